//! epoll: the interest list, from fdinfo (`tfd: N events: X data: X pos:
//! ino: sdev:`), each entry with its events (EPOLLET, EPOLLONESHOT,
//! EPOLLEXCLUSIVE included, and a fired one-shot entry as disabled as it
//! was) and its data.
//!
//! An entry names its target by descriptor number in the table of the
//! process that added it: each entry is looked for among the processes of
//! the tree that hold the instance, and must still be the file that was
//! added in one of them (closed or replaced since everywhere, it is
//! refused by name).
//!
//! Restore: the restorer makes an empty instance; the process where each
//! entry was found adds it itself (`epoll_ctl`, remotely) once all its
//! descriptors are in place, so an epoll watching another epoll comes
//! back too.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result, parse_err};
use crate::fds::restore::{Descriptions, key, one};
use crate::fds::{Embed, Kind, Probe, no_key};
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
        pid: 0,
        via: None,
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

/// Each entry of each instance must be found again: in some process of
/// the tree holding the instance, the entry's descriptor number must still
/// be the file that was added (the process that added it, or one that
/// inherited both since). That process adds it back at restore. An entry
/// whose number was closed while the file lives on under another number
/// (the kernel keeps the entry) is added back through that other number,
/// put at the entry's number for the time of the call (what is there
/// then is put back after). Targets replaced
/// by /dev/null on request are left out (epoll cannot watch /dev/null).
fn check_targets(e: &mut Embed<'_>) -> Result<()> {
    use std::collections::{HashMap, HashSet};
    /// A process holding an instance: its PID, its number for the
    /// instance, its numbers, those of them that are /dev/null.
    struct Holder {
        pid: i32,
        efd: i32,
        fds: Vec<i32>,
        nulled: HashSet<i32>,
    }
    let mut holders: HashMap<u64, Vec<Holder>> = HashMap::new();
    for p in e.procs.iter() {
        let nulled: HashSet<i32> = p
            .fds
            .iter()
            .filter(|x| matches!(x.kind, FdKind::ReplacedByNull { .. }))
            .map(|x| x.fd)
            .collect();
        for entry in &p.fds {
            if matches!(entry.kind, FdKind::Epoll { .. }) {
                let list = holders.entry(entry.description).or_default();
                if list.iter().all(|h| h.pid != p.process.pid) {
                    list.push(Holder {
                        pid: p.process.pid,
                        efd: entry.fd,
                        fds: p.fds.iter().map(|x| x.fd).collect(),
                        nulled: nulled.clone(),
                    });
                }
            }
        }
    }
    let mut resolved: HashMap<u64, Vec<EpollTarget>> = HashMap::new();
    let mut wrong = Vec::new();
    for p in e.procs.iter() {
        for entry in &p.fds {
            let FdKind::Epoll { targets } = &entry.kind else {
                continue;
            };
            if resolved.contains_key(&entry.description) {
                continue;
            }
            let held = holders
                .get(&entry.description)
                .map_or(&[][..], Vec::as_slice);
            let mut kept = Vec::new();
            for (i, t) in targets.iter().enumerate() {
                // Entries with the same number, in the kernel's order.
                let toff = targets[..i].iter().filter(|x| x.fd == t.fd).count() as u32;
                let at_its_number = held
                    .iter()
                    .find(|h| is_target(h.pid, h.efd, t.fd, t, toff))
                    .map(|h| (h, None));
                let elsewhere = || {
                    held.iter().find_map(|h| {
                        h.fds
                            .iter()
                            .filter(|&&fd| !h.nulled.contains(&fd))
                            .find(|&&fd| is_target(h.pid, h.efd, fd, t, toff))
                            .map(|&fd| (h, Some(fd)))
                    })
                };
                match at_its_number.or_else(elsewhere) {
                    Some((h, None)) if h.nulled.contains(&t.fd) => {}
                    Some((h, via)) => kept.push(EpollTarget {
                        pid: h.pid,
                        via,
                        ..t.clone()
                    }),
                    None => wrong.push(format!(
                        "PID {} fd {} (epoll watching fd {}, which no process holding it has as that file any more)",
                        p.process.pid, entry.fd, t.fd
                    )),
                }
            }
            resolved.insert(entry.description, kept);
        }
    }
    if !wrong.is_empty() {
        // Not UnsupportedFds: /dev/null in its place would not help.
        return Err(Error::Other(format!(
            "cannot restore {}: an epoll entry is added back by the number it was added under",
            wrong.join(", ")
        )));
    }
    for entry in e.procs.iter_mut().flat_map(|p| p.fds.iter_mut()) {
        if let FdKind::Epoll { targets } = &mut entry.kind
            && let Some(r) = resolved.get(&entry.description)
        {
            targets.clone_from(r);
        }
    }
    Ok(())
}

