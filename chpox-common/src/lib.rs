//! Types and constants shared by the chpox eBPF program and user space.
//!
//! Everything here must stay `no_std` and `#[repr(C)]`-plain, because the eBPF
//! side reads and writes the same bytes the agent does.
#![no_std]

/// The signal that triggers a checkpoint unless a registration names another.
/// 31 is SIGSYS on x86-64, the signal old chpox used.
pub const DEFAULT_TRIGGER_SIGNAL: u32 = 31;

/// Whether `signal` can trigger checkpoints: a real signal (1–64) that a
/// process can ignore, so not SIGKILL (9) or SIGSTOP (19).
pub const fn is_trigger_signal(signal: u32) -> bool {
    signal >= 1 && signal <= 64 && signal != 9 && signal != 19
}

/// How many processes can be registered at once (size of the BPF maps).
pub const MAX_REGISTRATIONS: u32 = 4096;

/// How many threads (other than leaders) of registered processes the
/// `THREADS` map (thread id → process id) can hold.
pub const MAX_THREADS: u32 = 65536;

/// How many processes of registered trees (descendants of processes
/// registered with their children, FLAGS 8) the `TREE` map can hold.
pub const MAX_TREE_MEMBERS: u32 = 65536;

/// `CLONE_THREAD`: a new task that is a thread of its creator's process.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// The FLAGS field of the old `PID:SIG:FLAGS:FILE` register line.
///
/// Old chpox gave these bits meaning; we keep them so existing scripts keep
/// their behaviour.
pub mod flags {
    /// Plain registration (value 1 in the old how-to's examples).
    pub const REGISTERED: u32 = 1;
    /// Put the executable itself into the image.
    pub const EMBED_EXE: u32 = 2;
    /// Put the libraries registered with `chpoxctl addlib` into the image.
    pub const EMBED_LIBS: u32 = 4;
    /// Also checkpoint the children of the process.
    pub const INCLUDE_CHILDREN: u32 = 8;
    /// Save established TCP connections in TCP repair mode
    /// (`--tcp-established`).
    pub const TCP_ESTABLISHED: u32 = 16;
    /// Restore established TCP connections reset (`--tcp-close`).
    pub const TCP_CLOSE: u32 = 32;
    /// Every bit we understand; anything else in a register line is an error.
    pub const KNOWN: u32 =
        REGISTERED | EMBED_EXE | EMBED_LIBS | INCLUDE_CHILDREN | TCP_ESTABLISHED | TCP_CLOSE;
}

/// Names of the maps and programs in the eBPF object.
pub mod names {
    pub const REGISTRY: &str = "REGISTRY";
    pub const THREADS: &str = "THREADS";
    /// Descendants of processes registered with their children: process
    /// id → the registered process (see the eBPF crate).
    pub const TREE: &str = "TREE";
    pub const STATES: &str = "STATES";
    pub const EVENTS: &str = "EVENTS";
    pub const SIGNAL_PROGRAM: &str = "chpox_signal_generate";
    pub const EXIT_PROGRAM: &str = "chpox_process_exit";
    pub const NEWTASK_PROGRAM: &str = "chpox_task_newtask";
    /// The BPF LSM guard on `task_kill` (see the eBPF crate).
    pub const GUARD_PROGRAM: &str = "chpox_task_kill";
    pub const GUARD_HOOK: &str = "task_kill";
    /// Watches registered processes changing their trigger signal's
    /// disposition (`syscalls/sys_enter_rt_sigaction`).
    pub const SIGACTION_PROGRAM: &str = "chpox_sigaction";
    /// Globals set at load time from the tracepoints' format files.
    pub const GLOBAL_SIGNAL_OFFSETS: &str = "SIGNAL_OFFSETS";
    pub const GLOBAL_EXIT_OFFSETS: &str = "EXIT_OFFSETS";
    pub const GLOBAL_NEWTASK_OFFSETS: &str = "NEWTASK_OFFSETS";
    /// Set from the kernel's BTF at load time.
    pub const GLOBAL_TASK_OFFSETS: &str = "TASK_OFFSETS";
    pub const VMA_FLAGS_PROGRAM: &str = "chpox_vma_flags";
    pub const GLOBAL_VMA_OFFSETS: &str = "VMA_OFFSETS";
    pub const GLOBAL_SIGACTION_OFFSETS: &str = "SIGACTION_OFFSETS";
    /// The kernel keeps 15 characters of a program's name, which others
    /// find it by (`trigger::bpf::iter::find_loaded`); `v1` is the layout
    /// of its records, to be raised with any change to them.
    pub const TASK_STATE_PROGRAM: &str = "chpox_tstate_v2";
    pub const GLOBAL_TASK_STATE_OFFSETS: &str = "TASK_STATE_OFFSETS";
}

