//! Registers of each thread: general registers (with the TLS bases), the full
//! XSAVE area, and whether the thread was stopped inside a system call.

use crate::error::Result;
use crate::image::model::{GpRegs, RestartKind, SyscallState};
use crate::ptrace;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
/// `__NR_restart_syscall` on x86-64.
pub const NR_RESTART_SYSCALL: u64 = 219;
/// Offset of XSTATE_BV (which components hold non-initial state) in an XSAVE area.
const XSTATE_BV_OFFSET: usize = 512;

pub struct ThreadRegs {
    pub gp: GpRegs,
    pub xsave: Vec<u8>,
    pub syscall: SyscallState,
}

pub fn dump_thread_regs(tid: i32) -> Result<ThreadRegs> {
    let raw = ptrace::get_regs(tid)?;
    let gp = ptrace::gp_regs_from(&raw);
    Ok(ThreadRegs {
        syscall: classify_syscall(&gp),
        gp,
        xsave: ptrace::get_xstate(tid)?,
    })
}

/// What the kernel would do with this thread's syscall when it resumes.
pub fn classify_syscall(regs: &GpRegs) -> SyscallState {
    // orig_rax is -1 outside a syscall.
    if (regs.orig_rax as i64) < 0 {
        return SyscallState::None;
    }
    let nr = regs.orig_rax;
    let restart = match -(regs.rax as i64) {
        ERESTARTSYS => RestartKind::Sys,
        ERESTARTNOINTR => RestartKind::NoIntr,
        ERESTARTNOHAND => RestartKind::NoHand,
        ERESTART_RESTARTBLOCK => RestartKind::RestartBlock,
        _ => return SyscallState::Completed { nr },
    };
    SyscallState::Restartable { nr, restart }
}

/// Registers that continue an interrupted syscall the way the kernel's own
/// signal-return path would: step back onto the `syscall` instruction and
/// run it again (or `restart_syscall`, which resumes a sleep with the time
/// it had left).
///
/// Needed whenever a thread leaves ptrace from a stop other than the one
/// that interrupted it (after a remote syscall, or on restore): only the
/// interrupted stop's return path applies the restart by itself.
pub fn restarted(regs: &libc::user_regs_struct) -> libc::user_regs_struct {
    let mut out = *regs;
    let gp = ptrace::gp_regs_from(regs);
    if let SyscallState::Restartable { nr, restart } = classify_syscall(&gp) {
        out.rax = match restart {
            RestartKind::RestartBlock => NR_RESTART_SYSCALL,
            _ => nr,
        };
        // `syscall` is two bytes: 0f 05.
        out.rip = regs.rip.wrapping_sub(2);
        // Not inside a syscall any more: a signal arriving before the thread
        // returns to user space must not apply the restart a second time.
        out.orig_rax = u64::MAX;
    }
    out
}

/// XSTATE_BV of a thread's XSAVE area: the state components it actually uses.
pub fn xstate_bv(xsave: &[u8]) -> u64 {
    xsave
        .get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// XSAVE state components (bit numbers in XCR0 / XSTATE_BV).
pub mod component {
    pub const X87: u32 = 0;
    pub const SSE: u32 = 1;
    /// Upper halves of ymm0–15.
    pub const AVX: u32 = 2;
    /// k0–k7.
    pub const OPMASK: u32 = 5;
    /// Upper halves of zmm0–15.
    pub const ZMM_HI256: u32 = 6;
    /// zmm16–31, whole.
    pub const HI16_ZMM: u32 = 7;
    pub const PKRU: u32 = 9;
}

/// The bytes of one state component in a standard-format (ptrace) XSAVE
/// area. Extended components sit where CPUID 0xD says, which differs
/// between vendors (AMD and Intel place the AVX-512 state differently), so
/// never hard-code an offset. `None` if the CPU does not have it.
pub fn xsave_component(xsave: &[u8], n: u32) -> Option<&[u8]> {
    let (offset, size) = match n {
        // Legacy FXSAVE region: x87 registers at 32, XMM registers at 160.
        component::X87 => (32usize, 128usize),
        component::SSE => (160, 256),
        _ => {
            let leaf = std::arch::x86_64::__cpuid_count(0xd, n);
            if leaf.eax == 0 {
                return None;
            }
            (leaf.ebx as usize, leaf.eax as usize)
        }
    };
    xsave.get(offset..offset + size)
}

/// XCR0 of this CPU (the XSAVE components the kernel enabled) and the XSAVE
/// area size for them. Zero if the CPU has no XSAVE.
pub fn host_xfeatures() -> (u64, u32) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID.1:ECX bit 27 is OSXSAVE: XGETBV is usable.
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        return (0, 512);
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 reads XCR0; OSXSAVE (checked above) makes it
    // legal in user mode. It touches no memory.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    let xcr0 = (u64::from(hi) << 32) | u64::from(lo);
    let size = __cpuid_count(0xd, 0).ebx;
    (xcr0, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(orig_rax: u64, rax: i64) -> GpRegs {
        GpRegs {
            orig_rax,
            rax: rax as u64,
            ..Default::default()
        }
    }

    #[test]
    fn user_code_is_not_in_a_syscall() {
        assert_eq!(classify_syscall(&regs(u64::MAX, 5)), SyscallState::None);
    }

    #[test]
    fn restart_codes_are_recognised() {
        assert_eq!(
            classify_syscall(&regs(35, -516)),
            SyscallState::Restartable {
                nr: 35,
                restart: RestartKind::RestartBlock
            }
        );
        assert_eq!(
            classify_syscall(&regs(0, -512)),
            SyscallState::Restartable {
                nr: 0,
                restart: RestartKind::Sys
            }
        );
        assert_eq!(
            classify_syscall(&regs(0, 3)),
            SyscallState::Completed { nr: 0 }
        );
    }

    #[test]
    fn restart_steps_back_onto_the_syscall() {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.orig_rax = 35;
        r.rax = (-516i64) as u64;
        r.rip = 0x1002;
        let out = restarted(&r);
        assert_eq!((out.rax, out.rip, out.orig_rax), (219, 0x1000, u64::MAX));
        r.orig_rax = 0;
        r.rax = (-512i64) as u64;
        assert_eq!(restarted(&r).rax, 0);
    }

    #[test]
    fn host_has_some_xsave_state() {
        let (xcr0, size) = host_xfeatures();
        // x87 and SSE are always enabled where XSAVE exists.
        assert_eq!(xcr0 & 3, 3);
        assert!(size >= 576);
    }
}
