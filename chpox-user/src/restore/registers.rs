//! The thread's registers, XSAVE area and signal mask, loaded with ptrace
//! once the remote syscalls are done.
//!
//! A thread checkpointed inside a restartable syscall goes back onto its
//! `syscall` instruction with the syscall number in rax, so it runs the
//! call again instead of returning an error. For calls the kernel would
//! have continued through `restart_syscall`, the new process has no
//! restart block: the *original* syscall runs again with its original
//! arguments. For a relative sleep that is the time left whenever the
//! program passed its timespec as the remainder too (glibc `sleep()`, Rust
//! `thread::sleep`): the kernel wrote the time left into it when the freeze
//! interrupted the sleep, and the dump saved that memory. With no remainder
//! pointer the sleep starts over; an absolute one wakes at its deadline.
//! Pointing the call at a separate remainder instead would change argument
//! registers the kernel promises to preserve, which compiled code may rely
//! on after the call.
//!
//! A thread in a blocking call that restarts unseen is then stepped into
//! the call (to its syscall-entry stop) before it is let go: a signal that comes after the restore must find
//! it *in* the call, which the handler then interrupts (EINTR), as it
//! would have the original. Let go on the `syscall` instruction instead, a
//! signal arriving before the thread first runs (a loaded machine, or a
//! process restored stopped and then sent a signal before SIGCONT) runs
//! its handler and the call starts over afterwards: Python's `time.sleep`
//! went on sleeping with the handler's work never done.

use crate::error::Result;
use crate::image::model::{GpRegs, SyscallState, ThreadState};
use crate::ptrace;

pub fn user_regs(g: &GpRegs) -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: g.r15,
        r14: g.r14,
        r13: g.r13,
        r12: g.r12,
        rbp: g.rbp,
        rbx: g.rbx,
        r11: g.r11,
        r10: g.r10,
        r9: g.r9,
        r8: g.r8,
        rax: g.rax,
        rcx: g.rcx,
        rdx: g.rdx,
        rsi: g.rsi,
        rdi: g.rdi,
        orig_rax: g.orig_rax,
        rip: g.rip,
        cs: g.cs,
        eflags: g.eflags,
        rsp: g.rsp,
        ss: g.ss,
        fs_base: g.fs_base,
        gs_base: g.gs_base,
        ds: g.ds,
        es: g.es,
        fs: g.fs,
        gs: g.gs,
    }
}

/// The registers the thread resumes with (see the module documentation).
pub fn resume_regs(state: &ThreadState) -> libc::user_regs_struct {
    let mut r = user_regs(&state.regs);
    if let SyscallState::Restartable { nr, .. } = state.syscall {
        r.rax = nr;
        // `syscall` is two bytes: 0f 05.
        r.rip = r.rip.wrapping_sub(2);
    }
    // We leave from a syscall-exit stop of our own; the kernel must not
    // apply any restart logic of its own on the way out.
    r.orig_rax = u64::MAX;
    r
}

/// The saved XSAVE area in the size this kernel takes: the image's bytes
/// over the thread's current area (same layout on the same CPU; a shorter
/// or longer saved area is cut or padded, its header says which
/// components hold state).
pub fn fit_xsave(saved: &[u8], current: &[u8]) -> Vec<u8> {
    let mut out = current.to_vec();
    let n = saved.len().min(out.len());
    out[..n].copy_from_slice(&saved[..n]);
    out
}

/// Load registers, XSAVE area and signal mask into stopped thread `tid`.
pub fn load(tid: i32, state: &ThreadState) -> Result<()> {
    ptrace::set_regs(tid, resume_regs(state))?;
    let current = ptrace::get_xstate(tid)?;
    ptrace::set_xstate(tid, &fit_xsave(&state.xsave, &current))?;
    ptrace::set_sigmask(tid, state.sigmask)?;
    Ok(())
}

