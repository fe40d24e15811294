//! What an image says about sockets (`FdKind::Unix`, `FdKind::Inet`,
//! `FdKind::External`). Same rules as `model.rs`: fields only added, with
//! `#[serde(default)]`; enum variants only at the end.

use serde::{Deserialize, Serialize};

use super::model::DataRef;
use super::model_fds::{FdEntry, FdKind};

/// A UNIX socket (stream, datagram or seqpacket) in any state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UnixSocketImage {
    /// Its inode: entries with the same one are the same socket.
    pub inode: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: i32,
    /// The name it is bound to, as the kernel keeps it (`sun_path` bytes:
    /// a path with its trailing NUL, or an abstract name starting with
    /// NUL); empty if unbound. A socket accepted from a listener has the
    /// listener's name.
    #[serde(default)]
    pub name: Vec<u8>,
    /// For a name that is a relative path: the directory it was bound in.
    #[serde(default)]
    pub bind_dir: Option<String>,
    /// The socket file of a path name, if it existed at dump time: its
    /// mode and owner come back.
    #[serde(default)]
    pub file: Option<SocketFile>,
    /// The socket it is connected to (0: none).
    #[serde(default)]
    pub peer: u64,
    /// A datagram socket connected to a named socket outside the
    /// checkpoint (`/dev/log`): that name, connected to again.
    #[serde(default)]
    pub peer_name: Vec<u8>,
    /// Connected once, and its peer is gone (closed): it reads what is
    /// left, then end of file.
    #[serde(default)]
    pub peer_gone: bool,
    #[serde(default)]
    pub listening: bool,
    #[serde(default)]
    pub backlog: u32,
    /// Listening: the client sockets of connections not accepted yet, in
    /// the order `accept` would return them.
    #[serde(default)]
    pub pending: Vec<u64>,
    /// Shutdowns: 1 receiving, 2 sending.
    #[serde(default)]
    pub shutdown: u8,
    #[serde(default)]
    pub passcred: bool,
    /// SO_SNDBUF and SO_RCVBUF as `getsockopt` says (0: not known).
    #[serde(default)]
    pub sndbuf: u32,
    #[serde(default)]
    pub rcvbuf: u32,
    /// What it would read next, stored once per socket.
    #[serde(default)]
    pub queued: Option<DataRef>,
    /// The lengths of the messages in `queued` (not for a stream, unless
    /// descriptors are in flight with some).
    #[serde(default)]
    pub messages: Vec<u64>,
    /// Descriptors in flight (SCM_RIGHTS) with messages of `queued`.
    #[serde(default)]
    pub in_flight: Vec<InFlight>,
}

/// The descriptors sent with one queued message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InFlight {
    /// The message's index in `messages`.
    pub message: u32,
    pub fds: Vec<FdEntry>,
}

/// The file a path-bound UNIX socket made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketFile {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A TCP or UDP socket, IPv4 or IPv6.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetSocketImage {
    pub inode: u64,
    /// AF_INET or AF_INET6.
    pub family: i32,
    /// SOCK_STREAM (TCP) or SOCK_DGRAM (UDP).
    pub sock_type: i32,
    /// The kernel's TCP state (1 established, 7 closed, 10 listening…).
    pub state: u8,
    /// Local and remote address (16 bytes; an IPv4 one in the first 4) and
    /// port; port 0 and all zeroes: not bound / not connected.
    pub src: [u8; 16],
    pub src_port: u16,
    pub dst: [u8; 16],
    pub dst_port: u16,
    #[serde(default)]
    pub backlog: u32,
    #[serde(default)]
    pub options: InetOptions,
    /// An established TCP connection saved through repair mode
    /// (`--tcp-established`).
    #[serde(default)]
    pub tcp: Option<TcpConnection>,
    /// An established TCP connection the dump was told to drop
    /// (`--tcp-close`): it comes back reset.
    #[serde(default)]
    pub closed: bool,
}

/// Socket options that come back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub nodelay: bool,
    pub v6only: bool,
    pub broadcast: bool,
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

/// What TCP repair mode reads of an established connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnection {
    /// `TCP_QUEUE_SEQ` of the send queue (write_seq) and the receive queue
    /// (rcv_nxt).
    pub snd_seq: u32,
    pub rcv_seq: u32,
    /// Bytes in the send queue, of which `unsent` never went out.
    pub outq_len: u32,
    pub unsent: u32,
    pub inq_len: u32,
    pub mss: u32,
    /// `tcpi_options` (TCPI_OPT_*), and the window scales.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    /// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd,
    /// rcv_wup.
    pub window: [u32; 5],
    pub send_queue: Option<DataRef>,
    pub recv_queue: Option<DataRef>,
}

/// The bulk data a socket entry refers to.
pub fn data_refs(kind: &FdKind) -> Vec<&DataRef> {
    match kind {
        FdKind::Unix(s) => s.queued.iter().collect(),
        FdKind::Inet(s) => s
            .tcp
            .iter()
            .flat_map(|t| t.send_queue.iter().chain(t.recv_queue.iter()))
            .collect(),
        _ => Vec::new(),
    }
}

/// [`data_refs`], to change them.
pub fn data_refs_mut(kind: &mut FdKind) -> Vec<&mut DataRef> {
    match kind {
        FdKind::Unix(s) => s.queued.iter_mut().collect(),
        FdKind::Inet(s) => s
            .tcp
            .iter_mut()
            .flat_map(|t| t.send_queue.iter_mut().chain(t.recv_queue.iter_mut()))
            .collect(),
        _ => Vec::new(),
    }
}
