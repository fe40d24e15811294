//! Open file descriptors: one file per kind, each holding its dump and its
//! restore half side by side (as CRIU's `pipes.c`, `sk-unix.c`,
//! `eventfd.c`), and here the table that ties them together.
//!
//! - [`file`]: regular files (path, flags, offset; content too if
//!   deleted), directories, character devices;
//! - [`tty`]: terminals, which restore replaces by the restorer's own;
//! - [`pipe`]: pipes whose both ends the checkpointed processes hold (with
//!   their unread bytes), and those on fd 0, 1 or 2 whose other end is
//!   another process's (`job | tee log`), which restore connects to the
//!   restorer's own fd 0, 1 or 2;
//! - [`fifo`]: named FIFOs, with their unread bytes;
//! - [`unix`]: UNIX sockets: bound, listening, connected inside the
//!   checkpoint with their queues, or to the outside (`--inherit-fd`);
//! - [`inet`]: TCP and UDP sockets; established TCP connections through
//!   [`tcp_repair`] (`--tcp-established`) or reset (`--tcp-close`);
//! - the socket kinds above and what they share are in [`sockets`];
//! - [`memfd`]: memfd_create files, with their content;
//! - [`events`]: the kernel's event objects, [`eventfd`], [`timerfd`],
//!   [`signalfd`], [`epoll`], [`inotify`], [`pidfd`], and [`uring`]
//!   (io_uring and AIO, refused by name);
//! - [`locks`]: flock, POSIX and OFD locks held through any of them.
//!
//! Adding a kind: a new file with its `KIND` (how to recognise it at dump
//! time, what to do across the tree, how restore makes it), and one line
//! in [`KINDS`]; a kind the restored process must finish itself once all
//! its descriptors are in place (epoll entries, pidfds) adds one line in
//! [`INSTALLED`], and one with words of its own for `inspect` a line in
//! [`describe`].
//!
//! In a tree, "the process" is the checkpointed processes together: a pipe
//! between two of them is internal.
//!
//! Kinds chpox cannot restore yet fail the dump, naming each one, unless
//! the user asks for them to come back as /dev/null. A checkpoint that
//! silently drops a descriptor is worse than none.
//!
//! Restore ([`restore`]): each open file description of the image is made
//! once, by the restorer, and handed to every process and number that held
//! it, so what `fork` and `dup` shared stays shared.

pub mod events;
pub mod external;
pub mod fifo;
pub mod file;
pub mod locks;
pub mod memfd;
pub mod pipe;
pub mod restore;
pub mod sockets;
pub mod tty;

use std::fs::Metadata as FileMeta;

use events::{epoll, eventfd, inotify, pidfd, signalfd, timerfd, uring};

use crate::creds::UserCreds;
use crate::error::{Error, Result, parse_err, read_proc};
use crate::image::ImageWriter;
use crate::image::model::{FdEntry, FdKind, ProcessImage};

pub use pipe::is_read_end;
pub use restore::{Descriptions, descriptions_needed, restore_fds};
// The socket kinds keep their short paths (`fds::unix`, `fds::inet`),
// as for every other kind.
pub use sockets::{inet, tcp_repair, unix};
pub use tty::is_terminal_major;

/// What to do with a descriptor of a kind chpox cannot restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnsupportedFd {
    #[default]
    Fail,
    /// Record it, and restore /dev/null in its place.
    Null,
}

/// A kind's tree-wide pass at dump time.
pub type Classify = fn(&mut [ProcessImage], UnsupportedFd) -> Result<()>;