/// Step every thread of `threads` (TID, state) loaded to go back into a
/// syscall to that call's entry (see the module documentation). Once the
/// whole process is restored: a signal delivered on the way runs its
/// handler in the finished process. Not for a lazy restore: stepping may
/// touch the thread's memory (a signal frame, code in an anonymous
/// mapping) before the page server that fills it runs.
pub fn step_into_syscalls<'a>(
    threads: impl IntoIterator<Item = (i32, &'a ThreadState)>,
) -> Result<()> {
    for (tid, state) in threads {
        if let SyscallState::Restartable { nr, .. } = state.syscall
            && restarts_unseen(nr)
        {
            step_into_syscall(tid, nr)?;
        }
    }
    Ok(())
}

/// Whether syscall `nr`, woken at its start by our release (a detach wakes
/// the thread as a signal would, with no signal), starts over unseen by
/// the program: the blocking calls that answer a pending signal with a
/// restart (`-ERESTARTSYS`, `-ERESTARTNOHAND`, or a restart block, as
/// sleeps and timed waits do). Not `epoll_wait` and the like, which would
/// return a spurious EINTR: those keep being let go on their instruction.
fn restarts_unseen(nr: u64) -> bool {
    [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_pause,
        libc::SYS_rt_sigsuspend,
        libc::SYS_futex,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_flock,
    ]
    .iter()
    .any(|&n| n as u64 == nr)
}

/// Run stopped thread `tid`, whose registers point at a `syscall`
/// instruction for call `nr`, to that call's entry stop. A signal
/// delivered on the way is passed on (its handler runs, the thread comes
/// back to the instruction, as without us); a group-stop on the way ends
/// the stepping there (the thread stops as the process was asked to, and
/// runs the call when continued, as before this step existed).
fn step_into_syscall(tid: i32, nr: u64) -> Result<()> {
    use nix::sys::ptrace as raw;
    use nix::unistd::Pid;
    let mut deliver = None;
    for _ in 0..16 {
        raw::syscall(Pid::from_raw(tid), deliver).map_err(|source| crate::Error::Ptrace {
            op: "syscall",
            tid,
            source,
        })?;
        match ptrace::wait_stop(tid)? {
            ptrace::Stop::Syscall => {
                let at = ptrace::get_regs(tid)?;
                if at.orig_rax == nr {
                    return Ok(());
                }
                return Err(crate::Error::RemoteProtocol {
                    tid,
                    what: format!(
                        "stepped into syscall {} instead of {nr} while restoring",
                        at.orig_rax as i64
                    ),
                });
            }
            ptrace::Stop::Signal(sig) => deliver = Some(sig),
            ptrace::Stop::Event => return Ok(()),
            ptrace::Stop::Exited => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::RestartKind;

    fn state(syscall: SyscallState) -> ThreadState {
        ThreadState {
            tid: 1,
            regs: GpRegs {
                rip: 0x1002,
                rax: (-516i64) as u64,
                orig_rax: 35,
                ..Default::default()
            },
            xsave: Vec::new(),
            sigmask: 0,
            syscall,
            sigaltstack: None,
            pending: Vec::new(),
            rseq: None,
            comm: String::new(),
            clear_child_tid: None,
            robust_list: None,
        }
    }

    #[test]
    fn restart_block_reruns_the_original_syscall() {
        let r = resume_regs(&state(SyscallState::Restartable {
            nr: 35,
            restart: RestartKind::RestartBlock,
        }));
        assert_eq!((r.rax, r.rip, r.orig_rax), (35, 0x1000, u64::MAX));
    }

    #[test]
    fn completed_syscall_keeps_its_result() {
        let r = resume_regs(&state(SyscallState::Completed { nr: 35 }));
        assert_eq!(
            (r.rax, r.rip, r.orig_rax),
            ((-516i64) as u64, 0x1002, u64::MAX)
        );
    }

    #[test]
    fn xsave_is_fitted_to_the_current_size() {
        assert_eq!(fit_xsave(&[1, 2, 3], &[0; 5]), [1, 2, 3, 0, 0]);
        assert_eq!(fit_xsave(&[1, 2, 3], &[0; 2]), [1, 2]);
    }
}
