//! What chpox keeps between runs to skip work it did before: the content
//! hashes of mapped files (`files::hashcache`) and the names of the
//! kernel's VMA flag patterns (`memory::vmflags`). Where the files live,
//! and how they are read and written so that nobody else can plant what
//! a dump would then trust.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::debug;

/// Where the caches live: `$CHPOX_CACHE_DIR`, else /var/cache/chpox for
/// root and `$XDG_CACHE_HOME/chpox` (`~/.cache/chpox`) for anyone else;
/// made (mode 0700) if missing. None if it cannot be, or is not ours
/// alone.
fn dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("CHPOX_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ if nix::unistd::geteuid().is_root() => PathBuf::from("/var/cache/chpox"),
        _ => match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("chpox"),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/chpox"),
        },
    };
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    ours_alone(&std::fs::symlink_metadata(&dir).ok()?).then_some(dir)
}

/// The cache file `name` in the cache directory, if there is one.
pub fn file(name: &str) -> Option<PathBuf> {
    Some(dir()?.join(name))
}

/// Owned by us, writable by no one else, not a link.
fn ours_alone(meta: &std::fs::Metadata) -> bool {
    meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.permissions().mode() & 0o022 == 0
        && !meta.file_type().is_symlink()
}

/// The text of `path` if it is a file of ours alone (see [`ours_alone`]).
pub fn read_own(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || !ours_alone(&meta) {
        debug!(path = %path.display(), "cache file not ours alone: not used");
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Put `text` at `path` through a new file (mode 0600) renamed over the
/// old one, so that two writers at once leave one whole file. Best effort:
/// a cache that cannot be written only costs the next run the work.
pub fn write(path: &Path, text: &str) {
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        debug!(path = %path.display(), error = %e, "cannot write a cache file");
    }
}
