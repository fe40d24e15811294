//! The userfaultfd interface `--lazy` uses: the ioctls and messages of
//! `<linux/userfaultfd.h>`, each behind a small safe function.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::restore::child::Child;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// The events the server must see to stay correct while the process runs:
/// a fork (the child's missing pages need filling too), mremap (pages
/// move), madvise(DONTNEED) and munmap (pages that must not come back).
pub const FEATURES: u64 =
    FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP;
const FEATURE_EVENT_FORK: u64 = 1 << 1;
const FEATURE_EVENT_REMAP: u64 = 1 << 2;
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: the event byte, padding, then 24 bytes of arguments.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawMsg {
    event: u8,
    _reserved: [u8; 7],
    arg: [u64; 3],
}

/// What the kernel told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread waits for the page at this address.
    Fault(u64),
    /// The process forked; the child's memory is served through this new
    /// descriptor, now in our table.
    Fork(i32),
    /// `[from, from + len)` moved to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was discarded (madvise) or unmapped: its old content
    /// must never come back.
    Gone { start: u64, end: u64 },
    /// An event this code does not know; ignored.
    Other(u8),
}

fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the `repr(C)` struct `request` takes, alive and
    // exclusively ours for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Enable the API with `features` (0, or [`FEATURES`]).
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<()> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a)?;
    if a.features & features != features {
        return Err(io::Error::other(
            "this kernel's userfaultfd lacks fork/remap/remove/unmap events",
        ));
    }
    Ok(())
}

/// A userfaultfd made by the process of `c` (a userfaultfd serves the
/// memory of the process that made it), moved into our descriptor table
/// with `pidfd_getfd`: the process keeps no copy.
pub fn from_child(c: &mut Child<'_>) -> crate::error::Result<io::Result<OwnedFd>> {
    from_remote(c.thread(), 0)
}

/// A userfaultfd made by the process whose thread `thread` is (a remote
/// syscall), moved into our descriptor table with `pidfd_getfd` and closed
/// in the process: it keeps no copy. `flags` are added to
/// `O_CLOEXEC | O_NONBLOCK` (e.g. [`USER_MODE_ONLY`]). Every ioctl on the
/// descriptor then acts on that process's memory.
pub fn from_remote(
    thread: &mut crate::remote::RemoteThread<'_>,
    flags: u64,
) -> crate::error::Result<io::Result<OwnedFd>> {
    let theirs = thread.syscall(
        libc::SYS_userfaultfd,
        [
            (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | flags,
            0,
            0,
            0,
            0,
            0,
        ],
    )?;
    if theirs < 0 {
        return Ok(Err(io::Error::from_raw_os_error(-theirs as i32)));
    }
    let copied = pidfd_getfd(thread.pid(), theirs as i32);
    thread.checked("close", libc::SYS_close, [theirs as u64, 0, 0, 0, 0, 0])?;
    Ok(copied)
}

fn pidfd_getfd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: integers in, a checked descriptor out.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made for us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: integers in, a checked descriptor out.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just installed for us.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

/// Have missing pages of `[start, start + len)` reported to `fd`.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Register {
        range: Range { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// How far a copy got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// All of it.
    All,
    /// `done` bytes, then an error: EEXIST (the next page is there
    /// already), EAGAIN (the layout is changing: read the events first),
    /// ESRCH (the process is gone), or another.
    Part { done: u64, errno: i32 },
}

/// Copy `len` bytes from our address `src` into the missing pages at `dst`,
/// waking the threads that wait for them.
pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: u64, len: u64) -> Copied {
    let mut c = Copy {
        dst,
        src,
        len,
        mode: 0,
        copy: 0,
    };
    match ioctl(fd, UFFDIO_COPY, &mut c) {
        Ok(()) => Copied::All,
        Err(e) => Copied::Part {
            done: u64::try_from(c.copy).unwrap_or(0),
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        },
    }
}

/// Map the zero page at the missing page `addr`. Ok also if the page is
/// there already.
pub fn zeropage(fd: BorrowedFd<'_>, addr: u64, len: u64) -> io::Result<()> {
    let mut z = Zeropage {
        range: Range { start: addr, len },
        mode: 0,
        zeropage: 0,
    };
    match ioctl(fd, UFFDIO_ZEROPAGE, &mut z) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Wake the threads waiting for `[addr, addr + len)`.
pub fn wake(fd: BorrowedFd<'_>, addr: u64, len: u64) -> io::Result<()> {
    let mut r = Range { start: addr, len };
    ioctl(fd, UFFDIO_WAKE, &mut r)
}

/// The events waiting on `fd` (non-blocking), at most `max`.
pub fn read_events(fd: BorrowedFd<'_>, max: usize) -> io::Result<Vec<Event>> {
    let mut raw = vec![
        RawMsg {
            event: 0,
            _reserved: [0; 7],
            arg: [0; 3],
        };
        max.max(1)
    ];
    let size = std::mem::size_of::<RawMsg>();
    // SAFETY: reading into `raw`, a buffer of `raw.len() * size` bytes of
    // plain integers, which any bytes are valid for.
    let n = unsafe { libc::read(fd.as_raw_fd(), raw.as_mut_ptr().cast(), raw.len() * size) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let count = n as usize / size;
    Ok(raw[..count]
        .iter()
        .map(|m| match m.event {
            // arg: flags, address, thread id.
            EVENT_PAGEFAULT => Event::Fault(m.arg[1]),
            EVENT_FORK => Event::Fork(m.arg[0] as u32 as i32),
            EVENT_REMAP => Event::Remap {
                from: m.arg[0],
                to: m.arg[1],
                len: m.arg[2],
            },
            EVENT_REMOVE | EVENT_UNMAP => Event::Gone {
                start: m.arg[0],
                end: m.arg[1],
            },
            other => Event::Other(other),
        })
        .collect())
}

/// `userfaultfd()` flag: only faults from user space are handled, which a
/// process without CAP_SYS_PTRACE may ask for when
/// `vm.unprivileged_userfaultfd` is 0.
pub const USER_MODE_ONLY: u64 = 1;
/// Write-protect faults are resolved by the kernel itself (no handler):
/// the page is made writable and loses its "not written" mark, which
/// `PAGEMAP_SCAN` reports (see `crate::dirty`).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Write-protect applies to pages not populated yet as well.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;

/// Enable the API with `features`; the features the kernel granted, which
/// may lack some asked for (the caller decides).
pub fn api_granted(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// Register `[start, start + len)` for write-protect tracking.
pub fn register_wp(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Register {
        range: Range { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// Undo a registration of `[start, start + len)` (write protection is
/// dropped with it).
pub fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Range { start, len };
    ioctl(fd, UFFDIO_UNREGISTER, &mut r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_sizes() {
        // The sizes are encoded in the ioctl numbers above.
        assert_eq!(std::mem::size_of::<Api>(), 24);
        assert_eq!(std::mem::size_of::<Register>(), 32);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(std::mem::size_of::<Zeropage>(), 32);
        assert_eq!(std::mem::size_of::<RawMsg>(), 32);
        assert_eq!(UFFDIO_COPY >> 16 & 0x3fff, 40);
        assert_eq!(UFFDIO_API >> 16 & 0x3fff, 24);
    }
}
