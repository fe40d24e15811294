//! Threads after the first: created by the restored main thread itself
//! (a remote `clone3` with `CLONE_THREAD`, `set_tid` = the saved TID when
//! the PID is ours), then held and set up like the main thread.
//!
//! A new thread starts on the instruction after the trampoline's
//! `syscall`, a `pause; jmp` spin loop, with the creating thread's
//! all-blocked signal mask, no alternate stack and no rseq. The restorer
//! seizes and interrupts it there; nothing of the program runs before its
//! registers are loaded.
//!
//! Per-thread kernel state set here: name, alternate stack, rseq,
//! robust-futex list, credentials (per thread in Linux), and the
//! `clear_child_tid` address (`set_tid_address`) that `pthread_join` relies
//! on. Images record `clear_child_tid`; for older ones, and to rewrite
//! glibc's record of each TID when TIDs change, we look for the offset from
//! the thread pointer (`fs_base`) at which every thread's memory holds its
//! own TID: the `tid` field of glibc's `struct pthread` (glibc 2.26+ on
//! x86-64: 0x2d0).

use tracing::{debug, warn};

use super::child::{CLONE_AT, Child, errno_of};
use super::memory::Layout;
use super::spawn::PidMode;
use crate::error::{Error, Result};
use crate::image::model::{Credentials, ThreadState};
use crate::ptrace::Frozen;
use crate::remote::{RemoteThread, read_memory, write_memory};

/// Scratch offsets of clone3's arguments.
const CLONE_ARGS_AT: u64 = CLONE_AT;
const TIDS_AT: u64 = CLONE_AT + 128;
/// glibc's `offsetof(struct pthread, tid)` on x86-64.
const GLIBC_TID_OFFSET: u64 = 0x2d0;

/// Create a thread for each state in `threads` (the image's threads after
/// the first) and hold it, seized. Their TIDs are pushed to `held` as soon
/// as they are ours, so an error path can reap them.
pub fn create(
    c: &mut Child<'_>,
    threads: &[ThreadState],
    mode: PidMode,
    same_pid: bool,
    in_namespace: bool,
    held: &mut Vec<i32>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let mut taken = Vec::new();
    for state in threads {
        // Never the saved TIDs under `--pid any`: same_pid is false then.
        let want = same_pid.then_some(state.tid);
        let mut tid = clone3(c, flags, 0, want)?;
        if tid == -(libc::EEXIST as i64) && mode == PidMode::Prefer {
            taken.push(state.tid);
            tid = clone3(c, flags, 0, None)?;
        }
        if tid < 0 {
            return Err(Error::Other(format!(
                "cannot create thread {}: {}{}",
                state.tid,
                errno_of(tid),
                if tid == -(libc::EEXIST as i64) {
                    " (its TID is in use)"
                } else {
                    ""
                }
            )));
        }
        // In a PID namespace of its own (--pid-ns), the process was told
        // the TID it has there; we know the thread by another.
        let pid = c.pid();
        let tid = if in_namespace {
            crate::process::host_tid_in(pid, tid as i32).ok_or_else(|| {
                Error::Other(format!("cannot find thread {} of PID {pid}", state.tid))
            })?
        } else {
            tid as i32
        };
        super::spawn::seize(tid)?;
        held.push(tid);
        debug!(saved = state.tid, tid, "thread created");
    }
    if !taken.is_empty() {
        let w = format!("thread IDs {taken:?} are taken; those threads got new ones");
        warn!("{w}");
        warnings.push(w);
    }
    Ok(())
}

/// Remote clone3 in the child's main thread, making a thread or (without
/// CLONE_VM) a child process that reports its exit with `exit_signal`; the
/// raw result. Either starts in the trampoline's spin loop.
pub(super) fn clone3(
    c: &mut Child<'_>,
    flags: u64,
    exit_signal: u64,
    tid: Option<i32>,
) -> Result<i64> {
    let tids_addr = c.put(TIDS_AT, &(tid.unwrap_or(0) as u64).to_ne_bytes())?;
    let mut args = Vec::with_capacity(80);
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size
    for w in [
        flags,
        0,
        0,
        0,
        exit_signal,
        0,
        0,
        0,
        if tid.is_some() { tids_addr } else { 0 },
        u64::from(tid.is_some()),
    ] {
        args.extend_from_slice(&w.to_ne_bytes());
    }
    let addr = c.put(CLONE_ARGS_AT, &args)?;
    c.raw(libc::SYS_clone3, [addr, args.len() as u64, 0, 0, 0, 0])
}

