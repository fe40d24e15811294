//! The agent's checkpoints: a chpox-agent of the bench's own, and the
//! time from `kill -31` to frozen and frozen time of its checkpoints.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::{median, percentile, release_bin};

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

/// A chpox-agent of the benchmark's own (run directory returned, images
/// in /dev/shm), stopped when the returned guard is dropped. While one
/// runs, `chpox dump` reads frozen processes' state through its eBPF
/// `task` iterator instead of remote syscalls, as on a machine set up as
/// README says (`cargo xtask start` leaves an agent running).
pub fn start_agent(tag: &str) -> Result<BenchAgent> {
    let run_dir = std::env::temp_dir().join(format!("chpox-bench-{}-{tag}", std::process::id()));
    let images = Path::new("/dev/shm").join(format!("chpox-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&images)?;
    let log = std::fs::File::create(run_dir.with_extension("log"))?;
    let agent = Reaped(
        Command::new(release_bin("chpox-agent"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--image-dir")
            .arg(&images)
            // One image at a time in /dev/shm.
            .args(["--keep", "0", "--config", "/dev/null"])
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
    Ok(BenchAgent {
        agent: Some(agent),
        run_dir,
        images,
    })
}

/// A running [`start_agent`]; dropping it stops the agent and removes its
/// images.
pub struct BenchAgent {
    agent: Option<Reaped>,
    pub run_dir: std::path::PathBuf,
    images: std::path::PathBuf,
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        drop(self.agent.take());
        let _ = std::fs::remove_dir_all(&self.images);
    }
}

/// Latency from the trigger signal to a frozen target, over `triggers`
/// checkpoints of a small registered process, through the real agent and
/// eBPF program. `chpox checkpoint` has the agent send the signal and
/// reports the tracepoint-to-frozen time the agent measured.
pub fn trigger_latency(triggers: usize, writing_mib: u64) -> Result<()> {
    // The goal is a latency independent of the process's size.
    for mib in [16, 1024] {
        trigger_latency_of(triggers, mib, Job::Sleeping)?;
    }
    // And of the tree's: 8 processes of 2 MiB, whose children the agent
    // finds through the eBPF program's list, not a scan of /proc.
    trigger_latency_of(triggers, 2, Job::Tree(8))?;
    // A job that keeps writing its memory, checkpointed every second:
    // its increments are read before the freeze (`incremental::preread`).
    if writing_mib > 0 {
        trigger_latency_of(WRITING_CHECKPOINTS, writing_mib, Job::Writing)?;
    }
    Ok(())
}

/// Checkpoints of the writing job, one a second.
const WRITING_CHECKPOINTS: usize = 20;

/// What the agent checkpoints.
#[derive(Clone, Copy)]
enum Job {
    /// `mempattern`: fills its memory, then sleeps.
    Sleeping,
    /// `memtree` of this many processes.
    Tree(usize),
    /// `cowwriters`: 4 threads rewriting their quarter page after page
    /// (about 70 MB/s here), checkpointed every second.
    Writing,
}

/// `triggers` checkpoints through chpox-agent of a `mib` MiB process (or
/// of a tree of processes of `mib` MiB each): from the trigger's
/// tracepoint timestamp to the last thread stopped, and how long the
/// process stayed frozen.
fn trigger_latency_of(triggers: usize, mib: u64, job: Job) -> Result<()> {
    let agent = start_agent(&format!("{mib}"))?;
    let run_dir = agent.run_dir.clone();
    let mut command = Command::new(release_bin("chpox"));
    command
        .env("CHPOX_RUN_DIR", &run_dir)
        // Whatever descriptors the bench inherits are not the point.
        .args(["run", "--unsupported-fd=null", "--"]);
    match job {
        Job::Tree(procs) => command
            .arg(release_bin("memtree"))
            .args([procs.to_string(), mib.to_string()]),
        Job::Sleeping => command.arg(release_bin("mempattern")).arg(mib.to_string()),
        Job::Writing => {
            command
                .arg(release_bin("cowwriters"))
                .args(["4", &(mib / 4).max(1).to_string(), "200"])
        }
    };
    let target = Reaped(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start chpox run")?,
    );
    let pid = target.0.id().to_string();
    let (mut latency, mut frozen) = (Vec::new(), Vec::new());
    let (mut read_before, mut snapshots) = (Vec::new(), 0);
    let mut failures = 0;
    while latency.len() < triggers {
        if matches!(job, Job::Writing) {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let out = Command::new(release_bin("chpox"))
            .env("CHPOX_RUN_DIR", &run_dir)
            .args(["checkpoint", &pid, "--json", "--timeout", "60"])
            .output()?;
        if !out.status.success() {
            // The target may not be registered (or filled) yet.
            failures += 1;
            if failures > 100 {
                bail!(
                    "checkpoints keep failing: {}; see {}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    run_dir.with_extension("log").display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        latency.push(reply["signal_to_frozen_us"].as_f64().unwrap_or(0.0) / 1e3);
        frozen.push(reply["frozen_us"].as_f64().unwrap_or(0.0) / 1e3);
        read_before.push(reply["pages_read_before_freeze"].as_f64().unwrap_or(0.0) * 4096.0 / 1e6);
        snapshots += usize::from(reply["snapshots"].as_u64().unwrap_or(0) > 0);
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    match job {
        Job::Tree(procs) => println!(
            "trigger latency: {} checkpoints of a tree of {procs} processes of {mib} MiB through chpox-agent",
            latency.len()
        ),
        Job::Sleeping => println!(
            "trigger latency: {} checkpoints of a {mib} MiB process through chpox-agent",
            latency.len()
        ),
        Job::Writing => println!(
            "trigger latency: {} checkpoints, one a second, of a {mib} MiB job writing all the while through chpox-agent ({snapshots} snapshots; MB read before the freeze: median {:.1}, max {:.1})",
            latency.len(),
            median(read_before.clone()),
            max(&read_before)
        ),
    }
    println!(
        "  tracepoint → frozen   median {:7.2} ms   p99 {:7.2} ms   max {:7.2} ms",
        median(latency.clone()),
        percentile(latency.clone(), 0.99),
        max(&latency)
    );
    println!(
        "  frozen for            median {:7.2} ms   p99 {:7.2} ms   max {:7.2} ms",
        median(frozen.clone()),
        percentile(frozen.clone(), 0.99),
        max(&frozen)
    );
    Ok(())
}
