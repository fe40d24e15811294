//! Signal state: dispositions (process-wide), and per thread the blocked
//! mask, the alternate signal stack and queued signals.
//!
//! Dispositions and alternate stacks are not exposed by /proc or ptrace, so
//! they are read with remote syscalls inside the target.

use crate::error::Result;
use crate::image::model::{AltStack, PendingSignal, SigAction};
use crate::ptrace;
use crate::remote::{RemoteThread, read_memory};

/// `struct kernel_sigaction` on x86-64: handler, flags, restorer, mask.
pub const KERNEL_SIGACTION_SIZE: usize = 32;
/// `stack_t`: ss_sp, ss_flags (+4 bytes padding), ss_size.
const STACK_T_SIZE: usize = 24;

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(word)
}

/// `action` as the kernel's `struct kernel_sigaction`.
pub fn to_kernel(action: &SigAction) -> [u8; KERNEL_SIGACTION_SIZE] {
    let mut k = [0u8; KERNEL_SIGACTION_SIZE];
    for (i, word) in [action.handler, action.flags, action.restorer, action.mask]
        .into_iter()
        .enumerate()
    {
        k[i * 8..i * 8 + 8].copy_from_slice(&word.to_ne_bytes());
    }
    k
}

/// The disposition of `signo` from the kernel's `struct kernel_sigaction`.
pub fn from_kernel(signo: i32, k: &[u8; KERNEL_SIGACTION_SIZE]) -> SigAction {
    SigAction {
        signo,
        handler: u64_at(k, 0),
        flags: u64_at(k, 8),
        restorer: u64_at(k, 16),
        mask: u64_at(k, 24),
    }
}

/// The signals whose disposition must be read (bit `signo - 1`): those the
/// process catches or ignores (`SigCgt`, `SigIgn` of `status`, its
/// /proc/PID/status), and SIGCHLD, whose SA_NOCLDSTOP/SA_NOCLDWAIT act even
/// with SIG_DFL. The others are SIG_DFL, where the kernel uses neither
/// mask nor flags.
pub fn asked_dispositions(status: &str) -> u64 {
    let mask = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            // Unknown: ask about every signal.
            .unwrap_or(u64::MAX)
    };
    mask("SigCgt:") | mask("SigIgn:") | 1 << (libc::SIGCHLD - 1)
}

/// The disposition of every signal that has one (all but SIGKILL, SIGSTOP).
///
/// Each remote call costs frozen time, so only signals the process catches
/// or ignores (`SigCgt`, `SigIgn` of /proc/PID/status), and SIGCHLD (whose
/// SA_NOCLDSTOP/SA_NOCLDWAIT act even with SIG_DFL), are asked; the others
/// are SIG_DFL, where the kernel uses neither mask nor flags, and are
/// recorded as a plain SIG_DFL.
/// `status` is the text of the process's /proc/PID/status, read while it
/// has been frozen (only the process changes its dispositions).
pub async fn dump_actions(
    thread: &mut RemoteThread<'_>,
    scratch: u64,
    status: &str,
) -> Result<Vec<SigAction>> {
    let not_default = asked_dispositions(status);
    let mut actions = Vec::with_capacity(62);
    let mut buf = [0u8; KERNEL_SIGACTION_SIZE];
    for signo in 1..=64i32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        if not_default & (1 << (signo - 1)) == 0 {
            actions.push(SigAction {
                signo,
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            });
            continue;
        }
        thread
            .call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [signo as u64, 0, scratch, 8, 0, 0],
            )
            .await?;
        read_memory(thread.pid(), scratch, &mut buf)?;
        actions.push(from_kernel(signo, &buf));
    }
    Ok(actions)
}

/// The thread's alternate signal stack, if it set one.
pub async fn dump_altstack(
    thread: &mut RemoteThread<'_>,
    scratch: u64,
) -> Result<Option<AltStack>> {
    let buf = match thread.altstack_at_borrow() {
        Some(buf) => buf,
        None => {
            thread
                .call(
                    "sigaltstack",
                    libc::SYS_sigaltstack,
                    [0, scratch, 0, 0, 0, 0],
                )
                .await?;
            let mut buf = [0u8; STACK_T_SIZE];
            read_memory(thread.pid(), scratch, &mut buf)?;
            buf
        }
    };
    let flags = i32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let stack = AltStack {
        sp: u64_at(&buf, 0),
        flags,
        size: u64_at(&buf, 16),
    };
    // SS_DISABLE means "none"; the other fields are then meaningless.
    Ok((flags & libc::SS_DISABLE == 0).then_some(stack))
}

/// Signals queued for one thread alone.
pub fn dump_thread_pending(tid: i32) -> Result<Vec<PendingSignal>> {
    ptrace::pending_signals(tid, false)
}

/// Signals queued for the whole process.
pub fn dump_shared_pending(tid: i32) -> Result<Vec<PendingSignal>> {
    ptrace::pending_signals(tid, true)
}

/// Whether the process has its own handler for `signo` (not default, not ignored).
pub fn has_handler(actions: &[SigAction], signo: i32) -> bool {
    actions.iter().any(|a| a.signo == signo && a.handler > 1)
}

/// Set the disposition of `signo` inside the running process `pid` and
/// return the one it replaces. The process is frozen for the moment of one
/// remote `rt_sigaction`, then runs on.
///
/// This is how `chpox register` makes the trigger signal harmless: with
/// SIG_IGN the kernel drops the signal at generation, so the target never
/// sees it, while the tracepoint still fires for the eBPF program.
pub fn set_action(pid: i32, action: SigAction) -> Result<SigAction> {
    let frozen = crate::ptrace::Frozen::freeze(pid)?;
    let syscall_ip = crate::remote::find_syscall_insn(pid)?;
    let gadgets = crate::safe_return::find_gadgets(pid);
    let mut leader = RemoteThread::borrow_guarded(&frozen, pid, gadgets.as_ref(), syscall_ip)?;
    let scratch_len = 4096;
    let scratch = leader.map_scratch(scratch_len)?;
    crate::remote::write_memory(pid, scratch, &to_kernel(&action))?;
    let old_at = scratch + KERNEL_SIGACTION_SIZE as u64;
    let result = leader.checked(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [action.signo as u64, scratch, old_at, 8, 0, 0],
    );
    let mut old = [0u8; KERNEL_SIGACTION_SIZE];
    let read = result.and_then(|_| read_memory(pid, old_at, &mut old));
    leader.unmap(scratch, scratch_len)?;
    leader.give_back()?;
    frozen.resume();
    read?;
    Ok(from_kernel(action.signo, &old))
}

/// SIG_IGN for `signo`, as `set_action` takes it.
pub fn ignore(signo: i32) -> SigAction {
    SigAction {
        signo,
        handler: libc::SIG_IGN as u64,
        flags: 0,
        restorer: 0,
        mask: 0,
    }
}

/// What /proc/PID/status says about `signo` without stopping the process:
/// ignored (SigIgn), caught by a handler (SigCgt), or default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Default,
    Ignored,
    Handled,
}

pub fn disposition(pid: i32, signo: i32) -> Result<Disposition> {
    let status = crate::error::read_proc(&format!("/proc/{pid}/status"))?;
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let bit = 1u64 << (signo - 1);
    Ok(if mask("SigIgn:") & bit != 0 {
        Disposition::Ignored
    } else if mask("SigCgt:") & bit != 0 {
        Disposition::Handled
    } else {
        Disposition::Default
    })
}
