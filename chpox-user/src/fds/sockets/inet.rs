//! TCP and UDP sockets, IPv4 and IPv6: dump and restore, side by side.
//!
//! Dump: the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, inet) say
//! each socket's state, local and remote address; options are read
//! through a copy of the descriptor. A listening socket comes back bound
//! to its address and port, listening with its backlog and options; a
//! bound or connected UDP socket bound and connected as it was; an
//! unconnected TCP socket as such (bound if it was).
//!
//! An established TCP connection is the outside's too, so the user says
//! what becomes of it (`--tcp-established` or `--tcp-close`); without
//! either the dump refuses, naming it. `--tcp-established` saves it
//! through the kernel's TCP repair mode ([`super::tcp_repair`]) and
//! brings it back in place. `--tcp-close` brings it back reset: reading
//! says ECONNRESET, so a server drops that client and serves the next.
//! Connections a listener has not accepted yet come back only with
//! `--tcp-close` (as lost: their clients are reset on their next send).
//!
//! Datagrams queued on a UDP socket are not kept (UDP may lose them
//! anyway): the dump logs how many bytes are dropped.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tracing::warn;

use super::sock_diag::{self, get_opt, set_opt, steal, u32_at};
use crate::error::{Error, Result};
use crate::fds::restore::{Key, file_err, one};
use crate::fds::{Embed, Kind, Probe, UnsupportedFd};
use crate::image::model::{FdKind, InetOptions, InetSocketImage, ProcessImage, TcpConnection};

/// What becomes of established TCP connections at dump time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpPolicy {
    /// The dump refuses, naming each.
    #[default]
    Refuse,
    /// Saved through TCP repair mode, restored in place.
    Established,
    /// Restored reset.
    Close,
}

impl TcpPolicy {
    /// From registration flags (`chpox register --tcp-established`).
    pub fn from_flags(flags: u32) -> TcpPolicy {
        if flags & chpox_common::flags::TCP_ESTABLISHED != 0 {
            TcpPolicy::Established
        } else if flags & chpox_common::flags::TCP_CLOSE != 0 {
            TcpPolicy::Close
        } else {
            TcpPolicy::Refuse
        }
    }
}

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_socket() => probe(p, m.ino())?,
            _ => None,
        })
    },
    classify: Some(classify),
    embed: Some(|e: &mut Embed<'_>| super::tcp_repair::embed(e.procs, e.writer)),
    key: |_, e| match &e.kind {
        FdKind::Inet(s) => Some(Key::Object("inet", s.inode, 0)),
        _ => None,
    },
    needs: one,
    make: |d, m, e| match &e.kind {
        // Every repaired connection at once: none leaves repair mode
        // before its peer (in the image too, maybe) exists.
        FdKind::Inet(s) if s.tcp.is_some() => {
            super::tcp_repair::make_all(d, m)?;
            Ok(true)
        }
        FdKind::Inet(s) => {
            let sock = make(s)?;
            let nonblock = e.flags as i32 & libc::O_NONBLOCK;
            fcntl(&sock, FcntlArg::F_SETFL(OFlag::from_bits_retain(nonblock)))
                .map_err(file_err(&format!("socket:[{}]", s.inode)))?;
            d.insert(Key::Object("inet", s.inode, 0), sock);
            Ok(true)
        }
        _ => Ok(false),
    },
};

/// What the kernel says of one TCP or UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InetDiag {
    pub family: i32,
    pub sock_type: i32,
    pub state: u8,
    pub src: [u8; 16],
    pub src_port: u16,
    pub dst: [u8; 16],
    pub dst_port: u16,
    pub rqueue: u32,
    pub wqueue: u32,
}

