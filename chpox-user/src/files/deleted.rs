//! Files that were deleted while open: one copy per file, with its mode.
//!
//! A deleted file has no name left, so the dump stores its content and
//! restore makes a memfd of it. Descriptors that had one deleted file open
//! (opened twice, in one process or several) must come back as one file
//! again: what one writes, the other reads. The dump stores the content
//! once per file (device, inode: [`Seen`]); restore makes one memfd per
//! file ([`Copies`]) and opens a description of its own on it for each
//! saved description. The memfd gets the file's permission bits (a memfd
//! is made 0777).
//!
//! One kind of "deleted" file still has a name: a named POSIX semaphore.
//! glibc's `sem_open` makes it under a temporary name in /dev/shm, maps
//! it, links it as `sem.NAME` and removes the temporary name. The dump
//! records that other name ([`other_name`]); restore makes its copy a file
//! in that directory and links it under the name again
//! ([`Copies::make_mapped`]), so that a process opening the semaphore after
//! the restore (a pool starting a new worker) shares it with the restored
//! ones instead of finding the file the checkpointed run left behind.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{DataRef, FileRef, LinkedName, Metadata};
use crate::restore::validate::Owner;

/// Dump: the stored content of each deleted file seen so far in the tree.
pub type Seen = HashMap<(u64, u64), DataRef>;

/// The permission bits of the file behind `link` (a /proc/PID/fd link).
pub fn mode_of(link: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(link).ok().map(|m| m.mode() & 0o7777)
}

/// Dump: the other name of the deleted file `path` (device `dev`, inode
/// `ino`), looked for next to it, as `sem_open` leaves it. Only there: a
/// name elsewhere is not one restore will make (see [`linked_name_ok`]).
pub fn other_name(path: &str, dev: u64, ino: u64) -> Option<String> {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let dir = std::path::Path::new(path).parent()?;
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .take(100_000)
        .filter(|e| e.ino() == ino)
        .find(|e| {
            std::fs::symlink_metadata(e.path())
                .is_ok_and(|m| m.dev() == dev && m.ino() == ino && m.file_type().is_file())
        })
        .map(|e| e.path().to_string_lossy().into_owned())
        .filter(|other| linked_name_ok(path, other))
}

/// Whether restore may link a copy of deleted file `deleted` as `other`:
/// the name a semaphore has (`sem.*`) in the same directory, nothing else
/// (an image names it, and an image may lie).
fn linked_name_ok(deleted: &str, other: &str) -> bool {
    let (deleted, other) = (std::path::Path::new(deleted), std::path::Path::new(other));
    let plain = |p: &std::path::Path| {
        p.is_absolute()
            && p.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            })
    };
    plain(deleted)
        && plain(other)
        && deleted.parent() == other.parent()
        && other
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("sem.") && n.len() > 4)
}

/// Whether any process maps the file of device `dev`, inode `ino` (its
/// `/proc/PID/maps` lines name both).
fn mapped_by_anyone(dev: u64, ino: u64) -> bool {
    let dev_field = format!(
        "{:02x}:{:02x}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let ino_field = ino.to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .any(|e| {
            std::fs::read_to_string(e.path().join("maps")).is_ok_and(|maps| {
                maps.lines().any(|line| {
                    let mut f = line.split_ascii_whitespace().skip(3);
                    f.next() == Some(dev_field.as_str()) && f.next() == Some(ino_field.as_str())
                })
            })
        })
}

