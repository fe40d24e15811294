//! UNIX sockets: stream, datagram and seqpacket; unbound, bound to a path
//! or an abstract name, listening (with connections not accepted yet),
//! connected inside the checkpoint (with what each end has not read yet),
//! or to the outside. The dump half is here, the restore half beside it
//! ([`super::unix_restore`]).
//!
//! Dump: the kernel's socket diagnostics say, for every UNIX socket, its
//! type, state, name, peer, pending connections and shutdowns; the
//! options (SO_PASSCRED, buffer sizes) and the queue are read through a
//! copy of the descriptor (`pidfd_getfd`), the queue peeked message after
//! message (`SO_PEEK_OFF`) without being consumed. Descriptors in flight
//! (`SCM_RIGHTS`) and data sent on a connection not accepted yet fail the
//! dump by name. A socket connected to a socket no checkpointed process
//! holds is named: restore needs a replacement (`--inherit-fd`), except
//! a datagram socket connected to a named one (`/dev/log`), which is
//! connected to that name again.
//!
//! Restore: every UNIX socket of the image at once
//! ([`super::unix_restore::make_all`]): stale socket files of the saved
//! paths removed (never a live one), connected
//! pairs made (`socketpair`, or through a short-lived listener on the
//! acceptor's name so both ends keep their names), listeners bound and
//! listening, their pending clients connected in order, datagram sockets
//! connected by name, queues sent again through the peer, shutdowns,
//! options and status flags as saved. The peer credentials
//! (`SO_PEERCRED`) are the restorer's, and queued datagrams lose their
//! sender's address.
//!
//! `FdKind::UnixPair` (images of earlier versions) is restored as before.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use tracing::warn;

pub(crate) use super::sock_diag::steal;
use super::sock_diag::{get_opt, set_opt};
use crate::error::{Error, Result};
use crate::fds::restore::{Key, one};
use crate::fds::{Embed, Kind, Probe, UnsupportedFd};
use crate::image::ImageWriter;
use crate::image::model::{FdKind, InFlight, ProcessImage, SocketFile, UnixSocketImage};

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_socket() => probe(p, m.ino())?,
            _ => None,
        })
    },
    classify: Some(classify),
    embed: Some(|e: &mut Embed<'_>| embed_queues(e.procs, e.writer)),
    key: |_, e| match &e.kind {
        FdKind::UnixPair { inode, .. } => Some(Key::Object("unix", *inode, 0)),
        FdKind::Unix(s) => Some(Key::Object("unix", s.inode, 0)),
        _ => None,
    },
    needs: |pid, e| match &e.kind {
        // Both ends are made at once.
        FdKind::UnixPair { inode, peer, .. } => {
            vec![(Key::Object("unix", (*inode).min(*peer), 0), 2)]
        }
        // Every socket at once, one descriptor each (and a few short-lived
        // ones).
        FdKind::Unix(s) => vec![(Key::Object("unix", s.inode, 0), 1)],
        _ => one(pid, e),
    },
    make: |d, m, e| match &e.kind {
        FdKind::UnixPair {
            inode,
            peer,
            sock_type,
            ..
        } => {
            super::unix_pair::make_socket_pair(d, m, *inode, *peer, *sock_type)?;
            Ok(true)
        }
        FdKind::Unix(_) => {
            super::unix_restore::make_all(d, m)?;
            Ok(true)
        }
        _ => Ok(false),
    },
};

use super::unix_diag::{TCP_ESTABLISHED, TCP_LISTEN};
pub use super::unix_diag::{UnixSocket, UnixTable, query};

/// A name for messages: a path, `@abstract`, or `unnamed`.
pub fn display_name(name: &[u8]) -> String {
    match name {
        [] => "unnamed".to_string(),
        [0, rest @ ..] => format!("@{}", String::from_utf8_lossy(rest)),
        path => String::from_utf8_lossy(path.strip_suffix(&[0]).unwrap_or(path)).into_owned(),
    }
}

/// The path of a path name (None for abstract and unbound).
pub(super) fn path_of(name: &[u8]) -> Option<std::path::PathBuf> {
    match name {
        [] | [0, ..] => None,
        path => {
            let path = path.split(|&b| b == 0).next().unwrap_or(path);
            Some(std::ffi::OsStr::from_bytes(path).into())
        }
    }
}

pub(super) fn type_name(sock_type: i32) -> &'static str {
    match sock_type {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "socket",
    }
}