/// Every TCP and UDP socket of our network namespace, by inode, and what
/// the dump was told to do with established connections.
#[derive(Debug, Default)]
pub struct InetTable {
    pub sockets: HashMap<u64, InetDiag>,
    pub tcp: TcpPolicy,
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// Ask the kernel for every TCP and UDP socket.
pub fn query(tcp: TcpPolicy) -> Result<InetTable> {
    let mut sockets = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for (proto, sock_type) in [
            (libc::IPPROTO_TCP, libc::SOCK_STREAM),
            (libc::IPPROTO_UDP, libc::SOCK_DGRAM),
        ] {
            // struct inet_diag_req_v2, every state, no socket id.
            let mut req = vec![family as u8, proto as u8, 0, 0];
            req.extend_from_slice(&u32::MAX.to_ne_bytes());
            req.extend_from_slice(&[0u8; 48]);
            for m in sock_diag::query(&req)? {
                // struct inet_diag_msg
                if m.len() < 72 {
                    continue;
                }
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&m[8..24]);
                dst.copy_from_slice(&m[24..40]);
                let ino = u64::from(u32_at(&m, 68));
                sockets.insert(
                    ino,
                    InetDiag {
                        family: i32::from(m[0]),
                        sock_type,
                        state: m[1],
                        src_port: u16::from_be_bytes([m[4], m[5]]),
                        dst_port: u16::from_be_bytes([m[6], m[7]]),
                        src,
                        dst,
                        rqueue: u32_at(&m, 56),
                        wqueue: u32_at(&m, 60),
                    },
                );
            }
        }
    }
    Ok(InetTable { sockets, tcp })
}

/// `ADDR:PORT`, IPv6 in brackets.
pub fn endpoint(family: i32, addr: &[u8; 16], port: u16) -> String {
    if family == libc::AF_INET {
        let a = std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
        format!("{a}:{port}")
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    }
}

fn proto_name(s: &InetSocketImage) -> &'static str {
    match (s.sock_type, s.family) {
        (libc::SOCK_STREAM, libc::AF_INET) => "TCP",
        (libc::SOCK_STREAM, _) => "TCPv6",
        (_, libc::AF_INET) => "UDP",
        _ => "UDPv6",
    }
}

fn state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "connecting",
        3 => "half-open",
        4 | 5 => "closing (FIN sent)",
        6 => "time-wait",
        7 => "unconnected",
        8 => "closing (FIN received)",
        9 => "last-ack",
        10 => "listening",
        11 => "closing",
        _ => "in an unknown state",
    }
}

/// For `chpox inspect`.
pub fn describe_kind(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::Inet(s) => Some(describe(s)),
        _ => None,
    }
}

/// One line naming a socket: `TCP 127.0.0.1:80 -> 127.0.0.1:4242 (established)`.
pub fn describe(s: &InetSocketImage) -> String {
    let mut d = format!(
        "{} socket:[{}] {}",
        proto_name(s),
        s.inode,
        endpoint(s.family, &s.src, s.src_port)
    );
    if s.dst_port != 0 {
        d += &format!(" -> {}", endpoint(s.family, &s.dst, s.dst_port));
    }
    if s.sock_type == libc::SOCK_STREAM {
        d += &format!(" ({})", state_name(s.state));
    }
    if s.listening() {
        d += &format!(", backlog {}", s.backlog);
    }
    if let Some(t) = &s.tcp {
        d += &format!(
            ", saved in repair mode ({} bytes to send, {} unread)",
            t.outq_len, t.inq_len
        );
    }
    if s.closed {
        d += ", restored reset (--tcp-close)";
    }
    d
}

trait Listening {
    fn listening(&self) -> bool;
}

impl Listening for InetSocketImage {
    fn listening(&self) -> bool {
        self.sock_type == libc::SOCK_STREAM && self.state == TCP_LISTEN
    }
}

