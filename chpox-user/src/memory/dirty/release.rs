//! Releasing write tracking off the caller's time.
//!
//! Closing a tracker's userfaultfd makes the kernel walk every tracked
//! page table and clear the protection it left (`userfaultfd_release`):
//! 25–45 ms per GiB here, which the process does not notice (it runs on
//! meanwhile) but a `chpox dump` that waits for it adds to its wall time
//! after the image is finished and durable (8 % of a 1 GiB dump that
//! takes 0.45 s). Closed in a thread, it would still be waited for: the
//! kernel releases what a process still holds when it exits, before its
//! parent learns of the exit. So the descriptors are handed to a process
//! of their own, which closes them, the last holder, and exits.
//!
//! A dump of the same process that starts before that walk ends finds
//! its mappings still registered and leaves them untracked (no pre-copy,
//! see [`Tracker::register`](super::Tracker)): slower, never wrong.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::Tracker;

/// Hand `trackers` to a process of their own that closes them (releasing
/// the tracking) and exits. The caller's descriptors are closed before
/// that process closes its own, so its close is the last, the one that
/// walks the page tables. If no such process can be made, the trackers
/// are released here, as a drop would.
pub fn release_elsewhere(trackers: Vec<Tracker>) {
    if trackers.is_empty() {
        return;
    }
    let uffds: Vec<RawFd> = trackers.iter().map(|t| t.uffd.as_raw_fd()).collect();
    let Ok((read_end, write_end)) = nix::unistd::pipe() else {
        drop(trackers);
        return;
    };
    let started = std::time::Instant::now();
    match fork_releaser(&uffds, &read_end) {
        Ok(()) => {
            tracing::debug!(
                trackers = uffds.len(),
                us = started.elapsed().as_micros() as u64,
                "write tracking handed to a process of its own to release"
            );
            // Ours first, then the pipe: the releaser closes its copies,
            // the last ones, once the pipe says ours are gone.
            drop(trackers);
            drop(read_end);
            drop(write_end);
        }
        Err(e) => {
            tracing::debug!(error = %e, "no process to release write tracking: released here");
            drop(trackers);
        }
    }
}

/// Make the releaser: a grandchild (its parent, our child, exits at once
/// and is reaped here, so nothing is left for us to reap later and it is
/// no child of ours), which keeps only `uffds` and `read_end` open, waits
/// for end of file on `read_end`, closes `uffds` and exits.
fn fork_releaser(uffds: &[RawFd], read_end: &OwnedFd) -> nix::Result<()> {
    let read_fd = read_end.as_raw_fd();
    let kept: Vec<u64> = uffds
        .iter()
        .chain([&read_fd])
        .map(|&fd| fd as u64)
        .collect();
    let spans = crate::fds::spans_closing_all_but(&kept);
    // SAFETY: the child of a multithreaded process may only make
    // async-signal-safe calls: it makes raw syscalls alone (`fork`,
    // `close_range`, `read`, `close`, `_exit`), with no allocation, lock
    // or Rust runtime code, on memory prepared before the fork (`spans`,
    // `uffds`).
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => unsafe { intermediate_child(&spans, uffds, read_fd) },
        nix::unistd::ForkResult::Parent { child } => {
            // The intermediate child exits right after its own fork.
            nix::sys::wait::waitpid(child, None)?;
            Ok(())
        }
    }
}

/// The intermediate child: fork the releaser and exit.
///
/// # Safety
/// Only after `fork` in the child: raw syscalls alone, then `_exit`.
unsafe fn intermediate_child(spans: &[(u64, u64)], uffds: &[RawFd], read_fd: RawFd) -> ! {
    // SAFETY: raw syscalls on our own descriptors and memory; this process
    // ends in `_exit` on every path, running no destructor.
    unsafe {
        if libc::syscall(libc::SYS_fork) == 0 {
            releaser(spans, uffds, read_fd);
        }
        libc::_exit(0)
    }
}

/// The releaser: every descriptor but `uffds` and `read_fd` closed
/// (`spans`: a pipe's write end it inherited, such as the caller's stdout
/// read by a shell's `$(…)`, must not be held open after the caller
/// exits), then the wait, then the close that releases.
///
/// # Safety
/// Only in a process forked from the caller: raw syscalls alone.
unsafe fn releaser(spans: &[(u64, u64)], uffds: &[RawFd], read_fd: RawFd) -> ! {
    // SAFETY: as in `intermediate_child`.
    unsafe {
        for &(first, last) in spans {
            libc::syscall(libc::SYS_close_range, first, last, 0);
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(read_fd, (&raw mut byte).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        for &fd in uffds {
            libc::close(fd);
        }
        libc::_exit(0)
    }
}
