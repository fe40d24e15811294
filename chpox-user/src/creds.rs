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
}
