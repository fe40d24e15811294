//! File descriptors. The child inherited chpox's; all of them go except the
//! image file (moved above every number the image uses) and, if the image
//! has terminal descriptors, the restorer's terminal. Then each saved
//! descriptor is opened and moved to its number:
//! - regular files by path, with the saved flags and offset;
//! - deleted files from their embedded content (a memfd, reopened with
//!   the saved access mode);
//! - directories and character devices by path;
//! - terminals: the restorer's own terminal (fd 0, 1 or 2 if one is a tty,
//!   else /dev/tty) takes their place;
//! - pipes whose both ends the process held: a new pipe of the saved
//!   capacity, holding the saved unread bytes, each descriptor on its end;
//! - a pipe on fd 0, 1 or 2 to another process: the restorer's own fd 0, 1
//!   or 2 (so `chpox restore IMAGE | tee -a log` carries on where
//!   `job | tee log` was);
//! - descriptors replaced at dump time: /dev/null.

use tracing::warn;

use super::Context;
use super::child::{Child, INOUT_AT, errno_of};
use super::memory::{fill_fd, memfd};
use crate::error::{Error, Result};
use crate::fds::is_read_end;
use crate::image::model::{FdEntry, FdKind};

fn note(warnings: &mut Vec<String>, w: String) {
    warn!("{w}");
    warnings.push(w);
}

/// Flags to reopen with: the saved ones, less those that only act at
/// creation or would steal a controlling terminal.
fn open_flags(saved: u32, cloexec: bool) -> i32 {
    let mut f = saved as i32
        & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY | libc::O_CLOEXEC);
    f |= libc::O_NOCTTY;
    if cloexec {
        f |= libc::O_CLOEXEC;
    }
    f
}

