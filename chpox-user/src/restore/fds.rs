//! File descriptors. Each open file description of the image is made once,
//! by the restorer ([`Descriptions::prepare`]), and handed to every process
//! and number that held it ([`restore_fds`], through `inject`), so what
//! `fork` and `dup` shared stays shared:
//! - regular files by path, with the saved flags and offset;
//! - deleted files from their embedded content (a memfd, reopened with
//!   the saved access mode);
//! - directories and character devices by path;
//! - terminals: the restorer's own terminal (fd 0, 1 or 2 if one is a tty,
//!   else /dev/tty) takes their place;
//! - pipes whose both ends the checkpointed processes held: a new pipe of
//!   the saved capacity, holding the saved unread bytes;
//! - a pipe on fd 0, 1 or 2 to a process outside the image: the
//!   restorer's own fd 0, 1 or 2 (so `chpox restore IMAGE | tee -a log`
//!   carries on where `job | tee log` was);
//! - named FIFOs by path, with the saved unread bytes;
//! - UNIX socket pairs: a new pair, with each end's unread data
//!   (`unix_sockets`);
//! - descriptors replaced at dump time: /dev/null.
//!
//! A process first closes every descriptor it inherited from the restorer
//! but the image and the receiving socket, then takes its own.
//!
//! Restoring another user's image as root (`validate::Trust::Owner`),
//! every file, directory, device and FIFO is opened by path with the file
//! rights of the process that held it, which are its owner's (a thread of
//! the restorer takes them: `crate::creds::as_user`). What that user may
//! not open is refused before any process exists, naming the descriptor,
//! and `--trust-image`. Copies of deleted files (from the image), pipes,
//! socket pairs and /dev/null are made, not opened, and carry nothing the
//! owner did not put in the image; the restorer's own terminal and fds
//! 0-2 are handed over as the restorer's, as for any image.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::Mode;
use tracing::warn;

use super::child::Child;
use super::inject::Injector;
use super::validate::Owner;
use crate::error::{Error, Result};
use crate::fds::is_read_end;
use crate::image::ImageReader;
use crate::image::model::{FdEntry, FdKind, Metadata};

fn note(warnings: &mut Vec<String>, w: String) {
    warn!("{w}");
    warnings.push(w);
}

/// Flags to reopen with: the saved ones, less those that only act at
/// creation or would steal a controlling terminal.
fn open_flags(saved: u32) -> OFlag {
    let f = saved as i32
        & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY | libc::O_CLOEXEC);
    OFlag::from_bits_retain(f) | OFlag::O_NOCTTY | OFlag::O_CLOEXEC
}

/// Which restorer-made description an entry of process `pid` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// An open file description the dump identified (shared or not).
    Description(u64),
    /// One end of a pipe of the image.
    PipeEnd { inode: u64, read: bool },
    /// The restorer's terminal, for every terminal descriptor.
    Terminal,
    /// The restorer's own fd 0, 1 or 2, for a pipe to the outside there.
    Stdio(i32),
    /// One end of a UNIX socket pair, by the saved socket's inode.
    Socket(u64),
    /// Images of earlier versions: one description per descriptor.
    Alone { pid: i32, fd: i32 },
}

fn key(pid: i32, e: &FdEntry) -> Key {
    match e.kind {
        FdKind::Pipe {
            inode,
            internal: true,
            ..
        } => Key::PipeEnd {
            inode,
            read: is_read_end(e.flags),
        },
        FdKind::Pipe {
            internal: false, ..
        } => Key::Stdio(e.fd),
        FdKind::Terminal { .. } => Key::Terminal,
        FdKind::UnixPair { inode, .. } => Key::Socket(inode),
        _ if e.description != 0 => Key::Description(e.description),
        _ => Key::Alone { pid, fd: e.fd },
    }
}

