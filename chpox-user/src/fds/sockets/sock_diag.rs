//! What UNIX and inet sockets share: the kernel's socket diagnostics
//! (`NETLINK_SOCK_DIAG`, as `ss` uses), a copy of a descriptor of another
//! process (`pidfd_getfd`), socket options, socket addresses.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

fn diag_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("cannot list sockets ({what}): {e}"))
}

/// Send one `SOCK_DIAG_BY_FAMILY` dump request whose body (after the
/// netlink header) is `body`; every reply message's payload.
pub fn query(body: &[u8]) -> Result<Vec<Vec<u8>>> {
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
    let mut req = Vec::with_capacity(16 + body.len());
    req.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(body);
    nix::sys::socket::send(sock.as_raw_fd(), &req, nix::sys::socket::MsgFlags::empty())
        .map_err(|e| diag_err("send", e))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(|e| diag_err("recv", e))?;
        if n == 0 {
            return Ok(out);
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                return Err(diag_err("reply", "a truncated message"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    return Err(diag_err("reply", std::io::Error::from_raw_os_error(-errno)));
                }
                _ => out.push(buf[at + 16..at + len].to_vec()),
            }
            at += (len + 3) & !3;
        }
    }
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The netlink attributes (type, payload) of a message from `at` on.
pub fn attributes(m: &[u8], mut at: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while at + 4 <= m.len() {
        let len = usize::from(u16::from_ne_bytes([m[at], m[at + 1]]));
        let kind = u16::from_ne_bytes([m[at + 2], m[at + 3]]);
        if len < 4 || at + len > m.len() {
            break;
        }
        out.push((kind, &m[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// A copy of fd `fd` of process `pid` in our table (`pidfd_getfd`).
pub fn steal(pid: i32, fd: i32) -> Result<OwnedFd> {
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

/// `getsockopt` of a plain value (an int, or a struct of ints).
pub fn get_opt<T: Copy + Default>(sock: &OwnedFd, level: i32, name: i32) -> nix::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a plain
    // value of that size.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    nix::errno::Errno::result(ret).map(|_| value)
}

/// `setsockopt` of a plain value.
pub fn set_opt<T: Copy>(sock: &OwnedFd, level: i32, name: i32, value: T) -> nix::Result<()> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes from `value`.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// A new socket, close-on-exec and non-blocking (a restore never waits).
pub fn new_socket(family: i32, sock_type: i32) -> nix::Result<OwnedFd> {
    // SAFETY: socket() takes integers; the result is checked and owned.
    let raw = unsafe {
        libc::socket(
            family,
            sock_type | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: a descriptor we just created and own alone.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `bind` or `connect` (`connect` true) to a raw socket address.
pub fn bind_or_connect(sock: &OwnedFd, addr: &[u8], connect: bool) -> nix::Result<()> {
    // SAFETY: `addr` is a live buffer of `addr.len()` bytes holding a
    // sockaddr; the kernel only reads it.
    let ret = unsafe {
        if connect {
            libc::connect(
                sock.as_raw_fd(),
                addr.as_ptr().cast(),
                addr.len() as libc::socklen_t,
            )
        } else {
            libc::bind(
                sock.as_raw_fd(),
                addr.as_ptr().cast(),
                addr.len() as libc::socklen_t,
            )
        }
    };
    nix::errno::Errno::result(ret).map(drop)
}

/// `sendto` a raw socket address (None: the connected peer).
pub fn send_to(sock: &OwnedFd, data: &[u8], addr: Option<&[u8]>) -> nix::Result<usize> {
    let (ptr, len) = addr.map_or((std::ptr::null(), 0), |a| (a.as_ptr(), a.len()));
    // SAFETY: `data` and `addr` are live buffers of the lengths given; the
    // kernel only reads them.
    let ret = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            ptr.cast(),
            len as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(ret).map(|n| n as usize)
}

/// `accept4`, close-on-exec and non-blocking.
pub fn accept(sock: &OwnedFd) -> nix::Result<OwnedFd> {
    // SAFETY: no address is asked for; the result is checked and owned.
    let raw = unsafe {
        libc::accept4(
            sock.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: a descriptor the kernel just installed for us.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