/// One kind of descriptor: its dump and restore halves, as its file
/// implements them.
pub struct Kind {
    /// Dump: this kind's entry for the descriptor, if it is one of its.
    pub probe: fn(&Probe<'_>) -> Result<Option<FdKind>>,
    /// Dump, once every process is scanned: what needs the whole tree
    /// (which pipe ends it holds…), before descriptions are linked.
    pub classify: Option<Classify>,
    /// Dump, after descriptions are linked: bulk data into the image.
    pub embed: Option<fn(&mut Embed<'_>) -> Result<()>>,
    /// Restore: the description an entry of this kind gets (None: the one
    /// the dump identified, [`restore::Key::Description`]).
    pub key: fn(i32, &FdEntry) -> Option<restore::Key>,
    /// Restore: what the restorer must hold open for entry `e` (key and
    /// number of descriptors), beyond its description.
    pub needs: fn(i32, &FdEntry) -> Vec<(restore::Key, usize)>,
    /// Restore: make the description(s) of entry `e` into `d`; false if
    /// `e` is not of this kind.
    pub make: fn(&mut Descriptions, &mut restore::Making<'_>, &FdEntry) -> Result<bool>,
}

/// Every kind, in the order a descriptor is tried against them.
pub const KINDS: &[&Kind] = &[
    &memfd::KIND,
    &file::REGULAR,
    &file::DIRECTORY,
    &fifo::KIND,
    &pipe::KIND,
    &unix::KIND,
    &inet::KIND,
    &tty::KIND,
    &file::CHAR_DEVICE,
    &external::KIND,
    &restore::NULL,
    &eventfd::KIND,
    &timerfd::KIND,
    &signalfd::KIND,
    &epoll::KIND,
    &inotify::KIND,
    &pidfd::KIND,
    &uring::KIND,
];

/// What a kind does in a restored process once all its descriptors are in
/// place (`pid_in_image`, its saved entries).
pub type Installed =
    fn(&mut crate::restore::child::Child<'_>, i32, &[FdEntry], &Descriptions) -> Result<()>;

/// The kinds that finish inside the process, in this order (pidfds before
/// an epoll that may watch them; file locks last, see [`locks`]).
pub const INSTALLED: &[Installed] = &[pidfd::installed, epoll::installed, locks::installed];

/// For `inspect`: how a kind not described there reads.
pub fn describe(kind: &FdKind) -> String {
    let describers: &[fn(&FdKind) -> Option<String>] = &[
        eventfd::describe,
        timerfd::describe,
        signalfd::describe,
        epoll::describe,
        inotify::describe,
        memfd::describe,
        pidfd::describe,
        unix::describe_kind,
        inet::describe_kind,
        external::describe,
    ];
    describers
        .iter()
        .find_map(|d| d(kind))
        .unwrap_or_else(|| format!("{kind:?}"))
}

/// What a kind's probe sees of one descriptor.
pub struct Probe<'a> {
    pub pid: i32,
    pub fd: i32,
    /// Where /proc/PID/fd/N points.
    pub target: &'a str,
    /// `stat` of the descriptor's file, if it can be had.
    pub meta: Option<&'a FileMeta>,
    /// /proc/PID/fdinfo/N, whole, and its `pos:` and `flags:`.
    pub fdinfo: &'a str,
    pub info: FdInfo,
    /// Every UNIX socket of our network namespace.
    pub unix: &'a unix::UnixTable,
    /// Every TCP and UDP socket, and what to do with connections.
    pub inet: &'a inet::InetTable,
}

/// What a kind's `embed` gets.
pub struct Embed<'a> {
    pub procs: &'a mut [ProcessImage],
    pub writer: &'a mut ImageWriter,
    /// The file rights deleted files are read with (`files::embed_reader`).
    pub reader: Option<&'a UserCreds>,
}

/// The `pos:` and `flags:` lines of /proc/PID/fdinfo/N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
}

pub fn parse_fdinfo(text: &str, path: &str) -> Result<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            // Octal, as open(2) flags are usually written.
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    match (pos, flags) {
        (Some(pos), Some(flags)) => Ok(FdInfo { pos, flags }),
        _ => Err(parse_err(path, "missing pos: or flags:")),
    }
}

