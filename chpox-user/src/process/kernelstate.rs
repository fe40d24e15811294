//! What a frozen process would be asked with remote syscalls, read from the
//! kernel's own structures instead: dispositions, parent-death signal,
//! subreaper flag, brk, dumpable, THP switch, itimers, and each thread's
//! alternate stack and `clear_child_tid`; with them what /proc would
//! otherwise be read for while frozen (personality, resource limits,
//! oom_score_adj, each thread's seccomp mode).
//!
//! Each remote syscall makes the frozen process run, which costs two ptrace
//! stops and about 25 µs of our CPU time here; a Rust program takes 14 of
//! them, and a tree of 8 spent 2.9 ms of its 6.7 ms freeze on them. The
//! trigger side's eBPF `task` iterator copies the same kernel fields for a
//! whole process in one read ([`KernelState`]); this module turns them into
//! what the syscalls would have returned, as the kernel computes it.
//!
//! Where the copy cannot say for sure, the remote syscalls run as before
//! ([`apply`] returns `None`): an itimer that may be armed, a POSIX timer,
//! locked memory (only a fresh mapping tells `mlockall(MCL_FUTURE)`), a
//! THP bit whose meaning depends on the kernel version, or a thread the
//! walk did not see.

use std::sync::Arc;

use crate::image::model::{AltStack, ProcessInfo, SigAction, ThreadState, Timers};

/// One thread, as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadFields {
    pub tid: i32,
    pub clear_child_tid: u64,
    pub sas_ss_sp: u64,
    pub sas_ss_size: u64,
    pub sas_ss_flags: u32,
    pub pdeath_signal: i32,
    /// `seccomp.mode`: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: i32,
    /// As `/proc/PID/task/TID/comm` shows it.
    pub comm: String,
}

/// One disposition, as the kernel holds it (`k_sigaction.sa`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionFields {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// One process, as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFields {
    pub threads: Vec<ThreadFields>,
    pub brk: u64,
    /// The first word of `mm_struct.flags`.
    pub mm_flags: u64,
    pub child_subreaper: bool,
    /// `signal_struct.real_timer`'s expiry and `it_real_incr`.
    pub real_expires: u64,
    pub real_incr: u64,
    /// `signal_struct.it`: (expires, incr) of ITIMER_PROF and ITIMER_VIRTUAL.
    pub cpu_itimers: [(u64, u64); 2],
    pub oom_score_adj: i32,
    pub personality: u32,
    /// Signals 1 to 64; empty if the leader's were not read.
    pub actions: Vec<ActionFields>,
    /// (soft, hard) of resources 0 to 15; empty if not read.
    pub rlimits: Vec<(u64, u64)>,
}

/// Reads a frozen process's [`ProcessFields`] (the trigger side's eBPF
/// iterator).
pub type ReadFields = dyn Fn(i32) -> std::io::Result<ProcessFields> + Send + Sync;

/// The source of [`ProcessFields`], handed to a dump in its options.
pub struct KernelState {
    read: Box<ReadFields>,
}

impl std::fmt::Debug for KernelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelState").finish_non_exhaustive()
    }
}

impl KernelState {
    pub fn new(read: Box<ReadFields>) -> Arc<KernelState> {
        Arc::new(KernelState { read })
    }

    /// The fields of frozen `pid`, or `None` (logged) when they cannot be
    /// read: the remote syscalls ask instead.
    pub fn read(&self, pid: i32) -> Option<ProcessFields> {
        match (self.read)(pid) {
            Ok(fields) => Some(fields),
            Err(e) => {
                tracing::debug!(pid, error = %e, "task iterator failed: remote syscalls ask");
                None
            }
        }
    }
}

/// The flags `rt_sigaction` reports: the kernel keeps bits of its own in
/// `sa_flags` and clears all but these (x86's `UAPI_SA_FLAGS`) on the way
/// out.
const UAPI_SA_FLAGS: u64 = 0x1 // SA_NOCLDSTOP
    | 0x2 // SA_NOCLDWAIT
    | 0x4 // SA_SIGINFO
    | 0x800 // SA_EXPOSE_TAGBITS
    | 0x0400_0000 // SA_RESTORER
    | 0x0800_0000 // SA_ONSTACK
    | 0x1000_0000 // SA_RESTART
    | 0x4000_0000 // SA_NODEFER
    | 0x8000_0000; // SA_RESETHAND

/// `MMF_DUMPABLE_MASK`: the low two bits of the mm flags, since 2.6.
const DUMPABLE_MASK: u64 = 0x3;
/// `MMF_DISABLE_THP` (`_COMPLETELY` since 6.18): prctl reports 1.
const THP_DISABLED_BIT: u64 = 1 << 24;
/// `MMF_DISABLE_THP_EXCEPT_ADVISED` since 6.18 (prctl reports 3), but
/// `MMF_HUGE_ZERO_PAGE` before: not to be read without the prctl.
const THP_AMBIGUOUS_BIT: u64 = 1 << 23;

