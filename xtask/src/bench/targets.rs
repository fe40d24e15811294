//! The processes the bench dumps: `mempattern` (one process) and
//! `memtree` (a tree), each killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::release_bin;

pub(super) struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn spawn_mempattern(mib: u64) -> Result<(Target, i32)> {
    let (child, pid) = start_mempattern(mib)?;
    Ok((Target(child), pid))
}

/// `mempattern` with `mib` MiB, once ready; the caller reaps it.
pub(super) fn start_mempattern(mib: u64) -> Result<(Child, i32)> {
    start_ready("mempattern", &[mib.to_string()])
}

/// `cowwriters`: `threads` threads each rewriting its own `mib` MiB page
/// after page, sleeping `pause_us` after each page, once ready (every
/// thread through its slice once).
pub(super) fn spawn_cowwriters(threads: u64, mib: u64, pause_us: u64) -> Result<(Target, i32)> {
    let args = [threads.to_string(), mib.to_string(), pause_us.to_string()];
    let (child, pid) = start_ready("cowwriters", &args)?;
    Ok((Target(child), pid))
}

/// The test program `name` with `args`, once it printed its READY line;
/// the caller reaps it.
fn start_ready(name: &str, args: &[String]) -> Result<(Child, i32)> {
    let mut child = Command::new(release_bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("cannot start {name}; run `cargo build --release -p chpox-tests`")
        })?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || !line.starts_with("READY") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{name} did not get ready: {line:?}");
    }
    Ok((child, pid))
}

/// When `pid` started (clock ticks since boot, `/proc/PID/stat` field 22):
/// with the PID, one process. `None` if there is no such process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last
    // ')'. Field 3 (state) comes first after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The processes of a tree, each known by PID and start time, so that a PID
/// another process has taken meanwhile is never signalled. Killed on drop.
pub(super) struct Tree {
    /// The root while it is our child: nobody else reaps it.
    root: Option<Child>,
    pub(super) members: Vec<(i32, u64)>,
}

impl Tree {
    /// Those of `pids` that exist now (not our children).
    pub(super) fn those_alive(pids: &[i32]) -> Tree {
        Tree {
            root: None,
            members: pids
                .iter()
                .filter_map(|&pid| Some((pid, start_time(pid)?)))
                .collect(),
        }
    }

    /// The processes `pids` as they are now, every one of which must exist.
    pub(super) fn identify(root: Option<Child>, pids: &[i32]) -> Result<Tree> {
        let mut tree = Tree {
            root,
            members: Vec::with_capacity(pids.len()),
        };
        for &pid in pids {
            let start =
                start_time(pid).with_context(|| format!("PID {pid} of the tree is gone"))?;
            tree.members.push((pid, start));
        }
        Ok(tree)
    }

    pub(super) fn pids(&self) -> Vec<i32> {
        self.members.iter().map(|&(pid, _)| pid).collect()
    }

    /// SIGKILL to every member that is still the same process, and reap the
    /// root if it is ours. Does not wait for the others.
    fn signal(&mut self) {
        for &(pid, start) in &self.members {
            if start_time(pid) == Some(start) {
                // SAFETY: kill has no memory-safety preconditions. Failure
                // (ESRCH) means it went in the meantime, which is the goal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(mut root) = self.root.take() {
            let _ = root.kill();
            let _ = root.wait();
        }
    }

    /// Kill the tree and wait until every PID of it is free: a tree is
    /// restored under its own PIDs only. The orphans are reaped by PID 1,
    /// which may take a second.
    pub(super) fn kill(&mut self) -> Result<()> {
        self.signal();
        let members = std::mem::take(&mut self.members);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left: Vec<i32> = members
                .iter()
                .map(|&(pid, _)| pid)
                .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PIDs {left:?} of a killed tree are still in use after 15 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.signal();
    }
}

/// `memtree`: `procs` processes with `mib` MiB of their own dirty memory
/// each, ready to be dumped.
pub(super) fn spawn_memtree(procs: usize, mib: u64) -> Result<Tree> {
    let mut child = Command::new(release_bin("memtree"))
        .args([procs.to_string(), mib.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start memtree; run `cargo build --release -p chpox-tests`")?;
    let stdout = child.stdout.take().context("no stdout")?;
    // Until the PIDs are known, the root alone is ours to kill; its children
    // exit by themselves once it is gone.
    let mut tree = Tree {
        root: Some(child),
        members: Vec::new(),
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let pids: Vec<i32> = line
        .strip_prefix("READY pids=")
        .and_then(|rest| rest.split_whitespace().next())
        .map(|list| list.split(',').filter_map(|p| p.parse().ok()).collect())
        .with_context(|| format!("memtree did not get ready: {line:?}"))?;
    if pids.len() != procs {
        bail!(
            "memtree reported {} processes, not {procs}: {line:?}",
            pids.len()
        );
    }
    Tree::identify(tree.root.take(), &pids)
}