/// How many descriptors the restorer holds at once to restore `meta`: one
/// per description, both ends of each pipe and socket pair, a keeper per
/// named FIFO.
pub fn descriptions_needed(meta: &Metadata) -> usize {
    let mut keys = std::collections::HashSet::new();
    let mut fifos = std::collections::HashSet::new();
    let mut n = 0;
    for p in meta.processes() {
        for e in &p.fds {
            let k = match key(p.process.pid, e) {
                // Both ends are made at once.
                Key::PipeEnd { inode, .. } => Key::PipeEnd { inode, read: true },
                Key::Socket(inode) => match e.kind {
                    FdKind::UnixPair { peer, .. } => Key::Socket(inode.min(peer)),
                    _ => Key::Socket(inode),
                },
                k => k,
            };
            if !keys.insert(k) {
                continue;
            }
            n += match k {
                Key::PipeEnd { .. } | Key::Socket(_) => 2,
                _ => 1,
            };
            if let FdKind::Fifo { path, .. } = &e.kind
                && fifos.insert(path.as_str())
            {
                n += 1;
            }
        }
    }
    n
}

/// Whose rights open the files of a process: the restorer's, or (restoring
/// another user's image as root) the process's own, which are its owner's.
#[derive(Clone, Copy)]
struct Opener<'a> {
    owner: Option<&'a Owner>,
    pid: i32,
    creds: &'a crate::image::model::Credentials,
}

impl Opener<'_> {
    /// `open(path, flags)` with the right rights; `number` is the
    /// descriptor it is for, named in a refusal.
    fn open(&self, path: &str, flags: OFlag, number: i32) -> Result<OwnedFd> {
        let Some(owner) = self.owner else {
            return nix::fcntl::open(path, flags, Mode::empty()).map_err(file_err(path));
        };
        let creds = Owner::creds_of(self.creds);
        let opened = crate::creds::as_user(&creds, || nix::fcntl::open(path, flags, Mode::empty()))
            .map_err(|e| Error::File {
                path: path.to_string(),
                source: e,
            })?;
        match opened {
            Ok(fd) => Ok(fd),
            Err(e @ (nix::errno::Errno::EACCES | nix::errno::Errno::EPERM)) => {
                Err(super::validate::beyond_owner(
                    owner,
                    &format!(
                        "descriptor {number} of PID {} opens {} {} ({})",
                        self.pid,
                        crate::image::error::one_line(path),
                        access_of(flags),
                        e.desc()
                    ),
                ))
            }
            Err(e) => Err(file_err(path)(e)),
        }
    }
}

/// The access an open asks for, for messages.
fn access_of(flags: OFlag) -> &'static str {
    match flags.bits() & libc::O_ACCMODE {
        libc::O_RDONLY => "for reading",
        libc::O_WRONLY => "for writing",
        _ => "for reading and writing",
    }
}

/// The restorer's copies of every description the image's processes hold.
pub struct Descriptions {
    by_key: HashMap<Key, OwnedFd>,
    /// A read-write descriptor of each named FIFO, by path: it holds the
    /// saved bytes and lets the processes' ends open without blocking,
    /// until every process has its own.
    fifos: HashMap<String, OwnedFd>,
}

fn file_err(path: &str) -> impl FnOnce(nix::errno::Errno) -> Error + '_ {
    move |e| Error::File {
        path: path.to_string(),
        source: std::io::Error::from(e),
    }
}