/// `SS_ONSTACK`, `SS_DISABLE`, `SS_AUTODISARM`.
const SS_ONSTACK: u32 = 1;
const SS_DISABLE: u32 = 2;
const SS_AUTODISARM: u32 = 1 << 31;

/// What `prctl(PR_GET_THP_DISABLE)` would return, if the bits say it
/// whatever the kernel version.
fn thp_disable(mm_flags: u64) -> Option<u32> {
    if mm_flags & THP_DISABLED_BIT != 0 {
        Some(1)
    } else if mm_flags & THP_AMBIGUOUS_BIT != 0 {
        None
    } else {
        Some(0)
    }
}

/// What `sigaltstack(NULL, &old)` would return to a thread whose stack
/// pointer is `sp` (the kernel's `do_sigaltstack`), `None` for SS_DISABLE.
fn altstack(t: &ThreadFields, sp: u64) -> Option<AltStack> {
    let on_stack = t.sas_ss_flags & SS_AUTODISARM == 0
        && sp > t.sas_ss_sp
        && sp - t.sas_ss_sp <= t.sas_ss_size;
    let state = if t.sas_ss_size == 0 {
        SS_DISABLE
    } else if on_stack {
        SS_ONSTACK
    } else {
        0
    };
    let flags = state | (t.sas_ss_flags & SS_AUTODISARM);
    (flags & SS_DISABLE == 0).then_some(AltStack {
        sp: t.sas_ss_sp,
        flags: flags as i32,
        size: t.sas_ss_size,
    })
}

/// The name of thread `tid`, if the walk saw it.
pub fn comm(fields: &ProcessFields, tid: i32) -> Option<String> {
    fields
        .threads
        .iter()
        .find(|t| t.tid == tid)
        .map(|t| t.comm.clone())
}

/// Whether no thread of the process has a seccomp filter or strict mode:
/// then /proc and ptrace need not be asked for filters.
pub fn no_seccomp(fields: &ProcessFields, tids: &[i32]) -> bool {
    tids.iter().all(|tid| {
        fields
            .threads
            .iter()
            .any(|t| t.tid == *tid && t.seccomp_mode == 0)
    })
}

