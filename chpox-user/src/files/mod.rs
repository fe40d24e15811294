//! Files the memory depends on: the executable and every mapped file (the
//! "libraries" of old chpox).
//!
//! Each gets an identity (device, inode, size, mtime, BLAKE3 of the content)
//! so restore can refuse a file that changed since the checkpoint, naming
//! it. A file can also be embedded whole, so the image restores on a host
//! whose files differ; deleted files are always embedded, since nothing else
//! holds their content.
//!
//! Content is read through `/proc/PID/map_files/` when we may (it reaches the
//! very file mapped, even deleted or in another mount namespace), else by
//! path.
//!
//! An embedded file ends up in an image its user owns, so its content is
//! read with that user's file rights ([`embed_reader`]): the descriptor we
//! hold is reopened, through `/proc/self/fd`, on a thread with the user's
//! identity, and the kernel checks their read permission on that very
//! inode. A file they may not read (an execute-only binary, a root-only
//! file a process held open before dropping privileges) fails the
//! checkpoint, named, rather than being copied or silently left out.

// Files deleted while open or mapped: their content goes in the image.
pub mod deleted;
// Hashes of files seen before, in memory and on disk.
pub mod hashcache;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::creds::UserCreds;
use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::error::one_line;
use crate::image::model::{FileRef, FileRole, ProcessInfo};
use crate::memory::MapEntry;

fn file_err(path: &Path, source: std::io::Error) -> Error {
    Error::File {
        path: path.display().to_string(),
        source,
    }
}

/// Whose file rights embedded content is read with: the user the dump acts
/// for, else the owner the image is given to (the real uid of the root
/// process, as `process::owner`), unless that is root.
pub fn embed_reader(as_user: Option<&UserCreds>, root: Option<&ProcessInfo>) -> Option<UserCreds> {
    if let Some(user) = as_user {
        return Some(user.clone());
    }
    let creds = &root?.creds;
    (creds.uid[0] != 0).then(|| UserCreds {
        uid: creds.uid[0],
        gid: creds.gid[0],
        groups: creds.groups.clone(),
    })
}

/// Opens each of `paths` for reading with `reader`'s file rights (ours
/// without one), all on one thread.
pub fn open_all_as(
    reader: Option<&UserCreds>,
    paths: &[PathBuf],
) -> std::io::Result<Vec<std::io::Result<File>>> {
    let open = || paths.iter().map(File::open).collect();
    match reader {
        Some(user) => crate::creds::as_user(user, open),
        None => Ok(open()),
    }
}

/// The error for a file that cannot be embedded: one line naming it, and
/// saying so when the reason is that the image's user may not read it.
pub fn embed_err(path: &str, reader: Option<&UserCreds>, source: std::io::Error) -> Error {
    let path = one_line(path);
    match reader {
        Some(user) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            Error::Other(format!(
                "cannot embed {path}: uid {} may not read it ({source}), and the image would give it to them",
                user.uid
            ))
        }
        _ => Error::Other(format!("cannot embed {path}: {source}")),
    }
}

/// The content hash recorded for files (BLAKE3, hex).
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The BLAKE3 hash, in hex, of everything `reader` yields.
pub fn hash_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Modification time in nanoseconds since the epoch, as images record it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// Hash the regular files the processes `pids` map now into the cache
/// that hashing them for an image looks in (see [`FileTable::hash_all`]):
/// for a dump to run beside its other work, so that the hashes are done
/// by the time the files are recorded. Best effort: a file that cannot be
/// read, or changes while it is read, is left to be hashed later.
pub fn warm_hashes(pids: &[i32]) {
    let mut seen = std::collections::HashSet::new();
    for &pid in pids {
        let Ok(maps) = crate::memory::read_maps_lines(pid) else {
            continue;
        };
        for map in maps {
            if map.inode == 0 || map.deleted || !map.path.starts_with('/') {
                continue;
            }
            let path = Path::new(&map.path);
            let Ok(before) = std::fs::metadata(path) else {
                continue;
            };
            if before.is_file() && seen.insert(hashcache::content_key(&before)) {
                let _ = cached_hash(path, &before);
            }
        }
    }
}

fn hash_file(path: &Path, meta: &std::fs::Metadata) -> Result<String> {
    cached_hash(path, meta).map_err(|e| file_err(path, e))
}

