//! Acting on files with a user's rights instead of root's.
//!
//! The agent runs as root but writes images and reads libraries for users.
//! A user must not be able to make it write where they may not (a root-owned
//! directory) or read what they may not (a root-only file), so file access
//! on a user's behalf happens on a short-lived thread whose filesystem
//! credentials are the user's: on Linux, fsuid, fsgid and the supplementary
//! groups belong to the thread, and a thread with a non-zero fsuid loses
//! CAP_DAC_OVERRIDE and friends. The kernel then applies exactly the
//! permission checks the user would meet: path traversal, directory write
//! bits, sticky directories, ACLs.

use std::io;

/// The identity whose file permissions apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl UserCreds {
    /// The real uid, gid and groups of process `pid`.
    pub fn of_process(pid: i32) -> io::Result<UserCreds> {
        let status = procfs::process::Process::new(pid)
            .and_then(|p| p.status())
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(UserCreds {
            uid: status.ruid,
            gid: status.rgid,
            groups: status.groups.iter().map(|&g| g as u32).collect(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Run `f` on a thread with `creds` as its filesystem identity and return
/// its result. Root runs `f` right here.
pub fn as_user<R: Send>(creds: &UserCreds, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    if creds.is_root() {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                switch_thread_fs_creds(creds)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("file access thread panicked")))
    })
}

/// Give the calling thread `creds` for file access. Only ever called on a
/// thread that ends right after, so nothing needs switching back.
fn switch_thread_fs_creds(creds: &UserCreds) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = creds.groups.clone();
    // Raw syscalls on purpose: glibc's wrappers for setgroups apply the
    // change to every thread of the process; the kernel's apply it to the
    // calling thread only, which is what we want.
    // SAFETY: setgroups reads `groups.len()` gids from a live buffer.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // setfsgid/setfsuid return the previous value and cannot report errors
    // directly; calling again with an invalid id (-1) returns the current
    // value, which tells whether the change took.
    // SAFETY: plain syscalls on integer arguments.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, creds.gid);
        libc::syscall(libc::SYS_setfsuid, creds.uid);
    }
    // SAFETY: as above; -1 changes nothing and returns the current id.
    let (fsgid, fsuid) = unsafe {
        (
            libc::syscall(libc::SYS_setfsgid, u32::MAX),
            libc::syscall(libc::SYS_setfsuid, u32::MAX),
        )
    };
    if fsuid as u32 != creds.uid || fsgid as u32 != creds.gid {
        return Err(io::Error::other(format!(
            "cannot take the file identity of uid {} gid {}",
            creds.uid, creds.gid
        )));
    }
    Ok(())
}

/// Whether `user` may have process `pid` checkpointed into a file of
/// theirs: only if the kernel would let them trace it, since an image holds
/// everything a tracer could read (its memory, its open files). This is the
/// kernel's own rule, `ptrace_may_access` with
/// `PTRACE_MODE_ATTACH_REALCREDS`, for a caller without capabilities:
/// every uid and gid of the process (real, effective, saved; and the
/// filesystem ids, which follow the effective ones unless a privileged
/// process changed them) is the user's real uid and gid, the process holds
/// no capabilities, and it is dumpable (a process that changed credentials,
/// or runs a program the user may not read, is not). Root may checkpoint
/// any process.
///
/// Checked when a user registers a process, and again while the process is
/// frozen for every checkpoint: a registered process can become setuid
/// (exec) or not dumpable (drop privileges, `prctl`) at any time.
pub fn may_checkpoint(pid: i32, user: &UserCreds) -> crate::error::Result<()> {
    use crate::error::Error;
    use std::os::unix::fs::MetadataExt;
    if user.is_root() {
        return Ok(());
    }
    let status = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .map_err(|e| match e {
            procfs::ProcError::NotFound(_) => Error::NoSuchProcess(pid),
            other => Error::Other(format!("cannot read /proc/{pid}: {other}")),
        })?;
    let uids = [status.ruid, status.euid, status.suid, status.fuid];
    let gids = [status.rgid, status.egid, status.sgid, status.fgid];
    if uids.iter().any(|&u| u != user.uid) || gids.iter().any(|&g| g != user.gid) {
        return Err(Error::PermissionDenied {
            pid,
            hint: " (it runs with other user or group ids than yours: a setuid or setgid program, say; uid 0 may checkpoint it, its user may not)",
        });
    }
    if status.capeff != 0 || status.capprm != 0 {
        return Err(Error::PermissionDenied {
            pid,
            hint: " (it holds capabilities; uid 0 may checkpoint it, its user may not)",
        });
    }
    // The kernel gives the per-process files of a process that is not
    // dumpable to root (`task_dump_owner`; not its /proc/PID directory,
    // which keeps the effective uid for `ps`); /proc has no other way to
    // tell another process's dumpable flag.
    let dumpable = std::fs::metadata(format!("/proc/{pid}/mem"))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ESRCH) => Error::NoSuchProcess(pid),
            _ => Error::Other(format!("cannot read /proc/{pid}/mem: {e}")),
        })?
        .uid()
        == user.uid;
    if !dumpable {
        return Err(Error::PermissionDenied {
            pid,
            hint: " (it is not dumpable: it changed its credentials, dropping privileges say, or runs a program you may not read; uid 0 may checkpoint it, its user may not)",
        });
    }
    Ok(())
}

/// Open `path` for reading with `creds`' file rights, refusing anything
/// but a regular file. For files a user names to a root daemon: the open
/// is non-blocking, so a FIFO without a writer (or a device that waits for
/// a carrier) cannot hang the caller, and the type is checked on the
/// descriptor opened, not on the path, so swapping the file meanwhile
/// changes nothing. The descriptor is returned blocking again.
pub fn open_regular(creds: &UserCreds, path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = as_user(creds, || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
    })??;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        ));
    }
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> UserCreds {
        UserCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        }
    }

    #[test]
    fn a_user_thread_meets_the_users_permissions() {
        if !nix::unistd::geteuid().is_root() {
            return; // switching identity needs root
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").expect("write");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        // tempdir is 0700 root: nobody may not even enter it.
        let opened = as_user(&nobody(), || std::fs::File::open(&secret)).expect("thread");
        assert_eq!(
            opened.expect_err("nobody must not read it").kind(),
            io::ErrorKind::PermissionDenied
        );
        let created =
            as_user(&nobody(), || std::fs::write(dir.path().join("new"), "x")).expect("thread");
        assert!(
            created.is_err(),
            "nobody must not create files in root's dir"
        );
        // Root, on this thread, still can.
        assert!(std::fs::File::open(&secret).is_ok());
    }

    #[test]
    fn a_user_may_not_checkpoint_another_users_process() {
        let me = std::process::id() as i32;
        if nix::unistd::getuid().as_raw() == 65534 {
            return;
        }
        let err = may_checkpoint(me, &nobody()).expect_err("not nobody's process");
        assert!(err.to_string().contains("permission denied"), "{err}");
        let root = UserCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert!(may_checkpoint(me, &root).is_ok());
    }

    #[test]
    fn open_regular_refuses_a_fifo_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let me = UserCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        // Blocking, this would wait for a writer forever.
        let err = open_regular(&me, &fifo).expect_err("a FIFO is not a regular file");
        assert!(err.to_string().contains("a FIFO"), "{err}");
        assert!(open_regular(&me, dir.path()).is_err(), "a directory");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        let opened = open_regular(&me, &file).expect("a regular file");
        let flags = nix::fcntl::fcntl(&opened, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
        assert_eq!(flags & libc::O_NONBLOCK, 0, "left non-blocking");
    }
}
