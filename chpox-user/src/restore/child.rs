//! The child being rebuilt: a borrowed thread that runs our syscalls, and a
//! scratch area in its memory for their arguments.

use crate::error::{Error, Result};
use crate::remote::{self, RemoteThread};

/// Longest path we pass (PATH_MAX, with its NUL).
pub const PATH_MAX: usize = 4096;

// The scratch area, one region per kind of use, so that no caller needs to
// know another's offsets. A path (`put_path`) takes [0, 4096).
/// A syscall's structured argument: a sigaction, a stack_t, a siginfo, the
/// mm map and auxv, rlimits, the group list.
pub const ARGS_AT: u64 = 4096;
/// Small values the kernel reads and writes back: sendfile's offset, the
/// descriptors pipe2 makes.
pub const INOUT_AT: u64 = 8192;
/// clone3's arguments and TID array, alive while a thread is created.
pub const CLONE_AT: u64 = 12288;
/// recvmsg's header, buffer and control message, while a descriptor is
/// handed over (`inject`).
pub const INJECT_AT: u64 = 16384;

pub struct Child<'f> {
    thread: RemoteThread<'f>,
    scratch: u64,
    scratch_len: u64,
}

impl<'f> Child<'f> {
    pub fn new(thread: RemoteThread<'f>, scratch: u64, scratch_len: u64) -> Self {
        Child {
            thread,
            scratch,
            scratch_len,
        }
    }

    pub fn pid(&self) -> i32 {
        self.thread.pid()
    }

    pub fn into_thread(self) -> RemoteThread<'f> {
        self.thread
    }

    /// The borrowed thread, for callers that speak to it directly.
    pub fn thread(&mut self) -> &mut RemoteThread<'f> {
        &mut self.thread
    }

    /// Run a syscall; a negative result is an error naming `call`.
    pub fn call(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.thread.checked(call, nr, args)
    }

    /// Run a syscall; the raw result (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        self.thread.syscall(nr, args)
    }

    /// Copy `bytes` into the scratch area at `offset`; returns their
    /// address in the child.
    pub fn put(&mut self, offset: u64, bytes: &[u8]) -> Result<u64> {
        if offset + bytes.len() as u64 > self.scratch_len {
            return Err(Error::Other(format!(
                "internal: {} bytes at {offset} overflow the restore scratch area",
                bytes.len()
            )));
        }
        let addr = self.scratch + offset;
        remote::write_memory(self.pid(), addr, bytes)?;
        Ok(addr)
    }

    /// Read `buf.len()` bytes of the scratch area at `offset`.
    pub fn get(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        remote::read_memory(self.pid(), self.scratch + offset, buf)
    }

    /// A NUL-terminated path at the start of the scratch area.
    pub fn put_path(&mut self, path: &str) -> Result<u64> {
        if path.len() >= PATH_MAX || path.as_bytes().contains(&0) {
            return Err(Error::Other(format!("path too long or invalid: {path:?}")));
        }
        let mut bytes = Vec::with_capacity(path.len() + 1);
        bytes.extend_from_slice(path.as_bytes());
        bytes.push(0);
        self.put(0, &bytes)
    }

    /// `openat(AT_FDCWD, path, flags, mode)` in the child; the raw result.
    pub fn try_open(&mut self, path: &str, flags: i32, mode: u32) -> Result<i64> {
        let addr = self.put_path(path)?;
        self.raw(
            libc::SYS_openat,
            [
                libc::AT_FDCWD as i64 as u64,
                addr,
                flags as u32 as u64,
                u64::from(mode),
                0,
                0,
            ],
        )
    }

    /// Like `try_open`, with an error naming the path.
    pub fn open(&mut self, path: &str, flags: i32, mode: u32) -> Result<i32> {
        let ret = self.try_open(path, flags, mode)?;
        if ret < 0 {
            return Err(Error::File {
                path: path.to_string(),
                source: std::io::Error::from_raw_os_error(-ret as i32),
            });
        }
        Ok(ret as i32)
    }

    pub fn close(&mut self, fd: i32) -> Result<()> {
        self.call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        Ok(())
    }
}

/// A positive errno from a raw result (for messages).
pub fn errno_of(ret: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error((-ret) as i32)
}
