//! inotify: its watches (fdinfo `inotify wd: ino: sdev: mask: ...
//! f_handle:`), each found again by path through its file handle
//! (`open_by_handle_at` on a mount of its filesystem), with its mask.
//! A watch whose file has no path any more (or sits on a filesystem whose
//! handles cannot be opened again, procfs) is refused by name. Events
//! queued and not read yet are not kept (no call puts an event into an
//! instance); the dump warns about them.
//!
//! Restore: a new instance; each watch added again by path, in the order
//! of their numbers, until the kernel hands out the saved number (watch
//! numbers only grow, so added and removed until they match), with the
//! file rights of the process that held it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::{Error, Result, parse_err};
use crate::fds::restore::{file_err, key, one};
use crate::fds::{Kind, Probe, no_key};
use crate::image::model::{FdKind, InotifyWatch};

pub static KIND: Kind = Kind {
    probe,
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make: |d, m, e| {
        let FdKind::Inotify { watches } = &e.kind else {
            return Ok(false);
        };
        let name = format!("inotify (fd {} of PID {})", e.fd, m.pid);
        // Watching a path needs the right to read it: the owner's, when
        // root restores another user's image.
        let fd = m.opener.with_rights(|| rebuild(watches, &name))??;
        let status = OFlag::from_bits_retain(e.flags as i32 & libc::O_NONBLOCK);
        fcntl(&fd, FcntlArg::F_SETFL(status)).map_err(file_err(&name))?;
        d.insert(key(m.pid, e), fd);
        Ok(true)
    },
};

/// The mask bits `inotify_add_watch` takes back.
const USER_BITS: u32 = 0xfff | 0x0400_0000 /* IN_EXCL_UNLINK */ | 0x8000_0000 /* IN_ONESHOT */;
const IN_DONT_FOLLOW: u32 = 0x0200_0000;

/// A line's `name:hex` value.
fn hex(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
}

struct Parsed {
    wd: i32,
    ino: u64,
    sdev: u64,
    mask: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

fn parse_line(line: &str) -> Option<Parsed> {
    let handle_hex = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("f_handle:"))?;
    let handle = (0..handle_hex.len() / 2)
        .map(|i| u8::from_str_radix(&handle_hex[2 * i..2 * i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(Parsed {
        wd: hex(line, "wd:")? as i32,
        ino: hex(line, "ino:")?,
        sdev: hex(line, "sdev:")?,
        mask: hex(line, "mask:")? as u32,
        handle_type: hex(line, "fhandle-type:")? as i32,
        handle,
    })
}

/// Mount points of the filesystem on device `dev` (as `stat` gives it),
/// as `pid` sees them, reachable from here through /proc/PID/root.
fn mounts_of(pid: i32, dev: u64) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return Vec::new();
    };
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&want.as_str())).then(|| f.get(4).map(|m| unescape(m)))?
        })
        .map(|m| format!("/proc/{pid}/root{m}"))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path of the watched file, through its handle.
fn path_of(pid: i32, w: &Parsed) -> Option<String> {
    let dev = super::epoll::user_dev(w.sdev);
    for mount in mounts_of(pid, dev) {
        let Ok(dir) = nix::fcntl::open(
            mount.as_str(),
            // Not O_PATH: open_by_handle_at takes no O_PATH mount fd.
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) else {
            continue;
        };
        // struct file_handle: handle_bytes, handle_type, f_handle[].
        let mut fh = Vec::with_capacity(8 + w.handle.len());
        fh.extend_from_slice(&(w.handle.len() as u32).to_ne_bytes());
        fh.extend_from_slice(&w.handle_type.to_ne_bytes());
        fh.extend_from_slice(&w.handle);
        // SAFETY: `fh` is a complete struct file_handle the kernel only
        // reads; the result is checked and owned.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                dir.as_raw_fd(),
                fh.as_ptr(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            continue;
        }
        // SAFETY: a descriptor the kernel just gave us.
        let file = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) else {
            continue;
        };
        let path = path.to_string_lossy().into_owned();
        if path.ends_with(" (deleted)") || !path.starts_with('/') {
            return None;
        }
        return Some(path);
    }
    None
}

