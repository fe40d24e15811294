//! Files opened by path: regular files (path, flags, offset; the content
//! too when the file was deleted but is still open), directories and
//! character devices.
//!
//! Restore reopens each by path with the saved flags and offset; a deleted
//! file comes back from its embedded content, as a memfd reopened with the
//! saved access mode.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::OFlag;

use super::restore::{Descriptions, Making, key, one, open_flags, seek, write_bytes};
use super::{Embed, Kind, Probe, no_key};
use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{FdEntry, FdKind, FileStamp};

pub static REGULAR: Kind = Kind {
    probe: probe_regular,
    classify: None,
    embed: Some(embed),
    key: no_key,
    needs: one,
    make,
};

pub static DIRECTORY: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_dir() => Some(FdKind::Directory {
                path: p.target.to_string(),
            }),
            _ => None,
        })
    },
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make,
};

/// Character devices that are not terminals (`tty` takes those first).
pub static CHAR_DEVICE: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_char_device() && !super::tty::is_pty_master(m.rdev()) => {
                Some(FdKind::CharDevice {
                    path: p.target.to_string(),
                    rdev: m.rdev(),
                })
            }
            _ => None,
        })
    },
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make,
};

fn probe_regular(p: &Probe<'_>) -> Result<Option<FdKind>> {
    Ok(match p.meta {
        Some(m) if m.file_type().is_file() => Some(FdKind::RegularFile {
            // A file unlinked under a name that does not say so (the
            // kernel adds " (deleted)" to most) is marked here, where its
            // link count is known, for `embed_deleted`.
            path: if m.nlink() == 0 && !p.target.ends_with(" (deleted)") {
                format!("{} (deleted)", p.target)
            } else {
                p.target.to_string()
            },
            pos: p.info.pos,
            embedded: None,
            dev: m.dev(),
            ino: m.ino(),
            mode: None,
            stamp: Some(stamp_of(m)),
        }),
        _ => None,
    })
}

fn stamp_of(m: &std::fs::Metadata) -> FileStamp {
    FileStamp {
        size: m.size(),
        mtime_ns: m
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
    }
}

/// Restore: a file the process had open that changed since the
/// checkpoint (a job left running went on writing it, someone edited it)
/// is reopened all the same, as a file is part of the filesystem, not of
/// the image; but the user hears of it, since the process now reads or
/// writes at its old offset in new content. Appending writers (logs) are
/// not worth a word: they write at the end whatever it is.
fn tell_if_changed(d: &mut Descriptions, pid: i32, e: &FdEntry, fd: &OwnedFd, path: &str) {
    let FdKind::RegularFile {
        stamp: Some(then), ..
    } = &e.kind
    else {
        return;
    };
    if e.flags & libc::O_APPEND as u32 != 0 {
        return;
    }
    let Ok(now) = nix::sys::stat::fstat(fd) else {
        return;
    };
    let now = FileStamp {
        size: now.st_size as u64,
        mtime_ns: now
            .st_mtime
            .saturating_mul(1_000_000_000)
            .saturating_add(now.st_mtime_nsec),
    };
    if now != *then {
        d.warn_later(format!(
            "{path} (fd {} of PID {pid}) changed since the checkpoint (size {} then, {} now): the process goes on at its old offset in the new content",
            e.fd, then.size, now.size
        ));
    }
}

fn embed(e: &mut Embed<'_>) -> Result<()> {
    let mut seen = crate::deleted::Seen::new();
    for p in e.procs.iter_mut() {
        embed_deleted(p.process.pid, &mut p.fds, e.writer, e.reader, &mut seen)?;
    }
    Ok(())
}

