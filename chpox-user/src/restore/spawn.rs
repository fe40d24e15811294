//! Creating the process to restore into, and holding it in a ptrace stop.
//!
//! The dance:
//! 1. The restorer blocks every signal in its own thread and calls
//!    `clone3` (flags 0, exit signal SIGCHLD, `set_tid` = the saved PID
//!    when wanted): a fork, so the child starts with every signal blocked.
//! 2. The child does only raw syscalls (it is a copy of a possibly
//!    multi-threaded chpox, where nothing else is safe): it asks for
//!    SIGKILL if the restorer dies, then sleeps in `pause()` forever. With
//!    every signal blocked, only SIGKILL (or ptrace) can end that.
//! 3. The restorer `PTRACE_SEIZE`s it (`TRACESYSGOOD` for the remote
//!    syscalls, `EXITKILL` so that a restorer that dies takes the
//!    half-built process with it) and `PTRACE_INTERRUPT`s it: the child
//!    reports `PTRACE_EVENT_STOP`, wherever it was (still in the kernel
//!    returning from clone3, or in pause).
//!
//! We do not let the child stop itself with SIGSTOP: that is a group-stop,
//! which a later `PTRACE_DETACH` re-establishes (the process would come
//! back stopped), and undoing it needs a SIGCONT the restored program
//! would see.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::unistd::Pid;
use tracing::debug;

use crate::error::{Error, Result};
use crate::ptrace::{Stop, wait_stop};

/// Which PID the restored process gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidMode {
    /// The saved PID, or fail if it is taken.
    Same,
    /// Whatever PID the kernel gives.
    Any,
    /// The saved PID if it is free, else a new one (with a warning).
    Prefer,
}

/// `struct clone_args`, up to `set_tid_size` (CLONE_ARGS_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
}

pub struct Spawned {
    pub pid: i32,
    pub same_pid: bool,
}

/// Create the child (see the module documentation) and hold it in a
/// ptrace stop, seized by the calling thread.
pub fn spawn(saved_pid: i32, mode: PidMode) -> Result<Spawned> {
    let (pid, same_pid) = match mode {
        PidMode::Any => (clone_any()?, false),
        PidMode::Same => match clone_child(Some(saved_pid), 0, Entry::Stub) {
            Ok(pid) => (pid, true),
            Err(Errno::EEXIST) => {
                return Err(Error::Other(format!(
                    "PID {saved_pid} is in use; restore with --pid any for a new PID"
                )));
            }
            Err(e) => {
                return Err(Error::Other(format!(
                    "cannot create a process with PID {saved_pid}: {e}{}",
                    if e == Errno::EPERM {
                        " (choosing the PID needs root or CAP_CHECKPOINT_RESTORE)"
                    } else {
                        ""
                    }
                )));
            }
        },
        PidMode::Prefer => match clone_child(Some(saved_pid), 0, Entry::Stub) {
            Ok(pid) => (pid, true),
            Err(e) => {
                debug!(saved_pid, error = %e, "saved PID not available");
                (clone_any()?, false)
            }
        },
    };
    if let Err(e) = seize(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(e);
    }
    debug!(pid, same_pid, "child created and held");
    Ok(Spawned { pid, same_pid })
}

fn clone_any() -> Result<i32> {
    clone_child(None, 0, Entry::Stub)
        .map_err(|e| Error::Other(format!("cannot create a process: {e}")))
}

/// Seize a new task of ours (the child, or a thread it made) and stop it.
pub(super) fn seize(tid: i32) -> Result<()> {
    let p = Pid::from_raw(tid);
    let options = ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_EXITKILL;
    let err = |op| move |source| Error::Ptrace { op, tid, source };
    ptrace::seize(p, options).map_err(err("seize"))?;
    ptrace::interrupt(p).map_err(err("interrupt"))?;
    loop {
        match wait_stop(tid)? {
            Stop::Event => return Ok(()),
            // Every signal is blocked in the child; only a signal sent
            // before it could block them would show here. Drop it.
            Stop::Signal(_) | Stop::Syscall => ptrace::cont(p, None).map_err(err("cont"))?,
            Stop::Exited => return Err(Error::Exited(tid)),
        }
    }
}

/// What a child of ours runs until the restorer takes it over.
#[derive(Clone, Copy)]
enum Entry {
    /// [`child_main`]: held by us, rebuilt into the restored process.
    Stub,
    /// [`init_main`]: PID 1 of a new PID namespace, told the root's PID
    /// through pipe `go` (whose write end `go_write` it closes).
    Init { go: i32, go_write: i32 },
}

