//! `cargo xtask bench`: dump throughput against what this machine can do.
//!
//! A VM hands out fresh pages slowly, and writing an image into tmpfs is
//! mostly allocating pages, so raw MB/s says little across machines. Each
//! round therefore also measures, right next to the dump: `dd` of the same
//! number of bytes into the same directory, the first-touch rate of new
//! anonymous memory, and memcpy over memory already touched. Rounds
//! alternate the measurements and medians are reported, because timings
//! here scatter 2–3x between runs.
//!
//! The same is measured for a process tree (`memtree`: by default 8
//! processes × 128 MiB, as many bytes as the single 1 GiB process), which
//! `chpox dump` saves whole and `chpox restore` brings back whole: the
//! difference between the two is what the extra processes cost, in the
//! dump and while frozen. Each case is held against the bounds measured in
//! its own rounds, and the two are printed side by side at the end.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

mod agent;
mod bounds;
pub mod incremental;
pub mod restore;
mod sizes;
mod targets;
pub mod writing;

pub use agent::{start_agent, trigger_latency};
pub(crate) use bounds::{bench_file, dd_secs, first_touch_gbps, memcpy_gbps};
pub use sizes::{SizeOptions, run_size, size_table};
use targets::{Tree, spawn_mempattern, spawn_memtree, start_mempattern};

