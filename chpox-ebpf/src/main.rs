//! The eBPF half of chpox.
//!
//! `chpox_signal_generate` watches `signal/signal_generate`: when a registered
//! process is sent its trigger signal, it moves the registration's `STATES`
//! slot from IDLE to REQUESTED and tells the agent through `EVENTS`. The
//! tracepoint fires even for signals the target ignores (result 1), which is
//! how a process with SIG_IGN for the trigger signal still gets checkpointed.
//!
//! `chpox_process_exit` watches `sched/sched_process_exit`: when the last
//! thread of a registered process exits, it drops the `REGISTRY` entry and
//! tells the agent, which frees the `STATES` slot.
//!
//! `chpox_task_newtask` also keeps `TREE`, the processes descended from a
//! process registered with its children (FLAGS 8): a fork by the
//! registered process or by a member adds the child, the exit of a
//! process's last thread removes it. The tracepoint fires in the forking
//! process before the child first runs and before `fork` returns, so once
//! the agent holds a member stopped, every child it made is in `TREE`:
//! freezing a tree needs no scan of /proc to find the members. The agent
//! still checks each one's parent in /proc (a member whose parent died is
//! reparented out of the tree), and its confirming scan, made once every
//! member is stopped, catches whatever the map missed (a full map, a tree
//! registered while its children forked).
//!
//! Field offsets of the tracepoints come from their format files: the agent
//! sets `SIGNAL_OFFSETS`, `EXIT_OFFSETS`, `NEWTASK_OFFSETS` and
//! `SIGACTION_OFFSETS` at load time.
//!
//! ## A trigger that never kills
//!
//! Registering sets the trigger signal to SIG_IGN in the process, so the
//! kernel drops it at generation, after `signal_generate` has seen it. But
//! a process may undo that at any moment (Node.js resets every disposition
//! at start-up; any program may `signal(SIGSYS, SIG_DFL)`). Two programs
//! keep the signal harmless, split by what each can do:
//!
//! - `chpox_task_kill`, a BPF LSM program on `task_kill`, runs before a
//!   signal a process sends is generated. For the trigger signal aimed at
//!   a registered process that would not ignore it (SIG_DFL or a handler,
//!   read from `task->sighand->action[sig - 1]` at offsets taken from the
//!   kernel's BTF), it asks for the checkpoint itself and refuses the
//!   signal (`kill` fails with EPERM): nothing is delivered. A signal the
//!   target ignores passes untouched, so `kill` succeeds and
//!   `signal_generate` stays the detector; each signal is counted by
//!   exactly one of the two. Only an LSM hook can stop a signal before it
//!   exists; a tracepoint only watches.
//! - `chpox_sigaction`, on `syscalls/sys_enter_rt_sigaction`, tells the
//!   agent when a registered process is about to stop ignoring its trigger
//!   signal; the agent sets SIG_IGN again (a handler the process installs
//!   is left alone), so `kill` reports success again. Where the BPF LSM is
//!   not available (not in the kernel's `lsm=` list, or the kernel refuses
//!   LSM programs), this is the only protection: a trigger signal in the
//!   few milliseconds before the agent has set SIG_IGN again still kills.
//!
//! A signal that the guard let through because the target ignored it, and
//! that the target then stops ignoring before it is generated, is not
//! stopped: the kernel decides at generation, after the hook.
#![no_std]
#![no_main]
// `core::sync::atomic`'s types are not available on BPF targets (rustc sets
// `atomic-cas: false` and min-atomic-width 64 for them), but LLVM's BPF backend
// lowers the atomic intrinsics to BPF_ATOMIC instructions (cpu v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_MMAPABLE,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{lsm, map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::{LsmContext, TracePointContext},
};
use aya_log_ebpf::{debug, info, warn};
use chpox_common::{
    CLONE_THREAD, EVENT_CHECKPOINT, EVENT_DISPOSITION, EVENT_EXIT, Event, ExitOffsets,
    MAX_REGISTRATIONS, MAX_THREADS, MAX_TREE_MEMBERS, NewTaskOffsets, RESULT_STOPPED_BY_GUARD,
    Registration, STATE_IDLE, STATE_REQUESTED, STATE_RUNNING, STATE_RUNNING_AGAIN,
    SigactionOffsets, SignalOffsets, SlotState, TASK_STATE_ACTION, TASK_STATE_PROCESS,
    TASK_STATE_RLIMIT, TASK_STATE_THREAD, TaskOffsets, TaskStateOffsets, TaskStateRecord,
    VmaOffsets, VmaRecord, flags::INCLUDE_CHILDREN, would_ignore,
};