/// Value of the `REGISTRY` hash map, keyed by the registered process's
/// tgid (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Registration {
    /// The signal that asks for a checkpoint.
    pub signal: u32,
    /// FLAGS of the old register line (see [`flags`]).
    pub flags: u32,
    /// Index into the `STATES` array for this registration.
    pub slot: u32,
    pub _pad: u32,
    /// Start time of the process (clock ticks since boot, field 22 of
    /// /proc/PID/stat): with the PID, it names one incarnation of the
    /// process, so a recycled PID is never checkpointed by mistake.
    pub start_time: u64,
}

/// Checkpoint state of one registration, in the `STATES` array.
///
/// The array is memory-mapped by the agent (`BPF_F_MMAPABLE`) so both sides
/// change `state` with real atomic compare-and-swap; a map update from user
/// space would race with the eBPF program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotState {
    /// One of the `STATE_*` values.
    pub state: u32,
    pub _pad: u32,
    /// Trigger signals seen for this registration, in all.
    pub signals: u64,
    /// Trigger signals that arrived while a checkpoint was already asked for
    /// and were folded into it.
    pub coalesced: u64,
    /// CLOCK_MONOTONIC when the state last became RUNNING_AGAIN (written
    /// just before that transition), so the checkpoint that follows knows
    /// when it was asked for.
    pub again_ns: u64,
}

/// Nothing asked for; the next trigger signal asks for a checkpoint.
pub const STATE_IDLE: u32 = 0;
/// The eBPF program asked for a checkpoint (and sent an event).
pub const STATE_REQUESTED: u32 = 1;
/// The agent is writing the checkpoint.
pub const STATE_RUNNING: u32 = 2;
/// A trigger signal came while the agent was writing: one more checkpoint
/// follows the current one.
pub const STATE_RUNNING_AGAIN: u32 = 3;

/// A checkpoint was asked for.
pub const EVENT_CHECKPOINT: u32 = 1;
/// A registered process exited (its entry is already gone from `REGISTRY`).
pub const EVENT_EXIT: u32 = 2;
/// A registered process is setting its trigger signal to something other
/// than ignoring it (SIG_DFL, or a handler: `Event::code` is the new
/// handler's low 32 bits, 0 for SIG_DFL).
pub const EVENT_DISPOSITION: u32 = 3;

/// `Event::result` of a checkpoint request whose signal the BPF LSM guard
/// stopped (the target would not have ignored it): the signal was never
/// generated, so the tracepoint did not see it. Outside the tracepoint's
/// own values (0–4).
pub const RESULT_STOPPED_BY_GUARD: i32 = 100;

/// A record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `EVENT_CHECKPOINT` or `EVENT_EXIT`.
    pub kind: u32,
    /// The registered process.
    pub tgid: u32,
    /// The task the signal was aimed at (a thread id for thread-directed signals).
    pub target_pid: u32,
    pub signal: u32,
    /// `si_code` of the signal (SI_USER for kill(1)).
    pub code: i32,
    /// What the kernel did with the signal (1 = ignored, as for SIG_IGN).
    pub result: i32,
    /// Process and thread that sent the signal.
    pub sender_tgid: u32,
    pub sender_pid: u32,
    pub sender_uid: u32,
    /// `STATES` slot of the registration.
    pub slot: u32,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) when the tracepoint fired.
    pub timestamp_ns: u64,
}

/// Byte offsets of the `signal/signal_generate` tracepoint fields the
/// program reads, taken from the tracepoint's format file at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalOffsets {
    pub sig: u32,
    pub code: u32,
    pub pid: u32,
    pub result: u32,
}

impl SignalOffsets {
    /// The layout of Linux 6.x; the agent checks it against the format file.
    pub const DEFAULT: SignalOffsets = SignalOffsets {
        sig: 8,
        code: 16,
        pid: 36,
        result: 44,
    };
}

/// Byte offsets in `sched/sched_process_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitOffsets {
    /// `group_dead` (bool): the last thread of the process is exiting.
    /// `u32::MAX` when the kernel does not have the field: then the leader
    /// thread's exit counts.
    pub group_dead: u32,
}

impl ExitOffsets {
    pub const DEFAULT: ExitOffsets = ExitOffsets { group_dead: 32 };
}

/// Byte offsets in `task/task_newtask`, which tells the program about new
/// threads of registered processes, so a trigger aimed at any thread of a
/// process (tgkill, or `kill` of a thread id) checkpoints the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewTaskOffsets {
    pub pid: u32,
    pub clone_flags: u32,
}

impl NewTaskOffsets {
    pub const DEFAULT: NewTaskOffsets = NewTaskOffsets {
        pid: 8,
        clone_flags: 32,
    };
}

