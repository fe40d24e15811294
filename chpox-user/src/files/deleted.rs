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

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{DataRef, Metadata};

/// Dump: the stored content of each deleted file seen so far in the tree.
pub type Seen = HashMap<(u64, u64), DataRef>;

/// The permission bits of the file behind `link` (a /proc/PID/fd link).
pub fn mode_of(link: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(link).ok().map(|m| m.mode() & 0o7777)
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
    pub fn make_mapped(&mut self, meta: &Metadata, reader: &ImageReader) -> Result<()> {
        for f in meta.files.iter().filter(|f| f.deleted) {
            let Some(data) = f.embedded else {
                continue;
            };
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
