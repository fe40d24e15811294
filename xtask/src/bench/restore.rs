//! `cargo xtask bench-restore`: restore time, eager and `--lazy`, against
//! what this machine can do, at several sizes.
//!
//! Restoring memory is allocating fresh pages and copying into them, so
//! each round measures, next to the restores: the first touch of the same
//! number of fresh anonymous bytes, memcpy over touched memory, and `dd`
//! of the same bytes into the image's directory (issue 12 gives CRIU's
//! restore as a multiple of that dd: 2.64× at 64 MiB, 1.72× at 1 GiB,
//! 1.37× at 4 GiB; the goal is 0.7× CRIU). Rounds alternate eager and lazy
//! restores; medians are printed.
//!
//! Eager: the wall time of `chpox restore --detach` until it returns (the
//! process runs, every page in). Lazy: the wall time of `chpox restore
//! --detach --lazy` (time to running), and until its page server ends, all
//! pages in (time to fully resident), both from the start of the command.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{dd_secs, first_touch_gbps, median, memcpy_gbps, release_bin};

/// CRIU's restore wall over dd's, from issue 12's table, by MiB.
fn criu_over_dd(mib: u64) -> Option<f64> {
    match mib {
        64 => Some(0.066 / 0.025),
        1024 => Some(0.55 / 0.32),
        4096 => Some(3.7 / 2.7),
        _ => None,
    }
}