/// Registered processes, by tgid.
#[map(name = "REGISTRY")]
static REGISTRY: HashMap<u32, Registration> = HashMap::with_max_entries(MAX_REGISTRATIONS, 0);

/// Threads of registered processes other than their leaders: thread id →
/// process id. The agent fills it at registration, `chpox_task_newtask`
/// as threads are created, `chpox_process_exit` empties it as they exit.
#[map(name = "THREADS")]
static THREADS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Processes descended from a process registered with its children
/// (FLAGS 8): process id → the registered process's id. The agent fills
/// it at registration, `chpox_task_newtask` as members fork,
/// `chpox_process_exit` empties it as they exit.
#[map(name = "TREE")]
static TREE: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TREE_MEMBERS, 0);

/// Checkpoint state per registration slot; the agent mmaps it and changes
/// `state` with atomic compare-and-swap, as this program does.
#[map(name = "STATES")]
static STATES: Array<SlotState> = Array::with_max_entries(MAX_REGISTRATIONS, BPF_F_MMAPABLE);

/// Events for the agent (`chpox_common::Event` records).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Offsets in `signal/signal_generate`, set by the agent at load time. Read
/// only with `read_volatile` so the compiler cannot fold the defaults in.
#[unsafe(no_mangle)]
static SIGNAL_OFFSETS: SignalOffsets = SignalOffsets::DEFAULT;

/// Offsets in `sched/sched_process_exit`, set by the agent at load time.
#[unsafe(no_mangle)]
static EXIT_OFFSETS: ExitOffsets = ExitOffsets::DEFAULT;

/// Offsets in `task/task_newtask`, set by the agent at load time.
#[unsafe(no_mangle)]
static NEWTASK_OFFSETS: NewTaskOffsets = NewTaskOffsets::DEFAULT;

/// Offsets in the kernel's task and signal structures, set by the agent
/// from the kernel's BTF at load time (for the guard).
#[unsafe(no_mangle)]
static TASK_OFFSETS: TaskOffsets = TaskOffsets::DEFAULT;

/// Offsets in `syscalls/sys_enter_rt_sigaction`, set by the agent at load
/// time.
#[unsafe(no_mangle)]
static SIGACTION_OFFSETS: SigactionOffsets = SigactionOffsets::DEFAULT;

/// Offsets in `struct vm_area_struct`, set by the agent from the kernel's
/// BTF at load time (for the `task_vma` iterator).
#[unsafe(no_mangle)]
static VMA_OFFSETS: VmaOffsets = VmaOffsets::DEFAULT;

/// Offsets in `task_struct`, `signal_struct`, `sighand_struct` and
/// `mm_struct`, set from the kernel's BTF at load time (for the `task`
/// iterator).
#[unsafe(no_mangle)]
static TASK_STATE_OFFSETS: TaskStateOffsets = TaskStateOffsets::DEFAULT;

/// How often a lost compare-and-swap on `state` is retried. Only the agent
/// and other CPUs' signals change the state, so two tries nearly always do.
const CAS_TRIES: u32 = 4;