fn dev_null(flags: u32) -> Result<OwnedFd> {
    let mode = OFlag::from_bits_retain(flags as i32 & libc::O_ACCMODE);
    nix::fcntl::open("/dev/null", mode | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(file_err("/dev/null"))
}

fn seek(fd: &OwnedFd, pos: u64, path: &str) -> Result<()> {
    nix::unistd::lseek(fd, pos as i64, nix::unistd::Whence::SeekSet).map_err(file_err(path))?;
    Ok(())
}

impl Descriptions {
    /// Make every description of `meta`'s processes. Nothing here runs in
    /// a process of the image: a file that cannot be opened fails the
    /// restore before any process exists.
    ///
    /// With `owner` (root restoring another user's image), files are
    /// opened with the rights of the process that holds them.
    pub fn prepare(
        meta: &Metadata,
        reader: &ImageReader,
        owner: Option<&Owner>,
        warnings: &mut Vec<String>,
    ) -> Result<Descriptions> {
        let mut d = Descriptions {
            by_key: HashMap::new(),
            fifos: HashMap::new(),
        };
        let mut copies = crate::deleted::Copies::default();
        for p in meta.processes() {
            let opener = Opener {
                owner,
                pid: p.process.pid,
                creds: &p.process.creds,
            };
            for e in &p.fds {
                let k = key(p.process.pid, e);
                if d.by_key.contains_key(&k) {
                    continue;
                }
                if let Key::PipeEnd { inode, .. } = k {
                    d.make_pipe(meta, inode, reader, warnings)?;
                    continue;
                }
                if let FdKind::UnixPair {
                    inode,
                    peer,
                    sock_type,
                    ..
                } = e.kind
                {
                    d.make_socket_pair(meta, inode, peer, sock_type, reader)?;
                    continue;
                }
                if let FdKind::Fifo {
                    path,
                    capacity,
                    data,
                } = &e.kind
                {
                    let fifo = Fifo {
                        path,
                        capacity: *capacity,
                        data: data.as_ref(),
                    };
                    let fd = d.open_fifo(&fifo, e, opener, reader, warnings)?;
                    d.by_key.insert(k, fd);
                    continue;
                }
                let fd = make(e, opener, reader, &mut copies, warnings)?;
                d.by_key.insert(k, fd);
            }
        }
        Ok(d)
    }

    /// A new pipe for pipe `inode` of the image, of its saved capacity,
    /// holding its saved bytes, each end with its saved status flags.
    fn make_pipe(
        &mut self,
        meta: &Metadata,
        inode: u64,
        reader: &ImageReader,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        let entries: Vec<&FdEntry> = meta
            .processes()
            .flat_map(|p| &p.fds)
            .filter(
                |e| matches!(e.kind, FdKind::Pipe { inode: i, internal: true, .. } if i == inode),
            )
            .collect();
        let name = format!("pipe:[{inode}]");
        // Non-blocking while we fill it: more bytes than it holds must be
        // an error, not a restorer stuck forever.
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(file_err(&name))?;
        let capacity = entries.iter().find_map(|e| match e.kind {
            FdKind::Pipe { capacity, .. } if capacity > 0 => Some(capacity),
            _ => None,
        });
        if let Some(capacity) = capacity
            && let Err(e) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(capacity as i32))
        {
            note(
                warnings,
                format!("{name} comes back with the default capacity, not {capacity} bytes ({e})"),
            );
        }
        let data = entries.iter().find_map(|e| match &e.kind {
            FdKind::Pipe { data: Some(d), .. } => Some(*d),
            _ => None,
        });
        if let Some(data) = data {
            let bytes = reader.read_data(&data)?;
            write_bytes(&write, &bytes, || {
                format!("{name} ({} unread bytes)", bytes.len())
            })?;
        }
        for (end, is_read) in [(read, true), (write, false)] {
            // The status flags that matter on a pipe (O_NONBLOCK, O_DIRECT
            // for packet mode), as the first entry of this end had them.
            let flags = entries
                .iter()
                .find(|e| is_read_end(e.flags) == is_read)
                .map_or(0, |e| e.flags as i32 & (libc::O_NONBLOCK | libc::O_DIRECT));
            fcntl(&end, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags)))
                .map_err(file_err(&name))?;
            self.by_key.insert(
                Key::PipeEnd {
                    inode,
                    read: is_read,
                },
                end,
            );
        }
        Ok(())
    }

    /// A new pair for the saved pair (`inode`, `peer`), each end holding
    /// its saved queue, with its saved shutdowns and status flags.
    fn make_socket_pair(
        &mut self,
        meta: &Metadata,
        inode: u64,
        peer: u64,
        sock_type: i32,
        reader: &ImageReader,
    ) -> Result<()> {
        let entry_of = |ino: u64| {
            meta.processes()
                .flat_map(|p| &p.fds)
                .find(|e| matches!(e.kind, FdKind::UnixPair { inode: i, .. } if i == ino))
        };
        let (this, other) = crate::unix_sockets::make_pair(sock_type)?;
        let ends = [(inode, &this, &other), (peer, &other, &this)];
        for (ino, end, from) in ends {
            if let Some(e) = entry_of(ino) {
                crate::unix_sockets::refill(end, from, &e.kind, reader)?;
            }
        }
        for (ino, end) in [(inode, this), (peer, other)] {
            let nonblock = entry_of(ino).map_or(0, |e| e.flags as i32 & libc::O_NONBLOCK);
            fcntl(&end, FcntlArg::F_SETFL(OFlag::from_bits_retain(nonblock)))
                .map_err(file_err(&format!("socket:[{ino}]")))?;
            self.by_key.insert(Key::Socket(ino), end);
        }
        Ok(())
    }

    /// An end of a named FIFO for entry `e`. The first open of a FIFO
    /// makes its keeper (read-write, so neither side waits for the other)
    /// and puts the saved bytes in.
    fn open_fifo(
        &mut self,
        fifo: &Fifo<'_>,
        e: &FdEntry,
        opener: Opener<'_>,
        reader: &ImageReader,
        warnings: &mut Vec<String>,
    ) -> Result<OwnedFd> {
        let path = fifo.path;
        let capacity = fifo.capacity;
        if !self.fifos.contains_key(path) {
            let keeper = opener.open(
                path,
                OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                e.fd,
            )?;
            if capacity > 0
                && let Err(e) = fcntl(&keeper, FcntlArg::F_SETPIPE_SZ(capacity as i32))
            {
                note(
                    warnings,
                    format!(
                        "FIFO {path} comes back with its default capacity, not {capacity} bytes ({e})"
                    ),
                );
            }
            self.fifos.insert(path.to_string(), keeper);
        }
        let keeper = &self.fifos[path];
        if let Some(data) = fifo.data {
            let bytes = reader.read_data(data)?;
            write_bytes(keeper, &bytes, || {
                format!("{path} ({} unread bytes)", bytes.len())
            })?;
        }
        let fd = opener.open(path, open_flags(e.flags) | OFlag::O_NONBLOCK, e.fd)?;
        // Back to the saved status flags (O_NONBLOCK or not).
        let status = e.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND | libc::O_DIRECT);
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(status))).map_err(file_err(path))?;
        Ok(fd)
    }

    fn get(&self, pid: i32, e: &FdEntry) -> Result<&OwnedFd> {
        self.by_key.get(&key(pid, e)).ok_or_else(|| {
            Error::Other(format!(
                "internal: no description made for fd {} of PID {pid}",
                e.fd
            ))
        })
    }
}

