//! UNIX socket pairs as images of earlier versions saved them
//! (`FdKind::UnixPair`): restore only; dumps now save every UNIX socket
//! as `FdKind::Unix` ([`super::unix`]).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::sock_diag;
use crate::error::{Error, Result};
use crate::fds::restore::{Descriptions, Key, Making, file_err};
use crate::image::ImageReader;
use crate::image::model::FdKind;

/// Restore: put the saved queue of one end back by sending it through the
/// other end (`from`), message by message; then the end's saved shutdown.
fn refill(end: &OwnedFd, from: &OwnedFd, kind: &FdKind, reader: &ImageReader) -> Result<()> {
    let FdKind::UnixPair {
        inode,
        queued,
        messages,
        shutdown,
        ..
    } = kind
    else {
        return Ok(());
    };
    let err = |e: nix::errno::Errno| {
        Error::Other(format!(
            "cannot put back the unread data of socket:[{inode}]: {e}"
        ))
    };
    if let Some(data) = queued {
        let bytes = reader.read_data(data)?;
        let lens: Vec<u64> = if messages.is_empty() {
            vec![bytes.len() as u64]
        } else {
            messages.clone()
        };
        let mut at = 0usize;
        for len in lens {
            let msg = bytes.get(at..at + len as usize).ok_or_else(|| {
                Error::Other(format!("socket:[{inode}]: queue shorter than its messages"))
            })?;
            let mut sent = 0;
            while sent < msg.len() {
                sent += sock_diag::send_to(from, &msg[sent..], None).map_err(err)?;
            }
            at += len as usize;
        }
    }
    use nix::sys::socket::Shutdown;
    let how = match shutdown & 3 {
        1 => Some(Shutdown::Read),
        2 => Some(Shutdown::Write),
        3 => Some(Shutdown::Both),
        _ => None,
    };
    if let Some(how) = how {
        nix::sys::socket::shutdown(end.as_fd().as_raw_fd(), how).map_err(err)?;
    }
    Ok(())
}

/// A new pair for the saved pair (`inode`, `peer`), each end holding
/// its saved queue, with its saved shutdowns and status flags.
pub(super) fn make_socket_pair(
    d: &mut Descriptions,
    m: &Making<'_>,
    inode: u64,
    peer: u64,
    sock_type: i32,
) -> Result<()> {
    let (meta, reader) = (m.meta, m.reader);
    let entry_of = |ino: u64| {
        meta.processes()
            .flat_map(|p| &p.fds)
            .find(|e| matches!(e.kind, FdKind::UnixPair { inode: i, .. } if i == ino))
    };
    let (this, other) = super::unix_restore::pair(sock_type)
        .map_err(|e| Error::Other(format!("cannot create a UNIX socket pair: {e}")))?;
    let ends = [(inode, &this, &other), (peer, &other, &this)];
    for (ino, end, from) in ends {
        if let Some(e) = entry_of(ino) {
            refill(end, from, &e.kind, reader)?;
        }
    }
    for (ino, end) in [(inode, this), (peer, other)] {
        let nonblock = entry_of(ino).map_or(0, |e| e.flags as i32 & libc::O_NONBLOCK);
        fcntl(&end, FcntlArg::F_SETFL(OFlag::from_bits_retain(nonblock)))
            .map_err(file_err(&format!("socket:[{ino}]")))?;
        d.insert(Key::Object("unix", ino, 0), end);
    }
    Ok(())
}
