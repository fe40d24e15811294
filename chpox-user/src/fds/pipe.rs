//! Anonymous pipes. Those whose both ends the checkpointed processes hold
//! come back as a new pipe of the saved capacity, holding the saved unread
//! bytes; one on fd 0, 1 or 2 whose other end another process holds (`job
//! | tee log`) comes back as the restorer's own fd 0, 1 or 2 (so `chpox
//! restore IMAGE | tee -a log` carries on where `job | tee log` was). Other
//! pipes to the outside are refused by name (or /dev/null by request).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::restore::{
    Descriptions, Key, Making, dev_null, file_err, note, one, restorer_fd, write_bytes,
};
use super::{Embed, Kind, UnsupportedFd};
use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{FdEntry, FdKind, ProcessImage};

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m) if m.file_type().is_fifo() && p.target.starts_with("pipe:[") => {
                Some(FdKind::Pipe {
                    inode: m.ino(),
                    internal: false,
                    capacity: 0,
                    data: None,
                })
            }
            _ => None,
        })
    },
    classify: Some(classify_pipes),
    embed: Some(|e: &mut Embed<'_>| embed_pipe_data(e.procs, e.writer)),
    key: |_, e| match e.kind {
        // Each open file description its own (two opens of one pipe keep
        // their own O_NONBLOCK); images of earlier versions, one per end.
        FdKind::Pipe { internal: true, .. } if e.description != 0 => {
            Some(Key::Object("pipe description", e.description, 0))
        }
        FdKind::Pipe {
            inode,
            internal: true,
            ..
        } => Some(Key::Object("pipe", inode, u64::from(is_read_end(e.flags)))),
        FdKind::Pipe {
            internal: false, ..
        } => Some(Key::Object("stdio", e.fd as u64, 0)),
        _ => None,
    },
    // Both ends are made at once, and kept while each description is
    // made from them.
    needs: |pid, e| match e.kind {
        FdKind::Pipe {
            inode,
            internal: true,
            ..
        } => vec![
            (Key::Object("pipe", inode, 1), 2),
            (super::restore::key(pid, e), 1),
        ],
        _ => one(pid, e),
    },
    make,
};

fn make(d: &mut Descriptions, m: &mut Making<'_>, e: &FdEntry) -> Result<bool> {
    match e.kind {
        FdKind::Pipe {
            inode,
            internal: true,
            ..
        } if !d.has(&Key::Object("pipe", inode, 1)) => make_pipe(d, m, inode)?,
        FdKind::Pipe { internal: true, .. } => {
            return Err(Error::Other(format!(
                "internal: fd {} of PID {} has no description of its pipe",
                e.fd, m.pid
            )));
        }
        FdKind::Pipe {
            internal: false, ..
        } => {
            let fd = match restorer_fd(e.fd) {
                Some(fd) => fd,
                None => {
                    note(
                        m.warnings,
                        format!(
                            "descriptor {} was a pipe to another process and the restorer has no fd {} to give instead; it is /dev/null",
                            e.fd, e.fd
                        ),
                    );
                    dev_null(e.flags)?
                }
            };
            d.insert(Key::Object("stdio", e.fd as u64, 0), fd);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Whether a descriptor with open flags `flags` is the read end of a pipe.
pub fn is_read_end(flags: u32) -> bool {
    flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32
}

/// Marks the pipes whose both ends the checkpointed processes hold as
/// internal; a pipe to a process outside them is kept only on fd 0, 1 or
/// 2 (restore hands over the restorer's own), and is otherwise
/// unsupported: replaced by /dev/null by request, or named in the error.
pub fn classify_pipes(procs: &mut [ProcessImage], policy: UnsupportedFd) -> Result<()> {
    use std::collections::{HashMap, HashSet};
    // inode -> (a read end is held, a write end is held)
    let mut ends: HashMap<u64, (bool, bool)> = HashMap::new();
    for e in procs.iter().flat_map(|p| &p.fds) {
        if let FdKind::Pipe { inode, .. } = e.kind {
            let held = ends.entry(inode).or_default();
            if is_read_end(e.flags) {
                held.0 = true;
            } else {
                held.1 = true;
            }
        }
    }
    // A pipe whose other end nobody holds any more (make gives its jobs a
    // pipe without a writer as stdin) is the processes' alone too. Asked
    // once per pipe and end: every process of a tree holds its inherited
    // stdout, and each probe opens the pipe (~5 us, while frozen).
    let mut probed: HashSet<(u64, bool)> = HashSet::new();
    for p in procs.iter() {
        for e in &p.fds {
            if let FdKind::Pipe { inode, .. } = e.kind
                && let Some(held) = ends.get_mut(&inode)
                && *held != (true, true)
                && probed.insert((inode, is_read_end(e.flags)))
                && other_end_closed(p.process.pid, e.fd, is_read_end(e.flags))
            {
                *held = (true, true);
            }
        }
    }
    let several = procs.len() > 1;
    let mut unsupported = Vec::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for e in &mut p.fds {
            let FdKind::Pipe {
                inode, internal, ..
            } = &mut e.kind
            else {
                continue;
            };
            *internal = ends.get(inode) == Some(&(true, true));
            if *internal || e.fd <= 2 {
                continue;
            }
            let was = format!("pipe:[{inode}]");
            match policy {
                UnsupportedFd::Null => e.kind = FdKind::ReplacedByNull { was },
                UnsupportedFd::Fail => unsupported.push(format!(
                    "{}fd {} ({was}, whose other end a process outside the checkpoint holds)",
                    if several {
                        format!("PID {pid} ")
                    } else {
                        String::new()
                    },
                    e.fd
                )),
            }
        }
    }
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsupportedFds(unsupported.join(", ")))
    }
}

