//! The files an image needs: the ones its memory maps (from disk when
//! unchanged, else from the image), the working directories, and the
//! files descriptors name.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use super::{FileSource, Owner, beyond_owner};
use crate::error::{Error, Result};
use crate::image::model::{FdKind, FileRef, FileRole, Metadata};

/// Indices of the files the restored memory needs.
fn referenced_files(meta: &Metadata) -> BTreeSet<usize> {
    let mut used = BTreeSet::new();
    for p in meta.processes() {
        used.extend(p.vmas.iter().filter_map(|v| v.file));
        used.extend(p.process.exe_file);
    }
    used
}

/// Files mapped `MAP_SHARED` by a process that may write them (`mw` in
/// the mapping's VmFlags; a shared mapping gets it only when the file was
/// opened for writing): their content is state the processes share with
/// the file (a JVM's `/tmp/hsperfdata_USER/PID`, a database file), written
/// on after the checkpoint, not a library that must be unchanged. For each,
/// the length the mappings need it to have.
pub fn shared_state_files(meta: &Metadata) -> std::collections::BTreeMap<usize, u64> {
    let mut out = std::collections::BTreeMap::new();
    for v in meta.processes().flat_map(|p| p.vmas.iter()) {
        let may_write = if v.vm_flags.is_empty() {
            v.write
        } else {
            v.vm_flags.iter().any(|f| f == "mw")
        };
        if let (crate::image::model::VmaKind::SharedFile, Some(i), true) =
            (v.kind, v.file, may_write)
        {
            let needed = v.offset.saturating_add(v.end.saturating_sub(v.start));
            let len = out.entry(i).or_insert(0);
            *len = needed.max(*len);
        }
    }
    out
}

/// A shared-state file (see [`shared_state_files`]) is used as it is now,
/// whatever its content, if it still is a regular file long enough for its
/// mappings (a shorter one would kill the process with SIGBUS).
fn check_shared_state(f: &FileRef, needed: u64) -> std::result::Result<(), Refusal> {
    let md = match std::fs::metadata(&f.path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::Other(
                "(mapped shared and writable) no longer exists".into(),
            ));
        }
        Err(e) => return Err(read_error(e)),
    };
    if !md.is_file() {
        return Err(Refusal::Other("is no longer a regular file".into()));
    }
    if md.size() < needed {
        return Err(Refusal::Other(format!(
            "(mapped shared and writable) is now {} bytes, shorter than the {needed} its mappings reach",
            md.size()
        )));
    }
    Ok(())
}

/// The content of files the processes map from disk, compared with the
/// checkpoint's hashes while the processes are rebuilt (hashing a
/// program and its libraries takes milliseconds, most of the time to
/// running of a small `--lazy` restore). Only files that exist with
/// their saved size and have no copy in the image are left for later: a
/// mismatch then has only one outcome, the restore fails, and
/// [`ContentChecks::run`] must succeed before any process runs.
#[derive(Debug, Clone, Default)]
pub struct ContentChecks {
    files: Vec<FileRef>,
}

impl ContentChecks {
    /// Compare every file; the warnings for files touched since, or the
    /// first refusal.
    pub fn run(&self) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for f in &self.files {
            check_content(f, &mut warnings).map_err(|r| r.into_error(f))?;
        }
        crate::files::hashcache::save();
        Ok(warnings)
    }
}

/// With `later`, the content of files that can only be read from disk is
/// left to it.
pub(super) fn check_files(
    meta: &Metadata,
    owner: Option<&Owner>,
    mut later: Option<&mut ContentChecks>,
    warnings: &mut Vec<String>,
) -> Result<Vec<FileSource>> {
    let used = referenced_files(meta);
    let shared_state = shared_state_files(meta);
    let mut out = Vec::with_capacity(meta.files.len());
    for (i, f) in meta.files.iter().enumerate() {
        if !used.contains(&i) {
            out.push(FileSource::Unused);
            continue;
        }
        let checked = match (shared_state.get(&i), later.as_deref_mut()) {
            (Some(&needed), _) if !f.deleted => check_shared_state(f, needed),
            (None, Some(later)) if !f.deleted && f.embedded.is_none() => {
                let quick = check_kind_and_size(f);
                if quick.is_ok() {
                    later.files.push(f.clone());
                }
                quick
            }
            _ => check_file(f, warnings),
        };
        // A copy in the image is the owner's own content; a file on disk
        // they may not read is not.
        if let (Some(owner), Err(Refusal::Denied(e)), None) = (owner, &checked, f.embedded) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "the memory of the image maps {}, which cannot be read ({e})",
                    crate::image::error::one_line(&f.path)
                ),
            ));
        }
        let source = match (f.deleted, checked.map_err(|r| r.into_error(f))) {
            (false, Ok(())) => FileSource::Disk,
            (_, result) => match (f.embedded, result) {
                (Some(data), _) => FileSource::Embedded(data),
                (None, Err(e)) => return Err(e),
                // Deleted at dump time but not embedded: should not happen
                // (the dump embeds deleted files), and the path names
                // another file now.
                (None, Ok(())) => {
                    return Err(Error::Other(format!(
                        "{} was deleted at checkpoint time and is not in the image",
                        crate::image::error::one_line(&f.path)
                    )));
                }
            },
        };
        out.push(source);
    }
    // What `check_file` hashed (the rest is saved once compared, `run`).
    crate::files::hashcache::save();
    Ok(out)
}

fn refusal(f: &FileRef, what: String) -> Error {
    let option = if f.role == FileRole::Executable {
        "--embed-exe"
    } else {
        "--embed-all-libs"
    };
    Error::Other(format!(
        "{} {what}; restore with an image that embeds it (chpox dump {option})",
        crate::image::error::one_line(&f.path)
    ))
}