/// Where each thread's `clear_child_tid` points: `fs_base + offset`, the
/// offset at which every thread's thread-control block holds its TID.
pub fn tid_offset(pid: i32, threads: &[ThreadState]) -> Option<u64> {
    let mut blocks = Vec::with_capacity(threads.len());
    for t in threads {
        if t.regs.fs_base == 0 {
            return None;
        }
        // The thread-control block of a thread glibc made sits at the very
        // top of its stack mapping: read as much of it as there is.
        let buf = [4096usize, 2048, 1024].into_iter().find_map(|len| {
            let mut buf = vec![0u8; len];
            read_memory(pid, t.regs.fs_base, &mut buf)
                .ok()
                .map(|()| buf)
        })?;
        blocks.push((t.tid, buf));
    }
    let holds = |off: u64| {
        blocks.iter().all(|(tid, b)| {
            let o = off as usize;
            b.get(o..o + 4)
                .is_some_and(|w| i32::from_ne_bytes([w[0], w[1], w[2], w[3]]) == *tid)
        })
    };
    if holds(GLIBC_TID_OFFSET) {
        return Some(GLIBC_TID_OFFSET);
    }
    // One thread's TID could appear anywhere by chance; all of them at
    // the same offset cannot.
    if threads.len() < 2 {
        return None;
    }
    (0..1024 - 4).step_by(4).find(|&o| holds(o))
}

/// glibc addresses a thread by the TID it keeps in the thread's control
/// block (`pthread_kill`, `raise`, owners of error-checking mutexes): a
/// thread that comes back with a new TID gets the new one written there.
pub fn renumber<'a>(
    pid: i32,
    threads: impl Iterator<Item = (i32, &'a ThreadState)>,
    offset: u64,
) -> Result<()> {
    for (new_tid, state) in threads.filter(|(new_tid, s)| *new_tid != s.tid) {
        write_memory(pid, state.regs.fs_base + offset, &new_tid.to_ne_bytes())?;
    }
    Ok(())
}

/// What one thread needs besides registers, run in that thread.
pub fn setup(
    c: &mut Child<'_>,
    state: &ThreadState,
    tid_offset: Option<u64>,
    creds: &Credentials,
) -> Result<()> {
    let name: String = state.comm.chars().filter(|&ch| ch != '\0').collect();
    let addr = c.put_path(&name)?;
    c.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        [libc::PR_SET_NAME as u64, addr, 0, 0, 0, 0],
    )?;
    // Recorded by the dump; images without it fall back to where glibc
    // keeps the TID.
    let clear_child_tid = state
        .clear_child_tid
        .or_else(|| tid_offset.map(|off| state.regs.fs_base + off));
    if let Some(addr) = clear_child_tid {
        c.call(
            "set_tid_address",
            libc::SYS_set_tid_address,
            [addr, 0, 0, 0, 0, 0],
        )?;
    }
    if let Some(list) = state.robust_list {
        c.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            [list.head, list.len, 0, 0, 0, 0],
        )?;
    }
    super::process::restore_creds(c, creds)?;
    if let Some(rseq) = state.rseq {
        c.call(
            "rseq",
            libc::SYS_rseq,
            [
                rseq.addr,
                u64::from(rseq.len),
                0,
                u64::from(rseq.signature),
                0,
                0,
            ],
        )?;
    }
    Ok(())
}

/// Set up each created thread (in itself) and load its registers.
pub fn finish(
    frozen: &Frozen,
    layout: &Layout,
    held: &[i32],
    states: &[ThreadState],
    tid_offset: Option<u64>,
    creds: &Credentials,
) -> Result<()> {
    for (&tid, state) in held.iter().zip(states) {
        let thread = RemoteThread::borrow(frozen, tid, layout.trampoline)?;
        let mut c = Child::new(thread, layout.scratch, layout.scratch_len);
        super::signals::restore_altstack(&mut c, state.sigaltstack.as_ref())?;
        setup(&mut c, state, tid_offset, creds)?;
        c.into_thread().give_back()?;
        super::registers::load(tid, state)?;
    }
    Ok(())
}
