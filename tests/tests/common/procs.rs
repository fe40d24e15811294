//! Processes as /proc shows them, and whole trees of them: for tests that
//! start process trees and must leave none behind.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(10);

/// The fields of `/proc/PID/stat` the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Start time in clock ticks since boot: with the PID, one incarnation.
    pub start: u64,
}

pub fn parse_stat(pid: i32, text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    Some(Stat {
        pid,
        comm: text[open + 1..close].to_string(),
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

/// `/proc/PID/stat`, or `None` if there is no such process.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

pub fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every process now.
pub fn all_stats() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// The processes among `roots` that exist, and all their descendants.
pub fn descendants_of(roots: &BTreeSet<i32>) -> BTreeSet<i32> {
    let all = all_stats();
    let mut found: BTreeSet<i32> = all
        .iter()
        .map(|s| s.pid)
        .filter(|p| roots.contains(p))
        .collect();
    loop {
        let before = found.len();
        for s in &all {
            if found.contains(&s.ppid) {
                found.insert(s.pid);
            }
        }
        if found.len() == before {
            return found;
        }
    }
}

/// `root` and all its descendants now.
pub fn tree_pids(root: i32) -> BTreeSet<i32> {
    descendants_of(&BTreeSet::from([root]))
}

/// `root` and its descendants, as `/proc` shows them now.
pub fn tree(root: i32) -> Vec<Stat> {
    tree_pids(root).into_iter().filter_map(stat).collect()
}

pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Sends `sig` to `pid` (a negative `pid`: a process group); whether it
/// went out.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Kills `root` and all its descendants with SIGKILL and returns their
/// PIDs. They are stopped first, walking down again until the walk finds
/// nothing new, so that none forks behind our back. Does not wait.
pub fn kill_tree(root: i32) -> BTreeSet<i32> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut roots = seen.clone();
        roots.insert(root);
        let new: Vec<i32> = descendants_of(&roots).difference(&seen).copied().collect();
        for &pid in &new {
            signal(pid, libc::SIGSTOP);
            seen.insert(pid);
        }
        // A process that is stopped (or dead) forks no more.
        while Instant::now() < deadline
            && seen
                .iter()
                .any(|&p| stat(p).is_some_and(|s| !matches!(s.state, 'T' | 't' | 'Z' | 'X')))
        {
            std::thread::sleep(POLL);
        }
        if new.is_empty() {
            break;
        }
    }
    for &pid in &seen {
        signal(pid, libc::SIGKILL);
    }
    seen
}

/// Kills, when dropped, the trees of processes it watches that are still
/// the same processes (PID and start time): the restored trees and what
/// the original roots left below them.
#[derive(Default)]
pub struct Guard(Vec<(i32, u64)>);

impl Guard {
    /// Watch `root` and all its descendants as they are now.
    pub fn watch_tree(&mut self, root: i32) {
        for s in tree(root) {
            self.0.push((s.pid, s.start));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut killed = BTreeSet::new();
        for &(pid, start) in &self.0 {
            if !killed.contains(&pid) && stat(pid).is_some_and(|s| s.start == start) {
                killed.extend(kill_tree(pid));
            }
        }
    }
}

/// Become a child subreaper, so restored processes whose restorer exited
/// (`restore --detach`) are ours to wait for.
pub fn become_subreaper() {
    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits for our child (or adopted orphan) `pid` to exit; returns its exit
/// code, or 128 + the signal that killed it.
pub fn wait_pid(pid: i32, timeout: std::time::Duration) -> i32 {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PID {pid} did not exit within {timeout:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `chpox restore --detach IMAGE [extra]`; returns the restored PID.
pub fn restore_detached(image: &std::path::Path, extra: &[&str]) -> i32 {
    let mut args = vec!["restore", "--detach", super::path_str(image)];
    args.extend_from_slice(extra);
    let out = super::chpox_ok(&args);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore printed {out:?}, not a PID: {e}"))
}