#[tracepoint(category = "signal", name = "signal_generate")]
pub fn chpox_signal_generate(ctx: TracePointContext) -> u32 {
    try_signal_generate(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_signal_generate(ctx: &TracePointContext) -> Result<u32, i32> {
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&SIGNAL_OFFSETS) };
    // SAFETY: read_at goes through bpf_probe_read_kernel, which cannot fault.
    let pid: i32 = unsafe { ctx.read_at(off.pid as usize)? };
    let target = pid as u32;
    // Aimed at the process (or its leader), or at another of its threads.
    let (pid, reg) = match REGISTRY.get_ptr(target) {
        Some(reg) => (target, reg),
        // SAFETY: a live map value, copied out at once.
        None => match unsafe { THREADS.get(target) } {
            Some(&tgid) => match REGISTRY.get_ptr(tgid) {
                Some(reg) => (tgid, reg),
                None => return Ok(0),
            },
            None => return Ok(0),
        },
    };
    // SAFETY: the pointer is a live map value; copy it out at once.
    let reg = unsafe { *reg };
    // SAFETY: as above.
    let sig: i32 = unsafe { ctx.read_at(off.sig as usize)? };
    let sig = sig as u32;
    if sig != reg.signal {
        return Ok(0);
    }
    // SAFETY: read_at goes through bpf_probe_read_kernel, which cannot fault.
    let code: i32 = unsafe { ctx.read_at(off.code as usize) }.unwrap_or(0);
    // SAFETY: as above.
    let result: i32 = unsafe { ctx.read_at(off.result as usize) }.unwrap_or(0);
    ask_for_checkpoint(ctx, pid, target, sig, &reg, code, result);
    Ok(0)
}

/// A trigger signal for the registered process `pid` (aimed at `target`):
/// move its slot towards a checkpoint (IDLE → REQUESTED with an event,
/// RUNNING → RUNNING_AGAIN, else fold it into the one coming). Both the
/// tracepoint and the guard come here, never both for one signal: the
/// guard counts only the signals it stops, which never reach the
/// tracepoint.
#[inline(always)]
fn ask_for_checkpoint<C: EbpfContext>(
    ctx: &C,
    pid: u32,
    target: u32,
    sig: u32,
    reg: &Registration,
    code: i32,
    result: i32,
) {
    let Some(slot) = STATES.get_ptr_mut(reg.slot) else {
        warn!(
            ctx,
            "chpox: pid {} has slot {} outside STATES", pid, reg.slot
        );
        return;
    };
    // SAFETY: slot points into an array map value, which stays valid for the
    // whole program run; the fields are naturally aligned for atomics.
    let (state, signals, coalesced, again_ns) = unsafe {
        (
            addr_of_mut!((*slot).state),
            addr_of_mut!((*slot).signals),
            addr_of_mut!((*slot).coalesced),
            addr_of_mut!((*slot).again_ns),
        )
    };
    // SAFETY: the three pointers are valid and aligned (see above).
    unsafe { atomic::add_u64(signals) };

    // Guess IDLE first; a failed CAS hands back the state it found.
    let mut expected = STATE_IDLE;
    for _ in 0..CAS_TRIES {
        let desired = match expected {
            STATE_IDLE => STATE_REQUESTED,
            STATE_RUNNING => {
                // Before the transition, so the agent finds it once it
                // sees RUNNING_AGAIN.
                // SAFETY: as above.
                unsafe { again_ns.write_volatile(bpf_ktime_get_ns()) };
                STATE_RUNNING_AGAIN
            }
            // REQUESTED or RUNNING_AGAIN: a checkpoint is already coming.
            _ => {
                // SAFETY: as above.
                unsafe { atomic::add_u64(coalesced) };
                debug!(ctx, "chpox: signal {} to pid {} coalesced", sig, pid);
                return;
            }
        };
        // SAFETY: as above.
        match unsafe { atomic::cas_u32(state, expected, desired) } {
            Ok(_) if expected == STATE_IDLE => {
                send_request(ctx, pid, target, sig, reg.slot, code, result);
                return;
            }
            // RUNNING -> RUNNING_AGAIN: the agent does one more checkpoint
            // when it finishes this one; no event needed.
            Ok(_) => {
                debug!(
                    ctx,
                    "chpox: signal {} to pid {} queued after the running checkpoint", sig, pid
                );
                return;
            }
            Err(actual) => expected = actual,
        }
    }
    // The state kept changing under us, so the agent is working on this
    // slot right now and will look at it again: count the signal as folded.
    // SAFETY: as above.
    unsafe { atomic::add_u64(coalesced) };
    warn!(
        ctx,
        "chpox: signal {} to pid {} coalesced after {} lost CAS", sig, pid, CAS_TRIES
    );
}

