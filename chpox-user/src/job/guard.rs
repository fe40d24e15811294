//! The job must not outlive `chpox job`: killed (SIGKILL cannot be caught),
//! it would leave the job running unwatched, and the next `chpox job` would
//! restore it a second time beside it. `PR_SET_PDEATHSIG` reaches one
//! process, and once it has killed the job's root, the root's children are
//! orphans nobody can find as the job's any more.
//!
//! So a small guard process, forked before anything else, holds the read
//! end of a pipe whose only write end is ours. We tell it the job's root
//! (PID and start time); when the pipe ends — we are gone, however — it
//! stops the root and every descendant it still has (stopped, they cannot
//! fork any more), kills them all and exits. When we end normally the job
//! has ended before us, and the guard finds nothing to kill. It ignores
//! the signals a terminal or a batch system sends a whole job, so it is
//! there when it is needed; SIGKILL ends it like any process.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{JobError, sys};

/// Our end of the guard's pipe.
pub struct Guard {
    tell: std::fs::File,
}

impl Guard {
    /// Fork the guard. Call before any thread is started: the child runs
    /// Rust code (reading /proc), which is only sound after a fork of a
    /// single-threaded process. `close` are descriptors the guard must not
    /// hold (the image's lock).
    pub fn spawn(close: &[RawFd]) -> Result<Guard, JobError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        // SAFETY: the caller guarantees we are single-threaded, so the child
        // may run ordinary code; it never returns from `watch`.
        match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
            nix::unistd::ForkResult::Child => {
                drop(write);
                for &fd in close {
                    // SAFETY: closing a descriptor number we own a copy of.
                    unsafe { libc::close(fd) };
                }
                watch(read)
            }
            nix::unistd::ForkResult::Parent { .. } => Ok(Guard {
                tell: std::fs::File::from(write),
            }),
        }
    }

    /// From now on the guard kills `root` (if it still is the same
    /// process) and its descendants when we are gone.
    pub fn guard(&mut self, root: i32) {
        let Some(start) = start_time(root) else {
            return;
        };
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&root.to_ne_bytes());
        msg[4..].copy_from_slice(&start.to_ne_bytes());
        // Best effort: without a guard the job is still ours while we live.
        let _ = self.tell.write_all(&msg);
    }
}

/// The guard's life: wait for the pipe to end, then kill what it was told.
fn watch(read: OwnedFd) -> ! {
    // SAFETY: setting dispositions to SIG_IGN and naming the thread touch
    // no memory of ours but the name.
    unsafe {
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            super::CHECKPOINT_SIGNAL,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"chpox-guard".as_ptr() as libc::c_ulong);
        // `chpox job` blocks the signals it reads from a signalfd.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    let fd = read.as_raw_fd();
    let mut root: Option<(i32, u64)> = None;
    loop {
        let mut msg = [0u8; 12];
        // SAFETY: reading into a local buffer of the length given.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), msg.len()) };
        if n == 12 {
            let pid = i32::from_ne_bytes(msg[..4].try_into().unwrap_or_default());
            let start = u64::from_ne_bytes(msg[4..].try_into().unwrap_or_default());
            root = Some((pid, start));
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break;
    }
    if let Some((pid, start)) = root
        && start_time(pid) == Some(start)
    {
        kill_job(pid);
    }
    // SAFETY: ends this process without running the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

/// Stop the tree under `root` until no new process appears, then kill it.
fn kill_job(root: i32) {
    let mut seen: Vec<i32> = Vec::new();
    for _ in 0..100 {
        let now = crate::tree::descendants_now(root);
        let new: Vec<i32> = now.iter().copied().filter(|p| !seen.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        for &p in &new {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGSTOP);
        }
        seen.extend(new);
    }
    for &p in &seen {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// The start time of `pid` (clock ticks since boot), which tells a process
/// from a later one with the same PID.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; fields after the command's closing parenthesis start at 3.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}
