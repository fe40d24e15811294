//! One CPU for the restorer and the process it rebuilds, during a `--lazy`
//! restore.
//!
//! Rebuilding a process is some 130 remote system calls, each two ptrace
//! stops: each a hand-off from us to the child and back. With the two on
//! different CPUs every hand-off wakes the other CPU (an interrupt, costly
//! in a VM); on one CPU it is a switch between two tasks. `--lazy`'s time
//! to running is mostly these hand-offs: pinned, the rebuild took ~8 ms
//! rather than ~11 (1 GiB, medians of 10). Eager restores are not pinned:
//! they fill memory with both cores (see `memory::fill`); what a `--lazy`
//! restore still fills before the process runs (shared or file-backed
//! memory, compressed runs) is filled on the one CPU.
//!
//! The child inherits the pin, and so do the threads and processes it
//! makes; each gets our own mask back before it runs ([`Pin::release`]),
//! which is what it would have had otherwise (it is our fork).

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use tracing::{debug, warn};

/// The calling thread pinned to the CPU it ran on, with `child`; our own
/// mask comes back when this is dropped.
pub struct Pin {
    ours: CpuSet,
}

impl Pin {
    /// Pin the calling thread and `child` to the CPU we are on. None (and
    /// nothing changed) if that cannot be done.
    pub fn new(child: i32) -> Option<Pin> {
        let ours = sched_getaffinity(Pid::from_raw(0)).ok()?;
        // SAFETY: sched_getcpu takes nothing and returns a CPU number or -1.
        let cpu = unsafe { libc::sched_getcpu() };
        let mut one = CpuSet::new();
        one.set(usize::try_from(cpu).ok()?).ok()?;
        sched_setaffinity(Pid::from_raw(child), &one).ok()?;
        if sched_setaffinity(Pid::from_raw(0), &one).is_err() {
            let _ = sched_setaffinity(Pid::from_raw(child), &ours);
            return None;
        }
        debug!(cpu, child, "restorer and child pinned to one CPU");
        Some(Pin { ours })
    }

    /// Give every task in `tids` (all made while pinned) our own mask.
    pub fn release(&self, tids: impl IntoIterator<Item = i32>) {
        for tid in tids {
            if let Err(e) = sched_setaffinity(Pid::from_raw(tid), &self.ours) {
                warn!(tid, error = %e, "could not unpin a restored thread from one CPU");
            }
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &self.ours) {
            warn!(error = %e, "could not unpin the restorer from one CPU");
        }
    }
}
