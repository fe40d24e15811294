//! `cargo xtask bench`: dump throughput against what this machine can do.
//!
//! A VM hands out fresh pages slowly, and writing an image into tmpfs is
//! mostly allocating pages, so raw MB/s says little across machines. Each
//! round therefore also measures, right next to the dump: `dd` of the same
//! number of bytes into the same directory, the first-touch rate of new
//! anonymous memory, and memcpy over memory already touched. Rounds
//! alternate the measurements and medians are reported, because timings
//! here scatter 2–3x between runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

fn release_bin(name: &str) -> std::path::PathBuf {
    workspace_root().join("target/release").join(name)
}

struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_mempattern(mib: u64) -> Result<(Target, i32)> {
    let mut child = Command::new(release_bin("mempattern"))
        .arg(mib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start mempattern; run `cargo build --release -p chpox-tests`")?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("no stdout")?;
    let target = Target(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("READY") {
        bail!("mempattern did not get ready: {line:?}");
    }
    Ok((target, pid))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

/// memcpy over buffers that are already touched: the copy itself.
fn memcpy_gbps() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![2u8; len];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    (4 * len) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Writing to freshly mapped anonymous memory: page faults and zeroing.
fn first_touch_gbps(bytes: usize) -> f64 {
    let t = Instant::now();
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    // SAFETY: capacity is `bytes`; write_bytes initialises all of it before
    // set_len makes it visible.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0x5a, bytes);
        v.set_len(bytes);
    }
    std::hint::black_box(&v);
    let secs = t.elapsed().as_secs_f64();
    drop(v);
    bytes as f64 / secs / 1e9
}

/// `dd` of `bytes` into a new file in `dir`.
fn dd_secs(dir: &Path, bytes: u64) -> Result<f64> {
    let file = dir.join("chpox-bench-dd");
    let _ = std::fs::remove_file(&file);
    let count = bytes.div_ceil(8 << 20);
    let t = Instant::now();
    let status = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=8M",
            &format!("count={count}"),
            "status=none",
        ])
        .status()
        .context("cannot run dd")?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    if !status.success() {
        bail!("dd into {} failed", dir.display());
    }
    Ok(secs)
}

struct DumpSample {
    total: f64,
    frozen: f64,
    image_bytes: u64,
    resident_bytes: u64,
    stored_bytes: u64,
}

/// Restore `image` as a new process and return the wall time until it runs
/// (validation with every checksum, address space, pages, threads). The
/// restored copy is killed right after.
fn restore_once(image: &Path) -> Result<f64> {
    // The target's stdout was a pipe to us, so the restored copy is handed
    // chpox restore's own stdout: a file, not a pipe whose end would never
    // come while the copy runs.
    let printed = image.with_extension("restore-out");
    let stdout = std::fs::File::create(&printed)
        .with_context(|| format!("cannot create {}", printed.display()))?;
    let t = Instant::now();
    let out = Command::new(release_bin("chpox"))
        .args(["restore", "--pid", "any", "--detach"])
        .arg(image)
        .stdout(stdout)
        .output()
        .context("cannot run chpox restore")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "chpox restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let printed_text = std::fs::read_to_string(&printed).unwrap_or_default();
    let _ = std::fs::remove_file(&printed);
    let pid = printed_text
        .split_whitespace()
        .find_map(|w| w.parse::<i32>().ok())
        .context("chpox restore --detach printed no PID")?;
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    Ok(secs)
}

fn dump_once(pid: i32, image: &Path) -> Result<DumpSample> {
    let _ = std::fs::remove_file(image);
    let out = Command::new(release_bin("chpox"))
        .args(["dump", &pid.to_string(), "-o"])
        .arg(image)
        // Descriptors the target inherited from cargo (its jobserver pipe)
        // are not what is measured.
        .args(["--json", "--unsupported-fd", "null"])
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
    let secs = |k: &str| -> f64 {
        let d = &report[k];
        d["secs"].as_f64().unwrap_or(0.0) + d["nanos"].as_f64().unwrap_or(0.0) / 1e9
    };
    let num = |k: &str| report[k].as_u64().unwrap_or(0);
    Ok(DumpSample {
        total: secs("total"),
        frozen: secs("frozen"),
        image_bytes: num("image_bytes"),
        resident_bytes: num("resident_bytes"),
        stored_bytes: num("pages_stored") * 4096,
    })
}

