//! signalfd: the set of signals it accepts (fdinfo `sigmask:`, hex).
//! Restore makes a new one with the same mask; a signalfd reads the
//! signals of whichever process reads it, so the restorer may make it.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::{Error, parse_err};
use crate::fds::restore::{file_err, key, one};
use crate::fds::{Kind, field, no_key};
use crate::image::model::FdKind;

pub static KIND: Kind = Kind {
    probe: |p| {
        if p.target != "anon_inode:[signalfd]" {
            return Ok(None);
        }
        let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
        let mask = field(p.fdinfo, "sigmask:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| parse_err(&what, "no sigmask:"))?;
        Ok(Some(FdKind::SignalFd { mask }))
    },
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make: |d, m, e| {
        let FdKind::SignalFd { mask } = e.kind else {
            return Ok(false);
        };
        let name = format!("signalfd (fd {} of PID {})", e.fd, m.pid);
        // The kernel's sigset is 64 bits on x86-64.
        let set = mask.to_ne_bytes();
        // SAFETY: the kernel reads 8 bytes from `set`; the result is
        // checked and owned.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_signalfd4,
                -1,
                set.as_ptr(),
                8usize,
                libc::SFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(Error::File {
                path: name,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a descriptor we just created.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let status = OFlag::from_bits_retain(e.flags as i32 & libc::O_NONBLOCK);
        fcntl(&fd, FcntlArg::F_SETFL(status)).map_err(file_err(&name))?;
        d.insert(key(m.pid, e), fd);
        Ok(true)
    },
};

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::SignalFd { mask } => {
            let signals: Vec<String> = (1..=64)
                .filter(|n| mask & (1u64 << (n - 1)) != 0)
                .map(|n| n.to_string())
                .collect();
            Some(format!("signalfd for signals {}", signals.join(",")))
        }
        _ => None,
    }
}
