//! What an image says about open file descriptors (`FdEntry`, `FdKind`
//! and the state of each kind), apart from sockets (`model_sockets.rs`).
//! Same rules as `model.rs`: fields only added, with `#[serde(default)]`;
//! enum variants only at the end.

use serde::{Deserialize, Serialize};

use super::model::DataRef;
use super::model_sockets::{InetSocketImage, UnixSocketImage};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: i32,
    /// `flags` from fdinfo: the open(2) flags (O_APPEND, O_RDWR…), octal in procfs.
    pub flags: u32,
    pub cloexec: bool,
    pub kind: FdKind,
    /// The open file description: entries of the tree with the same id
    /// share one (`dup`, or inherited through `fork`: one offset, one set
    /// of flags). Unique per entry in images of earlier versions (0).
    #[serde(default)]
    pub description: u64,
    /// Locks the process held through this descriptor (`fds::locks`).
    #[serde(default)]
    pub locks: Vec<FileLock>,
}

/// What a regular file looked like at the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// A lock held through a descriptor, as `/proc/PID/fdinfo/N` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub kind: LockKind,
    /// A write (exclusive) lock; otherwise a read (shared) one.
    pub write: bool,
    /// First byte (0 for `flock`).
    pub start: u64,
    /// Last byte, inclusive; None: to the end of the file, however far it
    /// grows.
    pub end: Option<u64>,
}

/// Who owns a lock, which decides how restore takes it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    /// `flock(2)`: owned by the open file description.
    Flock,
    /// `fcntl(F_SETLK)`, POSIX record lock: owned by the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: owned by the open file description.
    Ofd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FdKind {
    RegularFile {
        path: String,
        pos: u64,
        /// Set when the file was deleted but still open: the content is here.
        embedded: Option<DataRef>,
        dev: u64,
        ino: u64,
        /// Of a deleted file: its permission bits, which its copy gets.
        #[serde(default)]
        mode: Option<u32>,
        /// Size and modification time at the checkpoint: restore tells the
        /// user when the file changed since (images of earlier versions:
        /// None).
        #[serde(default)]
        stamp: Option<FileStamp>,
    },
    Directory {
        path: String,
    },
    CharDevice {
        path: String,
        rdev: u64,
    },
    /// A terminal; restore attaches the restorer's terminal in its place.
    Terminal {
        path: String,
        rdev: u64,
    },
    /// An anonymous pipe end; the access mode in the entry's flags says
    /// which end.
    Pipe {
        /// The pipe's inode: entries with the same one share the pipe.
        inode: u64,
        /// The checkpointed processes held both ends: restore recreates
        /// the pipe with its unread bytes. Otherwise (only ever on fd 0,
        /// 1 or 2) the restorer's own descriptor of that number takes its
        /// place, as the restorer's terminal does for a terminal.
        internal: bool,
        /// The pipe's capacity in bytes (`F_GETPIPE_SZ`) of an internal pipe.
        capacity: u64,
        /// Bytes written to an internal pipe and not read yet, stored with
        /// one of its read-end entries.
        data: Option<DataRef>,
    },
    /// A kind chpox cannot save yet, replaced by /dev/null at the user's
    /// request (`--unsupported-fd=null`).
    ReplacedByNull {
        was: String,
    },
    /// A named FIFO, reopened by path with the entry's access mode.
    Fifo {
        path: String,
        /// Its capacity in bytes (`F_GETPIPE_SZ`).
        capacity: u64,
        /// Bytes written and not read yet, stored with one entry of the
        /// FIFO (the first of the tree).
        data: Option<DataRef>,
    },
    /// One end of a connected pair of unnamed UNIX sockets (`socketpair`)
    /// whose other end the checkpointed processes hold too.
    UnixPair {
        /// The socket's inode; `peer` is the other end's.
        inode: u64,
        peer: u64,
        /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
        sock_type: i32,
        /// Shutdowns done: 1 receiving, 2 sending.
        shutdown: u8,
        /// What this end would read next (sent by the peer), stored once.
        queued: Option<DataRef>,
        /// The lengths of the messages in `queued` (not for a stream).
        messages: Vec<u64>,
    },
    /// An eventfd: its counter; EFD_NONBLOCK is in the entry's flags.
    EventFd {
        #[serde(default)]
        count: u64,
        #[serde(default)]
        semaphore: bool,
    },
    /// A timerfd, as `timerfd_gettime` and fdinfo said at dump time.
    TimerFd {
        #[serde(default)]
        clockid: i32,
        /// `timerfd_settime` flags: TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET.
        #[serde(default)]
        settime_flags: i32,
        /// Time left to the next expiry, 0 when disarmed.
        #[serde(default)]
        value_ns: u64,
        #[serde(default)]
        interval_ns: u64,
        /// For a TFD_TIMER_ABSTIME timer: its deadline on its clock.
        #[serde(default)]
        deadline_ns: u64,
        /// Expirations not read yet.
        #[serde(default)]
        ticks: u64,
    },
    /// A signalfd and the signals it accepts (bit N-1 for signal N).
    SignalFd {
        #[serde(default)]
        mask: u64,
    },
    /// An epoll instance and its interest list, each target by its number
    /// in the table of the process that adds it back.
    Epoll {
        #[serde(default)]
        targets: Vec<EpollTarget>,
    },
    /// An inotify instance and its watches.
    Inotify {
        #[serde(default)]
        watches: Vec<InotifyWatch>,
    },
    /// A memfd: entries with the same inode are one file.
    Memfd {
        #[serde(default)]
        name: String,
        #[serde(default)]
        inode: u64,
        #[serde(default)]
        pos: u64,
        /// Permission bits.
        #[serde(default)]
        mode: u32,
        /// `F_GET_SEALS`.
        #[serde(default)]
        seals: u32,
        #[serde(default)]
        size: u64,
        /// The content, stored with the first entry of the inode.
        #[serde(default)]
        content: Option<DataRef>,
        /// Owner.
        #[serde(default)]
        uid: u32,
        #[serde(default)]
        gid: u32,
    },
    /// A pidfd of a process of the checkpoint, by its PID as the image
    /// knows it.
    PidFd {
        #[serde(default)]
        pid: i32,
    },
    /// A UNIX socket (`fds::unix`): bound, listening, connected inside the
    /// checkpoint or not.
    Unix(Box<UnixSocketImage>),
    /// A TCP or UDP socket (`fds::inet`).
    Inet(Box<InetSocketImage>),
    /// Connected to something outside the checkpoint (a daemon's UNIX
    /// socket…): restore needs a replacement, `--inherit-fd FD=N`.
    External {
        was: String,
    },
}

/// One entry of an epoll interest list (`epoll_ctl(EPOLL_CTL_ADD)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    pub fd: i32,
    /// EPOLLIN…, with EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP.
    pub events: u32,
    pub data: u64,
    /// The watched file's inode and device (`st_dev`), to check at dump
    /// time that `fd` is still the file that was added.
    #[serde(default)]
    pub ino: u64,
    #[serde(default)]
    pub dev: u64,
    /// The process (PID in the image) whose table has `fd` as that file:
    /// it adds the entry back. 0: the first process holding the instance.
    #[serde(default)]
    pub pid: i32,
    /// Set when `fd` was closed in that process while the file lives on
    /// there as `via`: restore puts it at `fd` for the call.
    #[serde(default)]
    pub via: Option<i32>,
}

/// One inotify watch: re-added by path with its mask, under its number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
}
