//! Restoring descriptors. Each open file description of the image is made
//! once, by the restorer ([`Descriptions::prepare`], each kind's `make`),
//! and handed to every process and number that held it ([`restore_fds`],
//! through `restore::inject`), so what `fork` and `dup` shared stays
//! shared. What each kind becomes is said in its own file.
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

use super::{KINDS, Kind};
use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{FdEntry, FdKind, Metadata};
use crate::restore::child::Child;
use crate::restore::inject::Injector;
use crate::restore::validate::Owner;

pub(crate) fn note(warnings: &mut Vec<String>, w: String) {
    let held = HELD.with(|h| match h.borrow_mut().as_mut() {
        Some(held) => {
            held.push(w.clone());
            true
        }
        None => false,
    });
    if !held {
        warn!("{w}");
    }
    warnings.push(w);
}

thread_local! {
    static HELD: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// While it lives, this thread's descriptor warnings are kept, not logged;
/// [`HeldWarnings::log`] logs them, dropping it forgets them. So a restore
/// that fails while it fills memory (a damaged page run) or compares files
/// says so in one line, without warnings about a restore that did not
/// happen.
pub struct HeldWarnings(());

impl HeldWarnings {
    pub fn new() -> HeldWarnings {
        HELD.with(|h| *h.borrow_mut() = Some(Vec::new()));
        HeldWarnings(())
    }

    /// Log what was held, and log later warnings at once again.
    pub fn log(self) {
        if let Some(held) = HELD.with(|h| h.borrow_mut().take()) {
            for w in held {
                warn!("{w}");
            }
        }
    }
}

impl Default for HeldWarnings {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HeldWarnings {
    fn drop(&mut self) {
        HELD.with(|h| h.borrow_mut().take());
    }
}

/// Flags to reopen with: the saved ones, less those that only act at
/// creation or would steal a controlling terminal.
pub(crate) fn open_flags(saved: u32) -> OFlag {
    let f = saved as i32
        & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY | libc::O_CLOEXEC);
    OFlag::from_bits_retain(f) | OFlag::O_NOCTTY | OFlag::O_CLOEXEC
}

/// Which restorer-made description an entry of process `pid` gets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An open file description the dump identified (shared or not).
    Description(u64),
    /// An object of a kind (named by its file), by the kind's own ids:
    /// `("pipe", inode, read end)`, `("unix", inode, 0)`.
    Object(&'static str, u64, u64),
    /// Something a kind holds by name (a FIFO's keeper, by path).
    Named(&'static str, String),
    /// Images of earlier versions: one description per descriptor.
    Alone { pid: i32, fd: i32 },
}

/// The description entry `e` of process `pid` gets.
pub fn key(pid: i32, e: &FdEntry) -> Key {
    if let Some(k) = KINDS.iter().find_map(|k| (k.key)(pid, e)) {
        return k;
    }
    if e.description != 0 {
        Key::Description(e.description)
    } else {
        Key::Alone { pid, fd: e.fd }
    }
}

/// A kind's `needs` when one descriptor per description is all it needs.
pub fn one(pid: i32, e: &FdEntry) -> Vec<(Key, usize)> {
    vec![(key(pid, e), 1)]
}

/// How many descriptors the restorer holds at once to restore `meta`: one
/// per description, both ends of each pipe and socket pair, a keeper per
/// named FIFO.
pub fn descriptions_needed(meta: &Metadata) -> usize {
    let mut keys = std::collections::HashSet::new();
    let mut n = 0;
    for p in meta.processes() {
        for e in &p.fds {
            let needs = match KINDS.iter().find(|k| (k.key)(p.process.pid, e).is_some()) {
                Some(k) => (k.needs)(p.process.pid, e),
                None => one(p.process.pid, e),
            };
            for (k, count) in needs {
                if keys.insert(k) {
                    n += count;
                }
            }
        }
    }
    n
}

/// Whose rights open the files of a process: the restorer's, or (restoring
/// another user's image as root) the process's own, which are its owner's.
#[derive(Clone, Copy)]
pub struct Opener<'a> {
    owner: Option<&'a Owner>,
    pid: i32,
    creds: &'a crate::image::model::Credentials,
}

impl Opener<'_> {
    /// Restoring another user's image as root: the uid and gid the
    /// process's files are opened as (its owner's), which is also whom
    /// files it makes may belong to.
    pub fn owner_ids(&self) -> Option<(u32, u32)> {
        self.owner.map(|_| {
            let c = Owner::creds_of(self.creds);
            (c.uid, c.gid)
        })
    }

    /// Restoring another user's image as root: the refusal of `what`,
    /// which that user could not have had; None otherwise.
    pub fn beyond_owner(&self, what: &str) -> Option<Error> {
        self.owner
            .map(|o| crate::restore::validate::beyond_owner(o, what))
    }

    /// Run `f` with the rights files are opened with (see [`Opener::open`]).
    pub fn with_rights<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        match self.owner {
            None => Ok(f()),
            Some(_) => crate::creds::as_user(&Owner::creds_of(self.creds), f).map_err(|e| {
                Error::Other(format!(
                    "cannot take the file rights of PID {} to restore its descriptors: {e}",
                    self.pid
                ))
            }),
        }
    }

    /// `open(path, flags)` with the right rights; `number` is the
    /// descriptor it is for, named in a refusal.
    pub fn open(&self, path: &str, flags: OFlag, number: i32) -> Result<OwnedFd> {
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
                Err(crate::restore::validate::beyond_owner(
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

impl Opener<'_> {
    /// Whether files are made with the rights of the image's owner (root
    /// restoring another user's image), not the restorer's.
    pub fn as_owner(&self) -> bool {
        self.owner.is_some()
    }

    /// Run `f` (a `bind`, `unlink`, `chmod` of a socket file) with the
    /// file rights the process's files are opened with.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        if self.owner.is_none() {
            return Ok(f());
        }
        let creds = Owner::creds_of(self.creds);
        crate::creds::as_user(&creds, f).map_err(|source| Error::File {
            path: "(as the image's owner)".to_string(),
            source,
        })
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

/// What a kind's `make` works with.
pub struct Making<'a> {
    /// The process whose entry is being made, as the image knows it.
    pub pid: i32,
    pub meta: &'a Metadata,
    pub reader: &'a ImageReader,
    /// Opens files with the rights of the process that held them.
    pub opener: Opener<'a>,
    pub warnings: &'a mut Vec<String>,
    /// Replacements the user handed in (`--inherit-fd`).
    pub inherit: &'a [super::external::InheritFd],
}

/// The restorer's copies of every description the image's processes hold.
pub struct Descriptions {
    by_key: HashMap<Key, OwnedFd>,
    /// Descriptions a process has finished inside itself (an epoll's
    /// interest list), so the next holder does not again.
    finished: std::sync::Mutex<std::collections::HashSet<Key>>,
    /// One copy per deleted file, however many descriptions it has.
    pub(crate) deleted_copies: crate::deleted::Copies,
    /// Warnings to give once the restore succeeded (a refusal stays one
    /// line).
    later: Vec<String>,
}

pub(crate) fn file_err(path: &str) -> impl FnOnce(nix::errno::Errno) -> Error + '_ {
    move |e| Error::File {
        path: path.to_string(),
        source: std::io::Error::from(e),
    }
}