/// Whether fd `fd` of `pid` is the file of the `toff`-th entry for number
/// `t.fd` of the epoll instance at fd `efd` of `pid` (`kcmp`
/// KCMP_EPOLL_TFD: exact, where inode numbers are not; every eventfd,
/// timerfd or epoll shares one anonymous inode). The inode and device
/// must match too.
fn is_target(pid: i32, efd: i32, fd: i32, t: &EpollTarget, toff: u32) -> bool {
    const KCMP_EPOLL_TFD: i32 = 7;
    let same_inode = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|m| m.ino() == t.ino && m.dev() == t.dev);
    if !same_inode {
        return false;
    }
    // struct kcmp_epoll_slot { efd, tfd, toff }
    let slot: [u32; 3] = [efd as u32, t.fd as u32, toff];
    // SAFETY: the kernel reads the 12-byte slot; the rest are integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            slot.as_ptr(),
        )
    };
    r == 0
}

/// Restore, once the process holds its descriptors: the entries of each
/// instance it holds that it is to add (those found in its table at dump
/// time), each once.
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
        for (i, t) in targets.iter().enumerate() {
            // 0: an entry of no named process, added by the first holder.
            if t.pid != pid_in_image && t.pid != 0 {
                continue;
            }
            let k = crate::fds::restore::Key::Object("epoll entry", e.description, i as u64);
            if e.description != 0 && !d.first_time(k) {
                continue;
            }
            // struct epoll_event is packed on x86-64: events, then data.
            let mut event = Vec::with_capacity(12);
            event.extend_from_slice(&t.events.to_ne_bytes());
            event.extend_from_slice(&t.data.to_ne_bytes());
            let at = c.put(ARGS_AT, &event)?;
            // The entry's number was closed, its file lives on as `via`:
            // at the entry's number for the call only, what is there now
            // kept aside and put back after.
            let occupant = fds.iter().find(|x| x.fd == t.fd);
            let mut aside = None;
            if let Some(via) = t.via {
                if occupant.is_some() {
                    let top = fds.iter().map(|x| x.fd + 1).max().unwrap_or(0);
                    aside = Some(c.call(
                        "fcntl(F_DUPFD_CLOEXEC)",
                        libc::SYS_fcntl,
                        [
                            t.fd as u64,
                            libc::F_DUPFD_CLOEXEC as u64,
                            top as u64,
                            0,
                            0,
                            0,
                        ],
                    )?);
                }
                c.call(
                    "dup3",
                    libc::SYS_dup3,
                    [via as u64, t.fd as u64, libc::O_CLOEXEC as u64, 0, 0, 0],
                )?;
            }
            let added = c
                .call(
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
                });
            match (aside, occupant) {
                (Some(aside), Some(o)) => {
                    let cloexec = if o.cloexec { libc::O_CLOEXEC } else { 0 };
                    c.call(
                        "dup3",
                        libc::SYS_dup3,
                        [aside, t.fd as u64, cloexec as u64, 0, 0, 0],
                    )?;
                    c.close(aside as i32)?;
                }
                _ if t.via.is_some() => c.close(t.fd)?,
                _ => {}
            }
            added?;
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
