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
//! - descriptors replaced at dump time: /dev/null.

use tracing::warn;

use super::Context;
use super::child::{Child, errno_of};
use super::memory::{fill_fd, memfd};
use crate::error::{Error, Result};
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
    let mut keep: Vec<u64> = vec![image_fd as u64];
    keep.extend(tty.map(|t| t as u64));
    keep.sort_unstable();
    let mut from = 0u64;
    for &k in &keep {
        if k > from {
            close_range(c, from, k - 1)?;
        }
        from = k + 1;
    }
    close_range(c, from, u64::from(u32::MAX))?;

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
