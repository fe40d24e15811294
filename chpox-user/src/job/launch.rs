//! Starting the job and what surrounds it: the image's lock, a restore
//! or a fresh start as our child (registered either way), the pidfile.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::info;

use super::{JobError, JobOptions, state, sys};
use crate::control::{self, RegisterRequest, Request};

/// Whether there is an image to restore. A missing file means a first
/// run; anything at the path that is not a regular file is refused.
pub(super) fn image_exists(image: &Path) -> Result<bool, JobError> {
    match std::fs::symlink_metadata(image) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(_) => Err(JobError::Path {
            path: image.display().to_string(),
            reason: "not a regular file; give the path of an image, or of one to create".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(JobError::Path {
            path: image.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// One `chpox job` per image: a second one would restore the job again
/// beside the first, and both would write the same image.
pub(super) fn lock_image(image: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, JobError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = image.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| JobError::Path {
            path: path.display().to_string(),
            reason: format!("cannot create the job's lock file next to its image: {e}"),
        })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            // Who holds it, for the message a second one prints.
            let _ = lock.set_len(0);
            let _ = lock.write_all(format!("{}\n", std::process::id()).as_bytes());
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(JobError::InUse {
                image: image.display().to_string(),
                pid: text.trim().parse().ok(),
            })
        }
        Err((_, e)) => Err(sys("flock")(e)),
    }
}

/// Restore the job from its image, as our child, and register it again as
/// it was registered. Returns its PID and the PID to wait for.
pub(super) fn restore(image: &Path, run_dir: &Path) -> Result<(i32, i32), JobError> {
    let restored = crate::restore::restore(image, &crate::restore::RestoreOptions::default())
        .map_err(|source| JobError::Restore {
            image: image.display().to_string(),
            source,
        })?;
    let saved = restored.registration;
    let req = RegisterRequest {
        signal: saved.map_or(chpox_common::DEFAULT_TRIGGER_SIGNAL, |r| r.signal),
        flags: saved.map_or(
            chpox_common::flags::REGISTERED | chpox_common::flags::INCLUDE_CHILDREN,
            |r| r.flags,
        ),
        output: Some(image.to_path_buf()),
        // A job's image stands alone (see `launch` below).
        full_every: Some(1),
        ..RegisterRequest::new(restored.pid)
    };
    if let Err(source) = control::request(run_dir, &Request::Register(req), Duration::from_secs(60))
    {
        // It ran for a moment only: the image still holds all it did. A
        // job nobody can checkpoint must not run on as if it could be.
        kill_tree(restored.pid);
        let _ = crate::restore::wait(restored.wait_pid);
        return Err(JobError::Register {
            pid: restored.pid,
            source,
        });
    }
    // An image taken for a requeue holds the job stopped (see
    // `checkpoint_now`): here it runs on.
    let tree = crate::tree::descendants_now(restored.pid);
    if tree.iter().any(|&p| state(p) == Some('T')) {
        info!(
            pid = restored.pid,
            "the job was checkpointed stopped; continuing it"
        );
        for p in tree {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGCONT);
        }
    }
    info!(pid = restored.pid, image = %image.display(), "restored");
    eprintln!(
        "chpox: job restored from {} as PID {}",
        image.display(),
        restored.pid
    );
    Ok((restored.pid, restored.wait_pid))
}

/// Stopped first, the root forks no more; then it and its descendants go.
fn kill_tree(pid: i32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGSTOP);
    for p in crate::tree::descendants_now(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Start the command as our child, registered before its first
/// instruction (as `chpox run` does for itself): the child ignores the
/// trigger signal, tells us it is ready, waits until we have registered
/// it, and only then execs.
pub(super) fn start(opts: &JobOptions, image: &Path, run_dir: &Path) -> Result<i32, JobError> {
    let (program, _) = opts.command.split_first().ok_or_else(|| JobError::Start {
        program: "the job".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
    })?;
    let program_name = Path::new(program).display().to_string();
    let argv: Vec<CString> = opts
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| JobError::Start {
            program: program_name.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an argument contains a NUL byte",
            ),
        })?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let signo = opts.signal as i32;
    Signal::try_from(signo).map_err(sys("the trigger signal"))?;

    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    // SAFETY: the child runs `child_exec` only, which makes raw system
    // calls on memory prepared before the fork (argv, the pipes) and never
    // returns; nothing in it depends on locks another thread could hold.
    let child = match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        nix::unistd::ForkResult::Child => {
            child_exec(signo, &ready_r, &ready_w, &go_r, &go_w, &argv_ptrs)
        }
        nix::unistd::ForkResult::Parent { child } => child.as_raw(),
    };
    drop(ready_w);
    drop(go_r);
    let mut ready = std::fs::File::from(ready_r);
    let mut go = std::fs::File::from(go_w);
    let failed = |what: String, source: std::io::Error| {
        let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(child), None);
        JobError::Start {
            program: what,
            source,
        }
    };
    use std::io::{Read, Write};
    let mut byte = [0u8; 1];
    if let Err(e) = ready.read_exact(&mut byte) {
        return Err(failed(program_name, e));
    }
    let req = RegisterRequest {
        signal: opts.signal,
        flags: opts.flags,
        output: Some(image.to_path_buf()),
        self_ignored: true,
        name: Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        // Full images only: a job falls back to FILE.1 when a checkpoint
        // caught its termination (`caught`), and a requeued job may be
        // given its image alone; an increment would need its base too.
        full_every: Some(1),
        ..RegisterRequest::new(child)
    };
    if let Err(source) = control::request(run_dir, &Request::Register(req), Duration::from_secs(60))
    {
        let _ = failed(program_name, std::io::Error::other("not started"));
        return Err(JobError::Register { pid: child, source });
    }
    if let Err(e) = go.write_all(b"g") {
        return Err(failed(program_name, e));
    }
    drop(go);
    // EOF: the exec closed the pipe. Four bytes: its errno.
    let mut errno = [0u8; 4];
    match ready.read(&mut errno) {
        Ok(0) => {
            info!(pid = child, program = %program_name, "started");
            Ok(child)
        }
        Ok(_) => {
            let err = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
            let _ = nix::sys::wait::waitpid(Pid::from_raw(child), None);
            let _ = control::request(
                run_dir,
                &Request::Unregister { pid: child },
                Duration::from_secs(10),
            );
            Err(JobError::Start {
                program: program_name,
                source: err,
            })
        }
        Err(e) => Err(failed(program_name, e)),
    }
}

