//! pidfd of a process of the checkpoint (fdinfo `Pid:`). A pidfd of a
//! process outside it, or of one that has exited, is refused by name.
//!
//! Restore: the process itself opens it (`pidfd_open`, remotely) once
//! every process of the tree exists and its descriptors are in place, by
//! the PID it sees (its saved one, in a tree or a PID namespace; its own
//! new one for a pidfd of itself when it got another PID). Until then the
//! number holds /dev/null.

use crate::error::{Error, Result, parse_err};
use crate::fds::restore::{Descriptions, dev_null, key, one};
use crate::fds::{Kind, Probe, UnsupportedFd, field, no_key};
use crate::image::model::{FdEntry, FdKind, ProcessImage};
use crate::restore::child::Child;

pub static KIND: Kind = Kind {
    probe,
    classify: Some(classify),
    embed: None,
    key: no_key,
    needs: one,
    make: |d, m, e| {
        if !matches!(e.kind, FdKind::PidFd { .. }) {
            return Ok(false);
        }
        d.insert(key(m.pid, e), dev_null(libc::O_RDONLY as u32)?);
        Ok(true)
    },
};

fn probe(p: &Probe<'_>) -> Result<Option<FdKind>> {
    if p.target != "anon_inode:[pidfd]" && !p.target.starts_with("pidfd:") {
        return Ok(None);
    }
    let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
    let pid: i32 = field(p.fdinfo, "Pid:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| parse_err(&what, "no Pid:"))?;
    if pid <= 0 {
        // Of a process that has exited (or another PID namespace's):
        // unsupported, named by the caller.
        return Ok(None);
    }
    Ok(Some(FdKind::PidFd { pid }))
}

/// A pidfd of a process outside the checkpoint cannot come back.
fn classify(procs: &mut [ProcessImage], policy: UnsupportedFd) -> Result<()> {
    let pids: std::collections::HashSet<i32> = procs.iter().map(|p| p.process.pid).collect();
    let mut outside = Vec::new();
    for p in procs.iter_mut() {
        for e in &mut p.fds {
            let FdKind::PidFd { pid } = e.kind else {
                continue;
            };
            if pids.contains(&pid) {
                continue;
            }
            let was = format!("pidfd of PID {pid}");
            match policy {
                UnsupportedFd::Null => e.kind = FdKind::ReplacedByNull { was },
                UnsupportedFd::Fail => outside.push(format!(
                    "PID {} fd {} ({was}, a process outside the checkpoint)",
                    p.process.pid, e.fd
                )),
            }
        }
    }
    if outside.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsupportedFds(outside.join(", ")))
    }
}

/// Restore, once the process holds its descriptors: open each pidfd.
pub fn installed(
    c: &mut Child<'_>,
    pid_in_image: i32,
    fds: &[FdEntry],
    _: &Descriptions,
) -> Result<()> {
    for e in fds {
        let FdKind::PidFd { pid } = e.kind else {
            continue;
        };
        let target = if pid == pid_in_image {
            c.call("getpid", libc::SYS_getpid, [0; 6])?
        } else {
            pid as u64
        };
        // PIDFD_NONBLOCK is O_NONBLOCK, PIDFD_THREAD O_EXCL.
        let flags = e.flags as i32 & (libc::O_NONBLOCK | libc::O_EXCL);
        let got = c
            .call(
                "pidfd_open",
                libc::SYS_pidfd_open,
                [target, flags as u64, 0, 0, 0, 0],
            )
            .map_err(|err| Error::Other(format!("fd {} (pidfd of PID {pid}): {err}", e.fd)))?;
        let cloexec = if e.cloexec { libc::O_CLOEXEC } else { 0 };
        c.call(
            "dup3",
            libc::SYS_dup3,
            [got, e.fd as u64, cloexec as u64, 0, 0, 0],
        )?;
        c.close(got as i32)?;
    }
    Ok(())
}

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::PidFd { pid } => Some(format!("pidfd of PID {pid}")),
        _ => None,
    }
}