/// The slot is REQUESTED now: tell the agent.
#[inline(always)]
fn send_request<C: EbpfContext>(
    ctx: &C,
    pid: u32,
    target: u32,
    sig: u32,
    slot: u32,
    code: i32,
    result: i32,
) {
    let sender = bpf_get_current_pid_tgid();
    let event = Event {
        kind: EVENT_CHECKPOINT,
        tgid: pid,
        target_pid: target,
        signal: sig,
        code,
        result,
        sender_tgid: (sender >> 32) as u32,
        sender_pid: sender as u32,
        sender_uid: bpf_get_current_uid_gid() as u32,
        slot,
        // SAFETY: a helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    let sender_tgid = event.sender_tgid;
    if EVENTS.output::<Event>(&event, 0).is_err() {
        // STATES still says REQUESTED, so the agent finds it when it scans.
        warn!(
            ctx,
            "chpox: EVENTS full; checkpoint of pid {} (signal {}) recorded in STATES only",
            pid,
            sig
        );
    }
    info!(
        ctx,
        "chpox: checkpoint of pid {} requested by signal {} from pid {}", pid, sig, sender_tgid
    );
}

/// EPERM: what `kill` reports when the guard stops a signal.
const EPERM: i32 = 1;

#[lsm(hook = "task_kill")]
pub fn chpox_task_kill(ctx: LsmContext) -> i32 {
    // The hook's arguments (task, info, sig, cred), then what an earlier
    // BPF LSM program on this hook decided: a refusal stands as it is.
    let earlier: i32 = ctx.arg(4);
    if earlier != 0 {
        // Within the range the verifier allows an LSM program to return.
        return if (-4095..0).contains(&earlier) {
            earlier
        } else {
            -EPERM
        };
    }
    try_task_kill(&ctx).unwrap_or(0)
}

/// Stop a trigger signal the registered target would not ignore (it set
/// the signal back to SIG_DFL, or installed a handler, after registration)
/// and ask for the checkpoint here, since the signal will never reach the
/// tracepoint. A signal the target ignores goes through untouched: `kill`
/// succeeds and the tracepoint asks for the checkpoint as ever.
#[inline(always)]
fn try_task_kill(ctx: &LsmContext) -> Result<i32, i32> {
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&TASK_OFFSETS) };
    if off.valid == 0 {
        return Ok(0);
    }
    let task: *const u8 = ctx.arg(0);
    let info: *const u8 = ctx.arg(1);
    let sig: i32 = ctx.arg(2);
    if !(1..=64).contains(&sig) {
        return Ok(0);
    }
    let sig = sig as u32;
    // SAFETY: bpf_probe_read_kernel cannot fault; `task` is the hook's
    // live task_struct and the offsets come from this kernel's BTF.
    let tgid: i32 =
        unsafe { bpf_probe_read_kernel(task.wrapping_add(off.tgid as usize).cast::<i32>())? };
    let tgid = tgid as u32;
    let Some(reg) = REGISTRY.get_ptr(tgid) else {
        return Ok(0);
    };
    // SAFETY: the pointer is a live map value; copy it out at once.
    let reg = unsafe { *reg };
    if sig != reg.signal {
        return Ok(0);
    }
    // SAFETY: as above.
    let sighand: u64 =
        unsafe { bpf_probe_read_kernel(task.wrapping_add(off.sighand as usize).cast::<u64>())? };
    let handler_at = sighand
        + off.action as u64
        + (sig as u64 - 1) * off.ksigaction_size as u64
        + off.handler as u64;
    // SAFETY: as above; a stale or wrong address reads as an error.
    let handler: u64 = unsafe { bpf_probe_read_kernel(handler_at as *const u64)? };
    if would_ignore(sig, handler) {
        return Ok(0);
    }
    // si_code, unless `info` is one of the kernel's special values
    // (SEND_SIG_NOINFO 0, SEND_SIG_PRIV 1).
    let code: i32 = if (info as u64) > 1 {
        // SAFETY: as above; si_code is the third int of kernel_siginfo.
        unsafe { bpf_probe_read_kernel(info.wrapping_add(8).cast::<i32>()) }.unwrap_or(0)
    } else {
        0
    };
    // SAFETY: as above.
    let target: i32 =
        unsafe { bpf_probe_read_kernel(task.wrapping_add(off.pid as usize).cast::<i32>()) }
            .unwrap_or(tgid as i32);
    ask_for_checkpoint(
        ctx,
        tgid,
        target as u32,
        sig,
        &reg,
        code,
        RESULT_STOPPED_BY_GUARD,
    );
    debug!(
        ctx,
        "chpox: signal {} to pid {} stopped by the guard (handler {})", sig, tgid, handler
    );
    Ok(-EPERM)
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn chpox_process_exit(ctx: TracePointContext) -> u32 {
    try_process_exit(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_process_exit(ctx: &TracePointContext) -> Result<u32, i32> {
    let current = bpf_get_current_pid_tgid();
    let tgid = (current >> 32) as u32;
    let tid = current as u32;
    if tid != tgid {
        // A thread of a registered process leaves THREADS as it exits, so a
        // recycled thread id never points at the old process. (Absent is
        // fine: most exiting threads were never there.)
        let _ = THREADS.remove(tid);
    }
    let registered = REGISTRY.get_ptr(tgid);
    let member = registered.is_some() || TREE.get_ptr(tgid).is_some();
    if !member {
        return Ok(0);
    }
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&EXIT_OFFSETS) };
    let last_thread = if off.group_dead == u32::MAX {
        tid == tgid
    } else {
        // SAFETY: read_at goes through bpf_probe_read_kernel, which cannot fault.
        let group_dead: u8 = unsafe { ctx.read_at(off.group_dead as usize)? };
        group_dead != 0
    };
    if !last_thread {
        return Ok(0);
    }
    // Out of its tree before its PID can be reused. (A zombie left for
    // its parent to reap is found by the agent's confirming scan.)
    let _ = TREE.remove(tgid);
    let Some(reg) = registered else {
        return Ok(0);
    };
    // SAFETY: the pointer is a live map value; copy the slot out at once.
    let slot = unsafe { (*reg).slot };
    // Another CPU may have removed it already (the agent unregistering):
    // then that side owns the cleanup and no event is due.
    if REGISTRY.remove(tgid).is_err() {
        return Ok(0);
    }
    let event = Event {
        kind: EVENT_EXIT,
        tgid,
        target_pid: tid,
        slot,
        // SAFETY: a helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..Event::default()
    };
    if EVENTS.output::<Event>(&event, 0).is_err() {
        warn!(
            ctx,
            "chpox: EVENTS full; exit of pid {} (slot {}) not reported", tgid, slot
        );
    }
    Ok(0)
}