/// Where the guard finds, in the kernel's own structures, the process a
/// signal is aimed at and what that process does with the signal:
/// `task->tgid` and `task->sighand->action[sig - 1].sa.sa_handler`. Taken
/// from the kernel's BTF (/sys/kernel/btf/vmlinux) at load time, as CO-RE
/// would; the eBPF side reads them with `bpf_probe_read_kernel`, so a wrong
/// offset reads a wrong value but cannot fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.tgid` (pid_t).
    pub tgid: u32,
    /// `task_struct.pid` (pid_t): the thread a signal is aimed at.
    pub pid: u32,
    /// `task_struct.sighand` (pointer).
    pub sighand: u32,
    /// `sighand_struct.action` (array of `k_sigaction`).
    pub action: u32,
    /// `sizeof(struct k_sigaction)`.
    pub ksigaction_size: u32,
    /// `k_sigaction.sa.sa_handler` from the start of a `k_sigaction`.
    pub handler: u32,
    /// 1 once the agent set these from BTF; the guard stays out of the
    /// way (lets every signal through) while 0.
    pub valid: u32,
    pub _pad: u32,
}

impl TaskOffsets {
    pub const DEFAULT: TaskOffsets = TaskOffsets {
        tgid: 0,
        pid: 0,
        sighand: 0,
        action: 0,
        ksigaction_size: 0,
        handler: 0,
        valid: 0,
        _pad: 0,
    };
}

/// `SIG_DFL` and `SIG_IGN` as `sa_handler` values.
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;

/// Whether a process whose handler for `signal` is `handler` would ignore
/// the signal: SIG_IGN, or the default action of a signal whose default is
/// to ignore it (SIGCHLD, SIGCONT, SIGURG, SIGWINCH), as the kernel's
/// `sig_task_ignored` decides.
pub const fn would_ignore(signal: u32, handler: u64) -> bool {
    handler == SIG_IGN || (handler == SIG_DFL && matches!(signal, 17 | 18 | 23 | 28))
}

/// Byte offsets in `syscalls/sys_enter_rt_sigaction`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigactionOffsets {
    pub sig: u32,
    pub act: u32,
}

impl SigactionOffsets {
    pub const DEFAULT: SigactionOffsets = SigactionOffsets { sig: 16, act: 24 };
}

/// Where the `task_vma` iterator finds a mapping's bounds and flags in the
/// kernel's `struct vm_area_struct`, taken from the kernel's BTF at load
/// time. Read with `bpf_probe_read_kernel`: a wrong offset reads a wrong
/// value but cannot fault, and the agent checks every record against
/// `/proc/PID/maps` before trusting any of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmaOffsets {
    pub vm_start: u32,
    pub vm_end: u32,
    pub vm_flags: u32,
    /// 1 once the agent set these from BTF; the iterator writes nothing
    /// while 0.
    pub valid: u32,
}

impl VmaOffsets {
    pub const DEFAULT: VmaOffsets = VmaOffsets {
        vm_start: 0,
        vm_end: 0,
        vm_flags: 0,
        valid: 0,
    };
}

/// One mapping as the `task_vma` iterator writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmaRecord {
    pub start: u64,
    pub end: u64,
    /// The kernel's `vm_flags` bits, the source of smaps' VmFlags.
    pub flags: u64,
}

/// Where the `task` iterator (`chpox_tstate_v2`) finds what a frozen
/// process would otherwise be asked with remote syscalls: dispositions,
/// prctl values, brk, itimers, alternate stacks, `clear_child_tid`. Taken
/// from the kernel's BTF at load time; read with `bpf_probe_read_kernel`
/// (a wrong offset reads a wrong value but cannot fault).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskStateOffsets {
    /// In `task_struct`.
    pub pid: u32,
    pub tgid: u32,
    pub mm: u32,
    pub signal: u32,
    pub sighand: u32,
    pub pdeath_signal: u32,
    pub clear_child_tid: u32,
    pub sas_ss_sp: u32,
    pub sas_ss_size: u32,
    pub sas_ss_flags: u32,
    /// `sighand_struct.action`, and `sizeof(struct k_sigaction)`.
    pub action: u32,
    pub ksigaction_size: u32,
    /// In `k_sigaction`.
    pub sa_handler: u32,
    pub sa_flags: u32,
    pub sa_restorer: u32,
    pub sa_mask: u32,
    /// In `mm_struct`: `brk`, and the first word of `flags`.
    pub brk: u32,
    pub mm_flags: u32,
    /// In `signal_struct`: the 32-bit word holding the
    /// `is_child_subreaper` bit, and that bit's number in it.
    pub subreaper_word: u32,
    pub subreaper_bit: u32,
    /// `real_timer.node.expires`, `it_real_incr`, and `it` (two
    /// `cpu_itimer`s of two u64 each).
    pub real_expires: u32,
    pub real_incr: u32,
    pub cpu_itimers: u32,
    /// `signal_struct.oom_score_adj` (short) and `rlim` (16 `rlimit`s of
    /// two u64 each).
    pub oom_score_adj: u32,
    pub rlim: u32,
    /// `task_struct.personality` (u32), `seccomp.mode` (int) and `comm`
    /// (16 bytes).
    pub personality: u32,
    pub seccomp_mode: u32,
    pub comm: u32,
    pub _pad: u32,
    /// 1 once set from BTF; the iterator writes nothing while 0.
    pub valid: u32,
}

