//! The agent's files: its run directory, its descriptor limit, and the
//! temporary images interrupted dumps left behind.

use super::*;

pub(super) fn prepare_run_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let socket = dir.join(SOCKET_NAME);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "another chpox-agent is already serving {}; stop it first",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Raise the soft limit on open descriptors to the hard one (at most
/// `fs.nr_open`): each connection and each file a dump holds open is a
/// descriptor, and the usual soft limit of 1024 is soon reached. Returns
/// the soft limit in force.
pub(super) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the descriptor limit");
            return 1024;
        }
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(e) => {
            warn!(error = %e, soft, hard, "cannot raise the descriptor limit");
            soft
        }
    }
}

/// Whether `name` is one of our temporary image files,
/// `.<image name>.chpox-tmp.<pid>.<n>` (as `image::writer` names them),
/// and if so the PID of the process that wrote it.
pub(super) fn temp_file_writer(name: &[u8]) -> Option<u32> {
    const MARK: &[u8] = b".chpox-tmp.";
    let rest = name.strip_prefix(b".")?;
    let at = rest.windows(MARK.len()).rposition(|w| w == MARK)?;
    if at == 0 {
        return None; // no image name
    }
    let tail = std::str::from_utf8(&rest[at + MARK.len()..]).ok()?;
    let (pid, n) = tail.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Whether the process that wrote a temporary file last modified at
/// `mtime` (Unix seconds) may still be writing it: a process `pid` exists
/// and started before then (a later one only reuses the PID).
pub(super) fn writer_may_live(pid: u32, mtime: i64) -> bool {
    let Some(started_ticks) = start_time(pid as i32) else {
        return false;
    };
    let Ok(boot) = procfs::boot_time_secs() else {
        return true; // cannot tell: keep the file
    };
    let ticks = procfs::ticks_per_second();
    let started = boot + started_ticks / ticks.max(1);
    // One second of slack for the rounding of both times.
    started <= u64::try_from(mtime).unwrap_or(0) + 1
}

/// Remove the temporary files interrupted dumps (a SIGKILLed agent, a
/// power loss) left in the image directory and in its per-user
/// directories: only regular files named exactly as the image writer names
/// them, whose writer is gone. Each directory is opened without following
/// a symlink and files are removed relative to it, so a user who controls
/// their own image directory cannot point this elsewhere. Best effort.
pub(super) fn remove_stale_temps(image_dir: &Path) {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    // The image directory is root's choice, a link to elsewhere included;
    // the per-user directories in it are not followed if links.
    let Ok(top) = nix::fcntl::open(image_dir, flags, Mode::empty()) else {
        return;
    };
    let mut dirs = vec![(image_dir.to_path_buf(), top)];
    for name in dir_names(&dirs[0].1) {
        // The per-user directories: /var/lib/chpox/UID.
        if !name.is_empty()
            && name.iter().all(u8::is_ascii_digit)
            && let Ok(fd) = openat(
                &dirs[0].1,
                name.as_slice(),
                flags | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
        {
            let path = image_dir.join(std::ffi::OsStr::from_bytes(&name));
            dirs.push((path, fd));
        }
    }
    for (path, dir) in &dirs {
        for name in dir_names(dir) {
            let Some(pid) = temp_file_writer(&name) else {
                continue;
            };
            let Ok(st) = nix::sys::stat::fstatat(
                dir,
                name.as_slice(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || writer_may_live(pid, st.st_mtime) {
                continue;
            }
            let file = path.join(std::ffi::OsStr::from_bytes(&name));
            match nix::unistd::unlinkat(
                dir,
                name.as_slice(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) => {
                    info!(file = %file.display(), bytes = st.st_size, "removed a temporary file left by an interrupted dump")
                }
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "cannot remove a stale temporary file")
                }
            }
        }
    }
}

/// The names in directory `dir` (not `.` and `..`).
pub(super) fn dir_names(dir: &std::os::fd::OwnedFd) -> Vec<Vec<u8>> {
    use nix::fcntl::OFlag;
    let Ok(mut listing) = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) else {
        return Vec::new();
    };
    listing
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_exact_temp_names_match() {
        assert_eq!(
            temp_file_writer(b".job-12.chpox.chpox-tmp.4242.0"),
            Some(4242)
        );
        assert_eq!(temp_file_writer(b".a.chpox-tmp.b.chpox-tmp.7.12"), Some(7));
        for other in [
            &b"job.chpox.chpox-tmp.42.0"[..],
            b".job.chpox-tmp.42",
            b".job.chpox-tmp.42.",
            b".job.chpox-tmp.x.0",
            b".job.chpox-tmp.42.0.bak",
            b"..chpox-tmp.42.0",
            b".chpox-tmp.42.0",
            b".job.chpox",
        ] {
            assert_eq!(
                temp_file_writer(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
