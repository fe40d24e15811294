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
