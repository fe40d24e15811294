//! What the kernel's socket diagnostics say of UNIX sockets (`ss -x`):
//! type, state, name, socket file, peer, pending connections, queue
//! lengths, shutdowns.

use std::collections::HashMap;

use super::sock_diag::{self, u32_at};
use crate::error::Result;

/// What the kernel says of one UNIX socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocket {
    pub sock_type: i32,
    /// TCP_ESTABLISHED (1), TCP_CLOSE (7) or TCP_LISTEN (10).
    pub state: u8,
    pub peer: u64,
    /// `sun_path` bytes (empty: unbound).
    pub name: Vec<u8>,
    /// The inode of the socket file (path names).
    pub file_ino: Option<u64>,
    /// Listening: the sockets of connections not accepted yet.
    pub pending: Vec<u64>,
    /// Listening: the backlog; otherwise bytes in the receive queue.
    pub rqueue: u32,
    pub wqueue: u32,
    /// `sk_shutdown`: 1 receive, 2 send.
    pub shutdown: u8,
}

impl UnixSocket {
    /// Bound to a path or an abstract name.
    pub fn named(&self) -> bool {
        !self.name.is_empty()
    }
}

/// Every UNIX socket of our network namespace, by inode.
pub type UnixTable = HashMap<u64, UnixSocket>;

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_ICONS: u32 = 0x8;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// Ask the kernel for every UNIX socket (`ss -x` does the same).
pub fn query() -> Result<UnixTable> {
    // struct unix_diag_req
    let mut req = Vec::with_capacity(24);
    req.push(libc::AF_UNIX as u8);
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // every inode
    let show =
        UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;
    req.extend_from_slice(&show.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // cookie
    Ok(sock_diag::query(&req)?
        .iter()
        .filter_map(|m| parse_diag_msg(m))
        .collect())
}

/// struct unix_diag_msg and its attributes.
fn parse_diag_msg(m: &[u8]) -> Option<(u64, UnixSocket)> {
    if m.len() < 16 {
        return None;
    }
    let ino = u64::from(u32_at(m, 4));
    let mut s = UnixSocket {
        sock_type: i32::from(m[1]),
        state: m[2],
        ..UnixSocket::default()
    };
    for (kind, data) in sock_diag::attributes(m, 16) {
        match kind {
            UNIX_DIAG_NAME => s.name = data.to_vec(),
            UNIX_DIAG_VFS if data.len() >= 8 => s.file_ino = Some(u64::from(u32_at(data, 0))),
            UNIX_DIAG_PEER if data.len() >= 4 => s.peer = u64::from(u32_at(data, 0)),
            UNIX_DIAG_ICONS => {
                s.pending = data
                    .chunks_exact(4)
                    .map(|c| u64::from(u32_at(c, 0)))
                    .collect();
            }
            UNIX_DIAG_RQLEN if data.len() >= 8 => {
                s.rqueue = u32_at(data, 0);
                s.wqueue = u32_at(data, 4);
            }
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => s.shutdown = data[0],
            _ => {}
        }
    }
    Some((ino, s))
}
