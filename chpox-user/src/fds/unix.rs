//! UNIX socket pairs between checkpointed processes (`socketpair`, or two
//! unnamed sockets connected to each other), with what each end has not
//! read yet: dump and restore, side by side.
//!
//! Dump: the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) say, for
//! every UNIX socket, its type, its peer and whether it was shut down; an
//! end whose peer the tree holds too is one of ours. Its queue is read
//! without being consumed: a copy of the descriptor (`pidfd_getfd`) is
//! peeked, message after message (`SO_PEEK_OFF`). Descriptors in flight
//! (`SCM_RIGHTS`) cannot be kept yet and fail the dump by name.
//!
//! Restore: a new pair for each, each end's queue sent again through the
//! other end, then the saved shutdowns.
//!
//! Other sockets (bound, listening, TCP…) are not handled here.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::restore::{Descriptions, Key, Making, file_err, one};
use super::{Embed, Kind};
use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::ImageWriter;
use crate::image::model::{FdKind, ProcessImage};

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_socket() => kind_of(p.unix, m.ino()),
            _ => None,
        })
    },
    classify: Some(classify),
    embed: Some(|e: &mut Embed<'_>| embed_queues(e.procs, e.writer)),
    key: |_, e| match e.kind {
        FdKind::UnixPair { inode, .. } => Some(Key::Object("unix", inode, 0)),
        _ => None,
    },
    // Both ends are made at once.
    needs: |pid, e| match e.kind {
        FdKind::UnixPair { inode, peer, .. } => vec![(Key::Object("unix", inode.min(peer), 0), 2)],
        _ => one(pid, e),
    },
    make: |d, m, e| {
        let FdKind::UnixPair {
            inode,
            peer,
            sock_type,
            ..
        } = e.kind
        else {
            return Ok(false);
        };
        make_socket_pair(d, m, inode, peer, sock_type)?;
        Ok(true)
    },
};

/// What the kernel says of one UNIX socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSocket {
    pub sock_type: i32,
    pub peer: u64,
    /// Bound to a path or an abstract name.
    pub named: bool,
    /// `sk_shutdown`: 1 receive, 2 send.
    pub shutdown: u8,
}

/// Every UNIX socket of our network namespace, by inode.
pub type UnixTable = HashMap<u64, UnixSocket>;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

fn diag_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("cannot list UNIX sockets ({what}): {e}"))
}