/// The BLAKE3 hash (hex) of the file at `path`, whose metadata `meta` was
/// just read: from the cache when a file of that very identity was hashed
/// before (see [`hashcache`]), else read, and remembered if the file did
/// not change while it was read.
pub fn cached_hash(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
    let key = hashcache::content_key(meta);
    if let Some(hex) = hashcache::get(&key) {
        return Ok(hex);
    }
    let hex = File::open(path).and_then(hash_reader)?;
    if std::fs::metadata(path).is_ok_and(|after| hashcache::content_key(&after) == key) {
        hashcache::insert(key, hex.clone());
    }
    Ok(hex)
}

/// The files of the checkpointed processes, deduplicated by (device, inode).
#[derive(Default)]
pub struct FileTable {
    pub files: Vec<FileRef>,
    /// Where to read each file's content from: /proc/self/fd/N of `held`.
    sources: Vec<PathBuf>,
    by_id: HashMap<(u64, u64), usize>,
    /// The files, open: `sources` name them through /proc/self/fd.
    held: Vec<File>,
    /// Per file: mapped `MAP_SHARED` by a process that may write it, so its
    /// content is live state that changes while we look (see
    /// `restore::validate::shared_state_files`).
    shared_state: Vec<bool>,
    /// Mappings already registered, by mount namespace and what
    /// /proc/PID/maps says of them (device, inode, path, deleted): the
    /// other mappings of the same file (a library has four or five in each
    /// process, and every process of a tree maps the same ones) need not
    /// open it again while frozen. Within one mount namespace, as within
    /// one process, two different files could share these only as two
    /// btrfs subvolumes with equal inode numbers mounted over each other
    /// at that one path while both are mapped.
    mapped: HashMap<MappedKey, usize>,
    /// The mount namespace (inode of /proc/PID/ns/mnt) of each process
    /// seen; the PID itself where it cannot be read.
    mount_ns: HashMap<i32, MountNs>,
}

/// A process's mount namespace, or the process itself if unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum MountNs {
    Inode(u64),
    Unknown(i32),
}

/// (mount namespace, device, inode, path, deleted) of a mapping, as in its
/// maps line.
type MappedKey = (MountNs, (u32, u32), u64, String, bool);