fn probe(p: &Probe<'_>) -> Result<Option<FdKind>> {
    if p.target != "anon_inode:inotify" {
        return Ok(None);
    }
    let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
    let mut watches = Vec::new();
    for line in p.fdinfo.lines().filter(|l| l.starts_with("inotify ")) {
        let w = parse_line(line).ok_or_else(|| parse_err(&what, line))?;
        let Some(path) = path_of(p.pid, &w) else {
            // The kernel's fallback handle (FILEID_INO64_GEN) for
            // filesystems that cannot open a handle again (procfs).
            let why = if w.handle_type == 0x81 {
                "on a filesystem whose file handles cannot be opened again (procfs?), so its path cannot be found"
            } else {
                "which has no path any more"
            };
            return Err(Error::Other(format!(
                "fd {} of PID {} (inotify): watch {} is on inode {} of device {}:{}, {why}; chpox cannot add it again",
                p.fd,
                p.pid,
                w.wd,
                w.ino,
                libc::major(super::epoll::user_dev(w.sdev)),
                libc::minor(super::epoll::user_dev(w.sdev))
            )));
        };
        watches.push(InotifyWatch {
            wd: w.wd,
            mask: w.mask,
            path,
        });
    }
    watches.sort_by_key(|w| w.wd);
    // Events cannot be put into a new instance: a queue is said to be
    // lost rather than lost in silence.
    if let Ok(copy) = crate::fds::sockets::sock_diag::steal(p.pid, p.fd) {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `queued`.
        let ret = unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if ret == 0 && queued > 0 {
            tracing::warn!(
                "fd {} of PID {} (inotify): {queued} bytes of events queued and not read yet are not kept (its watches are)",
                p.fd,
                p.pid
            );
        }
    }
    Ok(Some(FdKind::Inotify { watches }))
}

/// A new instance holding `watches` under their numbers.
fn rebuild(watches: &[InotifyWatch], name: &str) -> Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags; the result is checked and owned.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if raw < 0 {
        return Err(Error::File {
            path: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a descriptor we just created.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    for w in watches {
        let Ok(path) = std::ffi::CString::new(w.path.as_str()) else {
            return Err(Error::Other(format!(
                "{name}: watch {} has a bad path",
                w.wd
            )));
        };
        let mask = (w.mask & USER_BITS) | IN_DONT_FOLLOW;
        // Numbers only grow: add and remove until the saved one comes up.
        let mut tries = 0u32;
        loop {
            // SAFETY: `path` is NUL-terminated; the kernel only reads it.
            let got = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
            if got < 0 {
                return Err(Error::Other(format!(
                    "{name}: cannot watch {} again (watch {}): {}",
                    w.path,
                    w.wd,
                    std::io::Error::last_os_error()
                )));
            }
            if got == w.wd {
                break;
            }
            tries += 1;
            if got > w.wd || tries > 1 << 20 {
                return Err(Error::Other(format!(
                    "{name}: watch {} on {} came back as number {got}",
                    w.wd, w.path
                )));
            }
            // SAFETY: removes a watch of our own instance.
            unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), got) };
        }
    }
    // Removing watches queued IN_IGNORED events; the process never saw
    // them. Drain them: none of the saved events were kept either.
    let mut buf = [0u8; 4096];
    while nix::unistd::read(&fd, &mut buf).is_ok_and(|n| n > 0) {}
    Ok(fd)
}

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    let FdKind::Inotify { watches } = kind else {
        return None;
    };
    let list: Vec<String> = watches
        .iter()
        .map(|w| format!("{} {} mask {:#x}", w.wd, w.path, w.mask))
        .collect();
    Some(format!("inotify watching [{}]", list.join("; ")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn watch_lines_are_parsed() {
        let w = super::parse_line("inotify wd:1 ino:3c4a7 sdev:fe00000 mask:80000300 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000").expect("parses");
        assert_eq!(
            (w.wd, w.ino, w.mask, w.handle_type),
            (1, 0x3c4a7, 0x8000_0300, 1)
        );
        assert_eq!(w.handle, vec![0xa7, 0xc4, 3, 0, 0, 0, 0, 0]);
        assert_eq!(super::super::epoll::user_dev(w.sdev), libc::makedev(254, 0));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
    }
}