/// Restore: a copy of the deleted file `file`, linked as `linked`, or None
/// (a memfd copy then) when that name is not ours to take: a name that is
/// not a semaphore's next to the deleted one, or one held by another
/// file, or by this very file while a process still maps it (the
/// checkpointed run goes on). A name free, or left by the checkpointed
/// run and mapped by nobody, gets the copy: made in the directory, filled
/// and given its owner and mode before its name appears, then renamed
/// over the name at once. Root restoring a user's image does it with that
/// user's rights, and the file is then theirs.
fn linked_copy(
    file: &FileRef,
    linked: &LinkedName,
    owner: Option<&Owner>,
    fill: impl FnOnce(&OwnedFd) -> Result<()>,
) -> Result<Option<OwnedFd>> {
    use std::os::unix::fs::MetadataExt;
    if !linked_name_ok(&file.path, &linked.path) {
        return Ok(None);
    }
    let target = std::path::Path::new(&linked.path);
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Ok(None);
    };
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(m)
            if m.dev() == file.dev
                && m.ino() == file.ino
                && !mapped_by_anyone(m.dev(), m.ino()) => {}
        _ => return Ok(None),
    }
    let err = |what: &str, e: &dyn std::fmt::Display| {
        Error::Other(format!(
            "cannot link the copy of {} as {}: {what}: {e}",
            file.path, linked.path
        ))
    };
    let creds = owner.map(Owner::file_creds);
    let as_owner = |f: &(dyn Fn() -> nix::Result<()> + Sync)| -> Result<()> {
        match &creds {
            Some(c) => crate::creds::as_user(c, f)
                .map_err(|e| err("switching to the image owner", &e))?
                .map_err(|e| err("as the image owner", &e)),
            None => f().map_err(|e| err("link", &e)),
        }
    };
    let made = std::sync::Mutex::new(None);
    as_owner(&|| {
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_TMPFILE | nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(file.mode & 0o777),
        )?;
        if let Ok(mut slot) = made.lock() {
            *slot = Some(fd);
        }
        Ok(())
    })?;
    let fd = made
        .into_inner()
        .ok()
        .flatten()
        .ok_or_else(|| err("O_TMPFILE", &"no file made"))?;
    fill(&fd)?;
    nix::sys::stat::fchmod(
        &fd,
        nix::sys::stat::Mode::from_bits_truncate(file.mode & 0o7777),
    )
    .map_err(|e| err("chmod", &e))?;
    if owner.is_none() {
        // Best effort: the restorer's own image, restored by root, gets
        // its owner back; a user restoring their own owns it already.
        let _ = nix::unistd::fchown(
            &fd,
            Some(nix::unistd::Uid::from_raw(linked.uid)),
            Some(nix::unistd::Gid::from_raw(linked.gid)),
        );
    }
    let staged = dir.join(format!(
        ".{}.chpox-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    as_owner(&|| {
        nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            source.as_str(),
            nix::fcntl::AT_FDCWD,
            &staged,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )?;
        nix::fcntl::renameat(nix::fcntl::AT_FDCWD, &staged, nix::fcntl::AT_FDCWD, target)
            .inspect_err(|_| {
                let _ = nix::unistd::unlink(&staged);
            })
    })?;
    Ok(Some(fd))
}

/// Restore: one memfd per deleted file of the image.
#[derive(Default)]
pub struct Copies {
    by_file: HashMap<(u64, u64), OwnedFd>,
}

