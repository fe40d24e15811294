//! epoll: the interest list, from fdinfo (`tfd: N events: X data: X pos:
//! ino: sdev:`), each entry with its events (EPOLLET, EPOLLONESHOT,
//! EPOLLEXCLUSIVE included, and a fired one-shot entry as disabled as it
//! was) and its data.
//!
//! An entry names its target by descriptor number in the table of the
//! process that added it, and only the numbers of the first process of
//! the tree holding the instance are checked: each target there must
//! still be the file that was added (closed or replaced since, it is
//! refused by name).
//!
//! Restore: the restorer makes an empty instance; the first process that
//! holds it adds the entries itself (`epoll_ctl`, remotely) once all its
//! descriptors are in place, so an epoll watching another epoll comes
//! back too.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::restore::{Descriptions, key, one};
use super::{Embed, Kind, Probe, no_key};
use crate::error::{Error, Result, parse_err};
use crate::image::model::{EpollTarget, FdEntry, FdKind};
use crate::restore::child::{ARGS_AT, Child};

pub static KIND: Kind = Kind {
    probe,
    classify: None,
    embed: Some(check_targets),
    key: no_key,
    needs: one,
    make: |d, m, e| {
        if !matches!(e.kind, FdKind::Epoll { .. }) {
            return Ok(false);
        }
        // SAFETY: epoll_create1 takes a flag; the result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(Error::File {
                path: format!("epoll (fd {} of PID {})", e.fd, m.pid),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a descriptor we just created.
        d.insert(key(m.pid, e), unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(true)
    },
};

/// The kernel's internal dev_t (fdinfo `sdev:`) as `stat` gives it.
pub fn user_dev(kernel: u64) -> u64 {
    libc::makedev((kernel >> 20) as u32, (kernel & 0xfffff) as u32)
}

/// One `tfd:` line.
fn parse_target(line: &str) -> Option<EpollTarget> {
    let mut words = line.split_whitespace();
    let mut next_after = |name: &str| -> Option<String> {
        loop {
            let w = words.next()?;
            if let Some(v) = w.strip_prefix(name) {
                return Some(if v.is_empty() {
                    words.next()?.to_string()
                } else {
                    v.to_string()
                });
            }
        }
    };
    let fd = next_after("tfd:")?.parse().ok()?;
    let events = u32::from_str_radix(&next_after("events:")?, 16).ok()?;
    let data = u64::from_str_radix(&next_after("data:")?, 16).ok()?;
    let ino = u64::from_str_radix(&next_after("ino:")?, 16).ok()?;
    let sdev = u64::from_str_radix(&next_after("sdev:")?, 16).ok()?;
    Some(EpollTarget {
        fd,
        events,
        data,
        ino,
        dev: user_dev(sdev),
    })
}

fn probe(p: &Probe<'_>) -> Result<Option<FdKind>> {
    if p.target != "anon_inode:[eventpoll]" {
        return Ok(None);
    }
    let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
    let mut targets = Vec::new();
    for line in p.fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
        targets.push(parse_target(line).ok_or_else(|| parse_err(&what, line))?);
    }
    Ok(Some(FdKind::Epoll { targets }))
}

/// Each instance's targets, in the first process that holds it, must be
/// the files that were added; targets replaced by /dev/null on request
/// are left out (epoll cannot watch /dev/null).
fn check_targets(e: &mut Embed<'_>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for p in e.procs.iter_mut() {
        let pid = p.process.pid;
        let nulled: std::collections::HashSet<i32> = p
            .fds
            .iter()
            .filter(|x| matches!(x.kind, FdKind::ReplacedByNull { .. }))
            .map(|x| x.fd)
            .collect();
        for entry in &mut p.fds {
            let fd = entry.fd;
            let FdKind::Epoll { targets } = &mut entry.kind else {
                continue;
            };
            if !seen.insert(entry.description) {
                continue;
            }
            targets.retain(|t| !nulled.contains(&t.fd));
            for t in targets.iter() {
                let same = std::fs::metadata(format!("/proc/{pid}/fd/{}", t.fd))
                    .is_ok_and(|m| m.ino() == t.ino && m.dev() == t.dev);
                if !same {
                    wrong.push(format!(
                        "PID {pid} fd {fd} (epoll watching fd {}, which is closed or another file now)",
                        t.fd
                    ));
                }
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsupportedFds(wrong.join(", ")))
    }
}

/// Restore, once the process holds its descriptors: the interest list of
/// each instance it is the first to hold.
pub fn installed(
    c: &mut Child<'_>,
    pid_in_image: i32,
    fds: &[FdEntry],
    d: &Descriptions,
) -> Result<()> {
    for e in fds {
        let FdKind::Epoll { targets } = &e.kind else {
            continue;
        };
        if !d.first_time(key(pid_in_image, e)) {
            continue;
        }
        for t in targets {
            // struct epoll_event is packed on x86-64: events, then data.
            let mut event = Vec::with_capacity(12);
            event.extend_from_slice(&t.events.to_ne_bytes());
            event.extend_from_slice(&t.data.to_ne_bytes());
            let at = c.put(ARGS_AT, &event)?;
            c.call(
                "epoll_ctl",
                libc::SYS_epoll_ctl,
                [
                    e.fd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    t.fd as u64,
                    at,
                    0,
                    0,
                ],
            )
            .map_err(|err| {
                Error::Other(format!(
                    "fd {} (epoll): cannot watch fd {} again: {err}",
                    e.fd, t.fd
                ))
            })?;
        }
    }
    Ok(())
}

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    let FdKind::Epoll { targets } = kind else {
        return None;
    };
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("fd {} events {:#x} data {:#x}", t.fd, t.events, t.data))
        .collect();
    Some(format!("epoll watching [{}]", list.join("; ")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tfd_lines_are_parsed() {
        let t = super::parse_target(
            "tfd:        3 events: 80000019 data:                3  pos:0 ino:40e sdev:10",
        )
        .expect("parses");
        assert_eq!((t.fd, t.events, t.data, t.ino), (3, 0x8000_0019, 3, 0x40e));
        assert_eq!(t.dev, libc::makedev(0, 0x10));
    }
}