/// Dump: the entry of a TCP or UDP socket descriptor (None: another kind).
fn probe(p: &Probe<'_>, ino: u64) -> Result<Option<FdKind>> {
    let Some(s) = p.inet.sockets.get(&ino) else {
        return Ok(None);
    };
    let sock = steal(p.pid, p.fd)?;
    let what = || format!("PID {} fd {} (socket:[{ino}])", p.pid, p.fd);
    let err = |e: nix::errno::Errno| Error::Other(format!("cannot read {}: {e}", what()));
    let int = |level, name| get_opt::<libc::c_int>(&sock, level, name).map_err(err);
    let tcp = s.sock_type == libc::SOCK_STREAM;
    let options = InetOptions {
        reuseaddr: int(libc::SOL_SOCKET, libc::SO_REUSEADDR)? != 0,
        reuseport: int(libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0,
        keepalive: int(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        broadcast: int(libc::SOL_SOCKET, libc::SO_BROADCAST)? != 0,
        nodelay: tcp && int(libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0,
        v6only: s.family == libc::AF_INET6 && int(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0,
        sndbuf: int(libc::SOL_SOCKET, libc::SO_SNDBUF)? as u32,
        rcvbuf: int(libc::SOL_SOCKET, libc::SO_RCVBUF)? as u32,
    };
    let mut image = InetSocketImage {
        inode: ino,
        family: s.family,
        sock_type: s.sock_type,
        state: s.state,
        src: s.src,
        src_port: s.src_port,
        dst: s.dst,
        dst_port: s.dst_port,
        backlog: if tcp && s.state == TCP_LISTEN {
            s.wqueue
        } else {
            0
        },
        options,
        tcp: None,
        closed: false,
    };
    if !tcp && s.rqueue > 0 {
        warn!(
            "{}: {} bytes of datagrams queued on {} are not kept (UDP may lose datagrams)",
            what(),
            s.rqueue,
            describe(&image)
        );
    }
    if tcp && s.state == TCP_LISTEN && s.rqueue > 0 {
        let line = format!(
            "{} ({}: {} connection(s) not accepted yet)",
            what(),
            describe(&image),
            s.rqueue
        );
        match p.inet.tcp {
            TcpPolicy::Close => warn!("{line}: dropped (--tcp-close)"),
            _ => {
                return Err(Error::TcpConnections(format!(
                    "{line}; they cannot be kept: rerun with --tcp-close to drop them"
                )));
            }
        }
    }
    if tcp && !matches!(s.state, TCP_LISTEN | TCP_CLOSE) {
        let line = format!("{} ({})", what(), describe(&image));
        match p.inet.tcp {
            TcpPolicy::Established if s.state == TCP_ESTABLISHED => {
                image.tcp = Some(TcpConnection::default());
            }
            TcpPolicy::Close | TcpPolicy::Established => image.closed = true,
            TcpPolicy::Refuse => return Err(Error::TcpConnections(line)),
        }
        if image.closed {
            warn!("{line}: comes back reset");
        }
    }
    Ok(Some(FdKind::Inet(Box::new(image))))
}

/// Nothing tree-wide yet: a connection to a process of the tree is saved
/// as one to the outside, each end on its own (both in repair mode).
fn classify(_: &mut [ProcessImage], _: UnsupportedFd) -> Result<()> {
    Ok(())
}

/// A `sockaddr_in` or `sockaddr_in6` for `addr`:`port`.
pub fn sockaddr(family: i32, addr: &[u8; 16], port: u16) -> Vec<u8> {
    let mut a = (family as u16).to_ne_bytes().to_vec();
    a.extend_from_slice(&port.to_be_bytes());
    if family == libc::AF_INET {
        a.extend_from_slice(&addr[..4]);
        a.extend_from_slice(&[0u8; 8]);
    } else {
        a.extend_from_slice(&[0u8; 4]); // flow info
        a.extend_from_slice(addr);
        a.extend_from_slice(&[0u8; 4]); // scope id
    }
    a
}

fn inet_err(s: &InetSocketImage) -> impl Fn(nix::errno::Errno) -> Error + '_ {
    move |e| Error::Other(format!("cannot restore {}: {e}", describe(s)))
}

/// The options of `s` on `sock` (SO_REUSEADDR last: binding sets it).
pub(crate) fn set_options(sock: &OwnedFd, s: &InetSocketImage) -> Result<()> {
    let o = &s.options;
    let err = inet_err(s);
    let b = |v: bool| libc::c_int::from(v);
    set_opt(sock, libc::SOL_SOCKET, libc::SO_KEEPALIVE, b(o.keepalive)).map_err(&err)?;
    set_opt(sock, libc::SOL_SOCKET, libc::SO_BROADCAST, b(o.broadcast)).map_err(&err)?;
    if s.sock_type == libc::SOCK_STREAM {
        set_opt(sock, libc::IPPROTO_TCP, libc::TCP_NODELAY, b(o.nodelay)).map_err(&err)?;
    }
    super::unix_restore::set_buffers(sock, o.sndbuf, o.rcvbuf);
    set_opt(sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, b(o.reuseaddr)).map_err(&err)?;
    Ok(())
}

/// Options that act at bind time, then bind to the saved address. A
/// socket in repair mode binds beside anything (the kernel forces reuse),
/// as long as SO_REUSEADDR is left alone until it is bound.
pub(crate) fn bind(sock: &OwnedFd, s: &InetSocketImage, repair: bool) -> Result<()> {
    let err = inet_err(s);
    if s.family == libc::AF_INET6 {
        set_opt(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(s.options.v6only),
        )
        .map_err(&err)?;
    }
    if !repair {
        set_opt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            libc::c_int::from(s.options.reuseport),
        )
        .map_err(&err)?;
        // Connections of the checkpointed process may linger (TIME_WAIT)
        // on the port: the listener binds anyway; its own setting comes
        // after.
        set_opt::<libc::c_int>(sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(&err)?;
    }
    sock_diag::bind_or_connect(sock, &sockaddr(s.family, &s.src, s.src_port), false).map_err(|e| {
        Error::Other(format!(
            "cannot restore {}: binding to {}: {e}{}",
            describe(s),
            endpoint(s.family, &s.src, s.src_port),
            if e == nix::errno::Errno::EADDRINUSE {
                " (is the checkpointed program still running?)"
            } else {
                ""
            }
        ))
    })
}

/// Restore: a new socket as `s` was.
fn make(s: &InetSocketImage) -> Result<OwnedFd> {
    if s.closed {
        return reset_connection(s);
    }
    let sock = sock_diag::new_socket(s.family, s.sock_type).map_err(inet_err(s))?;
    if s.src_port != 0 {
        bind(&sock, s, false)?;
    }
    if s.listening() {
        nix::sys::socket::listen(
            &sock,
            nix::sys::socket::Backlog::new(s.backlog as i32)
                .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
        )
        .map_err(inet_err(s))?;
    }
    if s.sock_type == libc::SOCK_DGRAM && s.dst_port != 0 {
        sock_diag::bind_or_connect(&sock, &sockaddr(s.family, &s.dst, s.dst_port), true)
            .map_err(inet_err(s))?;
    }
    set_options(&sock, s)?;
    Ok(sock)
}

/// A TCP socket whose connection was reset: a loopback connection of our
/// own, closed by its other end with a reset (SO_LINGER 0); reading says
/// ECONNRESET, polling says it is done.
fn reset_connection(s: &InetSocketImage) -> Result<OwnedFd> {
    let err = inet_err(s);
    let mut lo = [0u8; 16];
    if s.family == libc::AF_INET {
        lo[..4].copy_from_slice(&[127, 0, 0, 1]);
    } else {
        lo[15] = 1;
    }
    let listener = sock_diag::new_socket(s.family, libc::SOCK_STREAM).map_err(&err)?;
    sock_diag::bind_or_connect(&listener, &sockaddr(s.family, &lo, 0), false).map_err(&err)?;
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(1).map_err(&err)?)
        .map_err(&err)?;
    let port = local_port(&listener).map_err(&err)?;
    let client = sock_diag::new_socket(s.family, libc::SOCK_STREAM).map_err(&err)?;
    match sock_diag::bind_or_connect(&client, &sockaddr(s.family, &lo, port), true) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(err(e)),
    }
    let accepted = accept_soon(&listener).map_err(&err)?;
    set_opt(
        &client,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(&err)?;
    drop(client);
    Ok(accepted)
}

/// Accept on a loopback listener a connection made just now (the
/// handshake may take a moment on a busy machine).
fn accept_soon(listener: &OwnedFd) -> nix::Result<OwnedFd> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sock_diag::accept(listener) {
            Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            r => return r,
        }
    }
}

/// The port `sock` is bound to.
fn local_port(sock: &OwnedFd) -> nix::Result<u16> {
    let mut addr = [0u8; 128];
    let mut len = addr.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `addr`.
    let ret = unsafe { libc::getsockname(sock.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len) };
    nix::errno::Errno::result(ret)?;
    Ok(u16::from_be_bytes([addr[2], addr[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_as_people_write_them() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(endpoint(libc::AF_INET, &a, 80), "127.0.0.1:80");
        let mut b = [0u8; 16];
        b[15] = 1;
        assert_eq!(endpoint(libc::AF_INET6, &b, 443), "[::1]:443");
    }

    #[test]
    fn socket_addresses_have_the_kernel_layout() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 0, 0, 1]);
        let v4 = sockaddr(libc::AF_INET, &a, 0x1234);
        assert_eq!(v4.len(), std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(&v4[2..8], &[0x12, 0x34, 10, 0, 0, 1]);
        let v6 = sockaddr(libc::AF_INET6, &a, 1);
        assert_eq!(v6.len(), std::mem::size_of::<libc::sockaddr_in6>());
    }
}
