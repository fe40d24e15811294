//! Per-thread state that ptrace can read directly: registers, XSAVE area,
//! blocked mask, queued signals, rseq, robust-futex list, name. (The
//! alternate signal stack and `clear_child_tid` need a remote syscall;
//! `dump` adds them.)
//!
//! Read this before borrowing a thread for remote syscalls: afterwards its
//! registers show our restart fix-up, not the state it was stopped in.

use crate::error::Error;
use crate::error::Result;
use crate::image::model::{RobustList, ThreadState};
use crate::{process, ptrace, registers, signals};

/// `comm` is the thread's name where known already (from the kernel's
/// structures, see `kernelstate`); else read from /proc.
pub fn dump_thread(pid: i32, tid: i32, comm: Option<String>) -> Result<ThreadState> {
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
        comm: match comm {
            Some(comm) => comm,
            None => process::thread_comm(pid, tid)?,
        },
        clear_child_tid: None,
        robust_list: robust_list(tid)?,
    })
}

/// The robust-futex list the thread registered, if any. Another process
/// may ask for it with the rights of a tracer, which the dumper is.
pub fn robust_list(tid: i32) -> Result<Option<RobustList>> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list writes one pointer to `head` and one size_t
    // to `len`, both live locals of exactly those sizes.
    let rc = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &raw mut head, &raw mut len) };
    if rc != 0 {
        return Err(Error::Ptrace {
            op: "get_robust_list",
            tid,
            source: nix::errno::Errno::last(),
        });
    }
    Ok((head != 0).then_some(RobustList {
        head,
        len: len as u64,
    }))
}

/// The thread's `clear_child_tid`, which only the thread itself can ask
/// for (`prctl(PR_GET_TID_ADDRESS)` writes it to `scratch`).
pub async fn dump_clear_child_tid(
    thread: &mut crate::remote::RemoteThread<'_>,
    scratch: u64,
) -> Result<Option<u64>> {
    thread
        .call(
            "prctl(PR_GET_TID_ADDRESS)",
            libc::SYS_prctl,
            [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
        )
        .await?;
    let mut word = [0u8; 8];
    crate::remote::read_memory(thread.pid(), scratch, &mut word)?;
    Ok(Some(u64::from_ne_bytes(word)))
}
