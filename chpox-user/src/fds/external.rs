//! Descriptors connected to the outside of the checkpoint (a UNIX socket
//! to a daemon: `FdKind::External`), and those the dump replaced by
//! /dev/null on request (`FdKind::ReplacedByNull`): what restore puts in
//! their place.
//!
//! The user hands in a replacement as CRIU's `--inherit-fd` does: `chpox
//! restore IMG --inherit-fd 7=3` gives descriptor 7 (of every process of
//! the image that holds an external one at 7; `PID:7=3` for one process)
//! the restorer's fd 3. An external descriptor without one refuses the
//! restore, naming every one, before any process exists. One replaced by
//! /dev/null comes back as /dev/null, with one warning line each, unless
//! it too is handed a replacement.

use std::os::fd::{BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, fcntl};

use super::Kind;
use super::restore::{Making, dev_null, key, note};
use crate::error::{Error, Result};
use crate::image::model::{FdEntry, FdKind, Metadata};

/// `--inherit-fd [PID:]FD=N`: fd `fd` (of process `pid`, saved PID, or of
/// any) becomes the restorer's fd `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InheritFd {
    pub pid: Option<i32>,
    pub fd: i32,
    pub from: i32,
}

impl std::str::FromStr for InheritFd {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "--inherit-fd {s:?}: expected FD=N or PID:FD=N (N: a descriptor open in the restorer)"
            )
        };
        let (left, from) = s.split_once('=').ok_or_else(bad)?;
        let (pid, fd) = match left.split_once(':') {
            Some((p, f)) => (Some(p.trim().parse().map_err(|_| bad())?), f),
            None => (None, left),
        };
        let fd: i32 = fd.trim().parse().map_err(|_| bad())?;
        let from: i32 = from.trim().parse().map_err(|_| bad())?;
        if fd < 0 || from < 0 {
            return Err(bad());
        }
        Ok(InheritFd { pid, fd, from })
    }
}

fn replacement(inherit: &[InheritFd], pid: i32, fd: i32) -> Option<InheritFd> {
    inherit
        .iter()
        .find(|i| i.fd == fd && i.pid == Some(pid))
        .or_else(|| inherit.iter().find(|i| i.fd == fd && i.pid.is_none()))
        .copied()
}

/// Before anything is made: every external descriptor of `meta` has a
/// replacement, and each replacement is open; otherwise one error naming
/// them all.
pub fn check(meta: &Metadata, inherit: &[InheritFd]) -> Result<()> {
    let mut missing = Vec::new();
    for p in meta.processes() {
        for e in &p.fds {
            if let FdKind::External { was } = &e.kind
                && replacement(inherit, p.process.pid, e.fd).is_none()
            {
                missing.push(format!("PID {} fd {} ({was})", p.process.pid, e.fd));
            }
        }
    }
    if !missing.is_empty() {
        return Err(Error::Other(format!(
            "the image holds descriptors connected to the outside of the checkpoint: {}; hand in a replacement for each with --inherit-fd FD=N (N: a descriptor open in chpox restore, e.g. `3<>/dev/null` or a connected socket)",
            missing.join(", ")
        )));
    }
    for i in inherit {
        restorer_copy(i.from)?;
    }
    Ok(())
}

/// A copy of the restorer's fd `n`.
fn restorer_copy(n: i32) -> Result<OwnedFd> {
    // SAFETY: only borrowed to check and duplicate it; the restorer keeps
    // it open for its life (it was given on the command line).
    let borrowed = unsafe { BorrowedFd::borrow_raw(n) };
    fcntl(borrowed, FcntlArg::F_GETFD)
        .and_then(|_| fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(3)))
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .map_err(|e| {
            Error::Other(format!(
                "--inherit-fd: descriptor {n} is not open in chpox restore ({e})"
            ))
        })
}

/// For `chpox inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::External { was } => Some(format!(
            "{was}; restoring needs a replacement: --inherit-fd FD=N"
        )),
        _ => None,
    }
}

pub static KIND: Kind = Kind {
    probe: |_| Ok(None),
    classify: None,
    embed: None,
    key: super::no_key,
    needs: super::restore::one,
    make,
};

fn make(d: &mut super::Descriptions, m: &mut Making<'_>, e: &FdEntry) -> Result<bool> {
    let was = match &e.kind {
        FdKind::External { was } | FdKind::ReplacedByNull { was } => was,
        _ => return Ok(false),
    };
    let fd = match replacement(m.inherit, m.pid, e.fd) {
        Some(i) => restorer_copy(i.from)?,
        None if matches!(e.kind, FdKind::External { .. }) => {
            return Err(Error::Other(format!(
                "PID {} fd {} ({was}) needs --inherit-fd {}=N",
                m.pid, e.fd, e.fd
            )));
        }
        None => {
            note(
                m.warnings,
                format!(
                    "PID {} fd {} comes back as /dev/null: it was {was}, which the checkpoint did not keep",
                    m.pid, e.fd
                ),
            );
            dev_null(e.flags)?
        }
    };
    d.insert(key(m.pid, e), fd);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherit_fd_is_parsed() {
        assert_eq!(
            "7=3".parse::<InheritFd>(),
            Ok(InheritFd {
                pid: None,
                fd: 7,
                from: 3
            })
        );
        assert_eq!(
            "42:7=3".parse::<InheritFd>(),
            Ok(InheritFd {
                pid: Some(42),
                fd: 7,
                from: 3
            })
        );
        assert!("7".parse::<InheritFd>().is_err());
        assert!("x=3".parse::<InheritFd>().is_err());
    }

    #[test]
    fn a_replacement_for_one_process_goes_first() {
        let all = [
            InheritFd {
                pid: None,
                fd: 7,
                from: 3,
            },
            InheritFd {
                pid: Some(9),
                fd: 7,
                from: 4,
            },
        ];
        assert_eq!(replacement(&all, 9, 7).map(|i| i.from), Some(4));
        assert_eq!(replacement(&all, 8, 7).map(|i| i.from), Some(3));
        assert_eq!(replacement(&all, 8, 6), None);
    }
}
