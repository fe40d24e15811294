//! Errors of reading and writing images.
//!
//! Every message is one line, names the file or the section of the image
//! that failed, and, where the user can do something about it, says what.
//! Paths and names taken from a process (which may contain newlines or other
//! control characters) go through [`one_line`] before they reach a message.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error on the image file (or its directory) not covered by a
    /// more specific variant.
    #[error("I/O error on image {}: {source}", show(.path))]
    Io { path: PathBuf, source: io::Error },

    #[error("image {} does not exist", show(.path))]
    NotFound { path: PathBuf },

    #[error("cannot write image {}: directory {} does not exist", show(.path), show(.dir))]
    NoDirectory { path: PathBuf, dir: PathBuf },

    #[error("permission denied writing {}: choose a writable directory with -o", show(.path))]
    PermissionDenied { path: PathBuf },

    #[error("no space left writing {}: free some space or choose another directory with -o", show(.path))]
    NoSpace { path: PathBuf },

    #[error("cannot write image {}: not a file name", show(.path))]
    InvalidPath { path: PathBuf },

    #[error("refusing to write image {}: it is a symbolic link; remove it or choose another path", show(.path))]
    Symlink { path: PathBuf },

    #[error("{} exists but is not a regular file; choose another path", show(.path))]
    NotRegular { path: PathBuf },

    #[error("cannot give image {} to uid {uid} gid {gid}: {source}", show(.path))]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: io::Error,
    },

    #[error("not a chpox image (bad magic)")]
    BadMagic,

    #[error(
        "image format version {found} is newer than this chpox supports ({}); upgrade chpox",
        super::format::FORMAT_VERSION
    )]
    UnsupportedVersion { found: u32 },

    #[error("image is truncated: {section} is incomplete")]
    Truncated { section: String },

    #[error("checksum mismatch in {section}: the image is corrupt")]
    Checksum { section: String },

    #[error("cannot decode {section}: {reason}")]
    Decode { section: String, reason: String },

    #[error("{section} lies outside the image's data area: the image is corrupt")]
    OutOfBounds { section: String },

    /// The writer could not encode something (metadata serialization, a
    /// blob over the size limit).
    #[error("cannot encode {section}: {reason}")]
    Encode { section: String, reason: String },

    #[error("cannot allocate {len} bytes for {section}")]
    OutOfMemory { section: String, len: u64 },

    /// `read_data_into` got a buffer of the wrong size.
    #[error("buffer of {got} bytes for {section}, which holds {expected}")]
    BufferSize {
        section: String,
        expected: u64,
        got: u64,
    },

    /// The writer's methods were called out of order (a bug in the caller),
    /// or after an earlier error left it unusable.
    #[error("image writer misuse: {reason}")]
    WriterState { reason: &'static str },
}

impl ImageError {
    /// Maps an error of writing `path` to the variant that tells the user
    /// what to do about it.
    pub(crate) fn writing(path: &Path, source: io::Error) -> ImageError {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => ImageError::PermissionDenied { path },
            Some(libc::ENOSPC | libc::EDQUOT) => ImageError::NoSpace { path },
            _ => ImageError::Io { path, source },
        }
    }
}

fn show(p: &Path) -> String {
    one_line(&p.to_string_lossy()).into_owned()
}

/// `s` with control characters (newlines above all) escaped, so a message
/// built from it stays on one line.
pub fn one_line(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        assert_eq!(one_line("a\nb\tc"), "a\\nb\\tc");
        let e = ImageError::NoDirectory {
            path: "/x/y\nz".into(),
            dir: "/x".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot write image /x/y\\nz: directory /x does not exist"
        );
        let e = ImageError::writing(
            Path::new("/x/y"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(
            e.to_string(),
            "permission denied writing /x/y: choose a writable directory with -o"
        );
    }
}