pub fn run(mib: u64, rounds: usize, dir: &Path) -> Result<()> {
    let bytes = mib << 20;
    let (_target, pid) = spawn_mempattern(mib)?;
    let image = dir.join("chpox-bench.img");
    let (mut memcpy, mut touch, mut dd, mut dumps) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Alternate the order so drift in the VM does not favour one side.
        if round % 2 == 0 {
            dumps.push(dump_once(pid, &image)?);
            dd.push(dd_secs(dir, bytes)?);
        } else {
            dd.push(dd_secs(dir, bytes)?);
            dumps.push(dump_once(pid, &image)?);
        }
        memcpy.push(memcpy_gbps());
        touch.push(first_touch_gbps(bytes as usize));
        eprintln!(
            "round {}: dump {:.3} s (frozen {:.3} s), dd {:.3} s",
            round + 1,
            dumps[round].total,
            dumps[round].frozen,
            dd[round]
        );
    }
    // Restore the last image, alternating with first-touch measurements:
    // restoring is mostly filling fresh anonymous memory.
    let mut restores = Vec::new();
    for _ in 0..rounds {
        restores.push(restore_once(&image)?);
        touch.push(first_touch_gbps(bytes as usize));
    }
    let _ = std::fs::remove_file(&image);
    let total = median(dumps.iter().map(|d| d.total).collect());
    let frozen_med = median(dumps.iter().map(|d| d.frozen).collect());
    let frozen_p99 = percentile(dumps.iter().map(|d| d.frozen).collect(), 0.99);
    let stored = dumps[0].stored_bytes as f64;
    let dd_med = median(dd);
    let memcpy_med = median(memcpy);
    let touch_med = median(touch);
    let dump_gbps = stored / total / 1e9;
    println!(
        "dump benchmark: {mib} MiB dirty anonymous memory, image in {}, {rounds} rounds (medians)",
        dir.display()
    );
    println!(
        "  dump total          {:8.3} s   {:6.2} GB/s of stored pages",
        total, dump_gbps
    );
    println!(
        "  target frozen       {:8.3} s   (max {:.3} s)",
        frozen_med, frozen_p99
    );
    println!(
        "  dd same bytes       {:8.3} s   {:6.2} GB/s",
        dd_med,
        bytes as f64 / dd_med / 1e9
    );
    println!("  first-touch memory  {:8.2} GB/s", touch_med);
    println!("  memcpy (touched)    {:8.2} GB/s", memcpy_med);
    println!(
        "  ratio dump time / dd time           {:6.2}",
        total / dd_med
    );
    println!(
        "  ratio dump rate / first-touch rate  {:6.2}",
        dump_gbps / touch_med
    );
    println!(
        "  ratio dump rate / memcpy rate       {:6.2}",
        dump_gbps / memcpy_med
    );
    // While frozen, the dump only copies pages into the image's page cache,
    // allocated beforehand: that is the rate to hold against memcpy.
    let frozen_gbps = stored / frozen_med / 1e9;
    println!(
        "  frozen-phase copy {:6.2} GB/s; ratio to memcpy {:6.2}",
        frozen_gbps,
        frozen_gbps / memcpy_med
    );
    let restore_med = median(restores);
    let restore_gbps = stored / restore_med / 1e9;
    println!(
        "  restore (to running) {:7.3} s   {:6.2} GB/s of stored pages",
        restore_med, restore_gbps
    );
    println!(
        "  ratio restore rate / first-touch {:6.2}; / memcpy {:6.2}",
        restore_gbps / touch_med,
        restore_gbps / memcpy_med
    );
    println!(
        "  image size / resident memory        {:6.3} ({} / {} bytes)",
        dumps[0].image_bytes as f64 / dumps[0].resident_bytes.max(1) as f64,
        dumps[0].image_bytes,
        dumps[0].resident_bytes
    );
    Ok(())
}

/// Kills and reaps a helper process when the benchmark ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SIGTERM first so the agent removes its socket.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Latency from the trigger signal to a frozen target, over `triggers`
/// checkpoints of a small registered process, through the real agent and
/// eBPF program. `chpox checkpoint` has the agent send the signal and
/// reports the tracepoint-to-frozen time the agent measured.
pub fn trigger_latency(triggers: usize) -> Result<()> {
    let run_dir = std::env::temp_dir().join(format!("chpox-bench-{}", std::process::id()));
    let images = Path::new("/dev/shm").join(format!("chpox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&images)?;
    let log = std::fs::File::create(run_dir.with_extension("log"))?;
    let _agent = Reaped(
        Command::new(release_bin("chpox-agent"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--image-dir")
            .arg(&images)
            .stderr(log)
            .spawn()
            .context("cannot start chpox-agent")?,
    );
    let socket = run_dir.join("agent.sock");
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!(
                "chpox-agent did not start; see {}",
                run_dir.with_extension("log").display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let target = Reaped(
        Command::new(release_bin("chpox"))
            .env("CHPOX_RUN_DIR", &run_dir)
            .args(["run", "--"])
            .arg(release_bin("mempattern"))
            .arg("16")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start chpox run")?,
    );
    let pid = target.0.id().to_string();
    let (mut latency, mut frozen) = (Vec::new(), Vec::new());
    for _ in 0..triggers {
        let out = Command::new(release_bin("chpox"))
            .env("CHPOX_RUN_DIR", &run_dir)
            .args(["checkpoint", &pid, "--json", "--timeout", "30"])
            .output()?;
        if !out.status.success() {
            // The target may not be registered yet on the first round.
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        latency.push(reply["signal_to_frozen_us"].as_f64().unwrap_or(0.0) / 1e3);
        frozen.push(reply["frozen_us"].as_f64().unwrap_or(0.0) / 1e3);
    }
    let _ = std::fs::remove_dir_all(&images);
    if latency.is_empty() {
        bail!(
            "no checkpoint succeeded; see {}",
            run_dir.with_extension("log").display()
        );
    }
    println!(
        "trigger latency: {} checkpoints of a 16 MiB process through chpox-agent",
        latency.len()
    );
    println!(
        "  tracepoint → frozen   median {:7.2} ms   p99 {:7.2} ms",
        median(latency.clone()),
        percentile(latency, 0.99)
    );
    println!(
        "  frozen for            median {:7.2} ms   p99 {:7.2} ms",
        median(frozen.clone()),
        percentile(frozen, 0.99)
    );
    Ok(())
}