pub(crate) fn release_bin(name: &str) -> std::path::PathBuf {
    workspace_root().join("target/release").join(name)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

struct DumpSample {
    total: f64,
    frozen: f64,
    /// The brief second freeze in which the process reaps its snapshot.
    reap_pause: f64,
    /// The brief freeze before a pre-copy, attaching write tracking.
    precopy_pause: f64,
    image_bytes: u64,
    resident_bytes: u64,
    stored_bytes: u64,
    processes: usize,
    /// Processes whose state came from the kernel's structures.
    state_from_kernel: usize,
    /// Processes snapshotted (forked) rather than pre-copied.
    snapshots: u64,
    /// Pages written during a pre-copy and copied again before the
    /// freeze, and pages read while frozen.
    copied_again: u64,
    read_frozen: u64,
}

/// Run `chpox restore --detach image` with `args` and return the wall time
/// until it runs (validation with every checksum, address space, pages,
/// threads; for a tree, every process of it) and the PID it printed.
fn restore_image(image: &Path, args: &[&str]) -> Result<(f64, i32)> {
    // Where the target's stdout or stderr was a pipe to another process
    // (its stdout is one to us; its stderr is ours, a pipe under `| tee`),
    // the restored copy is handed chpox restore's own: files, not pipes
    // whose end would never come while the copy runs.
    let printed = image.with_extension("restore-out");
    let errors = image.with_extension("restore-err");
    let create = |p: &Path| {
        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
    };
    let (stdout, stderr) = (create(&printed)?, create(&errors)?);
    let t = Instant::now();
    let status = Command::new(release_bin("chpox"))
        .args(["restore", "--detach"])
        .args(args)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .context("cannot run chpox restore")?;
    let secs = t.elapsed().as_secs_f64();
    let printed_text = std::fs::read_to_string(&printed).unwrap_or_default();
    let error_text = std::fs::read_to_string(&errors).unwrap_or_default();
    let _ = std::fs::remove_file(&printed);
    let _ = std::fs::remove_file(&errors);
    if !status.success() {
        bail!("chpox restore failed: {error_text}");
    }
    let pid = printed_text
        .split_whitespace()
        .find_map(|w| w.parse::<i32>().ok())
        .context("chpox restore --detach printed no PID")?;
    Ok((secs, pid))
}

/// Restore `image` as a new process and return the wall time until it runs.
/// The restored copy is killed right after.
fn restore_once(image: &Path) -> Result<f64> {
    let (secs, pid) = restore_image(image, &["--pid", "any"])?;
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    Ok(secs)
}

/// Restore the tree in `image` under its PIDs `pids` (root first), which
/// must be free, and return the wall time until the whole tree runs. The
/// restored tree is killed, and its PIDs free again, on return.
fn restore_tree(image: &Path, pids: &[i32]) -> Result<f64> {
    let (secs, root) = restore_image(image, &[])?;
    // Whatever of the tree came back, so that it is killed also when the
    // check below fails.
    let mut restored = Tree::those_alive(pids);
    if root != pids[0] || restored.members.len() != pids.len() {
        bail!(
            "chpox restore brought back root {root} and {:?}, not the tree {pids:?}",
            restored.pids()
        );
    }
    restored.kill()?;
    Ok(secs)
}

/// `cargo xtask bench --no-precopy`: every dump without pre-copy (the
/// copy-on-write snapshot alone), to hold the two against each other.
pub static NO_PRECOPY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn dump_once(pid: i32, image: &Path) -> Result<DumpSample> {
    dump_with(pid, image, &[])
}

/// `chpox dump` with `extra` arguments (`--compress`, `--kill`).
fn dump_with(pid: i32, image: &Path, extra: &[&str]) -> Result<DumpSample> {
    let _ = std::fs::remove_file(image);
    let out = Command::new(release_bin("chpox"))
        .args(["dump", &pid.to_string(), "-o"])
        .arg(image)
        // Descriptors the target inherited from cargo (its jobserver pipe)
        // are not what is measured.
        .args(["--json", "--unsupported-fd", "null"])
        .args(extra)
        .args(
            NO_PRECOPY
                .load(std::sync::atomic::Ordering::Relaxed)
                .then_some("--no-precopy"),
        )
        .output()
        .context("cannot run chpox")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        bail!(
            "chpox dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // `dump --json` gives durations as integer microseconds, `*_us`.
    let secs = |k: &str| -> f64 { report[format!("{k}_us")].as_f64().unwrap_or(0.0) / 1e6 };
    let num = |k: &str| report[k].as_u64().unwrap_or(0);
    Ok(DumpSample {
        total: secs("total"),
        frozen: secs("frozen"),
        reap_pause: secs("reap_pause"),
        precopy_pause: secs("precopy_pause"),
        image_bytes: num("image_bytes"),
        resident_bytes: num("resident_bytes"),
        stored_bytes: num("pages_stored") * 4096,
        processes: num("processes") as usize,
        state_from_kernel: num("state_from_kernel") as usize,
        snapshots: num("snapshots"),
        copied_again: num("precopy_pages_copied_again"),
        read_frozen: num("precopy_pages_read_frozen"),
    })
}

/// Every sample of one case: a single process or a tree.
pub struct Case {
    /// `PROCESSES × MiB MiB`, the column head in [`compare`].
    label: String,
    /// Dirty bytes of all its processes together: what dd writes and
    /// first-touch fills next to it.
    bytes: u64,
    processes: usize,
    dumps: Vec<DumpSample>,
    restores: Vec<f64>,
    dd: Vec<f64>,
    memcpy: Vec<f64>,
    touch: Vec<f64>,
}

/// A case's medians, and the rates the ratios are made of.
struct Summary {
    processes: usize,
    total: f64,
    frozen: f64,
    frozen_p99: f64,
    /// The longest of the attach pauses of a pre-copy, median.
    attach: f64,
    restore: f64,
    stored: f64,
    dd: f64,
    memcpy: f64,
    touch: f64,
    /// Processes of the fewest in any dump whose state was read from the
    /// kernel's structures (an agent's iterator).
    from_kernel: usize,
}

impl Summary {
    fn dump_gbps(&self) -> f64 {
        self.stored / self.total / 1e9
    }

    /// While frozen, the dump only copies pages into the image's page
    /// cache, allocated beforehand: that is the rate to hold against memcpy.
    fn frozen_gbps(&self) -> f64 {
        self.stored / self.frozen / 1e9
    }

    fn restore_gbps(&self) -> f64 {
        self.stored / self.restore / 1e9
    }

    /// What each process adds to the freeze, on average.
    fn frozen_per_process(&self) -> f64 {
        self.frozen / self.processes.max(1) as f64
    }
}

impl Case {
    fn new(processes: usize, mib: u64) -> Case {
        Case {
            label: format!("{processes} × {mib} MiB"),
            bytes: processes as u64 * (mib << 20),
            processes,
            dumps: Vec::new(),
            restores: Vec::new(),
            dd: Vec::new(),
            memcpy: Vec::new(),
            touch: Vec::new(),
        }
    }

    /// `rounds` dumps of the process at `pid` (with its descendants), each
    /// next to a dd of the same bytes, a memcpy and a first-touch
    /// measurement.
    fn dump_rounds(&mut self, pid: i32, image: &Path, dir: &Path, rounds: usize) -> Result<()> {
        for round in 0..rounds {
            // Alternate the order so drift in the VM does not favour one side.
            let dump = if round % 2 == 0 {
                let dump = dump_once(pid, image)?;
                self.dd.push(dd_secs(dir, self.bytes)?);
                dump
            } else {
                self.dd.push(dd_secs(dir, self.bytes)?);
                dump_once(pid, image)?
            };
            // Fewer would be a dump of something else than measured here.
            if dump.processes != self.processes {
                bail!(
                    "the dump of PID {pid} saved {} processes, not {}",
                    dump.processes,
                    self.processes
                );
            }
            self.memcpy.push(memcpy_gbps());
            self.touch.push(first_touch_gbps(self.bytes as usize));
            eprintln!(
                "round {}: dump {:.3} s (frozen {:.3} s), dd {:.3} s",
                round + 1,
                dump.total,
                dump.frozen,
                self.dd[round]
            );
            self.dumps.push(dump);
        }
        Ok(())
    }

    /// Restore `rounds` times with `restore`, alternating with first-touch
    /// measurements: restoring is mostly filling fresh anonymous memory.
    fn restore_rounds(
        &mut self,
        rounds: usize,
        mut restore: impl FnMut() -> Result<f64>,
    ) -> Result<()> {
        for _ in 0..rounds {
            self.restores.push(restore()?);
            self.touch.push(first_touch_gbps(self.bytes as usize));
        }
        Ok(())
    }

    fn summary(&self) -> Summary {
        let frozen: Vec<f64> = self.dumps.iter().map(|d| d.frozen).collect();
        Summary {
            processes: self.processes,
            total: median(self.dumps.iter().map(|d| d.total).collect()),
            frozen: median(frozen.clone()),
            frozen_p99: percentile(frozen, 0.99),
            attach: median(self.dumps.iter().map(|d| d.precopy_pause).collect()),
            restore: median(self.restores.clone()),
            stored: self.dumps[0].stored_bytes as f64,
            dd: median(self.dd.clone()),
            memcpy: median(self.memcpy.clone()),
            touch: median(self.touch.clone()),
            from_kernel: self
                .dumps
                .iter()
                .map(|d| d.state_from_kernel)
                .min()
                .unwrap_or(0),
        }
    }

    /// The case's own report, under `heading`.
    fn print(&self, heading: &str) {
        let s = self.summary();
        println!("{heading}");
        println!(
            "  dump total          {:8.3} s   {:6.2} GB/s of stored pages",
            s.total,
            s.dump_gbps()
        );
        println!(
            "  target frozen       {:8.3} s   (max {:.3} s)",
            s.frozen, s.frozen_p99
        );
        if self.processes > 1 {
            println!(
                "  frozen per process  {:8.2} ms  ({} processes)",
                s.frozen_per_process() * 1e3,
                self.processes
            );
        }
        println!(
            "  dd same bytes       {:8.3} s   {:6.2} GB/s",
            s.dd,
            self.bytes as f64 / s.dd / 1e9
        );
        println!("  first-touch memory  {:8.2} GB/s", s.touch);
        println!("  memcpy (touched)    {:8.2} GB/s", s.memcpy);
        println!(
            "  ratio dump time / dd time           {:6.2}",
            s.total / s.dd
        );
        println!(
            "  ratio dump rate / first-touch rate  {:6.2}",
            s.dump_gbps() / s.touch
        );
        println!(
            "  ratio dump rate / memcpy rate       {:6.2}",
            s.dump_gbps() / s.memcpy
        );
        println!(
            "  frozen-phase copy {:6.2} GB/s; ratio to memcpy {:6.2}",
            s.frozen_gbps(),
            s.frozen_gbps() / s.memcpy
        );
        println!(
            "  restore (to running) {:7.3} s   {:6.2} GB/s of stored pages",
            s.restore,
            s.restore_gbps()
        );
        println!(
            "  ratio restore rate / first-touch {:6.2}; / memcpy {:6.2}",
            s.restore_gbps() / s.touch,
            s.restore_gbps() / s.memcpy
        );
        println!(
            "  image size / resident memory        {:6.3} ({} / {} bytes)",
            self.dumps[0].image_bytes as f64 / self.dumps[0].resident_bytes.max(1) as f64,
            self.dumps[0].image_bytes,
            self.dumps[0].resident_bytes
        );
    }
}

/// One process with `mib` MiB of dirty anonymous memory.
pub fn run(mib: u64, rounds: usize, dir: &Path) -> Result<Case> {
    let (_target, pid) = spawn_mempattern(mib)?;
    let image = bench_file(dir, "img");
    let mut case = Case::new(1, mib);
    case.dump_rounds(pid, &image, dir, rounds)?;
    // Restore the last image; a single process may take any PID, so the
    // original runs on meanwhile.
    case.restore_rounds(rounds, || restore_once(&image))?;
    let _ = std::fs::remove_file(&image);
    case.print(&format!(
        "dump benchmark: {mib} MiB dirty anonymous memory, image in {}, {rounds} rounds (medians)",
        dir.display()
    ));
    Ok(case)
}

/// A tree of `procs` processes with `mib` MiB of their own dirty anonymous
/// memory each, dumped whole from its root.
pub fn run_tree(procs: usize, mib: u64, rounds: usize, dir: &Path) -> Result<Case> {
    let mut tree = spawn_memtree(procs, mib)?;
    let pids = tree.pids();
    let image = bench_file(dir, "tree.img");
    let mut case = Case::new(procs, mib);
    case.dump_rounds(pids[0], &image, dir, rounds)?;
    // A tree comes back under its own PIDs only: the original goes first,
    // and each restored copy before the next restore.
    tree.kill()?;
    case.restore_rounds(rounds, || restore_tree(&image, &pids))?;
    let _ = std::fs::remove_file(&image);
    case.print(&format!(
        "tree benchmark: {procs} processes × {mib} MiB dirty anonymous memory ({} MiB), image in {}, {rounds} rounds (medians)",
        case.bytes >> 20,
        dir.display()
    ));
    Ok(case)
}

/// The cases side by side, each against the bounds of its own rounds.
pub fn compare(cases: &[&Case]) {
    let sums: Vec<Summary> = cases.iter().map(|c| c.summary()).collect();
    type Row = (&'static str, fn(&Summary) -> String);
    let rows: [Row; 14] = [
        ("processes", |s| s.processes.to_string()),
        ("state from the kernel", |s| {
            format!("{}/{}", s.from_kernel, s.processes)
        }),
        ("dump wall time        s", |s| format!("{:.3}", s.total)),
        ("frozen median        ms", |s| {
            format!("{:.2}", s.frozen * 1e3)
        }),
        ("frozen p99           ms", |s| {
            format!("{:.2}", s.frozen_p99 * 1e3)
        }),
        ("attach pause         ms", |s| {
            format!("{:.2}", s.attach * 1e3)
        }),
        ("frozen per process   ms", |s| {
            format!("{:.2}", s.frozen_per_process() * 1e3)
        }),
        ("restore (to running)  s", |s| format!("{:.3}", s.restore)),
        ("dump time / dd time", |s| format!("{:.2}", s.total / s.dd)),
        ("dump rate / first-touch", |s| {
            format!("{:.2}", s.dump_gbps() / s.touch)
        }),
        ("dump rate / memcpy", |s| {
            format!("{:.2}", s.dump_gbps() / s.memcpy)
        }),
        ("frozen copy / memcpy", |s| {
            format!("{:.2}", s.frozen_gbps() / s.memcpy)
        }),
        ("restore / first-touch", |s| {
            format!("{:.2}", s.restore_gbps() / s.touch)
        }),
        ("restore / memcpy", |s| {
            format!("{:.2}", s.restore_gbps() / s.memcpy)
        }),
    ];
    println!("single process and tree side by side (medians; ratios to each case's own bounds)");
    print!("  {:<25}", "");
    for c in cases {
        print!("{:>16}", c.label);
    }
    println!();
    for (name, cell) in rows {
        print!("  {name:<25}");
        for s in &sums {
            print!("{:>16}", cell(s));
        }
        println!();
    }
    if let [single, tree] = &sums[..] {
        println!(
            "  tree frozen / single frozen: {:.2} (median), {:.2} (p99)",
            tree.frozen / single.frozen,
            tree.frozen_p99 / single.frozen_p99
        );
    }
}