/// Dump: the entry of a UNIX socket descriptor (None: another family).
fn probe(p: &Probe<'_>, ino: u64) -> Result<Option<FdKind>> {
    let Some(s) = p.unix.get(&ino) else {
        return Ok(None);
    };
    let what = || format!("PID {} fd {} (socket:[{ino}])", p.pid, p.fd);
    let sock = steal(p.pid, p.fd)?;
    let opt = |name| get_opt::<libc::c_int>(&sock, libc::SOL_SOCKET, name);
    let err = |e: nix::errno::Errno| Error::Other(format!("cannot read {}: {e}", what()));
    let mut image = UnixSocketImage {
        inode: ino,
        sock_type: s.sock_type,
        name: s.name.clone(),
        peer: s.peer,
        peer_gone: s.state == TCP_ESTABLISHED && s.peer == 0 && s.sock_type != libc::SOCK_DGRAM,
        listening: s.state == TCP_LISTEN,
        backlog: if s.state == TCP_LISTEN { s.wqueue } else { 0 },
        pending: if s.state == TCP_LISTEN {
            s.pending.clone()
        } else {
            Vec::new()
        },
        shutdown: s.shutdown,
        passcred: opt(libc::SO_PASSCRED).map_err(err)? != 0,
        sndbuf: opt(libc::SO_SNDBUF).map_err(err)? as u32,
        rcvbuf: opt(libc::SO_RCVBUF).map_err(err)? as u32,
        ..UnixSocketImage::default()
    };
    if let Some(path) = path_of(&s.name) {
        let full = if path.is_absolute() {
            path
        } else {
            let cwd = std::fs::read_link(format!("/proc/{}/cwd", p.pid)).map_err(|e| {
                Error::Other(format!("cannot find the directory of {}: {e}", what()))
            })?;
            image.bind_dir = Some(cwd.to_string_lossy().into_owned());
            cwd.join(path)
        };
        // The socket file: only the one this socket made counts (it may
        // have been removed, or replaced by another).
        if let Ok(m) = std::fs::symlink_metadata(&full)
            && m.file_type().is_socket()
            && Some(m.ino()) == s.file_ino
        {
            image.file = Some(SocketFile {
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
            });
        }
    }
    Ok(Some(FdKind::Unix(Box::new(image))))
}

/// Tree-wide: which connections are the tree's own. A socket connected to
/// one no checkpointed process holds is external (named now; restore
/// needs `--inherit-fd`), or /dev/null by request; a listener's pending
/// connection from outside, or holding data, fails the dump by name.
pub fn classify(procs: &mut [ProcessImage], policy: UnsupportedFd) -> Result<()> {
    let socks: HashMap<u64, UnixSocketImage> = procs
        .iter()
        .flat_map(|p| &p.fds)
        .filter_map(|e| match &e.kind {
            FdKind::Unix(s) => Some((s.inode, (**s).clone())),
            _ => None,
        })
        .collect();
    let table = if socks.values().any(|s| s.peer != 0 || !s.pending.is_empty()) {
        query()?
    } else {
        UnixTable::new()
    };
    // Clients of connections not accepted yet (the kernel names those of
    // a listener, not the sockets the connections will be).
    let pending: HashSet<u64> = socks.values().flat_map(|s| s.pending.clone()).collect();
    let mut refused = Vec::new();
    let several = procs.len() > 1;
    for s in socks.values() {
        for c in &s.pending {
            if !socks.contains_key(c) {
                refused.push(format!(
                    "socket:[{}] (UNIX socket listening on {}: a connection from outside the checkpoint is not accepted yet)",
                    s.inode,
                    display_name(&s.name)
                ));
                continue;
            }
            // What it sent is charged to it until read (its peer, the
            // connection's socket, has no inode to ask about).
            let data = table.get(c).map_or(0, |t| t.wqueue);
            if data > 0 {
                refused.push(format!(
                    "socket:[{}] (UNIX socket listening on {}: a connection not accepted yet holds {data} bytes)",
                    s.inode,
                    display_name(&s.name)
                ));
            }
        }
    }
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for e in &mut p.fds {
            let FdKind::Unix(s) = &mut e.kind else {
                continue;
            };
            if pending.contains(&s.inode) {
                // Connected, its peer not a socket yet: not a peer gone.
                s.peer_gone = false;
                continue;
            }
            if s.peer == 0 || socks.contains_key(&s.peer) {
                continue;
            }
            let peer = table.get(&s.peer);
            let peer_name = peer.map(|t| t.name.clone()).unwrap_or_default();
            // A datagram socket connected to a named socket (/dev/log) is
            // connected to that name again.
            if s.sock_type == libc::SOCK_DGRAM && !peer_name.is_empty() {
                s.peer = 0;
                s.peer_name = peer_name;
                continue;
            }
            let was = format!(
                "socket:[{}] (UNIX {} socket connected to {}, outside the checkpoint)",
                s.inode,
                type_name(s.sock_type),
                display_name(&peer_name)
            );
            match policy {
                UnsupportedFd::Null => e.kind = FdKind::ReplacedByNull { was },
                UnsupportedFd::Fail => {
                    warn!(
                        "{}fd {} is {was}: restoring it needs --inherit-fd {}=N (N: a descriptor to put in its place)",
                        if several {
                            format!("PID {pid} ")
                        } else {
                            String::new()
                        },
                        e.fd,
                        e.fd
                    );
                    e.kind = FdKind::External { was };
                }
            }
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsupportedFds(refused.join(", ")))
    }
}

