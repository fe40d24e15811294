//! Terminals. A terminal cannot be reopened by path on another login, so
//! restore gives the restorer's own terminal in its place: fd 0, 1 or 2 if
//! one is a tty, else /dev/tty, else /dev/null with a warning.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::Kind;
use super::restore::{Key, dev_null, note, one, restorer_fd};
use crate::error::Result;
use crate::image::model::FdKind;

/// Terminal character devices by major number: the ones restore must hand
/// to the restorer's terminal rather than reopen by path.
pub fn is_terminal_major(major: u32) -> bool {
    // 4: tty0.. and ttyS; 5: /dev/tty, /dev/console, /dev/ptmx; 136–143: pts.
    major == 4 || major == 5 || (136..=143).contains(&major)
}

/// The master side of a pseudo-terminal (`/dev/ptmx`, `/dev/pts/ptmx`):
/// the job's own terminal emulator (`script`, `tmux`, `expect`) holds it,
/// with the pair's state (the slave it opened, what is queued either way)
/// that chpox does not save. Neither the restorer's terminal nor a new
/// pty from reopening the path would be the same: the descriptor is not of
/// a kind chpox restores (the dump names it; `--unsupported-fd=null`).
pub fn is_pty_master(rdev: u64) -> bool {
    libc::major(rdev) == 5 && libc::minor(rdev) == 2
}

pub static KIND: Kind = Kind {
    probe: |p| {
        Ok(match p.meta {
            Some(m)
                if m.file_type().is_char_device()
                    && is_terminal_major(libc::major(m.rdev()))
                    && !is_pty_master(m.rdev()) =>
            {
                Some(FdKind::Terminal {
                    path: p.target.to_string(),
                    rdev: m.rdev(),
                })
            }
            _ => None,
        })
    },
    classify: None,
    embed: None,
    // One for every terminal descriptor.
    key: |_, e| matches!(e.kind, FdKind::Terminal { .. }).then_some(Key::Object("tty", 0, 0)),
    needs: one,
    make: |d, m, e| {
        let FdKind::Terminal { path, .. } = &e.kind else {
            return Ok(false);
        };
        let fd = match terminal()? {
            Some(t) => t,
            None => {
                note(
                    m.warnings,
                    format!(
                        "descriptor {} was the terminal {path}; with no terminal here it is /dev/null",
                        e.fd
                    ),
                );
                dev_null(libc::O_RDWR as u32)?
            }
        };
        d.insert(Key::Object("tty", 0, 0), fd);
        Ok(true)
    },
};

/// The restorer's terminal: fd 0, 1 or 2 if one is a terminal, else
/// /dev/tty; None without one.
fn terminal() -> Result<Option<OwnedFd>> {
    // SAFETY: isatty only inspects a descriptor number.
    if let Some(fd) = (0..3).find(|&fd| unsafe { libc::isatty(fd) } == 1) {
        return Ok(restorer_fd(fd));
    }
    match nix::fcntl::open(
        "/dev/tty",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(_) => Ok(None),
    }
}
