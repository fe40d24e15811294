//! Established TCP connections through the kernel's TCP repair mode
//! (`--tcp-established`), as CRIU's sk-tcp: dump and restore.
//!
//! Dump (frozen): a copy of the descriptor is put in repair mode; its
//! sequence numbers (`TCP_QUEUE_SEQ` of both queues), queue lengths, MSS,
//! window scales, timestamp, SACK, windows (`TCP_REPAIR_WINDOW`) are read,
//! and both queues peeked (in repair mode `recv` on the send queue reads
//! what was written and not acknowledged). The copy stays in repair mode
//! until the dump ends ([`RepairHold`]): if the dump kills the tree, the
//! socket then goes away silently, with no FIN or reset to the peer, which
//! keeps waiting for the restored one; otherwise repair mode is turned off
//! (without a window probe) before the tree runs again.
//!
//! Restore: a socket in repair mode gets the saved sequence numbers, binds
//! to the saved address (repair mode allows it beside a listener on the
//! same port), "connects" without a handshake, gets its options, its
//! send queue (what was sent but not acknowledged goes out again on its
//! own) and its receive queue, its windows; then repair mode is turned
//! off, which sends a window probe, and bytes never sent are sent.
//!
//! What is guaranteed: no byte the kernel acknowledged before the freeze
//! is lost, and both ends' sequence numbers agree. chpox does not lock the
//! network while the tree is frozen: bytes a peer outside the tree sends
//! during the dump are acknowledged by the frozen socket and lost with
//! it. A peer inside the tree is frozen too, so between two checkpointed
//! processes (loopback) nothing is sent; a peer outside must be quiet
//! during the dump (a client waiting for its answer is).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::inet::{self, TCP_ESTABLISHED};
use super::sock_diag::{self, get_opt, set_opt, steal};
use crate::error::{Error, Result};
use crate::fds::restore::{Descriptions, Key, Making};
use crate::image::model::{FdKind, InetSocketImage, ProcessImage, TcpConnection};
use crate::image::{ImageReader, ImageWriter};

const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

thread_local! {
    /// Copies of the dumped connections, in repair mode, until the dump
    /// ends (a dump runs on one thread from freeze to kill or resume).
    static HELD: RefCell<Vec<OwnedFd>> = const { RefCell::new(Vec::new()) };
}

/// The dump's hold on connections in repair mode: dropped (the dump
/// failed, or the tree runs on), it turns repair mode off; after the tree
/// is killed, [`RepairHold::close_silently`].
#[derive(Default)]
pub struct RepairHold(());

impl RepairHold {
    pub fn new() -> RepairHold {
        HELD.with(|h| h.borrow_mut().clear());
        RepairHold(())
    }

    /// The tree is gone: close the connections as they are, in repair
    /// mode, so the peer is told nothing.
    pub fn close_silently(self) {
        HELD.with(|h| h.borrow_mut().clear());
    }

    /// The tree runs on: its connections leave repair mode.
    pub fn release(&self) {
        HELD.with(|h| {
            for sock in h.borrow_mut().drain(..) {
                let _ = set_opt(
                    &sock,
                    libc::IPPROTO_TCP,
                    libc::TCP_REPAIR,
                    TCP_REPAIR_OFF_NO_WP,
                );
            }
        });
    }
}

impl Drop for RepairHold {
    fn drop(&mut self) {
        self.release();
    }
}

fn repair_err(what: &str) -> impl Fn(nix::errno::Errno) -> Error + '_ {
    move |e| Error::Other(format!("cannot save {what} in TCP repair mode: {e}"))
}