fn open_fd_numbers(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).map_err(|source| Error::Proc {
        path: path.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// A descriptor's file as `stat` of /proc/PID/fd/N gives it (device,
/// inode): descriptors of one description are descriptors of one file
/// (see `tree::link_descriptions`).
pub type FileId = (u64, u64);

/// Every descriptor of `pid`, whose /proc/PID/maps reads `maps`, with its
/// file's id where `stat` gave one. The content of deleted regular files
/// is not read yet; [`embed`] does that.
pub fn scan_fds(
    pid: i32,
    policy: UnsupportedFd,
    sockets: &sockets::tables::SocketTables,
    maps: &str,
) -> Result<Vec<(FdEntry, Option<FileId>)>> {
    use std::os::unix::fs::MetadataExt;
    let mut entries = Vec::new();
    let mut unsupported = Vec::new();
    for fd in open_fd_numbers(pid)? {
        let link_path = format!("/proc/{pid}/fd/{fd}");
        let Ok(target) = std::fs::read_link(&link_path) else {
            // Closed since we listed the directory: not part of the state.
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let info_path = format!("/proc/{pid}/fdinfo/{fd}");
        let fdinfo = read_proc(&info_path)?;
        let info = parse_fdinfo(&fdinfo, &info_path)?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let meta = std::fs::metadata(&link_path).ok();
        let (unix, inet) = sockets.for_target(&target)?;
        let probe = Probe {
            pid,
            fd,
            target: &target,
            meta: meta.as_ref(),
            fdinfo: &fdinfo,
            info,
            unix,
            inet,
        };
        let locks = locks::parse(&fdinfo, pid, fd, &target)?;
        let mut kind = None;
        for k in KINDS {
            if let Some(found) = (k.probe)(&probe)? {
                kind = Some(found);
                break;
            }
        }
        let kind = match (kind, policy) {
            (Some(k), _) => k,
            (None, UnsupportedFd::Null) => FdKind::ReplacedByNull { was: target },
            (None, UnsupportedFd::Fail) => {
                unsupported.push(format!("fd {fd} ({target})"));
                continue;
            }
        };
        entries.push((
            FdEntry {
                fd,
                flags: info.flags,
                cloexec,
                kind,
                description: 0,
                locks,
            },
            meta.map(|m| (m.dev(), m.ino())),
        ));
    }
    if !unsupported.is_empty() {
        return Err(Error::UnsupportedFds(unsupported.join(", ")));
    }
    // Rings without a descriptor (AIO), before anything reads that memory.
    uring::check_rings_in(pid, maps)?;
    entries.sort_by_key(|(e, _)| e.fd);
    Ok(entries)
}

/// Everything that needs the whole tree: which pipes and socket pairs are
/// the tree's own.
pub fn classify(procs: &mut [ProcessImage], policy: UnsupportedFd) -> Result<()> {
    for k in KINDS {
        if let Some(classify) = k.classify {
            classify(procs, policy)?;
        }
    }
    Ok(())
}

/// Bulk data of every kind into the image: unread bytes of pipes, FIFOs
/// and socket pairs, deleted files' content.
pub fn embed(
    procs: &mut [ProcessImage],
    writer: &mut ImageWriter,
    reader: Option<&UserCreds>,
) -> Result<()> {
    let mut e = Embed {
        procs,
        writer,
        reader,
    };
    for k in KINDS {
        if let Some(embed) = k.embed {
            embed(&mut e)?;
        }
    }
    Ok(())
}

/// The value after `name` on the first fdinfo line that starts with it,
/// trimmed.
pub fn field<'a>(fdinfo: &'a str, name: &str) -> Option<&'a str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// Probes that do not apply to a kind.
pub fn no_key(_: i32, _: &FdEntry) -> Option<restore::Key> {
    None
}

/// The `close_range` spans, (first, last) inclusive, that close every
/// descriptor number but `keep` (any order, repeats allowed).
pub fn spans_closing_all_but(keep: &[u64]) -> Vec<(u64, u64)> {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    keep.dedup();
    let mut spans = Vec::with_capacity(keep.len() + 1);
    let mut from = 0u64;
    for k in keep {
        if k > from {
            spans.push((from, k - 1));
        }
        from = k + 1;
    }
    spans.push((from, u64::from(u32::MAX)));
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_closing_all_but_skip_exactly_the_kept() {
        assert_eq!(spans_closing_all_but(&[]), vec![(0, u64::from(u32::MAX))]);
        assert_eq!(
            spans_closing_all_but(&[7, 0, 3, 4, 7]),
            vec![(1, 2), (5, 6), (8, u64::from(u32::MAX))]
        );
    }

    #[test]
    fn fdinfo_is_parsed() {
        let text = "pos:\t123\nflags:\t02100002\nmnt_id:\t25\nino:\t42\n";
        let info = parse_fdinfo(text, "t").expect("parses");
        assert_eq!(info.pos, 123);
        assert_eq!(info.flags, 0o2100002);
        assert!(info.flags & libc::O_CLOEXEC as u32 != 0);
        assert!(info.flags & libc::O_RDWR as u32 != 0);
    }

    #[test]
    fn fdinfo_without_pos_is_an_error() {
        assert!(parse_fdinfo("flags: 0\n", "t").is_err());
    }

    #[test]
    fn pts_and_console_are_terminals() {
        assert!(is_terminal_major(136));
        assert!(is_terminal_major(5));
        assert!(!is_terminal_major(1)); // /dev/null, /dev/zero
    }

    #[test]
    fn only_ptmx_is_a_pty_master() {
        assert!(tty::is_pty_master(libc::makedev(5, 2)));
        assert!(!tty::is_pty_master(libc::makedev(5, 0))); // /dev/tty
        assert!(!tty::is_pty_master(libc::makedev(5, 1))); // /dev/console
        assert!(!tty::is_pty_master(libc::makedev(136, 2))); // /dev/pts/2
    }
}