/// Fill in, from `fields`, what the remote syscalls would have: the
/// dispositions (returned), the parent-death signal, subreaper flag, brk,
/// timers, dumpable and THP switch of `info`, and each thread's alternate
/// stack and `clear_child_tid` (`thread_states`, in the order of `tids`);
/// and what /proc would have: personality, resource limits, oom_score_adj.
/// `status` is the process's /proc/PID/status and `posix_timers` whether
/// /proc/PID/timers lists any, both read while frozen. `None`, with
/// nothing changed, where a remote syscall must ask (see the module
/// documentation).
pub fn apply(
    fields: &ProcessFields,
    info: &mut ProcessInfo,
    tids: &[i32],
    thread_states: &mut [ThreadState],
    status: &str,
    posix_timers: bool,
) -> Option<Vec<SigAction>> {
    let pid = info.pid;
    let leader = fields.threads.iter().find(|t| t.tid == pid)?;
    if fields.actions.len() != 64
        || fields.rlimits.len() != super::RLIMIT_NAMES.len()
        || super::memory_locked(status)
        || posix_timers
        || fields.real_expires != 0
        || fields.real_incr != 0
        || fields.cpu_itimers.iter().any(|&(e, i)| e != 0 || i != 0)
    {
        return None;
    }
    let thp = thp_disable(fields.mm_flags)?;
    let per_thread = tids
        .iter()
        .zip(thread_states.iter())
        .map(|(tid, state)| {
            let t = fields.threads.iter().find(|t| t.tid == *tid)?;
            Some((altstack(t, state.regs.rsp), t.clear_child_tid))
        })
        .collect::<Option<Vec<_>>>()?;
    let not_default = super::signals::asked_dispositions(status);
    let actions = (1..=64i32)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .map(|signo| {
            let a = if not_default & (1 << (signo - 1)) != 0 {
                fields.actions[(signo - 1) as usize]
            } else {
                ActionFields::default()
            };
            SigAction {
                signo,
                handler: a.handler,
                flags: a.flags & UAPI_SA_FLAGS,
                restorer: a.restorer,
                mask: a.mask,
            }
        })
        .collect();
    info.pdeath_signal = leader.pdeath_signal;
    info.child_subreaper = fields.child_subreaper;
    info.mm.brk = fields.brk;
    info.timers = Timers::default();
    info.attrs.dumpable = Some((fields.mm_flags & DUMPABLE_MASK) as u32);
    info.attrs.thp_disable = thp;
    info.attrs.oom_score_adj = Some(fields.oom_score_adj);
    info.personality = fields.personality;
    info.rlimits = super::rlimits_from(&fields.rlimits);
    for (state, (altstack, clear_child_tid)) in thread_states.iter_mut().zip(per_thread) {
        state.sigaltstack = altstack;
        state.clear_child_tid = Some(clear_child_tid);
    }
    Some(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: i32) -> ThreadFields {
        ThreadFields {
            tid,
            clear_child_tid: 0x7f00_0000_1000 + tid as u64,
            sas_ss_sp: 0,
            sas_ss_size: 0,
            sas_ss_flags: 0,
            pdeath_signal: 0,
            seccomp_mode: 0,
            comm: "t".into(),
        }
    }

    #[test]
    fn the_thp_bits_are_read_only_where_every_kernel_agrees() {
        assert_eq!(thp_disable(0), Some(0));
        assert_eq!(thp_disable(DUMPABLE_MASK), Some(0));
        assert_eq!(thp_disable(THP_DISABLED_BIT), Some(1));
        assert_eq!(thp_disable(THP_DISABLED_BIT | THP_AMBIGUOUS_BIT), Some(1));
        assert_eq!(thp_disable(THP_AMBIGUOUS_BIT), None);
    }

    #[test]
    fn the_alternate_stack_reads_as_sigaltstack_reports_it() {
        let mut t = thread(1);
        assert_eq!(altstack(&t, 0x1000), None, "none set: SS_DISABLE");
        t.sas_ss_sp = 0x10_000;
        t.sas_ss_size = 0x4000;
        let off = altstack(&t, 0x7fff_0000).expect("set");
        assert_eq!((off.sp, off.size, off.flags), (0x10_000, 0x4000, 0));
        let on = altstack(&t, 0x12_000).expect("set");
        assert_eq!(on.flags, SS_ONSTACK as i32);
        // The top of the stack counts as on it, its bottom does not.
        assert_eq!(altstack(&t, 0x14_000).expect("set").flags, 1);
        assert_eq!(altstack(&t, 0x10_000).expect("set").flags, 0);
        t.sas_ss_flags = SS_AUTODISARM;
        let auto = altstack(&t, 0x12_000).expect("set");
        assert_eq!(
            auto.flags, SS_AUTODISARM as i32,
            "never on it with autodisarm"
        );
    }

    #[test]
    fn the_kernels_own_action_flags_are_not_reported() {
        // SA_IMMUTABLE (0x00800000) is the kernel's; SA_RESTART and
        // SA_SIGINFO are the process's.
        let kernel_only = 0x0080_0000;
        assert_eq!((kernel_only | 0x1000_0004) & UAPI_SA_FLAGS, 0x1000_0004);
    }

    #[test]
    fn anything_the_fields_cannot_say_leaves_it_to_the_remote_calls() {
        let mut fields = ProcessFields {
            threads: vec![thread(10), thread(11)],
            actions: vec![ActionFields::default(); 64],
            rlimits: vec![(u64::MAX, u64::MAX); 16],
            personality: 0x0040_0000,
            ..Default::default()
        };
        let status = "SigIgn:\t0000000000001000\nSigCgt:\t0000000000000000\nVmLck:\t0 kB\n";
        let sample = crate::image::testutil::sample_metadata();
        let mut info = sample.root.process.clone();
        info.pid = 10;
        let mut states = sample.root.threads.clone();
        states.truncate(2);
        states[0].tid = 10;
        states[1].tid = 11;
        let tids = [10, 11];
        assert!(apply(&fields, &mut info, &tids, &mut states, status, false).is_some());
        assert_eq!(states[1].clear_child_tid, Some(0x7f00_0000_1000 + 11));
        assert_eq!(info.personality, 0x0040_0000);
        assert_eq!(info.rlimits.len(), 16);
        assert_eq!(info.rlimits[7].name, "nofile");
        assert!(no_seccomp(&fields, &tids));
        let mut filtered = fields.clone();
        filtered.threads[1].seccomp_mode = 2;
        assert!(!no_seccomp(&filtered, &tids));
        let check = |f: &ProcessFields, status: &str, posix: bool| {
            let mut info = sample.root.process.clone();
            info.pid = 10;
            let mut states = states.clone();
            apply(f, &mut info, &tids, &mut states, status, posix).is_none()
        };
        assert!(check(&fields, status, true), "a POSIX timer");
        assert!(
            check(&fields, &status.replace("VmLck:\t0", "VmLck:\t8"), false),
            "locked memory"
        );
        fields.real_incr = 1;
        assert!(check(&fields, status, false), "an itimer");
        fields.real_incr = 0;
        fields.mm_flags = THP_AMBIGUOUS_BIT;
        assert!(check(&fields, status, false), "a THP bit of two meanings");
        fields.mm_flags = 0;
        fields.rlimits.clear();
        assert!(check(&fields, status, false), "no limits read");
        fields.rlimits = vec![(0, 0); 16];
        fields.threads.pop();
        assert!(check(&fields, status, false), "a thread the walk missed");
    }
}