pub(crate) fn dev_null(flags: u32) -> Result<OwnedFd> {
    let mode = OFlag::from_bits_retain(flags as i32 & libc::O_ACCMODE);
    nix::fcntl::open("/dev/null", mode | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(file_err("/dev/null"))
}

/// Descriptors replaced at dump time (`--unsupported-fd=null`): /dev/null.
pub static NULL: Kind = Kind {
    probe: |_| Ok(None),
    classify: None,
    embed: None,
    key: super::no_key,
    needs: one,
    make: |d, _, e| {
        if !matches!(e.kind, FdKind::ReplacedByNull { .. }) {
            return Ok(false);
        }
        d.insert(key(0, e), dev_null(e.flags)?);
        Ok(true)
    },
};

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
        inherit: &[super::external::InheritFd],
        warnings: &mut Vec<String>,
    ) -> Result<Descriptions> {
        super::external::check(meta, inherit)?;
        let mut d = Descriptions {
            by_key: HashMap::new(),
            finished: Default::default(),
            deleted_copies: Default::default(),
            later: Vec::new(),
        };
        for p in meta.processes() {
            let mut making = Making {
                pid: p.process.pid,
                meta,
                reader,
                opener: Opener {
                    owner,
                    pid: p.process.pid,
                    creds: &p.process.creds,
                },
                warnings,
                inherit,
            };
            for e in &p.fds {
                if d.by_key.contains_key(&key(p.process.pid, e)) {
                    continue;
                }
                let mut made = false;
                for k in KINDS {
                    if (k.make)(&mut d, &mut making, e)? {
                        made = true;
                        break;
                    }
                }
                if !made {
                    return Err(Error::Other(format!(
                        "internal: no kind restores fd {} of PID {}",
                        e.fd, p.process.pid
                    )));
                }
            }
        }
        Ok(d)
    }

    /// Warn about `w` once the restore succeeded.
    pub fn warn_later(&mut self, w: String) {
        self.later.push(w);
    }

    /// What [`Descriptions::warn_later`] kept.
    pub fn later(&self) -> &[String] {
        &self.later
    }

    /// Whether a description for `k` exists already.
    pub fn has(&self, k: &Key) -> bool {
        self.by_key.contains_key(k)
    }

    /// Keep `fd` as the description for `k`.
    pub fn insert(&mut self, k: Key, fd: OwnedFd) {
        self.by_key.insert(k, fd);
    }

    /// The description made for `k`, if any.
    pub fn lookup(&self, k: &Key) -> Option<&OwnedFd> {
        self.by_key.get(k)
    }

    /// True the first time it is asked for `k`: the caller finishes it.
    pub fn first_time(&self, k: Key) -> bool {
        match self.finished.lock() {
            Ok(mut set) => set.insert(k),
            Err(poisoned) => poisoned.into_inner().insert(k),
        }
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

/// Seek `fd` (a file of ours) to `pos`; errors name `path`.
pub(crate) fn seek(fd: &OwnedFd, pos: u64, path: &str) -> Result<()> {
    nix::unistd::lseek(fd, pos as i64, nix::unistd::Whence::SeekSet).map_err(file_err(path))?;
    Ok(())
}

/// Write `bytes` into `fd` (a pipe, FIFO or memfd of ours); errors name
/// `what()`. Pipes are non-blocking here: bytes that do not fit are an
/// error, not a restorer stuck forever.
pub(crate) fn write_bytes(fd: &OwnedFd, bytes: &[u8], what: impl Fn() -> String) -> Result<()> {
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
pub(crate) fn restorer_fd(fd: i32) -> Option<OwnedFd> {
    if !(0..=2).contains(&fd) {
        return None;
    }
    // SAFETY: fd 0-2 are ours for the life of the process; we only borrow
    // it to duplicate it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD).ok()?;
    borrowed.try_clone_to_owned().ok()
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
    for (first, last) in super::spans_closing_all_but(&keep) {
        close_range(c, first, last)?;
    }
    let all = fds;
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
    for installed in super::INSTALLED {
        installed(c, pid_in_image, all, descriptions)?;
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