#[tracepoint(category = "task", name = "task_newtask")]
pub fn chpox_task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx).unwrap_or(0)
}

/// A new task: if it is a thread of a registered process, remember which;
/// if it is a process forked in a registered tree, add it to `TREE`.
#[inline(always)]
fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i32> {
    // The creator is current; a CLONE_THREAD child joins its process.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let registered = REGISTRY.get_ptr(tgid);
    // SAFETY: a live map value, copied out at once.
    let root = match registered {
        // SAFETY: as above.
        Some(reg) if unsafe { (*reg).flags } & INCLUDE_CHILDREN != 0 => Some(tgid),
        Some(_) => None,
        // SAFETY: as above.
        None => unsafe { TREE.get(tgid) }.copied(),
    };
    if registered.is_none() && root.is_none() {
        return Ok(0);
    }
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&NEWTASK_OFFSETS) };
    // SAFETY: read_at goes through bpf_probe_read_kernel, which cannot fault.
    let clone_flags: u64 = unsafe { ctx.read_at(off.clone_flags as usize)? };
    // SAFETY: as above.
    let tid: i32 = unsafe { ctx.read_at(off.pid as usize)? };
    if clone_flags & CLONE_THREAD == 0 {
        if let Some(root) = root
            && TREE.insert(tid as u32, root, 0).is_err()
        {
            warn!(
                ctx,
                "chpox: TREE full; process {} of the tree of pid {} is found by a scan", tid, root
            );
        }
        return Ok(0);
    }
    if registered.is_none() {
        return Ok(0);
    }
    if THREADS.insert(tid as u32, tgid, 0).is_err() {
        warn!(
            ctx,
            "chpox: THREADS full; signals aimed at thread {} of pid {} will not trigger", tid, tgid
        );
    }
    Ok(0)
}

