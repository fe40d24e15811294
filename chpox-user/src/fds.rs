//! Open file descriptors: regular files (path, flags, offset; content too if
//! deleted), directories, character devices, terminals, and pipes: those
//! whose both ends the process holds (with their unread bytes), and those on
//! fd 0, 1 or 2 whose other end is another process's (`job | tee log`),
//! which restore connects to the restorer's own fd 0, 1 or 2.
//!
//! In a tree, "the process" is the checkpointed processes together: a pipe
//! between two of them is internal.
//!
//! Kinds chpox cannot restore yet (other pipes to other processes, named
//! FIFOs, sockets, eventfd, epoll, …) fail the dump, naming each one,
//! unless the user asks for them to come back as /dev/null. A checkpoint
//! that silently drops a pipe is worse than none.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::error::{Error, Result, parse_err, read_proc};
use crate::image::ImageWriter;
use crate::image::model::{FdEntry, FdKind, ProcessImage};

/// What to do with a descriptor of a kind chpox cannot restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnsupportedFd {
    #[default]
    Fail,
    /// Record it, and restore /dev/null in its place.
    Null,
}

/// The `pos:` and `flags:` lines of /proc/PID/fdinfo/N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
}

pub fn parse_fdinfo(text: &str, path: &str) -> Result<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            // Octal, as open(2) flags are usually written.
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    match (pos, flags) {
        (Some(pos), Some(flags)) => Ok(FdInfo { pos, flags }),
        _ => Err(parse_err(path, "missing pos: or flags:")),
    }
}

/// Terminal character devices by major number: the ones restore must hand
/// to the restorer's terminal rather than reopen by path.
pub fn is_terminal_major(major: u32) -> bool {
    // 4: tty0.. and ttyS; 5: /dev/tty, /dev/console, /dev/ptmx; 136–143: pts.
    major == 4 || major == 5 || (136..=143).contains(&major)
}

fn open_fd_numbers(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).map_err(|source| Error::Proc {
        path: path.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// Every descriptor of `pid`. The content of deleted regular files is not
/// read yet; `embed_deleted` does that.
pub fn scan_fds(
    pid: i32,
    policy: UnsupportedFd,
    unix: &crate::unix_sockets::UnixTable,
) -> Result<Vec<FdEntry>> {
    let mut entries = Vec::new();
    let mut unsupported = Vec::new();
    for fd in open_fd_numbers(pid)? {
        let link_path = format!("/proc/{pid}/fd/{fd}");
        let Ok(target) = std::fs::read_link(&link_path) else {
            // Closed since we listed the directory: not part of the state.
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let info_path = format!("/proc/{pid}/fdinfo/{fd}");
        let info = parse_fdinfo(&read_proc(&info_path)?, &info_path)?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let meta = std::fs::metadata(&link_path).ok();
        let kind = match &meta {
            Some(m) if m.file_type().is_file() => Some(FdKind::RegularFile {
                path: target.clone(),
                pos: info.pos,
                embedded: None,
                dev: m.dev(),
                ino: m.ino(),
                mode: None,
            }),
            Some(m) if m.file_type().is_dir() => Some(FdKind::Directory {
                path: target.clone(),
            }),
            Some(m)
                if m.file_type().is_fifo()
                    && target.starts_with('/')
                    && !target.ends_with(" (deleted)") =>
            {
                Some(FdKind::Fifo {
                    path: target.clone(),
                    capacity: 0,
                    data: None,
                })
            }
            Some(m) if m.file_type().is_fifo() && target.starts_with("pipe:[") => {
                Some(FdKind::Pipe {
                    inode: m.ino(),
                    internal: false,
                    capacity: 0,
                    data: None,
                })
            }
            Some(m) if m.file_type().is_socket() => crate::unix_sockets::kind_of(unix, m.ino()),
            Some(m) if m.file_type().is_char_device() => {
                let rdev = m.rdev();
                if is_terminal_major(libc::major(rdev)) {
                    Some(FdKind::Terminal {
                        path: target.clone(),
                        rdev,
                    })
                } else {
                    Some(FdKind::CharDevice {
                        path: target.clone(),
                        rdev,
                    })
                }
            }
            _ => None,
        };
        let kind = match (kind, policy) {
            (Some(k), _) => k,
            (None, UnsupportedFd::Null) => FdKind::ReplacedByNull { was: target },
            (None, UnsupportedFd::Fail) => {
                unsupported.push(format!("fd {fd} ({target})"));
                continue;
            }
        };
        entries.push(FdEntry {
            fd,
            flags: info.flags,
            cloexec,
            kind,
            description: 0,
        });
    }
    if !unsupported.is_empty() {
        return Err(Error::UnsupportedFds(unsupported.join(", ")));
    }
    entries.sort_by_key(|e| e.fd);
    Ok(entries)
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
    use std::collections::HashMap;
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
    // pipe without a writer as stdin) is the processes' alone too.
    for p in procs.iter() {
        for e in &p.fds {
            if let FdKind::Pipe { inode, .. } = e.kind
                && let Some(held) = ends.get_mut(&inode)
                && *held != (true, true)
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
    embed_fifo_data(procs, writer)
}

/// The same for named FIFOs: capacity and unread bytes, once per FIFO,
/// copied through a reading descriptor of our own (opening a FIFO to read,
/// non-blocking, never waits).
fn embed_fifo_data(procs: &mut [ProcessImage], writer: &mut ImageWriter) -> Result<()> {
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
            let (c, bytes) = peek_pipe(pid, entry.fd, path)?;
            *capacity = c;
            if seen.insert(path.clone()) && !bytes.is_empty() {
                *data = Some(writer.add_data(&bytes)?);
            }
        }
    }
    Ok(())
}

/// The capacity and unread bytes of the pipe or FIFO at fd `fd` of
/// `pid` (`what` names it), read through a reading descriptor of our own,
/// non-blocking: it must never wait for a writer.
fn peek_pipe(pid: i32, fd: i32, what: &str) -> Result<(u64, Vec<u8>)> {
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
            let link_path = format!("/proc/{pid}/fd/{}", entry.fd);
            let nlink = std::fs::metadata(&link_path)
                .map(|m| m.nlink())
                .unwrap_or(1);
            if let Some(stripped) = path.strip_suffix(" (deleted)") {
                *path = stripped.to_string();
            } else if nlink != 0 {
                continue;
            }
            let link_path = std::path::PathBuf::from(link_path);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_is_parsed() {
        let text = "pos:\t123\nflags:\t02100002\nmnt_id:\t25\nino:\t42\n";
        let info = parse_fdinfo(text, "t").expect("parses");
        assert_eq!(info.pos, 123);
        assert_eq!(info.flags, 0o2100002);
        assert!(info.flags & libc::O_CLOEXEC as u32 != 0);
        assert!(info.flags & libc::O_RDWR as u32 != 0);
    }

    #[test]
    fn fdinfo_without_pos_is_an_error() {
        assert!(parse_fdinfo("flags: 0\n", "t").is_err());
    }

    #[test]
    fn pts_and_console_are_terminals() {
        assert!(is_terminal_major(136));
        assert!(is_terminal_major(5));
        assert!(!is_terminal_major(1)); // /dev/null, /dev/zero
    }
}