pub fn restore_fds(c: &mut Child<'_>, ctx: &Context<'_>, warnings: &mut Vec<String>) -> Result<()> {
    let meta = ctx.reader.metadata();
    let mut entries: Vec<&FdEntry> = meta.fds.iter().collect();
    entries.sort_by_key(|e| e.fd);
    let top = entries.last().map_or(3, |e| e.fd + 1).max(3) as u64;

    // Helpers above every number to restore.
    let image_fd = c.call(
        "fcntl(F_DUPFD_CLOEXEC)",
        libc::SYS_fcntl,
        [
            ctx.image_fd as u64,
            libc::F_DUPFD_CLOEXEC as u64,
            top,
            0,
            0,
            0,
        ],
    )? as i32;
    let wants_tty = entries
        .iter()
        .any(|e| matches!(e.kind, FdKind::Terminal { .. }));
    let tty = if wants_tty {
        terminal(c, top, warnings)?
    } else {
        None
    };
    let stdio = inherited_stdio(c, &entries, top, warnings)?;
    let mut keep: Vec<u64> = vec![image_fd as u64];
    keep.extend(tty.map(|t| t as u64));
    keep.extend(stdio.iter().flatten().map(|&d| d as u64));
    keep.sort_unstable();
    let mut from = 0u64;
    for &k in &keep {
        if k > from {
            close_range(c, from, k - 1)?;
        }
        from = k + 1;
    }
    close_range(c, from, u64::from(u32::MAX))?;
    let pipes = create_pipes(c, ctx, &entries, image_fd, top, warnings)?;

    for e in entries {
        let opened = match &e.kind {
            FdKind::RegularFile {
                path,
                pos,
                embedded,
                ..
            } => {
                let fd = match embedded {
                    None => c.open(path, open_flags(e.flags, e.cloexec), 0)?,
                    Some(data) => {
                        let name = std::path::Path::new(path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let m = memfd(c, &name)?;
                        fill_fd(c, ctx, image_fd, m, data)?;
                        // A new open file description with the saved access
                        // mode and flags.
                        let again = c.try_open(
                            &format!("/proc/self/fd/{m}"),
                            open_flags(e.flags, e.cloexec),
                            0,
                        )?;
                        if again >= 0 {
                            c.close(m)?;
                            again as i32
                        } else {
                            m
                        }
                    }
                };
                c.call(
                    "lseek",
                    libc::SYS_lseek,
                    [fd as u64, *pos, libc::SEEK_SET as u64, 0, 0, 0],
                )?;
                fd
            }
            FdKind::Directory { path } => c.open(
                path,
                libc::O_RDONLY | libc::O_DIRECTORY | if e.cloexec { libc::O_CLOEXEC } else { 0 },
                0,
            )?,
            FdKind::CharDevice { path, .. } => c.open(path, open_flags(e.flags, e.cloexec), 0)?,
            FdKind::Terminal { path, .. } => match tty {
                Some(t) => {
                    install(c, t, e)?;
                    continue;
                }
                None => {
                    note(
                        warnings,
                        format!(
                            "descriptor {} was the terminal {path}; with no terminal here it is /dev/null",
                            e.fd
                        ),
                    );
                    c.open("/dev/null", libc::O_RDWR, 0)?
                }
            },
            FdKind::Pipe {
                internal: true,
                inode,
                ..
            } => {
                let (read, write) = pipes
                    .iter()
                    .find(|p| p.0 == *inode)
                    .map(|p| (p.1, p.2))
                    .ok_or_else(|| Error::Other(format!("pipe:[{inode}] was not created")))?;
                let end = if is_read_end(e.flags) { read } else { write };
                install(c, end, e)?;
                set_status_flags(c, e)?;
                continue;
            }
            FdKind::Pipe { .. } => match stdio.get(e.fd as usize).copied().flatten() {
                Some(d) => {
                    install(c, d, e)?;
                    continue;
                }
                None => c.open("/dev/null", open_flags(e.flags, e.cloexec), 0)?,
            },
            FdKind::ReplacedByNull { .. } => c.open("/dev/null", open_flags(e.flags, false), 0)?,
        };
        // Opened right at its number, it has the saved O_CLOEXEC already.
        if opened != e.fd {
            install(c, opened, e)?;
            c.close(opened)?;
        }
    }
    c.close(image_fd)?;
    if let Some(t) = tty {
        c.close(t)?;
    }
    for (_, read, write) in pipes {
        c.close(read)?;
        c.close(write)?;
    }
    for d in stdio.into_iter().flatten() {
        c.close(d)?;
    }
    Ok(())
}

/// For each of fd 0, 1 and 2 that was a pipe to another process, a copy
/// (numbered `top` or above) of the restorer's own descriptor of that
/// number, which the child inherited.
fn inherited_stdio(
    c: &mut Child<'_>,
    entries: &[&FdEntry],
    top: u64,
    warnings: &mut Vec<String>,
) -> Result<[Option<i32>; 3]> {
    let mut out = [None; 3];
    for e in entries {
        if !matches!(
            e.kind,
            FdKind::Pipe {
                internal: false,
                ..
            }
        ) || e.fd > 2
        {
            continue;
        }
        let ret = c.raw(
            libc::SYS_fcntl,
            [e.fd as u64, libc::F_DUPFD_CLOEXEC as u64, top, 0, 0, 0],
        )?;
        if ret < 0 {
            note(
                warnings,
                format!(
                    "descriptor {} was a pipe to another process and the restorer has no fd {} to give instead ({}); it is /dev/null",
                    e.fd,
                    e.fd,
                    errno_of(ret)
                ),
            );
            continue;
        }
        out[e.fd as usize] = Some(ret as i32);
    }
    Ok(out)
}

/// Where pipe2 puts the two descriptors (past sendfile's offset).
const PIPE_FDS_AT: u64 = INOUT_AT + 64;

/// The pipes whose both ends the process held, made anew: (inode, read
/// end, write end), numbered `top` or above, of the saved capacity and
/// holding the saved unread bytes.
fn create_pipes(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    entries: &[&FdEntry],
    image_fd: i32,
    top: u64,
    warnings: &mut Vec<String>,
) -> Result<Vec<(u64, i32, i32)>> {
    let mut pipes: Vec<(u64, i32, i32)> = Vec::new();
    for e in entries {
        let FdKind::Pipe {
            inode,
            internal: true,
            capacity,
            ..
        } = e.kind
        else {
            continue;
        };
        if pipes.iter().any(|p| p.0 == inode) {
            continue;
        }
        // Non-blocking while we fill it: more bytes than it holds must be
        // an error, not a restorer stuck forever.
        let addr = c.put(PIPE_FDS_AT, &[0u8; 8])?;
        c.call(
            "pipe2",
            libc::SYS_pipe2,
            [
                addr,
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
                0,
                0,
                0,
                0,
            ],
        )?;
        let mut raw = [0u8; 8];
        c.get(PIPE_FDS_AT, &mut raw)?;
        let low = [
            i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]),
            i32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]),
        ];
        // Above every number to restore, so no dup3 closes them early.
        let mut high = [0i32; 2];
        for (h, l) in high.iter_mut().zip(low) {
            *h = c.call(
                "fcntl(F_DUPFD_CLOEXEC)",
                libc::SYS_fcntl,
                [l as u64, libc::F_DUPFD_CLOEXEC as u64, top, 0, 0, 0],
            )? as i32;
            c.close(l)?;
        }
        let [read, write] = high;
        pipes.push((inode, read, write));
        let ret = c.raw(
            libc::SYS_fcntl,
            [write as u64, libc::F_SETPIPE_SZ as u64, capacity, 0, 0, 0],
        )?;
        if ret < 0 {
            note(
                warnings,
                format!(
                    "pipe:[{inode}] comes back with the default capacity, not {capacity} bytes ({})",
                    errno_of(ret)
                ),
            );
        }
        let data = entries.iter().find_map(|other| match &other.kind {
            FdKind::Pipe {
                inode: i,
                data: Some(d),
                ..
            } if *i == inode => Some(d),
            _ => None,
        });
        if let Some(data) = data {
            fill_fd(c, ctx, image_fd, write, data)?;
        }
    }
    Ok(pipes)
}

