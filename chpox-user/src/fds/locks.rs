//! File locks: `flock(2)`, POSIX record locks (`fcntl(F_SETLK)`) and
//! open-file-description locks (`fcntl(F_OFD_SETLK)`) the process holds.
//!
//! A restored process that lost its locks is a silent fault: a database
//! (SQLite holds POSIX locks on its files for as long as a connection is
//! open) or a daemon guarding its PID file would go on believing it is
//! alone while another process walks in. So the dump records each lock
//! with the descriptor it was taken through, and restore takes each one
//! back inside the restored process, without waiting: if another process
//! holds a conflicting lock by then, the restore fails naming the file
//! rather than handing back a process that thinks it holds it.
//!
//! Dump: `/proc/PID/fdinfo/N` lists, under `lock:`, the locks taken
//! through that descriptor's file description and owned by this process
//! (POSIX) or by the description (flock, OFD). Locks a process is waiting
//! for (`->`) are not held; its blocked `fcntl`/`flock` call simply runs
//! again after restore. Leases and delegations cannot be taken back as
//! they were (their holder is told to give them up) and fail the dump.
//!
//! Restore runs last among the descriptor steps ([`super::INSTALLED`]),
//! once every descriptor is in place: a POSIX lock vanishes when its
//! process closes *any* descriptor of the file, so none may be closed
//! after it is taken.

use crate::error::{Error, Result};
use crate::image::model::{FdEntry, FdKind, FileLock, LockKind};
use crate::restore::child::{Child, errno_of};

use super::restore::Descriptions;

/// The locks held through descriptor `fd` of `pid`, from its fdinfo text.
pub fn parse(fdinfo: &str, pid: i32, fd: i32, target: &str) -> Result<Vec<FileLock>> {
    let mut locks = Vec::new();
    for line in fdinfo.lines() {
        let Some(rest) = line.strip_prefix("lock:") else {
            continue;
        };
        let bad = |why: &str| Error::Parse {
            path: format!("/proc/{pid}/fdinfo/{fd}"),
            reason: format!("lock line {rest:?}: {why}"),
        };
        let mut words = rest.split_whitespace();
        // "1:", the lock's number in this listing.
        words.next().ok_or_else(|| bad("empty"))?;
        let Some(kind) = words.next() else {
            return Err(bad("no kind"));
        };
        let kind = match kind {
            // Waiting for this lock, not holding it.
            "->" => continue,
            "FLOCK" => LockKind::Flock,
            "POSIX" => LockKind::Posix,
            "OFDLCK" => LockKind::Ofd,
            "LEASE" | "DELEG" => {
                return Err(Error::UnsupportedFds(format!(
                    "fd {fd} ({target}, which holds a file lease)"
                )));
            }
            other => return Err(bad(&format!("unknown kind {other}"))),
        };
        if words.next() != Some("ADVISORY") {
            return Err(bad("not an advisory lock"));
        }
        let write = match words.next() {
            Some("WRITE") => true,
            Some("READ") => false,
            _ => return Err(bad("neither READ nor WRITE")),
        };
        // The owner's PID, then the file's device and inode.
        let (Some(_pid), Some(_inode)) = (words.next(), words.next()) else {
            return Err(bad("no owner or inode"));
        };
        let start: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| bad("no start"))?;
        let end = match words.next() {
            Some("EOF") => None,
            Some(w) => Some(w.parse().map_err(|_| bad("bad end"))?),
            None => return Err(bad("no end")),
        };
        locks.push(FileLock {
            kind,
            write,
            start,
            end,
        });
    }
    Ok(locks)
}

/// How `inspect` shows a descriptor's locks, or "" when it holds none.
pub fn describe(locks: &[FileLock]) -> String {
    let each: Vec<String> = locks
        .iter()
        .map(|l| {
            let kind = match l.kind {
                LockKind::Flock => "flock",
                LockKind::Posix => "POSIX",
                LockKind::Ofd => "OFD",
            };
            let mode = if l.write { "write" } else { "read" };
            match (l.kind, l.end) {
                (LockKind::Flock, _) => format!("{kind} {mode}"),
                (_, Some(end)) => format!("{kind} {mode} bytes {}-{end}", l.start),
                (_, None) => format!("{kind} {mode} bytes {}-EOF", l.start),
            }
        })
        .collect();
    if each.is_empty() {
        String::new()
    } else {
        format!(", locked: {}", each.join(", "))
    }
}