#[tracepoint(category = "syscalls", name = "sys_enter_rt_sigaction")]
pub fn chpox_sigaction(ctx: TracePointContext) -> u32 {
    try_sigaction(&ctx).unwrap_or(0)
}

/// A registered process is about to stop ignoring its trigger signal
/// (`signal(SIGSYS, SIG_DFL)`, or a start-up that resets every signal, as
/// Node.js does): tell the agent, which sets SIG_IGN again, so that `kill`
/// keeps succeeding and, without the guard, keeps being harmless.
#[inline(always)]
fn try_sigaction(ctx: &TracePointContext) -> Result<u32, i32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(reg) = REGISTRY.get_ptr(tgid) else {
        return Ok(0);
    };
    // SAFETY: the pointer is a live map value; copy it out at once.
    let reg = unsafe { *reg };
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&SIGACTION_OFFSETS) };
    // SAFETY: read_at goes through bpf_probe_read_kernel, which cannot fault.
    let sig: u64 = unsafe { ctx.read_at(off.sig as usize)? };
    if sig != reg.signal as u64 {
        return Ok(0);
    }
    // SAFETY: as above.
    let act: u64 = unsafe { ctx.read_at(off.act as usize)? };
    if act == 0 {
        return Ok(0); // a query
    }
    // SAFETY: bpf_probe_read_user cannot fault; sa_handler is the first
    // field of the kernel's struct sigaction.
    let handler: u64 = unsafe { bpf_probe_read_user(act as *const u64)? };
    if would_ignore(reg.signal, handler) {
        return Ok(0);
    }
    let event = Event {
        kind: EVENT_DISPOSITION,
        tgid,
        target_pid: bpf_get_current_pid_tgid() as u32,
        signal: reg.signal,
        code: handler as i32,
        slot: reg.slot,
        // SAFETY: a helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..Event::default()
    };
    if EVENTS.output::<Event>(&event, 0).is_err() {
        warn!(
            ctx,
            "chpox: EVENTS full; pid {} stops ignoring signal {} unseen", tgid, reg.signal
        );
    }
    Ok(0)
}

