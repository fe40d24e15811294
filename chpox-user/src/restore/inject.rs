//! Handing the restorer's descriptors to a process being rebuilt.
//!
//! Every open file description of the image is made once, by the
//! restorer, in its own descriptor table: files opened with their saved
//! flags and offsets, pipes with their unread bytes, the restorer's
//! terminal. Each process that held it then receives it over a UNIX
//! socket (`SCM_RIGHTS`): the restorer sends, the process runs a remote
//! `recvmsg` and moves what it got to the saved number. A description
//! handed to several processes (or several numbers) stays one
//! description, with one offset, as `fork` and `dup` had left it.
//!
//! Every process of the tree is a copy of the restorer, so each holds the
//! receiving socket from birth, at the same number.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};

use super::child::{Child, INJECT_AT};
use crate::error::{Error, Result};

/// The socket pair: we send on one end, the processes receive on the other.
pub struct Injector {
    send: OwnedFd,
    receive: OwnedFd,
}

const MSGHDR_AT: u64 = INJECT_AT;
const IOVEC_AT: u64 = INJECT_AT + 64;
const BYTE_AT: u64 = INJECT_AT + 96;
const CONTROL_AT: u64 = INJECT_AT + 128;
/// `CMSG_SPACE(sizeof(int))` on x86-64.
const CONTROL_LEN: u64 = 24;

impl Injector {
    pub fn new() -> Result<Self> {
        let (send, receive) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::Other(format!("cannot create the restore socket: {e}")))?;
        Ok(Injector { send, receive })
    }

    /// The receiving end's number, the same in every process created after
    /// this.
    pub fn receive_fd(&self) -> i32 {
        self.receive.as_raw_fd()
    }

    /// Give `fd` to the process of `c`, which receives it on its descriptor
    /// `receive_fd` (its copy of our receiving end). Returns the number it
    /// got there, close-on-exec.
    pub fn give(&self, c: &mut Child<'_>, receive_fd: i32, fd: BorrowedFd<'_>) -> Result<i32> {
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(
            self.send.as_raw_fd(),
            &[IoSlice::new(&[0u8])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| {
            Error::Other(format!(
                "cannot pass a descriptor to the restored process: {e}"
            ))
        })?;
        let byte = c.put(BYTE_AT, &[0u8])?;
        let control = c.put(CONTROL_AT, &[0u8; CONTROL_LEN as usize])?;
        let mut iovec = Vec::with_capacity(16);
        iovec.extend_from_slice(&byte.to_ne_bytes());
        iovec.extend_from_slice(&1u64.to_ne_bytes());
        let iovec = c.put(IOVEC_AT, &iovec)?;
        // struct msghdr: name, namelen (+pad), iov, iovlen, control,
        // controllen, flags (+pad)
        let mut msghdr = Vec::with_capacity(56);
        for w in [0u64, 0, iovec, 1, control, CONTROL_LEN, 0] {
            msghdr.extend_from_slice(&w.to_ne_bytes());
        }
        let msghdr = c.put(MSGHDR_AT, &msghdr)?;
        c.call(
            "recvmsg",
            libc::SYS_recvmsg,
            [
                receive_fd as u64,
                msghdr,
                libc::MSG_CMSG_CLOEXEC as u64,
                0,
                0,
                0,
            ],
        )?;
        let mut got = [0u8; CONTROL_LEN as usize];
        c.get(CONTROL_AT, &mut got)?;
        let level = i32::from_ne_bytes([got[8], got[9], got[10], got[11]]);
        let kind = i32::from_ne_bytes([got[12], got[13], got[14], got[15]]);
        if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return Err(Error::Other(
                "the restored process received no descriptor".into(),
            ));
        }
        Ok(i32::from_ne_bytes([got[16], got[17], got[18], got[19]]))
    }
}