/// A named FIFO of the image.
struct Fifo<'a> {
    path: &'a str,
    capacity: u64,
    data: Option<&'a crate::image::model::DataRef>,
}

/// The description for entry `e`, made by the restorer; files are opened
/// with `opener`'s rights.
fn make(
    e: &FdEntry,
    opener: Opener<'_>,
    reader: &ImageReader,
    copies: &mut crate::deleted::Copies,
    warnings: &mut Vec<String>,
) -> Result<OwnedFd> {
    Ok(match &e.kind {
        FdKind::RegularFile {
            path,
            pos,
            embedded: None,
            ..
        } => {
            let fd = opener.open(path, open_flags(e.flags), e.fd)?;
            seek(&fd, *pos, path)?;
            fd
        }
        FdKind::RegularFile {
            path,
            pos,
            embedded: Some(data),
            dev,
            ino,
            mode,
        } => {
            let name = std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let copy = copies.get((*dev, *ino), &name, *mode, |memfd| {
                let bytes = reader.read_data(data)?;
                write_bytes(memfd, &bytes, || path.clone())
            })?;
            // A new open file description with the saved access mode.
            let fd = crate::deleted::Copies::open(copy, open_flags(e.flags))?;
            seek(&fd, *pos, path)?;
            fd
        }
        FdKind::Directory { path } => opener.open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            e.fd,
        )?,
        FdKind::CharDevice { path, .. } => opener.open(path, open_flags(e.flags), e.fd)?,
        FdKind::Terminal { path, .. } => match terminal()? {
            Some(t) => t,
            None => {
                note(
                    warnings,
                    format!(
                        "descriptor {} was the terminal {path}; with no terminal here it is /dev/null",
                        e.fd
                    ),
                );
                dev_null(libc::O_RDWR as u32)?
            }
        },
        FdKind::Pipe { .. } => match restorer_fd(e.fd) {
            Some(fd) => fd,
            None => {
                note(
                    warnings,
                    format!(
                        "descriptor {} was a pipe to another process and the restorer has no fd {} to give instead; it is /dev/null",
                        e.fd, e.fd
                    ),
                );
                dev_null(e.flags)?
            }
        },
        FdKind::ReplacedByNull { .. } => dev_null(e.flags)?,
        FdKind::Fifo { .. } | FdKind::UnixPair { .. } => {
            return Err(Error::Other(format!(
                "internal: fd {} is made with its peers, not alone",
                e.fd
            )));
        }
    })
}