/// Put the content of every deleted-but-open regular file into the image:
/// nothing else holds it. The content goes to the image's user, so it is
/// read with `reader`'s file rights (see `files::embed_reader`): a file
/// they may not read fails the dump, named.
pub fn embed_deleted(
    pid: i32,
    fds: &mut [FdEntry],
    writer: &mut ImageWriter,
    reader: Option<&crate::creds::UserCreds>,
    seen: &mut crate::deleted::Seen,
) -> Result<()> {
    let mut wanted = Vec::new();
    for (i, entry) in fds.iter_mut().enumerate() {
        if let FdKind::RegularFile {
            path,
            embedded,
            dev,
            ino,
            mode,
            ..
        } = &mut entry.kind
        {
            // Marked deleted by the scan (`probe_regular`), which read its
            // link count.
            let Some(stripped) = path.strip_suffix(" (deleted)") else {
                continue;
            };
            *path = stripped.to_string();
            let link_path = std::path::PathBuf::from(format!("/proc/{pid}/fd/{}", entry.fd));
            *mode = crate::deleted::mode_of(&link_path);
            // One copy per file (see `crate::deleted`).
            if let Some(data) = seen.get(&(*dev, *ino)) {
                *embedded = Some(*data);
                continue;
            }
            wanted.push((i, link_path));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let links: Vec<std::path::PathBuf> = wanted.iter().map(|(_, l)| l.clone()).collect();
    let opened = crate::files::open_all_as(reader, &links).map_err(|e| {
        Error::Other(format!(
            "cannot take the file rights to embed the deleted files PID {pid} holds open: {e}"
        ))
    })?;
    for ((i, link), file) in wanted.into_iter().zip(opened) {
        let entry = &mut fds[i];
        let FdKind::RegularFile {
            path,
            embedded,
            dev,
            ino,
            ..
        } = &mut entry.kind
        else {
            continue;
        };
        if let Some(data) = seen.get(&(*dev, *ino)) {
            // Open twice in this process.
            *embedded = Some(*data);
            continue;
        }
        let shown = format!("{path} (deleted, open as fd {} of PID {pid})", entry.fd);
        let file = file.map_err(|e| crate::files::embed_err(&shown, reader, e))?;
        let data = embed_open_file(file, &link, writer)?;
        seen.insert((*dev, *ino), data);
        *embedded = Some(data);
    }
    Ok(())
}

/// Copy a deleted-but-open file's content from `f`, a descriptor opened
/// through the process's own (the only name the file still has).
fn embed_open_file(
    mut f: File,
    link_path: &std::path::Path,
    writer: &mut ImageWriter,
) -> Result<crate::image::model::DataRef> {
    let err = |source| Error::File {
        path: link_path.display().to_string(),
        source,
    };
    let mut buf = vec![0u8; 1 << 20];
    writer.begin_data()?;
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        writer.write_data(&buf[..n])?;
    }
    Ok(writer.end_data()?)
}

/// Restore: the description of a file, directory or device entry, opened
/// with `m.opener`'s rights.
fn make(d: &mut Descriptions, m: &mut Making<'_>, e: &FdEntry) -> Result<bool> {
    let fd: OwnedFd = match &e.kind {
        FdKind::RegularFile {
            path,
            pos,
            embedded: None,
            ..
        } => {
            let fd = m.opener.open(path, open_flags(e.flags), e.fd)?;
            seek(&fd, *pos, path)?;
            tell_if_changed(d, m.pid, e, &fd, path);
            fd
        }
        FdKind::RegularFile {
            path,
            pos,
            embedded: Some(data),
            dev,
            ino,
            mode,
            ..
        } => {
            let name = std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let reader = m.reader;
            let copy = d.deleted_copies.get((*dev, *ino), &name, *mode, |memfd| {
                let bytes = reader.read_data(data)?;
                write_bytes(memfd, &bytes, || path.clone())
            })?;
            // A new open file description with the saved access mode.
            let fd = crate::deleted::Copies::open(copy, open_flags(e.flags))?;
            seek(&fd, *pos, path)?;
            fd
        }
        FdKind::Directory { path } => m.opener.open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            e.fd,
        )?,
        FdKind::CharDevice { path, .. } => m.opener.open(path, open_flags(e.flags), e.fd)?,
        _ => return Ok(false),
    };
    d.insert(key(m.pid, e), fd);
    Ok(true)
}