/// The saved status flags that matter on a pipe (O_NONBLOCK, O_DIRECT for
/// packet mode) on the open file description of entry `e`.
fn set_status_flags(c: &mut Child<'_>, e: &FdEntry) -> Result<()> {
    let flags = e.flags & (libc::O_NONBLOCK | libc::O_DIRECT) as u32;
    c.call(
        "fcntl(F_SETFL)",
        libc::SYS_fcntl,
        [e.fd as u64, libc::F_SETFL as u64, u64::from(flags), 0, 0, 0],
    )?;
    Ok(())
}

/// `dup3(from, e.fd)` with the saved close-on-exec flag.
fn install(c: &mut Child<'_>, from: i32, e: &FdEntry) -> Result<()> {
    let flags = if e.cloexec { libc::O_CLOEXEC } else { 0 };
    c.call(
        "dup3",
        libc::SYS_dup3,
        [from as u64, e.fd as u64, flags as u64, 0, 0, 0],
    )?;
    Ok(())
}

fn close_range(c: &mut Child<'_>, first: u64, last: u64) -> Result<()> {
    if first > last {
        return Ok(());
    }
    c.call(
        "close_range",
        libc::SYS_close_range,
        [first, last, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// A descriptor of the restorer's terminal in the child, numbered `top`
/// or above: fd 0, 1 or 2 if one is a terminal (the child inherited
/// them), else /dev/tty.
fn terminal(c: &mut Child<'_>, top: u64, warnings: &mut Vec<String>) -> Result<Option<i32>> {
    // SAFETY: isatty only inspects a descriptor number.
    let inherited = (0..3).find(|&fd| unsafe { libc::isatty(fd) } == 1);
    let (fd, opened) = match inherited {
        Some(fd) => (fd, false),
        None => {
            let ret = c.try_open("/dev/tty", libc::O_RDWR | libc::O_NOCTTY, 0)?;
            if ret < 0 {
                note(
                    warnings,
                    format!(
                        "the restorer has no terminal (/dev/tty: {}); terminal descriptors become /dev/null",
                        errno_of(ret)
                    ),
                );
                return Ok(None);
            }
            (ret as i32, true)
        }
    };
    let high = c.call(
        "fcntl(F_DUPFD_CLOEXEC)",
        libc::SYS_fcntl,
        [fd as u64, libc::F_DUPFD_CLOEXEC as u64, top, 0, 0, 0],
    )?;
    if opened {
        c.close(fd)?;
    }
    i32::try_from(high)
        .map(Some)
        .map_err(|_| Error::Other("terminal descriptor out of range".into()))
}