impl TaskStateOffsets {
    pub const DEFAULT: TaskStateOffsets = TaskStateOffsets {
        pid: 0,
        tgid: 0,
        mm: 0,
        signal: 0,
        sighand: 0,
        pdeath_signal: 0,
        clear_child_tid: 0,
        sas_ss_sp: 0,
        sas_ss_size: 0,
        sas_ss_flags: 0,
        action: 0,
        ksigaction_size: 0,
        sa_handler: 0,
        sa_flags: 0,
        sa_restorer: 0,
        sa_mask: 0,
        brk: 0,
        mm_flags: 0,
        subreaper_word: 0,
        subreaper_bit: 0,
        real_expires: 0,
        real_incr: 0,
        cpu_itimers: 0,
        oom_score_adj: 0,
        rlim: 0,
        personality: 0,
        seccomp_mode: 0,
        comm: 0,
        _pad: 0,
        valid: 0,
    };
}

/// What `chpox_tstate_v2` writes: for each thread a [`TASK_STATE_THREAD`]
/// record; for the thread group leader also one [`TASK_STATE_PROCESS`],
/// a [`TASK_STATE_ACTION`] record for each signal (1 to 64, in order)
/// whose disposition is not all zeros (SIG_DFL, no flags, no mask), and
/// 16 [`TASK_STATE_RLIMIT`] records (resources 0 to 15), in that order.
pub const TASK_STATE_THREAD: u32 = 1;
/// `words`: brk, mm flags, whether a subreaper, real timer expiry, real
/// timer interval, the two `cpu_itimer`s (expires, incr each),
/// oom_score_adj, personality.
pub const TASK_STATE_PROCESS: u32 = 2;
/// `words`: signal number, handler, flags, restorer, mask.
pub const TASK_STATE_ACTION: u32 = 3;
/// `words`: resource, soft limit, hard limit.
pub const TASK_STATE_RLIMIT: u32 = 4;

/// One record of `chpox_tstate_v2`. `words` of a thread record:
/// `clear_child_tid`, `sas_ss_sp`, `sas_ss_size`, `sas_ss_flags`,
/// `pdeath_signal`, tgid, seccomp mode, then `comm` in two words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskStateRecord {
    pub kind: u32,
    /// The thread the record is of.
    pub tid: u32,
    pub words: [u64; 12],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] structs of plain integers with
    // explicit padding fields, valid for any bit pattern.
    unsafe impl aya::Pod for super::Registration {}
    unsafe impl aya::Pod for super::SlotState {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::SignalOffsets {}
    unsafe impl aya::Pod for super::ExitOffsets {}
    unsafe impl aya::Pod for super::NewTaskOffsets {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::SigactionOffsets {}
    unsafe impl aya::Pod for super::VmaOffsets {}
    unsafe impl aya::Pod for super::TaskStateOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_flags_are_old_chpoxs_bits_and_the_tcp_policies() {
        assert_eq!(flags::KNOWN, 0b11_1111);
    }

    #[test]
    fn shared_structs_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Registration>(), 24);
        assert_eq!(core::mem::size_of::<SlotState>(), 32);
        assert_eq!(core::mem::size_of::<Event>(), 48);
        assert_eq!(core::mem::size_of::<SignalOffsets>(), 16);
        assert_eq!(core::mem::size_of::<TaskOffsets>(), 32);
        assert_eq!(core::mem::size_of::<VmaOffsets>(), 16);
        assert_eq!(core::mem::size_of::<VmaRecord>(), 24);
        assert_eq!(core::mem::size_of::<TaskStateOffsets>(), 120);
        assert_eq!(core::mem::size_of::<TaskStateRecord>(), 104);
    }

    #[test]
    fn only_ignored_dispositions_are_ignored() {
        assert!(would_ignore(31, SIG_IGN));
        assert!(!would_ignore(31, SIG_DFL));
        assert!(!would_ignore(31, 0x401000), "a handler runs");
        assert!(would_ignore(28, SIG_DFL), "SIGWINCH is ignored by default");
        assert!(!would_ignore(10, SIG_DFL));
    }
}