/// The init of a new PID namespace for a restored tree, held by us like a
/// spawned child: the tree's root is forked from it, so that every
/// original PID is free. Once released and told the root's PID through
/// `go` (see [`start_init`]), it reaps whatever ends in the namespace and
/// exits with the root's exit status (128 + N if signal N killed it); its
/// exit ends every process left in the namespace.
pub struct NamespaceInit {
    pub pid: i32,
    go: std::os::fd::OwnedFd,
}

pub fn spawn_namespace_init() -> Result<NamespaceInit> {
    use std::os::fd::AsRawFd;
    let (go_read, go) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::Other(format!("cannot create a pipe: {e}")))?;
    let entry = Entry::Init {
        go: go_read.as_raw_fd(),
        go_write: go.as_raw_fd(),
    };
    let pid = clone_child(None, libc::CLONE_NEWPID as u64, entry).map_err(|e| {
        Error::Other(format!(
            "cannot create a PID namespace: {e}{}",
            if e == Errno::EPERM {
                " (it needs root or CAP_SYS_ADMIN)"
            } else {
                ""
            }
        ))
    })?;
    drop(go_read);
    if let Err(e) = seize(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(e);
    }
    debug!(pid, "namespace init created and held");
    Ok(NamespaceInit { pid, go })
}

/// Let the init (released by now) go on: it learns the root's PID as the
/// namespace numbers it, and reaps from then on.
pub fn start_init(init: NamespaceInit, root_pid_in_namespace: i32) -> Result<()> {
    use std::io::Write;
    std::fs::File::from(init.go)
        .write_all(&i64::from(root_pid_in_namespace).to_ne_bytes())
        .map_err(|e| Error::Other(format!("cannot start the namespace's init: {e}")))
}

/// Fork with clone3, the child running `entry`. Returns the child's PID,
/// or the errno of clone3 (EEXIST: `pid` is taken).
fn clone_child(pid: Option<i32>, flags: u64, entry: Entry) -> std::result::Result<i32, Errno> {
    let tids = [pid.unwrap_or(0)];
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid.is_some() {
            tids.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(pid.is_some()),
        ..Default::default()
    };
    let parent = std::process::id() as i64;
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of
    // our memory and runs on from here with only this thread; it calls
    // nothing but raw syscalls (`child_main` never returns). `args` and
    // `tids` outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        match entry {
            Entry::Stub => child_main(parent),
            Entry::Init { go, go_write } => init_main(go, go_write),
        }
    }
    let err = Errno::last();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    if ret < 0 {
        return Err(err);
    }
    Ok(ret as i32)
}

/// The child until the restorer takes it over: raw syscalls only.
fn child_main(parent: i64) -> ! {
    // SAFETY: plain syscalls with integer arguments; nothing here touches
    // memory another thread of the parent could have left inconsistent.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // The restorer died before PR_SET_PDEATHSIG took effect.
        if libc::syscall(libc::SYS_getppid) != parent {
            libc::syscall(libc::SYS_exit_group, 127);
        }
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

/// PID 1 of a restored tree's namespace: raw syscalls only, every signal
/// blocked (PID 1 gets no signal it does not handle anyway).
fn init_main(go: i32, go_write: i32) -> ! {
    // SAFETY: plain syscalls; the only memory they touch is on this
    // function's stack.
    unsafe {
        libc::syscall(libc::SYS_close, go_write);
        // Held by the restorer until then: if it dies first, the pipe ends
        // without a PID and so do we.
        let mut root: i64 = 0;
        let n = libc::syscall(libc::SYS_read, go, &raw mut root, 8);
        if n != 8 {
            libc::syscall(libc::SYS_exit_group, 127);
        }
        libc::syscall(libc::SYS_close, go);
        let mut root_status: i32 = 1 << 8;
        loop {
            let mut status: i32 = 0;
            let got = libc::syscall(
                libc::SYS_wait4,
                -1 as libc::c_long,
                &raw mut status,
                libc::__WALL,
                0,
            );
            if got == root {
                root_status = status;
            }
            // ECHILD: nobody is left.
            if got < 0 && *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
        let code = if libc::WIFSIGNALED(root_status) {
            128 + libc::WTERMSIG(root_status)
        } else {
            libc::WEXITSTATUS(root_status)
        };
        libc::syscall(libc::SYS_exit_group, code);
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}