impl FileTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a file's identity and keep it open. Hashing waits for
    /// `finish`: it needs the file, not the frozen process, and reads
    /// through the descriptor kept here, so it sees this very file even if
    /// the process unmaps it meanwhile.
    fn add(&mut self, path: &str, source: PathBuf, role: FileRole, deleted: bool) -> Result<usize> {
        let file = File::open(&source).map_err(|e| file_err(&source, e))?;
        self.add_open(path, file, role, deleted)
    }

    /// Mark file `index` as shared state (see `shared_state`).
    fn mark_shared_state(&mut self, index: usize) {
        if self.shared_state.len() <= index {
            self.shared_state.resize(index + 1, false);
        }
        self.shared_state[index] = true;
    }

    fn is_shared_state(&self, index: usize) -> bool {
        self.shared_state.get(index).copied().unwrap_or(false)
    }

    /// File `i`, met again in `role`: the executable is also mapped; the
    /// stronger role wins, and any name that says the file is deleted is
    /// believed.
    fn registered_again(&mut self, i: usize, role: FileRole, deleted: bool) -> usize {
        if role == FileRole::Executable {
            self.files[i].role = role;
        }
        self.files[i].deleted |= deleted;
        i
    }

    fn add_open(&mut self, path: &str, file: File, role: FileRole, deleted: bool) -> Result<usize> {
        use std::os::fd::AsRawFd;
        let source = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let meta = file.metadata().map_err(|e| file_err(&source, e))?;
        if let Some(&i) = self.by_id.get(&(meta.dev(), meta.ino())) {
            return Ok(self.registered_again(i, role, deleted));
        }
        // glibc's sem_open makes the semaphore under a temporary name,
        // maps it, links it under its real name and removes the temporary
        // one: the mapping says "deleted", the file is not.
        let linked_as = (deleted && meta.nlink() > 0)
            .then(|| {
                let found = crate::deleted::other_name(path, meta.dev(), meta.ino());
                if found.is_none() {
                    tracing::warn!(
                        "{path} (deleted) is still linked under another name, not found next \
                         to it: the restored processes share a copy of it, which a process \
                         opening that name after the restore does not"
                    );
                }
                found
            })
            .flatten()
            .map(|other| crate::image::model::LinkedName {
                path: other,
                uid: meta.uid(),
                gid: meta.gid(),
            });
        self.files.push(FileRef {
            path: path.to_string(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: mtime_ns(&meta),
            mode: meta.mode(),
            blake3: String::new(),
            deleted,
            role,
            embedded: None,
            linked_as,
        });
        self.sources.push(source);
        self.held.push(file);
        self.by_id
            .insert((meta.dev(), meta.ino()), self.files.len() - 1);
        Ok(self.files.len() - 1)
    }

    /// Hash every file recorded, and refuse one that changed since it was
    /// recorded (its hash would not describe what the process mapped).
    pub fn hash_all(&mut self) -> Result<()> {
        let shared_state: Vec<bool> = (0..self.files.len())
            .map(|i| self.is_shared_state(i))
            .collect();
        for ((file, source), live) in self.files.iter_mut().zip(&self.sources).zip(shared_state) {
            if !file.blake3.is_empty() {
                continue;
            }
            let meta = std::fs::metadata(source).map_err(|e| file_err(source, e))?;
            let mtime_ns = mtime_ns(&meta);
            // A file the processes write through a shared mapping changes
            // as they run on; restore does not compare it.
            if !live && (meta.size() != file.size || mtime_ns != file.mtime_ns) {
                return Err(Error::Other(format!(
                    "{} changed while being checkpointed; retry the checkpoint",
                    file.path
                )));
            }
            file.blake3 = hash_file(source, &meta)?;
        }
        Ok(())
    }

    /// Register the file behind a file-backed mapping; returns its index.
    pub fn add_mapping(&mut self, pid: i32, map: &MapEntry) -> Result<usize> {
        let ns = *self.mount_ns.entry(pid).or_insert_with(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .map_or(MountNs::Unknown(pid), |m| MountNs::Inode(m.ino()))
        });
        let key = (ns, map.dev, map.inode, map.path.clone(), map.deleted);
        let index = match self.mapped.get(&key) {
            Some(&index) => index,
            None => {
                let index = self.add_mapped_file(pid, map)?;
                self.mapped.insert(key, index);
                index
            }
        };
        let may_write = if map.vm_flags.is_empty() {
            map.write
        } else {
            map.vm_flags.iter().any(|f| f == "mw")
        };
        if map.shared && may_write {
            self.mark_shared_state(index);
        }
        Ok(index)
    }

    fn add_mapped_file(&mut self, pid: i32, map: &MapEntry) -> Result<usize> {
        let link = PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            map.start, map.end
        ));
        // map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; a user
        // dumping their own process reads by path instead.
        let source = if std::fs::metadata(&link).is_ok() {
            link
        } else {
            PathBuf::from(&map.path)
        };
        self.add(&map.path, source, FileRole::Mapped, map.deleted)
    }

    /// Register the executable of process `pid` (`/proc/PID/exe`).
    pub fn add_exe(&mut self, pid: i32, exe_path: &str) -> Result<usize> {
        let deleted = exe_path.ends_with(" (deleted)");
        let path = exe_path.trim_end_matches(" (deleted)");
        let source = PathBuf::from(format!("/proc/{pid}/exe"));
        // A tree's processes mostly run one executable: one stat (through
        // the link) tells it is registered already, where opening it to
        // ask took three calls per process while frozen.
        if let Ok(meta) = std::fs::metadata(&source)
            && let Some(&i) = self.by_id.get(&(meta.dev(), meta.ino()))
        {
            return Ok(self.registered_again(i, FileRole::Executable, deleted));
        }
        self.add(path, source, FileRole::Executable, deleted)
    }

    /// Register a file named for embedding that the process may not map.
    /// With `as_user`, the file is opened with that user's rights, so a user
    /// cannot have the agent read a file they may not; the content is then
    /// read through the descriptor so opened. The open never waits (a FIFO
    /// named here must not stall the dump) and only a regular file is
    /// taken.
    pub fn add_library(&mut self, path: &Path, as_user: Option<&UserCreds>) -> Result<usize> {
        // Without a user, our own rights: `as_user` runs root's work in place.
        let ours = UserCreds {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        };
        let file = crate::creds::open_regular(as_user.unwrap_or(&ours), path)
            .map_err(|e| embed_err(&path.to_string_lossy(), as_user, e))?;
        use std::os::fd::AsRawFd;
        let shown = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .into_owned();
        self.add_open(&shown, file, FileRole::Library, false)
    }

    /// Index of the file at `path` (by identity), if registered.
    pub fn find(&self, path: &Path) -> Option<usize> {
        let meta = std::fs::metadata(path).ok()?;
        self.by_id.get(&(meta.dev(), meta.ino())).copied()
    }

    /// Put the content of file `index` into the image, read with
    /// `reader`'s file rights (see the module documentation).
    pub fn embed(
        &mut self,
        index: usize,
        writer: &mut ImageWriter,
        reader: Option<&UserCreds>,
    ) -> Result<()> {
        self.embed_each(&[index], writer, reader)
    }

    /// Embed every file that must be: deleted ones always; the executable,
    /// listed libraries or all mapped files when asked. Read with
    /// `reader`'s file rights.
    pub fn embed_requested(
        &mut self,
        writer: &mut ImageWriter,
        embed_exe: bool,
        embed_all: bool,
        reader: Option<&UserCreds>,
    ) -> Result<()> {
        let wanted: Vec<usize> = (0..self.files.len())
            .filter(|&i| {
                let f = &self.files[i];
                f.deleted
                    || embed_all
                    || f.role == FileRole::Library
                    || (embed_exe && f.role == FileRole::Executable)
            })
            .collect();
        self.embed_each(&wanted, writer, reader)
    }

    /// Embed the files at `indices` not embedded yet: all opened first,
    /// with `reader`'s rights on one thread, then copied.
    fn embed_each(
        &mut self,
        indices: &[usize],
        writer: &mut ImageWriter,
        reader: Option<&UserCreds>,
    ) -> Result<()> {
        let todo: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| self.files.get(i).is_some_and(|f| f.embedded.is_none()))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let sources: Vec<PathBuf> = todo.iter().map(|&i| self.sources[i].clone()).collect();
        let opened = open_all_as(reader, &sources).map_err(|e| {
            Error::Other(format!(
                "cannot take the file rights to embed {}: {e}",
                one_line(&self.files[todo[0]].path)
            ))
        })?;
        for (&i, f) in todo.iter().zip(opened) {
            let f = f.map_err(|e| embed_err(&self.files[i].path, reader, e))?;
            self.embed_open(i, f, writer)?;
        }
        Ok(())
    }

    /// Copy the content of file `index`, open as `f`, into the image.
    fn embed_open(&mut self, index: usize, mut f: File, writer: &mut ImageWriter) -> Result<()> {
        let live = self.is_shared_state(index);
        let (Some(file), Some(source)) = (self.files.get_mut(index), self.sources.get(index))
        else {
            return Ok(());
        };
        let mut buf = vec![0u8; 4 << 20];
        writer.begin_data()?;
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| file_err(source, e))?;
            if n == 0 {
                break;
            }
            writer.write_data(&buf[..n])?;
            total += n as u64;
        }
        let data = writer.end_data()?;
        if total != file.size && !live {
            return Err(Error::Other(format!(
                "{} changed size while being embedded ({} → {total} bytes); retry the dump",
                file.path, file.size
            )));
        }
        file.embedded = Some(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::WriteOptions;
    use std::os::unix::fs::PermissionsExt;

    /// A file this process maps is hashed into the cache as its content
    /// hashes, under the key hashing it for an image looks up.
    #[test]
    fn warmed_hashes_are_the_mapped_files_content_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mapped");
        let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).expect("write");
        let file = File::open(&path).expect("open");
        // SAFETY: a fresh private read-only mapping of a file we own,
        // unmapped below; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                content.len(),
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        warm_hashes(&[std::process::id() as i32]);
        // SAFETY: the mapping made above, of that length.
        unsafe { libc::munmap(addr, content.len()) };
        let key = hashcache::content_key(&std::fs::metadata(&path).expect("metadata"));
        let cached = hashcache::get(&key);
        assert_eq!(cached, Some(hash_reader(&content[..]).expect("hash")));
    }

    #[test]
    fn embedded_content_is_read_with_the_readers_rights() {
        if !nix::unistd::geteuid().is_root() {
            return; // taking another identity needs root
        }
        let nobody = UserCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut table = FileTable::new();
        let i = table.add_library(&secret, None).expect("root opens it");
        let mut writer =
            ImageWriter::create(&dir.path().join("img"), WriteOptions::default()).expect("writer");
        let e = table
            .embed(i, &mut writer, Some(&nobody))
            .expect_err("nobody may not read it");
        let e = e.to_string();
        assert!(e.contains("uid 65534 may not read it"), "{e}");
        assert!(e.contains(&secret.display().to_string()), "{e}");
        assert!(table.files[i].embedded.is_none());
        table.embed(i, &mut writer, None).expect("root may");
        assert!(table.files[i].embedded.is_some());
    }

    #[test]
    fn a_library_that_is_not_a_regular_file_is_refused_without_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let mut table = FileTable::new();
        let e = table.add_library(&fifo, None).expect_err("a FIFO");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(table.add_library(dir.path(), None).is_err(), "a directory");
    }
}
