//! `cargo xtask bench`, incremental part: a registered process of N MiB
//! (4 GiB by default) checkpointed by the real agent, full, then after it
//! changed about 1 % of its pages (`memchurn` steps), incrementally; the
//! increment's wall time and size as fractions of the full checkpoint's
//! in the same round (goals: 5 % and 2 %), with `dd` of the full image's
//! bytes into the same directory beside them. A second increment (another
//! 1 %, so 2 % since the full image it builds on) shows what the design
//! costs as increments follow each other. The third checkpoint after the
//! full one is full again (`--full-every 3`), taken from the base: its
//! pause against the first full checkpoint's snapshot.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{dd_secs, median, release_bin};

/// Kills and reaps a helper process when the benchmark ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SIGTERM first so the agent removes its socket.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One checkpoint through the agent: client wall seconds, image bytes,
/// frozen ms.
fn checkpoint(run_dir: &Path, pid: i32, image: &Path) -> Result<(f64, u64, f64)> {
    let t = Instant::now();
    let out = Command::new(release_bin("chpox"))
        .env("CHPOX_RUN_DIR", run_dir)
        .args(["checkpoint", &pid.to_string(), "--json", "--timeout", "300"])
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "checkpoint failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bytes = std::fs::metadata(image)
        .with_context(|| format!("no image at {}", image.display()))?
        .len();
    Ok((
        secs,
        bytes,
        reply["frozen_us"].as_f64().unwrap_or(0.0) / 1e3,
    ))
}

/// Wait until `report` has `line`, while `churn` lives.
fn wait_line(churn: &mut Child, report: &Path, line: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !std::fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .any(|l| l == line)
    {
        if let Some(status) = churn.try_wait()? {
            bail!("memchurn ended ({status}) before {line:?}; out of memory? (see dmesg)");
        }
        if Instant::now() > deadline {
            bail!(
                "memchurn did not report {line:?}; see {}",
                report.with_file_name("").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    full: Vec<f64>,
    full_bytes: Vec<f64>,
    full_frozen: Vec<f64>,
    inc: Vec<f64>,
    inc_bytes: Vec<f64>,
    inc_frozen: Vec<f64>,
    inc2: Vec<f64>,
    inc2_bytes: Vec<f64>,
    from_base: Vec<f64>,
    from_base_frozen: Vec<f64>,
    dd: Vec<f64>,
}

/// The incremental part of the bench; prints its table.
pub fn run(mib: u64, rounds: usize, dir: &Path) -> Result<()> {
    let tag = format!("chpox-bench-incr-{}", std::process::id());
    let run_dir = std::env::temp_dir().join(&tag);
    let images = dir.join(&tag);
    std::fs::create_dir_all(&images)?;
    let log_path = run_dir.with_extension("log");
    let _agent = Reaped(
        Command::new(release_bin("chpox-agent"))
            .env(
                "CHPOX_LOG",
                std::env::var("CHPOX_LOG").unwrap_or_else(|_| "info".into()),
            )
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--image-dir")
            .arg(&images)
            .args(["--keep", "0", "--full-every", "0", "--config", "/dev/null"])
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("cannot start chpox-agent")?,
    );
    let socket = run_dir.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("chpox-agent did not start; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = images.join("memchurn.report");
    let mut target = Reaped(
        Command::new(release_bin("memchurn"))
            .arg(&report)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                run_dir.with_extension("memchurn.stderr"),
            )?)
            .spawn()
            .context("cannot start memchurn; run `cargo build --release -p chpox-tests`")?,
    );
    let pid = target.0.id() as i32;
    wait_line(&mut target.0, &report, "READY")?;
    let image = images.join("memchurn.chpox");
    let out = Command::new(release_bin("chpox"))
        .env("CHPOX_RUN_DIR", &run_dir)
        .args(["register", &pid.to_string(), "--unsupported-fd=null"])
        .args(["--full-every", "3", "-o"])
        .arg(&image)
        .output()?;
    if !out.status.success() {
        bail!(
            "register failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut s = Samples::default();
    let mut steps = 0;
    let mut step = |steps: &mut u32| -> Result<()> {
        *steps += 1;
        // SAFETY: a plain signal to our own child.
        if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
            bail!(
                "cannot signal memchurn: {}",
                std::io::Error::last_os_error()
            );
        }
        wait_line(&mut target.0, &report, &format!("STEP {steps}"))
    };
    for _ in 0..rounds {
        // No base left over: this checkpoint is full.
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(images.join("memchurn.chpox.base"));
        let (secs, bytes, frozen) = checkpoint(&run_dir, pid, &image)?;
        s.full.push(secs);
        s.full_bytes.push(bytes as f64);
        s.full_frozen.push(frozen);
        s.dd.push(dd_secs(&images, bytes)?);
        step(&mut steps)?;
        let (secs, bytes, frozen) = checkpoint(&run_dir, pid, &image)?;
        s.inc.push(secs);
        s.inc_bytes.push(bytes as f64);
        s.inc_frozen.push(frozen);
        step(&mut steps)?;
        let (secs, bytes, _) = checkpoint(&run_dir, pid, &image)?;
        s.inc2.push(secs);
        s.inc2_bytes.push(bytes as f64);
        step(&mut steps)?;
        let (secs, _, frozen) = checkpoint(&run_dir, pid, &image)?;
        s.from_base.push(secs);
        s.from_base_frozen.push(frozen);
    }
    drop(target);
    let _ = std::fs::remove_dir_all(&images);
    eprintln!("xtask: the agent's log is {}", log_path.display());
    let m = |v: &[f64]| median(v.to_vec());
    let (full, inc, inc2) = (m(&s.full), m(&s.inc), m(&s.inc2));
    let (fb, ib, i2b) = (m(&s.full_bytes), m(&s.inc_bytes), m(&s.inc2_bytes));
    println!(
        "incremental checkpoints: {mib} MiB process (memchurn), through chpox-agent, ~1 % of its pages changed before each increment; medians of {rounds}"
    );
    println!(
        "  full        wall {full:7.3} s   image {:9.1} MiB   frozen {:7.1} ms   (dd of the same bytes {:.3} s)",
        fb / 1048576.0,
        m(&s.full_frozen),
        m(&s.dd)
    );
    println!(
        "  increment   wall {inc:7.3} s   image {:9.1} MiB   frozen {:7.1} ms   wall {:5.1} % of full (goal ≤ 5 %), size {:5.2} % (goal ≤ 2 %)",
        ib / 1048576.0,
        m(&s.inc_frozen),
        100.0 * inc / full,
        100.0 * ib / fb
    );
    println!(
        "  2nd incr.   wall {inc2:7.3} s   image {:9.1} MiB   ({:5.1} % and {:5.2} % of full: 2 % changed since the full image)",
        i2b / 1048576.0,
        100.0 * inc2 / full,
        100.0 * i2b / fb
    );
    println!(
        "  full again  wall {:7.3} s   from the base (3 % changed since): frozen {:7.1} ms against the first's {:.1} ms",
        m(&s.from_base),
        m(&s.from_base_frozen),
        m(&s.full_frozen)
    );
    Ok(())
}