/// Ask the kernel for every UNIX socket (`ss -x` does the same).
pub fn query() -> Result<UnixTable> {
    // SAFETY: socket() takes integers; the result is checked and owned.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(diag_err("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor we just created and own alone.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // struct nlmsghdr + struct unix_diag_req
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8);
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // every inode
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // cookie
    nix::sys::socket::send(sock.as_raw_fd(), &req, nix::sys::socket::MsgFlags::empty())
        .map_err(|e| diag_err("send", e))?;
    let mut table = UnixTable::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(|e| diag_err("recv", e))?;
        if n == 0 {
            return Ok(table);
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                return Err(diag_err("reply", "a truncated message"));
            }
            match kind {
                NLMSG_DONE => return Ok(table),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    return Err(diag_err("reply", std::io::Error::from_raw_os_error(-errno)));
                }
                _ => {
                    if let Some((ino, s)) = parse_diag_msg(&buf[at + 16..at + len]) {
                        table.insert(ino, s);
                    }
                }
            }
            at += (len + 3) & !3;
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// struct unix_diag_msg and its attributes.
fn parse_diag_msg(m: &[u8]) -> Option<(u64, UnixSocket)> {
    if m.len() < 16 {
        return None;
    }
    let sock_type = i32::from(m[1]);
    let ino = u64::from(u32_at(m, 4));
    let mut s = UnixSocket {
        sock_type,
        peer: 0,
        named: false,
        shutdown: 0,
    };
    let mut at = 16;
    while at + 4 <= m.len() {
        let len = usize::from(u16::from_ne_bytes([m[at], m[at + 1]]));
        let kind = u16::from_ne_bytes([m[at + 2], m[at + 3]]);
        if len < 4 || at + len > m.len() {
            break;
        }
        let data = &m[at + 4..at + len];
        match kind {
            UNIX_DIAG_NAME => s.named = !data.is_empty(),
            UNIX_DIAG_PEER if data.len() >= 4 => s.peer = u64::from(u32_at(data, 0)),
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => s.shutdown = data[0],
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some((ino, s))
}

/// The kind of a socket descriptor with inode `ino`, if it is an unnamed
/// UNIX socket connected to another unnamed one (whether the tree holds
/// the peer is decided by [`classify`]).
pub fn kind_of(table: &UnixTable, ino: u64) -> Option<FdKind> {
    let s = table.get(&ino)?;
    let peer = table.get(&s.peer)?;
    if s.named || peer.named || peer.peer != ino {
        return None;
    }
    Some(FdKind::UnixPair {
        inode: ino,
        peer: s.peer,
        sock_type: s.sock_type,
        shutdown: s.shutdown,
        queued: None,
        messages: Vec::new(),
    })
}

/// Socket pairs whose other end no checkpointed process holds are sockets
/// to the outside: named, as unsupported (or /dev/null by request).
pub fn classify(procs: &mut [ProcessImage], policy: super::UnsupportedFd) -> Result<()> {
    use std::collections::HashSet;
    let held: HashSet<u64> = procs
        .iter()
        .flat_map(|p| &p.fds)
        .filter_map(|e| match e.kind {
            FdKind::UnixPair { inode, .. } => Some(inode),
            _ => None,
        })
        .collect();
    let mut outside = Vec::new();
    for p in procs.iter_mut() {
        for e in &mut p.fds {
            let FdKind::UnixPair { inode, peer, .. } = e.kind else {
                continue;
            };
            if held.contains(&peer) {
                continue;
            }
            let was = format!("socket:[{inode}]");
            match policy {
                super::UnsupportedFd::Null => e.kind = FdKind::ReplacedByNull { was },
                super::UnsupportedFd::Fail => outside.push(format!(
                    "PID {} fd {} ({was}, a UNIX socket connected to a process outside the checkpoint)",
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

/// A copy of fd `fd` of process `pid` in our table (`pidfd_getfd`).
pub(crate) fn steal(pid: i32, fd: i32) -> Result<OwnedFd> {
    let err = |what: &str, e: std::io::Error| Error::File {
        path: format!("/proc/{pid}/fd/{fd} ({what})"),
        source: e,
    };
    // SAFETY: pidfd_open and pidfd_getfd take integers; results are
    // checked and owned.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(err("pidfd_open", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just created.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(err("pidfd_getfd", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor the kernel just installed for us.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

/// Peek at everything `sock` would read next, without consuming it: each
/// message (a stream's bytes as they come), in order. SO_PEEK_OFF walks
/// the queue and is put back as it was.
fn peek_queue(sock: &OwnedFd, what: &str) -> Result<Vec<Vec<u8>>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let err = |e: nix::errno::Errno| Error::Other(format!("cannot read the queue of {what}: {e}"));
    let old = peek_off(sock).map_err(err)?;
    set_peek_off(sock, 0).map_err(err)?;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let result = loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 64]);
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
        let mut in_flight = false;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    in_flight = true;
                    for fd in fds {
                        // SAFETY: the kernel installed these copies for us.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if in_flight {
            break Err(Error::UnsupportedFds(format!(
                "{what} (descriptors in flight, SCM_RIGHTS)"
            )));
        }
        let n = msg.bytes;
        if n == 0 {
            break Ok(());
        }
        messages.push(buf[..n].to_vec());
    };
    set_peek_off(sock, old).map_err(err)?;
    result.map(|()| messages)
}

/// `SO_PEEK_OFF` (nix has no wrapper): where the next MSG_PEEK reads from,
/// -1 when peeking does not advance.
fn peek_off(sock: &OwnedFd) -> nix::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    nix::errno::Errno::result(ret).map(|_| value)
}

fn set_peek_off(sock: &OwnedFd, value: i32) -> nix::Result<()> {
    // SAFETY: the kernel reads `size_of::<c_int>()` bytes from `value`.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// Store what each end of the tree's socket pairs has not read yet.
pub fn embed_queues(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
    let mut done = std::collections::HashSet::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for e in &mut p.fds {
            let FdKind::UnixPair {
                inode,
                sock_type,
                queued,
                messages,
                ..
            } = &mut e.kind
            else {
                continue;
            };
            if !done.insert(*inode) {
                continue;
            }
            let sock = steal(pid, e.fd)?;
            let what = format!("PID {pid} fd {} (socket:[{inode}])", e.fd);
            let peeked = peek_queue(&sock, &what)?;
            if peeked.is_empty() {
                continue;
            }
            if *sock_type != libc::SOCK_STREAM {
                *messages = peeked.iter().map(|m| m.len() as u64).collect();
            }
            *queued = Some(writer.add_data(&peeked.concat())?);
        }
    }
    Ok(())
}

/// Restore: a new pair for the pair of `inode`, as (this end, peer end).
pub fn make_pair(sock_type: i32) -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let ty = SockType::try_from(sock_type)
        .map_err(|e| Error::Other(format!("socket type {sock_type}: {e}")))?;
    socketpair(
        AddressFamily::Unix,
        ty,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| Error::Other(format!("cannot create a UNIX socket pair: {e}")))
}

/// Restore: put the saved queue of one end back by sending it through the
/// other end (`from`), message by message; then the end's saved shutdown.
pub fn refill(end: &OwnedFd, from: &OwnedFd, kind: &FdKind, reader: &ImageReader) -> Result<()> {
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
                sent += nix::sys::socket::send(
                    from.as_raw_fd(),
                    &msg[sent..],
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                )
                .map_err(err)?;
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
fn make_socket_pair(
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
    let (this, other) = make_pair(sock_type)?;
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