/// Why a file of the image cannot be used from disk.
enum Refusal {
    /// Access denied (to the image's owner, when restoring as them).
    Denied(std::io::Error),
    /// Gone, changed, unreadable for another reason.
    Other(String),
}

impl Refusal {
    fn into_error(self, f: &FileRef) -> Error {
        match self {
            Refusal::Denied(e) => refusal(f, format!("cannot be read ({e})")),
            Refusal::Other(what) => refusal(f, what),
        }
    }
}

fn read_error(e: std::io::Error) -> Refusal {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Refusal::Denied(e)
    } else {
        Refusal::Other(format!("cannot be read ({e})"))
    }
}

/// Whether the file at `f.path` is the one the checkpoint saw.
fn check_file(f: &FileRef, warnings: &mut Vec<String>) -> std::result::Result<(), Refusal> {
    check_kind_and_size(f)?;
    check_content(f, warnings)
}

/// Whether `f.path` is a regular file of the saved size.
fn check_kind_and_size(f: &FileRef) -> std::result::Result<(), Refusal> {
    let md = match std::fs::metadata(&f.path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::Other("no longer exists".into()));
        }
        Err(e) => return Err(read_error(e)),
    };
    if !md.is_file() {
        return Err(Refusal::Other("is no longer a regular file".into()));
    }
    if md.size() != f.size {
        return Err(Refusal::Other(format!(
            "changed since the checkpoint (size {} → {})",
            f.size,
            md.size()
        )));
    }
    Ok(())
}

/// Whether `f.path` has the saved content (a new modification time alone
/// is a warning).
fn check_content(f: &FileRef, warnings: &mut Vec<String>) -> std::result::Result<(), Refusal> {
    let md = std::fs::metadata(&f.path).map_err(read_error)?;
    if md.size() != f.size {
        return Err(Refusal::Other(format!(
            "changed since the checkpoint (size {} → {})",
            f.size,
            md.size()
        )));
    }
    // A file hashed before under the same identity (device, inode, size,
    // mtime, ctime: a restore right after its dump, or one more restore of
    // the same image) is not read again: hashing a program and its
    // libraries took a core for several ms of `--lazy`'s time to running.
    let hash = crate::files::cached_hash(std::path::Path::new(&f.path), &md).map_err(read_error)?;
    if hash != f.blake3 {
        return Err(Refusal::Other(
            "changed since the checkpoint (same size, different content)".into(),
        ));
    }
    let mtime_ns = crate::files::mtime_ns(&md);
    if mtime_ns != f.mtime_ns {
        // Same bytes (the hash says so), touched or copied since: the memory
        // it backs is the same.
        warnings.push(format!(
            "{} has a new modification time but the same content as at the checkpoint",
            crate::image::error::one_line(&f.path)
        ));
    }
    Ok(())
}

/// The working directory and the files descriptors name must exist (and,
/// restoring as the image's owner, be theirs to reach).
pub(super) fn check_paths(meta: &Metadata, owner: Option<&Owner>) -> Result<()> {
    let denied = |what: String, e: &std::io::Error| match owner {
        Some(o) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Some(beyond_owner(o, &format!("{what} ({e})")))
        }
        _ => None,
    };
    for p in meta.processes().filter(|p| !p.process.attrs.cwd_deleted) {
        let cwd = &p.process.cwd;
        let shown = crate::image::error::one_line(cwd);
        let gone = || Error::Other(format!("the working directory {shown} no longer exists"));
        match std::fs::metadata(cwd) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(gone()),
            Err(e) => {
                let reach = format!(
                    "PID {} of the image works in {shown}, which cannot be reached",
                    p.process.pid
                );
                return Err(denied(reach, &e).unwrap_or_else(gone));
            }
        }
    }
    for (p, fd) in meta
        .processes()
        .flat_map(|p| p.fds.iter().map(move |fd| (p, fd)))
    {
        let (path, what) = match &fd.kind {
            FdKind::RegularFile {
                path,
                embedded: None,
                ..
            } => (path, "file"),
            FdKind::Directory { path } => (path, "directory"),
            FdKind::CharDevice { path, .. } => (path, "device"),
            FdKind::Fifo { path, .. } => (path, "FIFO"),
            _ => continue,
        };
        let shown = crate::image::error::one_line(path);
        if let Err(e) = std::fs::metadata(path) {
            let reach = format!(
                "descriptor {} of PID {} names the {what} {shown}, which cannot be reached",
                fd.fd, p.process.pid
            );
            // Most often a temporary file the job removed after the
            // checkpoint (a compiler's, sort's): its content is not in the
            // image, so the restore cannot make it again.
            return Err(denied(reach, &e).unwrap_or_else(|| {
                Error::Other(format!(
                    "{what} {shown} (descriptor {} of PID {}) no longer exists: \
                     it was removed or renamed since the checkpoint (as a job removes \
                     its temporary files); put it back, restore a later image, or \
                     start the job over",
                    fd.fd, p.process.pid
                ))
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::sample_metadata;

    #[test]
    fn files_mapped_shared_and_writable_are_state_not_libraries() {
        let mut meta = sample_metadata();
        let state = shared_state_files(&meta);
        // The rw-s mapping of file 2 (one page); the libraries mapped
        // private are not state, though they may be written (mw).
        assert_eq!(state.into_iter().collect::<Vec<_>>(), [(2, 0x1000)]);
        // A shared mapping of a file opened read-only has no mw.
        for v in &mut meta.root.vmas {
            if v.kind == crate::image::model::VmaKind::SharedFile {
                v.vm_flags.retain(|f| f != "mw");
                v.write = false;
            }
        }
        assert!(shared_state_files(&meta).is_empty());
    }
}
