//! Per-thread state that ptrace can read directly: registers, XSAVE area,
//! blocked mask, queued signals, rseq, name. (The alternate signal stack
//! needs a remote syscall; `dump` adds it.)
//!
//! Read this before borrowing a thread for remote syscalls: afterwards its
//! registers show our restart fix-up, not the state it was stopped in.

use crate::error::Result;
use crate::image::model::ThreadState;
use crate::{process, ptrace, registers, signals};

pub fn dump_thread(pid: i32, tid: i32) -> Result<ThreadState> {
    let regs = registers::dump_thread_regs(tid)?;
    Ok(ThreadState {
        tid,
        regs: regs.gp,
        xsave: regs.xsave,
        sigmask: ptrace::get_sigmask(tid)?,
        syscall: regs.syscall,
        sigaltstack: None,
        pending: signals::dump_thread_pending(tid)?,
        rseq: ptrace::rseq_config(tid)?,
        comm: process::thread_comm(pid, tid)?,
        clear_child_tid: None,
    })
}

/// The thread's `clear_child_tid`, which only the thread itself can ask
/// for (`prctl(PR_GET_TID_ADDRESS)` writes it to `scratch`).
pub fn dump_clear_child_tid(
    thread: &mut crate::remote::RemoteThread<'_>,
    scratch: u64,
) -> Result<Option<u64>> {
    thread.checked(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
    )?;
    let mut word = [0u8; 8];
    crate::remote::read_memory(thread.pid(), scratch, &mut word)?;
    Ok(Some(u64::from_ne_bytes(word)))
}
