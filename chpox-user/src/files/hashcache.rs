//! The content hashes of files seen before, kept in memory and on disk.
//!
//! Every dump records a BLAKE3 hash of each mapped file, and hashing them
//! (a C library, the program, a runtime's modules: megabytes to hundreds
//! of megabytes) cost a 64 MiB dump ~4 ms of its ~35. The agent kept its
//! hashes from one checkpoint to the next in memory; `chpox dump`, a new
//! process each time, hashed everything again. So the hashes are also
//! kept in a file, `file-hashes` in the cache directory (see
//! `crate::cache`), read when first needed and written back after a dump
//! that added to it.
//!
//! A hash is used only for a file whose device, inode, size, modification
//! time and change time are all those it was computed for. The change
//! time cannot be set by a user, and changes with every write, so a file
//! rewritten and given its old mtime back is hashed again. The file is
//! used only if it and its directory belong to us and no one else may
//! write them: a hash planted there would be recorded as a file's
//! identity.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use tracing::debug;

/// What identifies a file's content without reading it: device, inode,
/// size, mtime and ctime (nanoseconds). If all match, its hash is right.
pub type ContentKey = (u64, u64, u64, i64, i64);

/// Most hashes kept on disk; the oldest go first.
const MAX_KEPT: usize = 4096;

pub fn content_key(meta: &std::fs::Metadata) -> ContentKey {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        ns(meta.mtime(), meta.mtime_nsec()),
        ns(meta.ctime(), meta.ctime_nsec()),
    )
}

fn ns(secs: i64, nanos: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

struct Cache {
    hashes: HashMap<ContentKey, String>,
    /// Keys in the order they came (the file's, then new ones): what is
    /// kept when there are too many.
    order: Vec<ContentKey>,
    /// Hashes added since the file was read.
    added: usize,
}

static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();

fn cache() -> &'static Mutex<Cache> {
    CACHE.get_or_init(|| {
        let mut cache = Cache {
            hashes: HashMap::new(),
            order: Vec::new(),
            added: 0,
        };
        if let Some(text) = cache_file().and_then(|path| crate::cache::read_own(&path)) {
            for (key, hash) in text.lines().filter_map(parse_line) {
                if cache.hashes.insert(key, hash).is_none() {
                    cache.order.push(key);
                }
            }
            debug!(
                hashes = cache.order.len(),
                "file hashes read from the cache"
            );
        }
        Mutex::new(cache)
    })
}

/// The hash of the content `key` stands for, if known.
pub fn get(key: &ContentKey) -> Option<String> {
    cache().lock().ok()?.hashes.get(key).cloned()
}

pub fn insert(key: ContentKey, hash: String) {
    if let Ok(mut c) = cache().lock()
        && c.hashes.insert(key, hash).is_none()
    {
        c.order.push(key);
        c.added += 1;
    }
}

/// Write the hashes back to the cache file if any were added: best
/// effort (a cache that cannot be written only costs the next dump the
/// hashing), through a new file renamed over the old one, so that two
/// dumps at once leave one whole file.
pub fn save() {
    // Never looked in: nothing was added, and the file need not be read.
    let Some(cache) = CACHE.get() else {
        return;
    };
    let text = {
        let Ok(mut c) = cache.lock() else {
            return;
        };
        if c.added == 0 {
            return;
        }
        c.added = 0;
        let skip = c.order.len().saturating_sub(MAX_KEPT);
        c.order[skip..]
            .iter()
            .filter_map(|k| Some(format_line(k, c.hashes.get(k)?)))
            .collect::<String>()
    };
    let Some(path) = cache_file() else {
        return;
    };
    crate::cache::write(&path, &text);
}

fn format_line(k: &ContentKey, hash: &str) -> String {
    format!("{} {} {} {} {} {hash}\n", k.0, k.1, k.2, k.3, k.4)
}

/// One line of the cache file; None for anything else than five numbers
/// and a 64-digit hex hash.
fn parse_line(line: &str) -> Option<(ContentKey, String)> {
    let mut f = line.split(' ');
    let key = (
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
    );
    let hash = f.next()?;
    let hex = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && f.next().is_none()).then(|| (key, hash.to_ascii_lowercase()))
}

fn cache_file() -> Option<PathBuf> {
    crate::cache::file("file-hashes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_anything_else_is_skipped() {
        let key = (2049, 1234, 4096, 1_700_000_000_123_456_789, -5);
        let hash = "ab".repeat(32);
        let line = format_line(&key, &hash);
        assert_eq!(parse_line(line.trim_end()), Some((key, hash.clone())));
        for bad in [
            "",
            "1 2 3 4 5",
            "1 2 3 4 5 abc",
            &format!("1 2 3 4 x {hash}"),
            &format!("1 2 3 4 5 {hash} extra"),
            &format!("1 2 3 4 5 {}", "zz".repeat(32)),
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_key_has_the_change_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").expect("write");
        let meta = std::fs::metadata(&path).expect("metadata");
        let before = content_key(&meta);
        // Past a coarse clock's tick, where a filesystem without
        // fine-grained timestamps would give the same ctime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Same size, the same mtime set back: only ctime tells.
        std::fs::write(&path, b"two").expect("write");
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::new(meta.mtime() as u64, meta.mtime_nsec() as u32);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .expect("set mtime");
        let after = content_key(&std::fs::metadata(&path).expect("metadata"));
        assert_eq!(
            (before.0, before.1, before.2, before.3),
            (after.0, after.1, after.2, after.3)
        );
        assert_ne!(before.4, after.4, "ctime unchanged by a write");
    }
}
