//! Signal state: dispositions, the alternate stack, queued signals. (The
//! blocked mask is loaded with ptrace at the very end: until then every
//! signal stays blocked while the child runs our syscalls.)

use tracing::warn;

use super::child::{ARGS_AT, Child, errno_of};
use crate::error::Result;
use crate::image::model::{AltStack, PendingSignal, ProcessImage, SigAction};

const SS_AUTODISARM: i32 = 1 << 31;

/// The restorer's own dispositions, which a process it forks starts with:
/// [`restore_actions`] leaves alone those the image has too (most are the
/// default), a remote call each saved.
pub fn own_actions() -> Vec<SigAction> {
    let mut actions = Vec::with_capacity(62);
    for signo in 1..=64i32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        let mut k = [0u8; crate::signals::KERNEL_SIGACTION_SIZE];
        // SAFETY: rt_sigaction with no new action only writes the old one
        // into `k`, which is a kernel_sigaction's size (sigsetsize 8).
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signo,
                std::ptr::null::<u8>(),
                k.as_mut_ptr(),
                8usize,
            )
        };
        if r == 0 {
            actions.push(crate::signals::from_kernel(signo, &k));
        }
    }
    actions
}

/// `rt_sigaction` for every saved disposition the process does not have
/// already: `inherited` are the ones it started with (from
/// [`own_actions`] of its creator), or `None` to set every one.
pub fn restore_actions(
    c: &mut Child<'_>,
    actions: &[SigAction],
    inherited: Option<&[SigAction]>,
) -> Result<()> {
    for a in actions {
        let same = |b: &SigAction| {
            b.signo == a.signo
                && b.handler == a.handler
                && b.flags == a.flags
                && b.restorer == a.restorer
                && b.mask == a.mask
        };
        if inherited.is_some_and(|have| have.iter().any(same)) {
            continue;
        }
        let addr = c.put(ARGS_AT, &crate::signals::to_kernel(a))?;
        c.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            [a.signo as u64, addr, 0, 8, 0, 0],
        )?;
    }
    Ok(())
}

/// The saved alternate stack, or none: the child inherited chpox's (Rust
/// installs one for stack-overflow reports), which is unmapped now.
pub fn restore_altstack(c: &mut Child<'_>, stack: Option<&AltStack>) -> Result<()> {
    let (sp, flags, size) = match stack {
        // SS_ONSTACK is not a setting, only what the kernel reports while
        // the thread runs on it.
        Some(s) => (s.sp, s.flags & SS_AUTODISARM, s.size),
        None => (0, libc::SS_DISABLE, 0),
    };
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&sp.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[16..].copy_from_slice(&size.to_ne_bytes());
    let addr = c.put(ARGS_AT, &b)?;
    c.call("sigaltstack", libc::SYS_sigaltstack, [addr, 0, 0, 0, 0, 0])?;
    Ok(())
}

/// Queue the saved pending signals again, with their siginfo: the
/// process-wide ones, then each thread's own (`tids`: the new TIDs, in the
/// image's thread order). The child queues them to itself, which the
/// kernel allows for any siginfo; every signal is still blocked.
pub fn restore_pending(
    c: &mut Child<'_>,
    image: &ProcessImage,
    tids: &[i32],
    warnings: &mut Vec<String>,
) -> Result<()> {
    // As the process numbers itself: the main thread's TID is its PID.
    let pid = tids.first().copied().unwrap_or(c.pid());
    queue(c, pid, None, &image.signals.shared_pending, warnings)?;
    for (&tid, state) in tids.iter().zip(&image.threads) {
        queue(c, pid, Some((tid, state.tid)), &state.pending, warnings)?;
    }
    Ok(())
}

/// Queue `list` to the process, or to thread `(new tid, saved tid)`.
fn queue(
    c: &mut Child<'_>,
    pid: i32,
    thread: Option<(i32, i32)>,
    list: &[PendingSignal],
    warnings: &mut Vec<String>,
) -> Result<()> {
    let pid = pid as u64;
    for p in list {
        if p.signo == libc::SIGKILL || p.signo == libc::SIGSTOP || p.siginfo.len() != 128 {
            continue;
        }
        let info = c.put(ARGS_AT, &p.siginfo)?;
        let ret = match thread {
            None => c.raw(
                libc::SYS_rt_sigqueueinfo,
                [pid, p.signo as u64, info, 0, 0, 0],
            )?,
            Some((tid, _)) => c.raw(
                libc::SYS_rt_tgsigqueueinfo,
                [pid, tid as u64, p.signo as u64, info, 0, 0],
            )?,
        };
        if ret < 0 {
            let whose = thread.map_or(String::new(), |(_, saved)| format!(" of thread {saved}"));
            let w = format!(
                "could not queue pending signal {}{whose} again: {}",
                p.signo,
                errno_of(ret)
            );
            warn!("{w}");
            warnings.push(w);
        }
    }
    Ok(())
}
