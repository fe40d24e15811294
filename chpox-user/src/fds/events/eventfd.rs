//! eventfd: its counter and EFD_SEMAPHORE, from fdinfo
//! (`eventfd-count:` in hex, `eventfd-semaphore:`); O_NONBLOCK is in the
//! entry's flags. Restore makes a new one and writes the count into it.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::{Error, parse_err};
use crate::fds::restore::{file_err, key, one};
use crate::fds::{Kind, field, no_key};
use crate::image::model::FdKind;

pub static KIND: Kind = Kind {
    probe: |p| {
        if p.target != "anon_inode:[eventfd]" {
            return Ok(None);
        }
        let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
        let count = field(p.fdinfo, "eventfd-count:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| parse_err(&what, "no eventfd-count:"))?;
        let semaphore = match field(p.fdinfo, "eventfd-semaphore:") {
            Some(v) => v == "1",
            None => {
                return Err(parse_err(
                    &what,
                    "no eventfd-semaphore: (kernel before 6.6?)",
                ));
            }
        };
        Ok(Some(FdKind::EventFd { count, semaphore }))
    },
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make: |d, m, e| {
        let FdKind::EventFd { count, semaphore } = e.kind else {
            return Ok(false);
        };
        let name = format!("eventfd (fd {} of PID {})", e.fd, m.pid);
        let mut flags = libc::EFD_CLOEXEC | libc::EFD_NONBLOCK;
        if semaphore {
            flags |= libc::EFD_SEMAPHORE;
        }
        // SAFETY: eventfd takes integers; the result is checked and owned.
        let raw = unsafe { libc::eventfd(0, flags) };
        if raw < 0 {
            return Err(Error::File {
                path: name,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a descriptor we just created.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The counter is 64 bits; eventfd()'s initial value only 32.
        if count > 0 {
            nix::unistd::write(&fd, &count.to_ne_bytes()).map_err(file_err(&name))?;
        }
        let status = OFlag::from_bits_retain(e.flags as i32 & libc::O_NONBLOCK);
        fcntl(&fd, FcntlArg::F_SETFL(status)).map_err(file_err(&name))?;
        d.insert(key(m.pid, e), fd);
        Ok(true)
    },
};

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::EventFd { count, semaphore } => Some(format!(
            "eventfd, count {count}{}",
            if *semaphore { ", semaphore" } else { "" }
        )),
        _ => None,
    }
}
