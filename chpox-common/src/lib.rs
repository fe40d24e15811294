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
    pub const STATES: &str = "STATES";
    pub const EVENTS: &str = "EVENTS";
    pub const SIGNAL_PROGRAM: &str = "chpox_signal_generate";
    pub const EXIT_PROGRAM: &str = "chpox_process_exit";
    pub const NEWTASK_PROGRAM: &str = "chpox_task_newtask";
    /// Globals set at load time from the tracepoints' format files.
    pub const GLOBAL_SIGNAL_OFFSETS: &str = "SIGNAL_OFFSETS";
    pub const GLOBAL_EXIT_OFFSETS: &str = "EXIT_OFFSETS";
    pub const GLOBAL_NEWTASK_OFFSETS: &str = "NEWTASK_OFFSETS";
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_flags_cover_every_bit_old_chpox_defined() {
        assert_eq!(flags::KNOWN, 0b1111);
    }

    #[test]
    fn shared_structs_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Registration>(), 24);
        assert_eq!(core::mem::size_of::<SlotState>(), 24);
        assert_eq!(core::mem::size_of::<Event>(), 48);
        assert_eq!(core::mem::size_of::<SignalOffsets>(), 16);
    }
}