/// Whether the pipe end at fd `fd` of `pid` has no peer anywhere: no
/// writer for a read end (a copy of it polls as hung up), no reader for a
/// write end (opening one more writer without a reader fails with ENXIO).
fn other_end_closed(pid: i32, fd: i32, read_end: bool) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/{pid}/fd/{fd}");
    let mut open = std::fs::OpenOptions::new();
    open.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    if read_end {
        let Ok(copy) = open.read(true).open(&path) else {
            return false;
        };
        let mut poll = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&copy),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(
            nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO),
            Ok(1)
        ) && poll[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP))
    } else {
        matches!(
            open.write(true).open(&path),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO)
        )
    }
}

/// Put the capacity of every internal pipe into each of its entries, and
/// its unread bytes into the image, with the first read-end entry of the
/// tree. One descriptor of our own per pipe, on a read end: the bytes are
/// copied with `tee`, which leaves them in the pipe, so the processes, if
/// they run on, read them as if nothing happened.
pub fn embed_pipe_data(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
    use std::collections::HashMap;
    // inode -> capacity
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for p in procs.iter_mut() {
        let pid = p.process.pid;
        for entry in p.fds.iter_mut() {
            let FdKind::Pipe {
                inode,
                internal: true,
                ..
            } = entry.kind
            else {
                continue;
            };
            if !is_read_end(entry.flags) || seen.contains_key(&inode) {
                continue;
            }
            let (capacity, bytes) = peek_pipe(pid, entry.fd, &format!("pipe:[{inode}]"))?;
            seen.insert(inode, capacity);
            if !bytes.is_empty()
                && let FdKind::Pipe { data, .. } = &mut entry.kind
            {
                *data = Some(writer.add_data(&bytes)?);
            }
        }
    }
    for entry in procs.iter_mut().flat_map(|p| p.fds.iter_mut()) {
        if let FdKind::Pipe {
            inode,
            internal: true,
            capacity,
            ..
        } = &mut entry.kind
            && let Some(&c) = seen.get(inode)
        {
            *capacity = c;
        }
    }
    Ok(())
}

/// The capacity and unread bytes of the pipe or FIFO at fd `fd` of
/// `pid` (`what` names it), read through a reading descriptor of our own,
/// non-blocking: it must never wait for a writer.
pub(crate) fn peek_pipe(pid: i32, fd: i32, what: &str) -> Result<(u64, Vec<u8>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let link = format!("/proc/{pid}/fd/{fd}");
    let err = |source| Error::File {
        path: format!("{link} ({what})"),
        source,
    };
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&link)
        .map_err(err)?;
    pipe_content(&pipe).map_err(err)
}