/// Write `bytes` into `fd` (a pipe, FIFO or memfd of ours); errors name
/// `what()`. Pipes are non-blocking here: bytes that do not fit are an
/// error, not a restorer stuck forever.
fn write_bytes(fd: &OwnedFd, bytes: &[u8], what: impl Fn() -> String) -> Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        written += nix::unistd::write(fd, &bytes[written..]).map_err(|e| Error::File {
            path: what(),
            source: std::io::Error::from(e),
        })?;
    }
    Ok(())
}

/// A copy of the restorer's own descriptor `fd` (0, 1 or 2), if it has one.
fn restorer_fd(fd: i32) -> Option<OwnedFd> {
    if !(0..=2).contains(&fd) {
        return None;
    }
    // SAFETY: fd 0-2 are ours for the life of the process; we only borrow
    // it to duplicate it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD).ok()?;
    borrowed.try_clone_to_owned().ok()
}

/// The restorer's terminal: fd 0, 1 or 2 if one is a terminal, else
/// /dev/tty; None without one.
fn terminal() -> Result<Option<OwnedFd>> {
    // SAFETY: isatty only inspects a descriptor number.
    if let Some(fd) = (0..3).find(|&fd| unsafe { libc::isatty(fd) } == 1) {
        return Ok(restorer_fd(fd));
    }
    match nix::fcntl::open(
        "/dev/tty",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(_) => Ok(None),
    }
}

/// Close what the process inherited from the restorer, and give it each
/// of its saved descriptors.
pub fn restore_fds(
    c: &mut Child<'_>,
    pid_in_image: i32,
    fds: &[FdEntry],
    image_fd: i32,
    descriptions: &Descriptions,
    injector: &Injector,
) -> Result<()> {
    let top = fds.iter().map(|e| e.fd + 1).max().unwrap_or(3).max(3) as u64;
    // Helpers above every number to restore.
    let mut keep = Vec::new();
    for fd in [image_fd, injector.receive_fd()] {
        keep.push(c.call(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            [fd as u64, libc::F_DUPFD_CLOEXEC as u64, top, 0, 0, 0],
        )?);
    }
    let (image_high, receive_high) = (keep[0] as i32, keep[1] as i32);
    keep.sort_unstable();
    let mut from = 0u64;
    for &k in &keep {
        if k > from {
            close_range(c, from, k - 1)?;
        }
        from = k + 1;
    }
    close_range(c, from, u64::from(u32::MAX))?;
    let mut fds: Vec<&FdEntry> = fds.iter().collect();
    // In order, so each received descriptor lands at or below its number.
    fds.sort_by_key(|e| e.fd);
    for e in fds {
        let ours = descriptions.get(pid_in_image, e)?;
        let got = injector.give(c, receive_high, ours.as_fd())?;
        if got == e.fd {
            // Received right at its number, close-on-exec.
            if !e.cloexec {
                c.call(
                    "fcntl(F_SETFD)",
                    libc::SYS_fcntl,
                    [got as u64, libc::F_SETFD as u64, 0, 0, 0, 0],
                )?;
            }
            continue;
        }
        let flags = if e.cloexec { libc::O_CLOEXEC } else { 0 };
        c.call(
            "dup3",
            libc::SYS_dup3,
            [got as u64, e.fd as u64, flags as u64, 0, 0, 0],
        )?;
        c.close(got)?;
    }
    c.close(image_high)?;
    c.close(receive_high)?;
    Ok(())
}

fn close_range(c: &mut Child<'_>, first: u64, last: u64) -> Result<()> {
    if first > last {
        return Ok(());
    }
    c.call(
        "close_range",
        libc::SYS_close_range,
        [first, last, 0, 0, 0, 0],
    )?;
    Ok(())
}