/// Peek at everything `sock` would read next, without consuming it: each
/// message (a stream's bytes as they come), in order, with the copies of
/// the descriptors in flight with it. SO_PEEK_OFF walks the queue and is
/// put back as it was.
fn peek_queue(sock: &OwnedFd, what: &str) -> Result<Vec<(Vec<u8>, Vec<OwnedFd>)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let err = |e: nix::errno::Errno| Error::Other(format!("cannot read the queue of {what}: {e}"));
    let old = get_opt::<libc::c_int>(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(err)?;
    set_opt::<libc::c_int>(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(err)?;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let result = loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 253]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match got {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => break Ok(()),
            Err(e) => break Err(err(e)),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel installed these copies for us.
                        fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    }
                }
            }
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() {
            break Ok(());
        }
        messages.push((buf[..n].to_vec(), fds));
    };
    set_opt::<libc::c_int>(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old).map_err(err)?;
    result.map(|()| messages)
}

/// Store what each socket of the tree has not read yet (once per socket).
pub fn embed_queues(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
    let mut done = HashSet::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for e in &mut p.fds {
            // Old images' pairs have no room for descriptors in flight.
            let (inode, sock_type, queued, messages, in_flight) = match &mut e.kind {
                FdKind::UnixPair {
                    inode,
                    sock_type,
                    queued,
                    messages,
                    ..
                } => (*inode, *sock_type, queued, messages, None),
                FdKind::Unix(s) if !s.listening => (
                    s.inode,
                    s.sock_type,
                    &mut s.queued,
                    &mut s.messages,
                    Some(&mut s.in_flight),
                ),
                _ => continue,
            };
            if !done.insert(inode) {
                continue;
            }
            let sock = steal(pid, e.fd)?;
            let what = format!("PID {pid} fd {} (socket:[{inode}])", e.fd);
            let peeked = peek_queue(&sock, &what)?;
            if peeked.is_empty() {
                continue;
            }
            let mut flights = Vec::new();
            for (i, (_, fds)) in peeked.iter().enumerate() {
                if fds.is_empty() {
                    continue;
                }
                if in_flight.is_none() {
                    return Err(Error::UnsupportedFds(format!(
                        "{what} (descriptors in flight, SCM_RIGHTS)"
                    )));
                }
                flights.push(InFlight {
                    message: i as u32,
                    fds: fds
                        .iter()
                        .map(|fd| super::scm_rights::entry(fd, &what))
                        .collect::<Result<_>>()?,
                });
            }
            if sock_type != libc::SOCK_STREAM || !flights.is_empty() {
                *messages = peeked.iter().map(|(m, _)| m.len() as u64).collect();
            }
            if let Some(in_flight) = in_flight {
                *in_flight = flights;
            }
            let bytes: Vec<u8> = peeked.iter().flat_map(|(m, _)| m.iter().copied()).collect();
            *queued = Some(writer.add_data(&bytes)?);
        }
    }
    Ok(())
}

/// For `chpox inspect`.
pub fn describe_kind(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::Unix(s) => Some(describe(s)),
        _ => None,
    }
}

fn describe(s: &UnixSocketImage) -> String {
    let mut d = format!(
        "UNIX {} socket:[{}] {}",
        type_name(s.sock_type),
        s.inode,
        display_name(&s.name)
    );
    if s.listening {
        d += &format!(", listening (backlog {}", s.backlog);
        if !s.pending.is_empty() {
            d += &format!(", {} not accepted yet", s.pending.len());
        }
        d += ")";
    }
    if s.peer != 0 {
        d += &format!(", connected to socket:[{}]", s.peer);
    } else if !s.peer_name.is_empty() {
        d += &format!(", connected to {}", display_name(&s.peer_name));
    } else if s.peer_gone {
        d += ", its peer closed";
    }
    if s.shutdown != 0 {
        d += &format!(", shut down {}", s.shutdown);
    }
    if let Some(q) = &s.queued {
        d += &format!(", {} unread bytes", q.raw_len);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_as_paths_or_abstract() {
        assert_eq!(display_name(b"/run/x.sock\0"), "/run/x.sock");
        assert_eq!(display_name(b"\0abc"), "@abc");
        assert_eq!(display_name(b""), "unnamed");
        assert_eq!(
            path_of(b"/run/x.sock\0"),
            Some(std::path::PathBuf::from("/run/x.sock"))
        );
        assert_eq!(path_of(b"\0abc"), None);
    }
}
