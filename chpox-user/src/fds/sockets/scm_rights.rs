//! Descriptors in flight: sent over a UNIX socket (`SCM_RIGHTS`) and not
//! received yet. Dump and restore, for the socket's queue ([`super::unix`]).
//!
//! Dump: peeking at the queue gives us a copy of each descriptor in
//! flight; one that is a file opened by path (a regular file still there,
//! a directory, a character device) is saved as such, with its flags and
//! offset. Anything else in flight (a pipe, a socket, a deleted file, a
//! memfd…) fails the dump by name.
//!
//! Restore: each is opened again by path (with the rights of the process
//! that holds the socket) and sent with its message, so the receiver gets
//! it with the same bytes as before.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

use crate::error::{Error, Result};
use crate::fds::restore::{Making, open_flags, seek};
use crate::fds::{FdInfo, Probe, file, parse_fdinfo};
use crate::image::model::{FdEntry, FdKind};

/// Dump: the entry of `fd`, a copy of a descriptor in flight that we
/// received by peeking; `what` names the socket.
pub fn entry(fd: &OwnedFd, what: &str) -> Result<FdEntry> {
    let n = fd.as_raw_fd();
    let link = format!("/proc/self/fd/{n}");
    let target = std::fs::read_link(&link)
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    let refuse = || {
        Error::UnsupportedFds(format!(
            "{what} (a descriptor in flight, SCM_RIGHTS, that chpox cannot send again: {target})"
        ))
    };
    if target.ends_with(" (deleted)") {
        return Err(refuse());
    }
    let meta = std::fs::metadata(&link).ok();
    let info_path = format!("/proc/self/fdinfo/{n}");
    let fdinfo = crate::error::read_proc(&info_path)?;
    let info: FdInfo = parse_fdinfo(&fdinfo, &info_path)?;
    let unix = super::unix::UnixTable::new();
    let inet = super::inet::InetTable::default();
    let probe = Probe {
        pid: std::process::id() as i32,
        fd: n,
        target: &target,
        meta: meta.as_ref(),
        fdinfo: &fdinfo,
        info,
        unix: &unix,
        inet: &inet,
    };
    for kind in [&file::REGULAR, &file::DIRECTORY, &file::CHAR_DEVICE] {
        if let Some(k) = (kind.probe)(&probe)? {
            return Ok(FdEntry {
                fd: -1,
                flags: info.flags,
                cloexec: false,
                kind: k,
                description: 0,
                locks: Vec::new(),
            });
        }
    }
    Err(refuse())
}

/// Restore: the descriptors of `entries` opened again.
pub fn make(m: &Making<'_>, entries: &[FdEntry]) -> Result<Vec<OwnedFd>> {
    entries
        .iter()
        .map(|e| match &e.kind {
            FdKind::RegularFile { path, pos, .. } => {
                let fd = m.opener.open(path, open_flags(e.flags), e.fd)?;
                seek(&fd, *pos, path)?;
                Ok(fd)
            }
            FdKind::Directory { path } => m.opener.open(
                path,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                e.fd,
            ),
            FdKind::CharDevice { path, .. } => m.opener.open(path, open_flags(e.flags), e.fd),
            other => Err(Error::Other(format!(
                "a descriptor in flight of a kind chpox does not send again: {other:?}"
            ))),
        })
        .collect()
}

/// Send `msg` with `fds` from `from`, to `name` (a UNIX socket name as
/// the kernel keeps it) or the connected peer.
pub fn send(
    from: &OwnedFd,
    msg: &[u8],
    fds: &[OwnedFd],
    name: Option<&[u8]>,
) -> nix::Result<usize> {
    let raws: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [std::io::IoSlice::new(msg)];
    let cmsgs = [ControlMessage::ScmRights(&raws)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let addr = match name {
        None | Some([]) => None,
        Some([0, rest @ ..]) => Some(UnixAddr::new_abstract(rest)?),
        Some(path) => {
            let path = path.split(|&b| b == 0).next().unwrap_or(path);
            Some(UnixAddr::new(path)?)
        }
    };
    sendmsg(from.as_raw_fd(), &iov, &cmsgs, flags, addr.as_ref())
}