/// The `task_vma` iterator: for each mapping of the task the agent's link
/// names, one [`VmaRecord`] (bounds and the kernel's flag bits), so that
/// the agent learns a frozen process's VmFlags without `/proc/PID/smaps`,
/// which walks every page table entry (about 100 ms for 4 GiB). The
/// context is the kernel's `struct bpf_iter__task_vma`: three pointers,
/// `meta` (whose first field is the output `seq_file`), `task` and `vma`
/// (NULL once the walk is over).
#[unsafe(link_section = "iter/task_vma")]
#[unsafe(no_mangle)]
pub fn chpox_vma_flags(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&VMA_OFFSETS) };
    if off.valid == 0 {
        return 0;
    }
    let args = ctx as *const u64;
    // SAFETY: the iterator's context is three pointer-sized arguments; the
    // verifier types each from the kernel's BTF and checks these loads.
    let (meta, vma) = unsafe { (read_volatile(args), read_volatile(args.wrapping_add(2))) };
    if meta == 0 || vma == 0 {
        return 0;
    }
    let vma = vma as *const u8;
    // SAFETY: bpf_probe_read_kernel cannot fault; a wrong offset reads a
    // wrong value, which the agent's check against /proc/PID/maps refuses.
    let record = unsafe {
        let (Ok(start), Ok(end), Ok(flags)) = (
            bpf_probe_read_kernel(vma.wrapping_add(off.vm_start as usize).cast::<u64>()),
            bpf_probe_read_kernel(vma.wrapping_add(off.vm_end as usize).cast::<u64>()),
            bpf_probe_read_kernel(vma.wrapping_add(off.vm_flags as usize).cast::<u64>()),
        ) else {
            return 0;
        };
        VmaRecord { start, end, flags }
    };
    // SAFETY: `meta` points to the kernel's `struct bpf_iter_meta`, whose
    // first field is the `seq_file` the helper writes to (the verifier
    // types this load from BTF); the record lives on our stack.
    unsafe {
        let seq = read_volatile(meta as *const *mut aya_ebpf::bindings::seq_file);
        aya_ebpf::helpers::bpf_seq_write(
            seq,
            (&raw const record).cast(),
            core::mem::size_of::<VmaRecord>() as u32,
        );
    }
    0
}

/// The `task` iterator: for each thread of the process the link names,
/// what a checkpoint would otherwise ask each frozen process with remote
/// syscalls (see [`TaskStateRecord`]), so that a tree's processes are not
/// made to run a dozen syscalls each while frozen. The context is the
/// kernel's `struct bpf_iter__task`: `meta` and `task` (NULL once the walk
/// is over). Values are copied raw; the reader interprets them.
#[unsafe(link_section = "iter/task")]
#[unsafe(no_mangle)]
pub fn chpox_tstate_v2(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: a plain read of our own read-only global.
    let off = unsafe { read_volatile(&TASK_STATE_OFFSETS) };
    if off.valid == 0 {
        return 0;
    }
    let args = ctx as *const u64;
    // SAFETY: the iterator's context is two pointer-sized arguments; the
    // verifier types each from the kernel's BTF and checks these loads.
    let (meta, task) = unsafe { (read_volatile(args), read_volatile(args.wrapping_add(1))) };
    if meta == 0 || task == 0 {
        return 0;
    }
    // SAFETY: `meta` points to the kernel's `struct bpf_iter_meta`, whose
    // first field is the `seq_file` the helper writes to.
    let seq = unsafe { read_volatile(meta as *const *mut aya_ebpf::bindings::seq_file) };
    let _ = task_state(seq, task as *const u8, &off);
    0
}

/// A kernel value of type `T` at `base + offset`.
#[inline(always)]
fn kernel_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel cannot fault; a wrong offset or a
    // stale pointer reads a wrong value or fails.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
}

#[inline(always)]
fn emit(seq: *mut aya_ebpf::bindings::seq_file, record: &TaskStateRecord) {
    // SAFETY: `seq` is the iterator's own output; the record lives on our
    // stack.
    unsafe {
        aya_ebpf::helpers::bpf_seq_write(
            seq,
            (record as *const TaskStateRecord).cast(),
            core::mem::size_of::<TaskStateRecord>() as u32,
        );
    }
}