impl Copies {
    /// The copy of deleted file `file` (device, inode), made on first use:
    /// a memfd named `name`, filled by `fill`, with permission bits `mode`.
    pub fn get(
        &mut self,
        file: (u64, u64),
        name: &str,
        mode: Option<u32>,
        fill: impl FnOnce(&OwnedFd) -> Result<()>,
    ) -> Result<&OwnedFd> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_file.entry(file) {
            let name: String = name.chars().filter(|&ch| ch != '\0').take(200).collect();
            let memfd = nix::sys::memfd::memfd_create(
                name.as_str(),
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(|e| Error::Other(format!("memfd_create for deleted file {name}: {e}")))?;
            fill(&memfd)?;
            if let Some(mode) = mode {
                nix::sys::stat::fchmod(
                    &memfd,
                    nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777),
                )
                .map_err(|e| Error::Other(format!("chmod the copy of deleted file {name}: {e}")))?;
            }
            slot.insert(memfd);
        }
        self.by_file
            .get(&file)
            .ok_or_else(|| Error::Other("internal: a deleted file's copy vanished".into()))
    }

    /// The copy of deleted file `file` (device, inode), if made.
    pub fn find(&self, file: (u64, u64)) -> Option<&OwnedFd> {
        self.by_file.get(&file)
    }

    /// Make the copies of the deleted files the image's memory maps (and
    /// the executable, if deleted), so that a file mapped by several
    /// processes, or mapped and held open, is one file again: restore maps
    /// these copies (`restore::memory`).
    /// A deleted file still linked under a semaphore's name gets a copy
    /// linked there again (see [`linked_copy`]); where it cannot, a memfd,
    /// and `warnings` say so.
    pub fn make_mapped(
        &mut self,
        meta: &Metadata,
        reader: &ImageReader,
        owner: Option<&Owner>,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        for f in meta.files.iter().filter(|f| f.deleted) {
            let Some(data) = f.embedded else {
                continue;
            };
            if let Some(linked) = &f.linked_as
                && !self.by_file.contains_key(&(f.dev, f.ino))
            {
                let fill = |fd: &OwnedFd| -> Result<()> {
                    let bytes = reader.read_data(&data)?;
                    let mut file = std::fs::File::from(fd.try_clone().map_err(|e| {
                        Error::Other(format!("copy of deleted file {}: {e}", f.path))
                    })?);
                    std::io::Write::write_all(&mut file, &bytes)
                        .map_err(|e| Error::Other(format!("copy of deleted file {}: {e}", f.path)))
                };
                match linked_copy(f, linked, owner, fill)? {
                    Some(fd) => {
                        self.by_file.insert((f.dev, f.ino), fd);
                        continue;
                    }
                    None => warnings.push(format!(
                        "{} is not linked again (the name is taken or not a semaphore's): the \
                         restored processes share a copy of it that a process opening the name \
                         does not",
                        linked.path
                    )),
                }
            }
            let name = std::path::Path::new(&f.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.get((f.dev, f.ino), &name, Some(f.mode), |memfd| {
                let bytes = reader.read_data(&data)?;
                let mut file =
                    std::fs::File::from(memfd.try_clone().map_err(|e| {
                        Error::Other(format!("copy of deleted file {}: {e}", f.path))
                    })?);
                std::io::Write::write_all(&mut file, &bytes)
                    .map_err(|e| Error::Other(format!("copy of deleted file {}: {e}", f.path)))
            })?;
        }
        Ok(())
    }

    /// A new open file description of `copy` with `flags` (through
    /// /proc/self/fd, as opening the file by name would make one).
    pub fn open(copy: &OwnedFd, flags: nix::fcntl::OFlag) -> Result<OwnedFd> {
        let again = format!("/proc/self/fd/{}", copy.as_raw_fd());
        nix::fcntl::open(again.as_str(), flags, nix::sys::stat::Mode::empty())
            .map_err(|e| Error::Other(format!("reopen a deleted file's copy: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::linked_name_ok;

    #[test]
    fn only_a_semaphore_name_next_to_the_deleted_file_is_linked_again() {
        assert!(linked_name_ok("/dev/shm/sem.Ab12Cd", "/dev/shm/sem.mp-x1"));
        assert!(!linked_name_ok("/dev/shm/sem.Ab12Cd", "/dev/shm/other"));
        assert!(!linked_name_ok("/dev/shm/sem.Ab12Cd", "/dev/shm/sem."));
        assert!(!linked_name_ok("/dev/shm/sem.Ab12Cd", "/etc/sem.passwd"));
        assert!(!linked_name_ok(
            "/dev/shm/sem.Ab12Cd",
            "/dev/shm/../etc/sem.x"
        ));
        assert!(!linked_name_ok("/dev/shm/sem.Ab12Cd", "sem.x"));
        assert!(!linked_name_ok("/dev/shm/x/../sem.Ab", "/dev/shm/sem.x"));
    }
}
