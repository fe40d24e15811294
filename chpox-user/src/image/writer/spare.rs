//! A file made ready between two checkpoints for the next one's image.
//!
//! An increment's pages are written once the processes run again
//! (`memory::heldpages`), into a new file, and on tmpfs two thirds of
//! writing new bytes is allocating pages (see `ahead`): 47 MB of an
//! increment took 38 ms to write, most of a 95 ms checkpoint. The agent
//! knows about how large the next increment will be and has the time
//! between checkpoints: it makes an unnamed file (`O_TMPFILE`) in the
//! image's directory and allocates that much of it meanwhile. The next
//! image is written into it, linked first under the temporary name a new
//! file would have had, so that it is published, removed on failure and
//! rotated like any other; what it does not use is cut off when it is
//! finished. An unnamed file leaves nothing behind if the agent dies, and
//! a directory or filesystem that cannot make one (or cannot link it) is
//! written the usual way.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::ImageError;
use super::ahead::AllocateAhead;
use super::dir::{open_dir, split_path};

/// An unnamed file in an image's directory, being allocated; see the
/// module documentation. Dropping it frees the space.
pub struct SpareFile {
    file: Arc<File>,
    /// (device, inode) of the directory it was made in: only an image
    /// written there can use it.
    dir: (u64, u64),
    allocating: AllocateAhead,
}

impl std::fmt::Debug for SpareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpareFile").field("dir", &self.dir).finish()
    }
}

impl SpareFile {
    /// Make an unnamed file beside `final_path` (with `as_user`'s file
    /// rights, as the image would be) and start allocating `bytes` of it
    /// on a thread of its own.
    pub fn prepare(
        final_path: &Path,
        bytes: u64,
        as_user: Option<&crate::creds::UserCreds>,
    ) -> Result<SpareFile, ImageError> {
        let (dir_path, _) = split_path(final_path)?;
        let acting_uid = match as_user {
            Some(user) => user.uid,
            None => nix::unistd::geteuid().as_raw(),
        };
        let make = || -> std::io::Result<(File, (u64, u64))> {
            let dir = open_dir(&dir_path, acting_uid)?;
            let st = nix::sys::stat::fstat(&dir)?;
            let fd = nix::fcntl::openat(
                &dir,
                ".",
                OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            Ok((File::from(fd), (st.st_dev, st.st_ino)))
        };
        let (file, dir) = match as_user {
            Some(user) => crate::creds::as_user(user, make).and_then(|r| r),
            None => make(),
        }
        .map_err(|e| ImageError::writing(final_path, e))?;
        let file = Arc::new(file);
        let allocating = AllocateAhead::start(Arc::clone(&file), 0, bytes);
        Ok(SpareFile {
            file,
            dir,
            allocating,
        })
    }

    /// The file, and how far it was allocated, for an image written in
    /// the directory `dir`; None for another directory.
    pub(super) fn take_for(self, dir: &File) -> Option<(Arc<File>, u64)> {
        let reached = self.allocating.stop_at();
        let st = nix::sys::stat::fstat(dir).ok()?;
        ((st.st_dev, st.st_ino) == self.dir).then_some((self.file, reached))
    }

    /// The file's inode number (tests: which file an image was written to).
    #[cfg(test)]
    pub(crate) fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.ino())
    }
}