/// Dump: every connection marked for repair (`tcp: Some`), read while
/// frozen; its queues into the image.
pub fn embed(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
    let mut done = std::collections::HashMap::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for e in &mut p.fds {
            let FdKind::Inet(s) = &mut e.kind else {
                continue;
            };
            if s.tcp.is_none() || s.state != TCP_ESTABLISHED {
                continue;
            }
            if let Some(t) = done.get(&s.inode) {
                s.tcp = Some(Clone::clone(t));
                continue;
            }
            let what = format!("PID {pid} fd {} ({})", e.fd, inet::describe(s));
            let sock = steal(pid, e.fd)?;
            set_opt(&sock, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_ON)
                .map_err(repair_err(&what))?;
            // Held from now on: repair mode goes off again on any error.
            let t = HELD.with(|h| {
                let mut h = h.borrow_mut();
                h.push(sock);
                let sock = h.last().expect("just pushed");
                read_connection(sock, writer, &what)
            })?;
            done.insert(s.inode, t.clone());
            s.tcp = Some(t);
        }
    }
    Ok(())
}

fn ioctl_int(sock: &OwnedFd, req: libc::c_ulong) -> nix::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, &mut v) };
    nix::errno::Errno::result(ret).map(|_| v as u32)
}

fn read_connection(sock: &OwnedFd, writer: &mut ImageWriter, what: &str) -> Result<TcpConnection> {
    let err = repair_err(what);
    let tcp = libc::IPPROTO_TCP;
    let mut t = TcpConnection::default();
    set_opt(sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(&err)?;
    t.snd_seq = get_opt::<u32>(sock, tcp, libc::TCP_QUEUE_SEQ).map_err(&err)?;
    set_opt(sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(&err)?;
    t.rcv_seq = get_opt::<u32>(sock, tcp, libc::TCP_QUEUE_SEQ).map_err(&err)?;
    t.outq_len = ioctl_int(sock, libc::TIOCOUTQ).map_err(&err)?;
    t.unsent = ioctl_int(sock, libc::SIOCOUTQNSD).map_err(&err)?;
    t.inq_len = ioctl_int(sock, libc::FIONREAD).map_err(&err)?;
    t.mss = get_opt::<u32>(sock, tcp, libc::TCP_MAXSEG).map_err(&err)?;
    // The head of struct tcp_info: state, ca_state, retransmits, probes,
    // backoff, options, then the two 4-bit window scales (snd low).
    let info = get_opt::<[u8; 8]>(sock, tcp, libc::TCP_INFO).map_err(&err)?;
    t.options = info[5];
    t.snd_wscale = info[6] & 0xf;
    t.rcv_wscale = info[6] >> 4;
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        t.timestamp = get_opt::<u32>(sock, tcp, libc::TCP_TIMESTAMP).map_err(&err)?;
    }
    t.window = get_opt::<[u32; 5]>(sock, tcp, libc::TCP_REPAIR_WINDOW).map_err(&err)?;
    for (queue, len, slot) in [
        (TCP_SEND_QUEUE, t.outq_len, &mut t.send_queue),
        (TCP_RECV_QUEUE, t.inq_len, &mut t.recv_queue),
    ] {
        if len == 0 {
            continue;
        }
        set_opt(sock, tcp, libc::TCP_REPAIR_QUEUE, queue).map_err(&err)?;
        let mut buf = vec![0u8; len as usize];
        let n = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(&err)?;
        if n != buf.len() {
            return Err(Error::Other(format!(
                "cannot save {what}: its queue held {n} bytes of {len}"
            )));
        }
        *slot = Some(writer.add_data(&buf)?);
    }
    set_opt(sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(&err)?;
    Ok(t)
}

/// Restore: every repaired connection of the image, into `d`: each made
/// in repair mode, then each out of it, so that a window probe never
/// finds the peer missing (which would reset the connection).
pub fn make_all(d: &mut Descriptions, m: &mut Making<'_>) -> Result<()> {
    let mut socks: std::collections::BTreeMap<u64, (&InetSocketImage, u32)> =
        std::collections::BTreeMap::new();
    for e in m.meta.processes().flat_map(|p| &p.fds) {
        if let FdKind::Inet(s) = &e.kind
            && s.tcp.is_some()
        {
            socks.entry(s.inode).or_insert((&**s, e.flags));
        }
    }
    let mut made = Vec::new();
    for &(s, flags) in socks.values() {
        made.push((s, flags, restore(s, m.reader)?));
    }
    for (s, flags, (sock, unsent)) in made {
        let what = inet::describe(s);
        let err = |e: nix::errno::Errno| Error::Other(format!("cannot restore {what}: {e}"));
        set_opt(&sock, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_OFF).map_err(&err)?;
        send_all(&sock, &unsent).map_err(&err)?;
        inet::set_options(&sock, s)?;
        let nonblock = flags as i32 & libc::O_NONBLOCK;
        fcntl(&sock, FcntlArg::F_SETFL(OFlag::from_bits_retain(nonblock))).map_err(&err)?;
        d.insert(Key::Object("inet", s.inode, 0), sock);
    }
    Ok(())
}

/// The connection `s` in place, still in repair mode; and the bytes it
/// never sent, to send once out of it.
fn restore(s: &InetSocketImage, reader: &ImageReader) -> Result<(OwnedFd, Vec<u8>)> {
    let Some(t) = &s.tcp else {
        return Err(Error::Other("internal: not a repaired connection".into()));
    };
    let what = inet::describe(s);
    let err = |e: nix::errno::Errno| Error::Other(format!("cannot restore {what}: {e}"));
    let tcp = libc::IPPROTO_TCP;
    let sock = sock_diag::new_socket(s.family, libc::SOCK_STREAM).map_err(&err)?;
    set_opt(&sock, tcp, libc::TCP_REPAIR, TCP_REPAIR_ON).map_err(&err)?;
    set_opt(&sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(&err)?;
    set_opt(
        &sock,
        tcp,
        libc::TCP_QUEUE_SEQ,
        t.snd_seq.wrapping_sub(t.outq_len),
    )
    .map_err(&err)?;
    set_opt(&sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(&err)?;
    set_opt(
        &sock,
        tcp,
        libc::TCP_QUEUE_SEQ,
        t.rcv_seq.wrapping_sub(t.inq_len),
    )
    .map_err(&err)?;
    // Buffers before queues: a full queue must fit.
    super::unix_restore::set_buffers(&sock, s.options.sndbuf, s.options.rcvbuf);
    inet::bind(&sock, s, true)?;
    sock_diag::bind_or_connect(&sock, &inet::sockaddr(s.family, &s.dst, s.dst_port), true)
        .map_err(&err)?;
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, t.mss]];
    if t.options & TCPI_OPT_WSCALE != 0 {
        opts.push([
            TCPOPT_WINDOW,
            u32::from(t.snd_wscale) | (u32::from(t.rcv_wscale) << 16),
        ]);
    }
    if t.options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    // SAFETY: `opts` is a live array of struct tcp_repair_opt (two u32
    // each); the kernel reads that many bytes.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            tcp,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            std::mem::size_of_val(opts.as_slice()) as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(ret).map_err(&err)?;
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        set_opt(&sock, tcp, libc::TCP_TIMESTAMP, t.timestamp).map_err(&err)?;
    }
    // What was sent and not acknowledged goes into the send queue as sent;
    // what was never sent, after repair mode.
    let send = match &t.send_queue {
        Some(d) => reader.read_data(d)?,
        None => Vec::new(),
    };
    let sent_part = send.len().saturating_sub(t.unsent as usize);
    if sent_part > 0 {
        set_opt(&sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(&err)?;
        send_all(&sock, &send[..sent_part]).map_err(&err)?;
    }
    if let Some(d) = &t.recv_queue {
        let bytes = reader.read_data(d)?;
        set_opt(&sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(&err)?;
        send_all(&sock, &bytes).map_err(&err)?;
    }
    set_opt(&sock, tcp, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(&err)?;
    set_opt(&sock, tcp, libc::TCP_REPAIR_WINDOW, t.window).map_err(&err)?;
    let unsent = send[sent_part..].to_vec();
    Ok((sock, unsent))
}

/// Send all of `bytes` (a queue that fit before fits again).
fn send_all(sock: &OwnedFd, bytes: &[u8]) -> nix::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        at += sock_diag::send_to(sock, &bytes[at..], None)?;
    }
    Ok(())
}
