//! UNIX sockets, the restore half (the dump half and the overview are in
//! [`super::unix`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::sock_diag::{self, set_opt};
use super::unix::{display_name, path_of, type_name};
use crate::error::{Error, Result};
use crate::fds::restore::{Descriptions, Key, Making, file_err};
use crate::image::model::{FdKind, UnixSocketImage};

fn sock_err(what: &str) -> impl Fn(nix::errno::Errno) -> Error + '_ {
    move |e| Error::Other(format!("cannot restore {what}: {e}"))
}

/// A `sockaddr_un` for `name` as the kernel keeps it.
fn sockaddr(name: &[u8]) -> Vec<u8> {
    let mut a = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    a.extend_from_slice(name);
    a
}

/// Run `f` in the directory a relative name was bound in.
fn in_dir<R>(dir: Option<&str>, f: impl FnOnce() -> R) -> Result<R> {
    let Some(dir) = dir else {
        return Ok(f());
    };
    let back = std::env::current_dir().map_err(|source| Error::File {
        path: ".".into(),
        source,
    })?;
    std::env::set_current_dir(dir).map_err(|source| Error::File {
        path: dir.into(),
        source,
    })?;
    let r = f();
    std::env::set_current_dir(&back).map_err(|source| Error::File {
        path: back.display().to_string(),
        source,
    })?;
    Ok(r)
}

/// The file a path name is at, as the restorer reaches it.
fn full_path(s: &UnixSocketImage) -> Option<std::path::PathBuf> {
    let p = path_of(&s.name)?;
    Some(match &s.bind_dir {
        Some(d) if !p.is_absolute() => std::path::Path::new(d).join(p),
        _ => p,
    })
}

/// Make the saved path of `s` free to bind: a socket file nobody listens
/// on (left by the checkpointed process) is removed; anything else there
/// refuses the restore by name.
fn clear_stale(s: &UnixSocketImage, m: &Making<'_>) -> Result<()> {
    let Some(path) = full_path(s) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Ok(());
    };
    let shown = path.display().to_string();
    if !meta.file_type().is_socket() {
        return Err(Error::Other(format!(
            "cannot restore the UNIX socket bound to {shown}: that path exists and is not a socket; move it away"
        )));
    }
    let probe = sock_diag::new_socket(libc::AF_UNIX, s.sock_type).map_err(sock_err(&shown))?;
    let addr = sockaddr(&s.name);
    match in_dir(s.bind_dir.as_deref(), || {
        sock_diag::bind_or_connect(&probe, &addr, true)
    })? {
        Err(nix::errno::Errno::ECONNREFUSED) => {}
        _ => {
            return Err(Error::Other(format!(
                "cannot restore the UNIX socket bound to {shown}: a live socket is bound there (is the checkpointed program still running?)"
            )));
        }
    }
    m.opener
        .run(|| std::fs::remove_file(&path))?
        .map_err(|source| Error::File {
            path: shown,
            source,
        })
}