/// The forked child until it is the command: raw system calls only.
fn child_exec(
    signo: i32,
    ready_r: &OwnedFd,
    ready_w: &OwnedFd,
    go_r: &OwnedFd,
    go_w: &OwnedFd,
    argv: &[*const libc::c_char],
) -> ! {
    // SAFETY: async-signal-safe calls on descriptors and memory that the
    // fork copied; `argv` is NULL-terminated and its strings outlive us.
    unsafe {
        libc::close(ready_r.as_raw_fd());
        libc::close(go_w.as_raw_fd());
        let ready = ready_w.as_raw_fd();
        // The trigger is harmless from the first instruction on (SIG_IGN
        // survives execve); the agent checks it when registering.
        let mut ign: libc::sigaction = std::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(signo, &ign, std::ptr::null_mut());
        if libc::write(ready, b"r".as_ptr().cast(), 1) != 1 {
            libc::_exit(127);
        }
        let mut go = 0u8;
        if libc::read(go_r.as_raw_fd(), (&raw mut go).cast(), 1) != 1 {
            libc::_exit(127);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execvp(argv[0], argv.as_ptr());
        let errno = *libc::__errno_location();
        libc::write(ready, (&raw const errno).cast(), 4);
        libc::_exit(127);
    }
}

/// Written whole or not at all: a reader never sees a half-written PID.
pub(super) fn write_pidfile(path: &Path, pid: i32) -> Result<(), String> {
    let tmp = {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".tmp{}", std::process::id()));
        PathBuf::from(name)
    };
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write the pidfile {}: {e}", path.display())
        })
}

/// Remove the pidfile if it still names the job.
pub(super) fn remove_pidfile(path: &Path, pid: i32) {
    if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == pid.to_string()) {
        let _ = std::fs::remove_file(path);
    }
}