/// The capacity of `pipe` and a copy of what it holds, without consuming
/// it: `tee` into a pipe of ours at least as large, in one call (a second
/// would copy the same bytes again), then read that.
fn pipe_content(pipe: &File) -> std::io::Result<(u64, Vec<u8>)> {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, tee};
    let capacity = fcntl(pipe, FcntlArg::F_GETPIPE_SZ)?;
    let (copy_out, copy_in) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    if fcntl(&copy_in, FcntlArg::F_GETPIPE_SZ)? < capacity {
        fcntl(&copy_in, FcntlArg::F_SETPIPE_SZ(capacity))?;
    }
    let n = match tee(pipe, &copy_in, usize::MAX, SpliceFFlags::SPLICE_F_NONBLOCK) {
        Ok(n) => n,
        // Empty pipe.
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => return Err(e.into()),
    };
    let mut bytes = vec![0u8; n];
    File::from(copy_out).read_exact(&mut bytes)?;
    Ok((capacity as u64, bytes))
}

/// A new pipe for pipe `inode` of the image, of its saved capacity,
/// holding its saved bytes, each end with its saved status flags.
fn make_pipe(d: &mut Descriptions, m: &mut Making<'_>, inode: u64) -> Result<()> {
    let (meta, reader, warnings) = (m.meta, m.reader, &mut *m.warnings);
    let entries: Vec<&FdEntry> = meta
        .processes()
        .flat_map(|p| &p.fds)
        .filter(|e| matches!(e.kind, FdKind::Pipe { inode: i, internal: true, .. } if i == inode))
        .collect();
    let name = format!("pipe:[{inode}]");
    // Non-blocking while we fill it: more bytes than it holds must be
    // an error, not a restorer stuck forever.
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(file_err(&name))?;
    let capacity = entries.iter().find_map(|e| match e.kind {
        FdKind::Pipe { capacity, .. } if capacity > 0 => Some(capacity),
        _ => None,
    });
    if let Some(capacity) = capacity
        && let Err(e) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(capacity as i32))
    {
        note(
            warnings,
            format!("{name} comes back with the default capacity, not {capacity} bytes ({e})"),
        );
    }
    let data = entries.iter().find_map(|e| match &e.kind {
        FdKind::Pipe { data: Some(d), .. } => Some(*d),
        _ => None,
    });
    if let Some(data) = data {
        let bytes = reader.read_data(&data)?;
        write_bytes(&write, &bytes, || {
            format!("{name} ({} unread bytes)", bytes.len())
        })?;
    }
    for (end, is_read) in [(read, true), (write, false)] {
        // The status flags that matter on a pipe (O_NONBLOCK, O_DIRECT
        // for packet mode), as the first entry of this end had them.
        let flags = entries
            .iter()
            .find(|e| is_read_end(e.flags) == is_read)
            .map_or(0, |e| e.flags as i32 & (libc::O_NONBLOCK | libc::O_DIRECT));
        fcntl(&end, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags))).map_err(file_err(&name))?;
        d.insert(Key::Object("pipe", inode, u64::from(is_read)), end);
    }
    make_descriptions(d, &entries, inode, &name)
}

/// One description per saved description of pipe `inode`: the first of
/// each end is that end itself (shared), the others open it anew through
/// /proc (a new description of the same pipe), each with its own status
/// flags.
fn make_descriptions(
    d: &mut Descriptions,
    entries: &[&FdEntry],
    inode: u64,
    name: &str,
) -> Result<()> {
    let mut first_of_end = [false, false];
    for e in entries {
        if e.description == 0 {
            continue;
        }
        let k = Key::Object("pipe description", e.description, 0);
        if d.has(&k) {
            continue;
        }
        let is_read = is_read_end(e.flags);
        let end = d
            .lookup(&Key::Object("pipe", inode, u64::from(is_read)))
            .ok_or_else(|| Error::Other(format!("internal: {name} not made")))?;
        let fd = if !first_of_end[usize::from(is_read)] {
            // The end's flags were set from the first entry of that end,
            // which is this description's.
            first_of_end[usize::from(is_read)] = true;
            end.try_clone().map_err(|err| Error::File {
                path: name.to_string(),
                source: err,
            })?
        } else {
            let again = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(end));
            let access = e.flags as i32 & libc::O_ACCMODE;
            let fd = nix::fcntl::open(
                again.as_str(),
                OFlag::from_bits_retain(access) | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(file_err(name))?;
            let status = e.flags as i32 & (libc::O_NONBLOCK | libc::O_DIRECT);
            fcntl(&fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(status)))
                .map_err(file_err(name))?;
            fd
        };
        d.insert(k, fd);
    }
    Ok(())
}
