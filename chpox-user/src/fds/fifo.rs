//! Named FIFOs, reopened by path with the entry's access mode, holding
//! their unread bytes again.
//!
//! Restore opens, per FIFO, a keeper first (read-write, so neither side
//! waits for the other) that holds the saved bytes and lets the processes'
//! ends open without blocking, until every process has its own.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::restore::{Descriptions, Key, Making, file_err, key, note, open_flags, write_bytes};
use super::{Embed, Kind, no_key};
use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{FdEntry, FdKind, ProcessImage};

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m)
                if m.file_type().is_fifo()
                    && p.target.starts_with('/')
                    && !p.target.ends_with(" (deleted)") =>
            {
                Some(FdKind::Fifo {
                    path: p.target.to_string(),
                    capacity: 0,
                    data: None,
                })
            }
            _ => None,
        })
    },
    classify: None,
    embed: Some(|e: &mut Embed<'_>| embed_fifo_data(e.procs, e.writer)),
    key: no_key,
    // Its description, and a keeper per FIFO.
    needs: |pid, e| {
        let mut needs = vec![(key(pid, e), 1)];
        if let FdKind::Fifo { path, .. } = &e.kind {
            needs.push((Key::Named("fifo", path.clone()), 1));
        }
        needs
    },
    make: |d, m, e| {
        let FdKind::Fifo {
            path,
            capacity,
            data,
        } = &e.kind
        else {
            return Ok(false);
        };
        let fifo = Fifo {
            path,
            capacity: *capacity,
            data: data.as_ref(),
        };
        let fd = open_fifo(d, &fifo, e, m)?;
        d.insert(key(m.pid, e), fd);
        Ok(true)
    },
};

/// Capacity and unread bytes, once per FIFO,
/// copied through a reading descriptor of our own (opening a FIFO to read,
/// non-blocking, never waits).
pub fn embed_fifo_data(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
    use std::collections::HashSet;
    let mut seen: HashSet<String> = HashSet::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for entry in p.fds.iter_mut() {
            let FdKind::Fifo {
                path,
                capacity,
                data,
            } = &mut entry.kind
            else {
                continue;
            };
            let (c, bytes) = super::pipe::peek_pipe(pid, entry.fd, path)?;
            *capacity = c;
            if seen.insert(path.clone()) && !bytes.is_empty() {
                *data = Some(writer.add_data(&bytes)?);
            }
        }
    }
    Ok(())
}

/// An end of a named FIFO for entry `e`. The first open of a FIFO
/// makes its keeper (read-write, so neither side waits for the other)
/// and puts the saved bytes in.
fn open_fifo(
    d: &mut Descriptions,
    fifo: &Fifo<'_>,
    e: &FdEntry,
    m: &mut Making<'_>,
) -> Result<OwnedFd> {
    let (opener, reader, warnings) = (m.opener, m.reader, &mut *m.warnings);
    let keeper_key = Key::Named("fifo", fifo.path.to_string());
    let path = fifo.path;
    let capacity = fifo.capacity;
    if !d.has(&keeper_key) {
        let keeper = opener.open(
            path,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            e.fd,
        )?;
        if capacity > 0
            && let Err(e) = fcntl(&keeper, FcntlArg::F_SETPIPE_SZ(capacity as i32))
        {
            note(
                warnings,
                format!(
                    "FIFO {path} comes back with its default capacity, not {capacity} bytes ({e})"
                ),
            );
        }
        d.insert(keeper_key.clone(), keeper);
    }
    let keeper = d
        .lookup(&keeper_key)
        .ok_or_else(|| Error::Other(format!("internal: no keeper for FIFO {path}")))?;
    if let Some(data) = fifo.data {
        let bytes = reader.read_data(data)?;
        write_bytes(keeper, &bytes, || {
            format!("{path} ({} unread bytes)", bytes.len())
        })?;
    }
    let fd = opener.open(path, open_flags(e.flags) | OFlag::O_NONBLOCK, e.fd)?;
    // Back to the saved status flags (O_NONBLOCK or not).
    let status = e.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND | libc::O_DIRECT);
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(status))).map_err(file_err(path))?;
    Ok(fd)
}

/// A named FIFO of the image.
struct Fifo<'a> {
    path: &'a str,
    capacity: u64,
    data: Option<&'a crate::image::model::DataRef>,
}