/// The file a lock is on, for messages.
fn path_of(kind: &FdKind) -> String {
    match kind {
        FdKind::RegularFile { path, .. }
        | FdKind::Directory { path }
        | FdKind::CharDevice { path, .. } => path.clone(),
        _ => "its file".to_string(),
    }
}

/// `struct flock` as x86-64 lays it out: l_type, l_whence (shorts), then
/// l_start, l_len (off_t), l_pid, padding.
fn flock_struct(lock: &FileLock) -> [u8; 32] {
    let kind = if lock.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    // A length of 0 means "to the end of the file, however far it grows".
    let len = lock.end.map_or(0, |end| end - lock.start + 1);
    let mut b = [0u8; 32];
    b[0..2].copy_from_slice(&(kind as i16).to_ne_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    b[8..16].copy_from_slice(&lock.start.to_ne_bytes());
    b[16..24].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Restore: take back, inside the restored process, every lock it held.
pub fn installed(
    c: &mut Child<'_>,
    pid_in_image: i32,
    fds: &[FdEntry],
    _: &Descriptions,
) -> Result<()> {
    for e in fds {
        if matches!(e.kind, FdKind::ReplacedByNull { .. }) {
            continue;
        }
        for lock in &e.locks {
            let ret = match lock.kind {
                LockKind::Flock => {
                    let how = if lock.write {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    };
                    c.raw(
                        libc::SYS_flock,
                        [e.fd as u64, (how | libc::LOCK_NB) as u64, 0, 0, 0, 0],
                    )?
                }
                LockKind::Posix | LockKind::Ofd => {
                    let cmd = if lock.kind == LockKind::Posix {
                        libc::F_SETLK
                    } else {
                        libc::F_OFD_SETLK
                    };
                    let addr = c.put(0, &flock_struct(lock))?;
                    c.raw(libc::SYS_fcntl, [e.fd as u64, cmd as u64, addr, 0, 0, 0])?
                }
            };
            if ret < 0 {
                return Err(Error::FileLock {
                    pid: pid_in_image,
                    fd: e.fd,
                    what: describe(std::slice::from_ref(lock))
                        .trim_start_matches(", locked: ")
                        .to_string(),
                    path: path_of(&e.kind),
                    source: errno_of(ret),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FDINFO: &str = "pos:\t0\nflags:\t0100002\nmnt_id:\t30\nino:\t1234\n\
lock:\t1: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF\n\
lock:\t2: POSIX  ADVISORY  READ 4242 fe:00:1234 10 19\n\
lock:\t3: OFDLCK ADVISORY  WRITE -1 fe:00:1234 100 EOF\n\
lock:\t4: -> POSIX  ADVISORY  WRITE 4243 fe:00:1234 0 EOF\n";

    #[test]
    fn held_locks_are_read_and_waiters_skipped() {
        let locks = parse(FDINFO, 1, 3, "/x").expect("parse");
        assert_eq!(
            locks,
            vec![
                FileLock {
                    kind: LockKind::Flock,
                    write: true,
                    start: 0,
                    end: None
                },
                FileLock {
                    kind: LockKind::Posix,
                    write: false,
                    start: 10,
                    end: Some(19)
                },
                FileLock {
                    kind: LockKind::Ofd,
                    write: true,
                    start: 100,
                    end: None
                },
            ]
        );
        assert_eq!(
            describe(&locks),
            ", locked: flock write, POSIX read bytes 10-19, OFD write bytes 100-EOF"
        );
    }

    #[test]
    fn a_lease_fails_the_dump_by_name() {
        let text = "pos:\t0\nflags:\t0\nlock:\t1: LEASE  ACTIVE    READ 7 fe:00:5 0 EOF\n";
        let err = parse(text, 1, 5, "/data/f").expect_err("a lease");
        assert!(err.to_string().contains("fd 5 (/data/f"), "{err}");
    }

    #[test]
    fn a_range_becomes_a_length_and_eof_a_zero_length() {
        let l = FileLock {
            kind: LockKind::Posix,
            write: true,
            start: 10,
            end: Some(19),
        };
        let b = flock_struct(&l);
        assert_eq!(i16::from_ne_bytes([b[0], b[1]]), libc::F_WRLCK as i16);
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().unwrap()), 10);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 10);
        let eof = FileLock { end: None, ..l };
        let b = flock_struct(&eof);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 0);
    }
}