#[inline(always)]
fn task_state(
    seq: *mut aya_ebpf::bindings::seq_file,
    task: *const u8,
    off: &TaskStateOffsets,
) -> Result<(), i32> {
    let tid: i32 = kernel_at(task, off.pid)?;
    let tgid: i32 = kernel_at(task, off.tgid)?;
    let pdeath: i32 = kernel_at(task, off.pdeath_signal)?;
    let sas_flags: u32 = kernel_at(task, off.sas_ss_flags)?;
    let mut record = TaskStateRecord {
        kind: TASK_STATE_THREAD,
        tid: tid as u32,
        words: [
            kernel_at::<u64>(task, off.clear_child_tid)?,
            kernel_at::<u64>(task, off.sas_ss_sp)?,
            kernel_at::<u64>(task, off.sas_ss_size)?,
            sas_flags as u64,
            pdeath as u32 as u64,
            tgid as u32 as u64,
            kernel_at::<i32>(task, off.seccomp_mode)? as u32 as u64,
            kernel_at::<u64>(task, off.comm)?,
            kernel_at::<u64>(task, off.comm + 8)?,
            0,
            0,
            0,
        ],
    };
    emit(seq, &record);
    if tid != tgid {
        return Ok(());
    }
    let mm: u64 = kernel_at(task, off.mm)?;
    let signal: u64 = kernel_at(task, off.signal)?;
    let sighand: u64 = kernel_at(task, off.sighand)?;
    if mm == 0 || signal == 0 || sighand == 0 {
        return Ok(());
    }
    let (mm, signal) = (mm as *const u8, signal as *const u8);
    let itimers = off.cpu_itimers;
    record.kind = TASK_STATE_PROCESS;
    record.words = [
        kernel_at::<u64>(mm, off.brk)?,
        kernel_at::<u64>(mm, off.mm_flags)?,
        ((kernel_at::<u32>(signal, off.subreaper_word)? >> (off.subreaper_bit & 31)) & 1) as u64,
        kernel_at::<u64>(signal, off.real_expires)?,
        kernel_at::<u64>(signal, off.real_incr)?,
        kernel_at::<u64>(signal, itimers)?,
        kernel_at::<u64>(signal, itimers + 8)?,
        kernel_at::<u64>(signal, itimers + 16)?,
        kernel_at::<u64>(signal, itimers + 24)?,
        kernel_at::<i16>(signal, off.oom_score_adj)? as i64 as u64,
        kernel_at::<u32>(task, off.personality)? as u64,
        0,
    ];
    emit(seq, &record);
    let actions = (sighand as *const u8).wrapping_add(off.action as usize);
    record.kind = TASK_STATE_ACTION;
    for signo in 1..=64u32 {
        let k = actions.wrapping_add(((signo - 1) * off.ksigaction_size) as usize);
        let (handler, flags, restorer, mask) = (
            kernel_at::<u64>(k, off.sa_handler)?,
            kernel_at::<u64>(k, off.sa_flags)?,
            kernel_at::<u64>(k, off.sa_restorer)?,
            kernel_at::<u64>(k, off.sa_mask)?,
        );
        // Most are all zeros (SIG_DFL): the reader takes a missing one
        // for that.
        if handler | flags | restorer | mask == 0 {
            continue;
        }
        record.words = [
            signo as u64,
            handler,
            flags,
            restorer,
            mask,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        emit(seq, &record);
    }
    record.kind = TASK_STATE_RLIMIT;
    for resource in 0..16u32 {
        let at = off.rlim + resource * 16;
        record.words = [
            resource as u64,
            kernel_at::<u64>(signal, at)?,
            kernel_at::<u64>(signal, at + 8)?,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        emit(seq, &record);
    }
    Ok(())
}

/// The few atomic operations the program needs, on raw pointers into map
/// values (which the agent also changes through its mmap of `STATES`).
mod atomic {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

    /// Atomically add 1 (BPF_ATOMIC | BPF_ADD on a double word).
    ///
    /// # Safety
    /// `p` must be valid and 8-byte aligned.
    #[inline(always)]
    pub unsafe fn add_u64(p: *mut u64) {
        // SAFETY: guaranteed by the caller.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) };
    }

    /// Compare-and-swap (BPF_CMPXCHG on a word, a full barrier): `Ok` with
    /// the old value if it was `old`, else `Err` with the value found.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    #[inline(always)]
    pub unsafe fn cas_u32(p: *mut u32, old: u32, new: u32) -> Result<u32, u32> {
        // SAFETY: guaranteed by the caller.
        let (found, ok) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
        };
        if ok { Ok(found) } else { Err(found) }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