/// A process killed (and reaped, if ours) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions; ESRCH is fine.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Kill `pid` and wait until its memory is given back (it is a zombie or
/// gone): the kernel frees a killed process's pages in its exit, on a CPU,
/// and a restore timed meanwhile would share the two cores with freeing
/// the previous copy (at 4 GiB that alone added ~25 ms to `--lazy`'s time
/// to running).
fn kill_and_wait(pid: i32) {
    kill(pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        // "PID (comm) STATE ...": the state follows the last ')'.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if matches!(state, Some("Z" | "X") | None) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `mempattern MIB`, dumped into `image` and killed.
fn dumped_mempattern(mib: u64, image: &Path) -> Result<()> {
    let mut child = Command::new(release_bin("mempattern"))
        .arg(mib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start mempattern; run `cargo build --release -p chpox-tests`")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let target = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("READY") {
        bail!("mempattern did not get ready: {line:?}");
    }
    let _ = std::fs::remove_file(image);
    let out = Command::new(release_bin("chpox"))
        .args(["dump", &target.0.id().to_string(), "-o"])
        .arg(image)
        // Killed once saved: its memory is not needed beside the image and
        // the restored copies.
        .args(["--unsupported-fd", "null", "--kill"])
        .output()
        .context("cannot run chpox dump")?;
    if !out.status.success() {
        bail!(
            "chpox dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Text without its ANSI colour sequences.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Restored {
    pid: i32,
    /// Seconds from the start of the command until it returned.
    running: f64,
    /// With --lazy: seconds from the start until the page server ended.
    resident: Option<f64>,
    /// With --lazy: the restore's steps as it logged them (`restore::phases`),
    /// with their milliseconds.
    steps: Vec<(String, f64)>,
}

/// The `restore step` lines of a log: each step's name and milliseconds.
fn steps(log: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains("restore step")) {
        let Some(at) = line.find("step=") else {
            continue;
        };
        let rest = &line[at + 5..];
        let name = match rest.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next().unwrap_or_default(),
            None => rest.split_whitespace().next().unwrap_or_default(),
        };
        let took = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("took_us="))
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(us) = took {
            out.push((name.to_string(), us / 1e3));
        }
    }
    out
}

/// `chpox restore --detach --pid any [--lazy] image`, timed.
fn restore(image: &Path, lazy: bool) -> Result<Restored> {
    let err_path = image.with_extension("restore-err");
    let out_path = image.with_extension("restore-out");
    let t = Instant::now();
    let mut cmd = Command::new(release_bin("chpox"));
    cmd.args(["restore", "--detach", "--pid", "any"]);
    if lazy {
        // -v: the page server says when every page is in; the steps of the
        // restore with their times.
        cmd.args(["--lazy", "-v"])
            .env("CHPOX_LOG", "info,chpox::restore::phases=debug");
    }
    let status = cmd
        .arg(image)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .status()
        .context("cannot run chpox restore")?;
    let running = t.elapsed().as_secs_f64();
    let printed = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if !status.success() {
        bail!(
            "chpox restore failed: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    let pid: i32 = printed
        .trim()
        .parse()
        .with_context(|| format!("chpox restore printed {printed:?}, not a PID"))?;
    let mut steps_seen = Vec::new();
    let resident = if lazy {
        // The page server logs when every page is in, and ends (its exit
        // is no good as a mark: PID 1 may reap it a second later).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = plain(&std::fs::read_to_string(&err_path).unwrap_or_default());
            if log.contains("every page is in") {
                break;
            }
            if log.contains("ERROR") || Instant::now() > deadline {
                kill(pid);
                bail!("the page server did not fill every page: {log}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let resident = t.elapsed().as_secs_f64();
        steps_seen = steps(&plain(
            &std::fs::read_to_string(&err_path).unwrap_or_default(),
        ));
        Some(resident)
    } else {
        None
    };
    let _ = std::fs::remove_file(&err_path);
    // mempattern checks its memory as it runs and exits 3 on a wrong word.
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("the restored process {pid} died");
    }
    Ok(Restored {
        pid,
        running,
        resident,
        steps: steps_seen,
    })
}

#[derive(Default)]
struct Samples {
    eager: Vec<f64>,
    lazy_running: Vec<f64>,
    lazy_resident: Vec<f64>,
    touch: Vec<f64>,
    memcpy: Vec<f64>,
    dd: Vec<f64>,
    /// Milliseconds of each step of the lazy restores, in their order.
    lazy_steps: Vec<(String, Vec<f64>)>,
}

/// One size: `rounds` of eager and lazy restores, alternating, each next
/// to the bounds.
fn measure(mib: u64, rounds: usize, dir: &Path) -> Result<Samples> {
    let image = super::bench_file(dir, &format!("restore-{mib}.img"));
    dumped_mempattern(mib, &image)?;
    let bytes = mib << 20;
    let mut s = Samples::default();
    let result = (|| -> Result<()> {
        for round in 0..rounds {
            for lazy in if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                let r = restore(&image, lazy)?;
                kill_and_wait(r.pid);
                match r.resident {
                    Some(resident) => {
                        s.lazy_running.push(r.running);
                        s.lazy_resident.push(resident);
                        for (name, ms) in r.steps {
                            match s.lazy_steps.iter_mut().find(|(n, _)| *n == name) {
                                Some((_, v)) => v.push(ms),
                                None => s.lazy_steps.push((name, vec![ms])),
                            }
                        }
                    }
                    None => s.eager.push(r.running),
                }
            }
            // Both bounds as the seconds their rate gives for these bytes.
            s.touch
                .push(bytes as f64 / (first_touch_gbps(bytes as usize) * 1e9));
            s.memcpy.push(bytes as f64 / (memcpy_gbps() * 1e9));
            s.dd.push(dd_secs(dir, bytes)?);
            eprintln!(
                "{mib} MiB round {}: eager {:.3} s, lazy running {:.1} ms / resident {:.3} s, first touch {:.3} s, dd {:.3} s",
                round + 1,
                s.eager[round],
                s.lazy_running[round] * 1e3,
                s.lazy_resident[round],
                s.touch[round],
                s.dd[round]
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&image);
    result.map(|()| s)
}

/// Restore benchmark at each of `sizes` MiB, `rounds` rounds each.
pub fn run(sizes: &[u64], rounds: usize, dir: &Path) -> Result<()> {
    let mut rows = Vec::new();
    for &mib in sizes {
        rows.push((mib, measure(mib, rounds.max(1), dir)?));
    }
    println!(
        "restore benchmark: mempattern, image in {}, {rounds} rounds (medians; times in s unless ms)",
        dir.display()
    );
    println!(
        "  {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "MiB",
        "eager",
        "touch",
        "memcpy",
        "dd",
        "eager/tch",
        "eager/dd",
        "goal e/dd",
        "lazy run",
        "lazy res"
    );
    for (mib, s) in &rows {
        let (eager, touch, dd) = (
            median(s.eager.clone()),
            median(s.touch.clone()),
            median(s.dd.clone()),
        );
        let goal = criu_over_dd(*mib).map_or("-".to_string(), |r| format!("{:.2}", 0.7 * r));
        println!(
            "  {:>6} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.2} {:>10.2} {:>10} {:>8.1}ms {:>9.3}",
            mib,
            eager,
            touch,
            median(s.memcpy.clone()),
            dd,
            eager / touch,
            eager / dd,
            goal,
            median(s.lazy_running.clone()) * 1e3,
            median(s.lazy_resident.clone()),
        );
    }
    println!(
        "  eager/tch: eager restore over first touch of the same bytes; goal e/dd: 0.7 × CRIU's restore/dd of issue 12"
    );
    println!("  lazy run: --lazy until the process runs; lazy res: until every page is in");
    for (mib, s) in &rows {
        println!(
            "  {mib} MiB: lazy fully resident / first touch {:.2}",
            median(s.lazy_resident.clone()) / median(s.touch.clone())
        );
    }
    for (mib, s) in &rows {
        let parts: Vec<String> = s
            .lazy_steps
            .iter()
            .map(|(name, v)| format!("{name} {:.1}", median(v.clone())))
            .collect();
        let inside: f64 = s.lazy_steps.iter().map(|(_, v)| median(v.clone())).sum();
        println!(
            "  {mib} MiB --lazy to running, median ms per step: {}; steps {inside:.1} of {:.1} (the rest: exec, start-up, exit)",
            parts.join(", "),
            median(s.lazy_running.clone()) * 1e3
        );
    }
    Ok(())
}