/// Bind `sock` to the saved name of `s`, as the process's owner; the
/// socket file gets its saved mode and owner, or is removed if it was.
fn bind(sock: &OwnedFd, s: &UnixSocketImage, m: &Making<'_>) -> Result<()> {
    let what = format!("the UNIX socket bound to {}", display_name(&s.name));
    let addr = sockaddr(&s.name);
    m.opener
        .run(|| {
            in_dir(s.bind_dir.as_deref(), || {
                sock_diag::bind_or_connect(sock, &addr, false)
            })
        })??
        .map_err(sock_err(&what))?;
    let Some(path) = full_path(s) else {
        return Ok(());
    };
    match s.file {
        Some(f) => {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode)).map_err(
                |source| Error::File {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            if !m.opener.as_owner() && nix::unistd::geteuid().is_root() {
                // Root restores the file as it was owned (not when it
                // restores another user's image with that user's rights).
                let _ = std::os::unix::fs::lchown(&path, Some(f.uid), Some(f.gid));
            }
        }
        // Removed before the checkpoint: removed again.
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Connect `sock` to `name` (of a listener or a datagram socket).
fn connect(sock: &OwnedFd, name: &[u8], dir: Option<&str>, what: &str) -> Result<()> {
    let addr = sockaddr(name);
    in_dir(dir, || sock_diag::bind_or_connect(sock, &addr, true))?.map_err(|e| {
        Error::Other(format!(
            "cannot restore {what}: connecting to {}: {e}",
            display_name(name)
        ))
    })
}

/// Make every UNIX socket of the image (`FdKind::Unix`), into `d`.
pub(super) fn make_all(d: &mut Descriptions, m: &mut Making<'_>) -> Result<()> {
    // Each socket once, with the status flags of its first entry.
    let mut socks: BTreeMap<u64, (&UnixSocketImage, u32)> = BTreeMap::new();
    for e in m.meta.processes().flat_map(|p| &p.fds) {
        if let FdKind::Unix(s) = &e.kind {
            socks.entry(s.inode).or_insert((&**s, e.flags));
        }
    }
    let mut made: HashMap<u64, OwnedFd> = HashMap::new();
    // The other end of pairs whose peer is gone: kept until the queue is
    // back, then closed (end of file).
    let mut gone_peers: HashMap<u64, OwnedFd> = HashMap::new();
    let what = |s: &UnixSocketImage| {
        format!(
            "socket:[{}] (UNIX {} socket, {})",
            s.inode,
            type_name(s.sock_type),
            display_name(&s.name)
        )
    };

    // Saved paths free: every socket that binds its name (not those
    // accepted from a listener, which have its name without binding).
    let accepted = acceptors(&socks);
    let mut cleared = HashSet::new();
    for (s, _) in socks.values() {
        if !accepted.contains(&s.inode) && cleared.insert((s.name.clone(), s.bind_dir.clone())) {
            clear_stale(s, m)?;
        }
    }

    // Connected pairs.
    for (&ino, &(s, _)) in &socks {
        if made.contains_key(&ino) {
            continue;
        }
        if s.peer_gone {
            let (this, other) = pair(s.sock_type).map_err(sock_err(&what(s)))?;
            made.insert(ino, this);
            gone_peers.insert(ino, other);
            continue;
        }
        let Some(&(p, _)) = socks.get(&s.peer) else {
            // Not connected, or a client whose connection is not accepted
            // yet (its peer is the listener's).
            continue;
        };
        let mutual = p.peer == ino;
        if s.sock_type == libc::SOCK_DGRAM && !(mutual && s.name.is_empty() && p.name.is_empty()) {
            // Connected by name below.
            continue;
        }
        if !mutual {
            return Err(Error::Other(format!(
                "cannot restore {}: connected to socket:[{}], which is connected elsewhere",
                what(s),
                p.inode
            )));
        }
        let (a, b) = if s.name.is_empty() && p.name.is_empty() {
            pair(s.sock_type).map_err(sock_err(&what(s)))?
        } else {
            // The acceptor has its name from a listener; the other end
            // connects to it.
            let (acceptor, connector) = if accepted.contains(&ino) {
                (s, p)
            } else {
                (p, s)
            };
            let (acc, con) = connect_through_listener(acceptor, connector, m, &what(acceptor))?;
            if acceptor.inode == ino {
                (acc, con)
            } else {
                (con, acc)
            }
        };
        made.insert(ino, a);
        made.insert(s.peer, b);
    }

    // Everything else: a socket of its type, bound and listening if it was.
    for (&ino, &(s, _)) in &socks {
        if made.contains_key(&ino) {
            continue;
        }
        let sock = sock_diag::new_socket(libc::AF_UNIX, s.sock_type).map_err(sock_err(&what(s)))?;
        if !s.name.is_empty() {
            bind(&sock, s, m)?;
        }
        if s.listening {
            nix::sys::socket::listen(
                &sock,
                nix::sys::socket::Backlog::new(s.backlog as i32)
                    .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
            )
            .map_err(sock_err(&what(s)))?;
        }
        made.insert(ino, sock);
    }

    // Connections not accepted yet, in the order accept returns them.
    for (_, &(l, _)) in socks.iter().filter(|(_, (s, _))| s.listening) {
        for client in &l.pending {
            if let (Some(sock), Some((c, _))) = (made.get(client), socks.get(client)) {
                connect(sock, &l.name, l.bind_dir.as_deref(), &what(c))?;
            }
        }
    }

    // Datagram sockets connected by name.
    for (&ino, &(s, _)) in &socks {
        if s.sock_type != libc::SOCK_DGRAM {
            continue;
        }
        let target = match socks.get(&s.peer) {
            Some((p, _)) if p.peer == ino && s.name.is_empty() && p.name.is_empty() => continue,
            Some((p, _)) => Some((p.name.as_slice(), p.bind_dir.as_deref())),
            None if !s.peer_name.is_empty() => Some((s.peer_name.as_slice(), None)),
            None => None,
        };
        if let Some((name, dir)) = target {
            if name.is_empty() {
                return Err(Error::Other(format!(
                    "cannot restore {}: its peer has no name to connect to",
                    what(s)
                )));
            }
            connect(&made[&ino], name, dir, &what(s))?;
        }
    }

    // Queues, then shutdowns.
    for (&ino, &(s, _)) in &socks {
        if let Some(data) = &s.queued {
            let bytes = m.reader.read_data(data)?;
            let sender = gone_peers.get(&ino).or_else(|| made.get(&s.peer));
            refill_socket(s, sender, &bytes, m, &what(s))?;
        }
    }
    // A peer gone: closing the other end gives end of file after the data.
    drop(gone_peers);
    for (&ino, &(s, flags)) in &socks {
        let sock = &made[&ino];
        let shown = what(s);
        let err = sock_err(&shown);
        use nix::sys::socket::Shutdown;
        let how = match s.shutdown & 3 {
            1 => Some(Shutdown::Read),
            2 => Some(Shutdown::Write),
            3 => Some(Shutdown::Both),
            _ => None,
        };
        if let Some(how) = how
            && !s.peer_gone
        {
            // A listener or an unconnected socket says ENOTCONN: its
            // shutdown only matters once connected, and it is not.
            match nix::sys::socket::shutdown(sock.as_raw_fd(), how) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
                Err(e) => return Err(err(e)),
            }
        }
        if s.passcred {
            set_opt::<libc::c_int>(sock, libc::SOL_SOCKET, libc::SO_PASSCRED, 1).map_err(&err)?;
        }
        set_buffers(sock, s.sndbuf, s.rcvbuf);
        let nonblock = flags as i32 & libc::O_NONBLOCK;
        fcntl(sock, FcntlArg::F_SETFL(OFlag::from_bits_retain(nonblock)))
            .map_err(file_err(&format!("socket:[{ino}]")))?;
    }
    for (ino, sock) in made {
        d.insert(Key::Object("unix", ino, 0), sock);
    }
    Ok(())
}

/// SO_SNDBUF and SO_RCVBUF as saved (the kernel doubles what it is given,
/// and reports the doubled value); the forcing variants pass the system
/// maximum when the restorer may.
pub(crate) fn set_buffers(sock: &OwnedFd, sndbuf: u32, rcvbuf: u32) {
    for (value, force, plain) in [
        (sndbuf, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (rcvbuf, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        if value == 0 {
            continue;
        }
        let half = (value / 2) as libc::c_int;
        if set_opt(sock, libc::SOL_SOCKET, force, half).is_err() {
            let _ = set_opt(sock, libc::SOL_SOCKET, plain, half);
        }
    }
}

/// Which sockets got their name from a listener (`accept`): of a pair of
/// connected stream or seqpacket sockets, the named end (or, both named,
/// the one whose name a listener of the image has, else the lower inode).
fn acceptors(socks: &BTreeMap<u64, (&UnixSocketImage, u32)>) -> HashSet<u64> {
    let listener_names: HashSet<&[u8]> = socks
        .values()
        .filter(|(s, _)| s.listening)
        .map(|(s, _)| s.name.as_slice())
        .collect();
    let mut out = HashSet::new();
    for (&ino, &(s, _)) in socks {
        if s.sock_type == libc::SOCK_DGRAM || s.name.is_empty() {
            continue;
        }
        let Some(&(p, _)) = socks.get(&s.peer) else {
            continue;
        };
        let me = if p.name.is_empty() {
            true
        } else {
            let mine = listener_names.contains(s.name.as_slice());
            let theirs = listener_names.contains(p.name.as_slice());
            mine && !theirs || (mine == theirs && ino < p.inode)
        };
        if me {
            out.insert(ino);
        }
    }
    out
}

/// A connected pair where `acceptor` has its name from a listener: a
/// short-lived listener on that name, `connector` (bound to its own name
/// if it had one) connects, the accepted socket is the acceptor. Returns
/// (acceptor, connector).
fn connect_through_listener(
    acceptor: &UnixSocketImage,
    connector: &UnixSocketImage,
    m: &Making<'_>,
    what: &str,
) -> Result<(OwnedFd, OwnedFd)> {
    let listener =
        sock_diag::new_socket(libc::AF_UNIX, acceptor.sock_type).map_err(sock_err(what))?;
    let addr = sockaddr(&acceptor.name);
    m.opener
        .run(|| {
            in_dir(acceptor.bind_dir.as_deref(), || {
                sock_diag::bind_or_connect(&listener, &addr, false)
            })
        })??
        .map_err(sock_err(what))?;
    let result = (|| {
        nix::sys::socket::listen(
            &listener,
            nix::sys::socket::Backlog::new(1).map_err(sock_err(what))?,
        )
        .map_err(sock_err(what))?;
        let con =
            sock_diag::new_socket(libc::AF_UNIX, connector.sock_type).map_err(sock_err(what))?;
        if !connector.name.is_empty() {
            bind(&con, connector, m)?;
        }
        connect(&con, &acceptor.name, acceptor.bind_dir.as_deref(), what)?;
        let acc = sock_diag::accept(&listener).map_err(sock_err(what))?;
        Ok((acc, con))
    })();
    drop(listener);
    if let Some(path) = full_path(acceptor) {
        let _ = m.opener.run(|| std::fs::remove_file(&path));
    }
    result
}

/// A connected pair of `sock_type`, close-on-exec and non-blocking.
pub(super) fn pair(sock_type: i32) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let ty = SockType::try_from(sock_type)?;
    socketpair(
        AddressFamily::Unix,
        ty,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
}

/// Put the saved queue of `s` (`bytes`) back, message by message: sent by
/// its peer (`sender`), or, for a named datagram socket with no peer of
/// ours, by a socket of our own to its name.
fn refill_socket(
    s: &UnixSocketImage,
    sender: Option<&OwnedFd>,
    bytes: &[u8],
    m: &Making<'_>,
    what: &str,
) -> Result<()> {
    let err = |e: nix::errno::Errno| {
        Error::Other(format!("cannot put back the unread data of {what}: {e}"))
    };
    let own;
    let (from, to): (&OwnedFd, Option<&[u8]>) = match sender {
        Some(p) if s.sock_type != libc::SOCK_DGRAM => (p, None),
        Some(p) if s.name.is_empty() => (p, None),
        Some(p) => (p, Some(&s.name)),
        None if s.sock_type == libc::SOCK_DGRAM && !s.name.is_empty() => {
            own = sock_diag::new_socket(libc::AF_UNIX, libc::SOCK_DGRAM).map_err(err)?;
            (&own, Some(&s.name))
        }
        None => {
            return Err(Error::Other(format!(
                "cannot put back the unread data of {what}: nothing of the checkpoint can send it"
            )));
        }
    };
    let addr = to.map(sockaddr);
    let lens: Vec<u64> = if s.messages.is_empty() {
        vec![bytes.len() as u64]
    } else {
        s.messages.clone()
    };
    let mut at = 0usize;
    for (i, len) in lens.into_iter().enumerate() {
        let msg = bytes
            .get(at..at + len as usize)
            .ok_or_else(|| Error::Other(format!("{what}: queue shorter than its messages")))?;
        let mut sent = 0;
        if let Some(flight) = s.in_flight.iter().find(|f| f.message as usize == i) {
            let fds = super::scm_rights::make(m, &flight.fds)?;
            sent = in_dir(s.bind_dir.as_deref(), || {
                super::scm_rights::send(from, msg, &fds, to)
            })?
            .map_err(err)?;
        }
        while sent < msg.len() {
            sent += in_dir(s.bind_dir.as_deref(), || {
                sock_diag::send_to(from, &msg[sent..], addr.as_deref())
            })?
            .map_err(err)?;
        }
        at += len as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_end_of_a_pair_is_the_acceptor() {
        let listener = UnixSocketImage {
            inode: 1,
            sock_type: libc::SOCK_STREAM,
            name: b"/s\0".to_vec(),
            listening: true,
            ..Default::default()
        };
        let accepted = UnixSocketImage {
            inode: 2,
            sock_type: libc::SOCK_STREAM,
            name: b"/s\0".to_vec(),
            peer: 3,
            ..Default::default()
        };
        let client = UnixSocketImage {
            inode: 3,
            sock_type: libc::SOCK_STREAM,
            peer: 2,
            ..Default::default()
        };
        let mut socks = BTreeMap::new();
        for s in [&listener, &accepted, &client] {
            socks.insert(s.inode, (s, 0));
        }
        assert_eq!(acceptors(&socks), HashSet::from([2]));
    }
}
