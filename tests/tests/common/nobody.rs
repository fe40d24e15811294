//! Helpers for tests that play a hostile local user: processes that run
//! as `nobody`, setuid copies, processes forked from the test that change
//! their credentials without exec, and sockets connected with nobody's
//! credentials.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::agent::{NOBODY, Scratch, no_core, poll, proc_status};
use super::{Target, chmod};

/// The four uids of /proc/PID/status: real, effective, saved, filesystem.
pub fn uids(pid: i32) -> Vec<u32> {
    proc_status(pid, "Uid:")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect()
}

/// A command run by `nobody`, its output in `s.logs`, started once it
/// printed READY.
pub fn nobody_command(s: &Scratch, mut cmd: Command, name: &str) -> Target {
    cmd.uid(NOBODY).gid(NOBODY);
    no_core(&mut cmd, &s.logs);
    Target::spawn_command(cmd, name, &s.logs)
}

/// A copy of `program` in the scratch space, setuid root (mode 4755).
pub fn setuid_root_copy(s: &Scratch, program: &str, name: &str) -> PathBuf {
    let dir = s.dir("bin", 0o755);
    let copy = dir.join(name);
    fs::copy(program, &copy).unwrap_or_else(|e| panic!("copy {program}: {e}"));
    chmod(&copy, 0o4755);
    copy
}

/// Waits until process `pid` runs with effective uid 0.
pub fn wait_euid_root(pid: i32) {
    poll(
        &format!("PID {pid} to run with euid 0"),
        Duration::from_secs(10),
        || format!("uids {:?}", uids(pid)),
        || (uids(pid).get(1) == Some(&0)).then_some(()),
    );
}

/// How a [`Forked`] process starts.
pub enum Start {
    /// As root: read `secret`, then drop to nobody (every uid and gid),
    /// which leaves it not dumpable.
    RootReadsThenDrops(CString),
    /// As nobody, dumpable.
    Nobody,
}

/// A process forked from this test, without exec (which would make a
/// process that changed its credentials dumpable again), driven through a
/// pipe: each `N` byte makes it not dumpable; it answers on another pipe.
pub struct Forked {
    pub pid: i32,
    commands: File,
    answers: File,
}

/// Raw syscalls, valid between fork and exit in a child of a
/// multi-threaded process: no allocation, no lock.
pub fn set_ids_nobody() -> bool {
    let n = NOBODY as libc::c_long;
    // SAFETY: integer arguments only; setgroups with size 0 reads nothing.
    unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            0 as libc::c_long,
            std::ptr::null::<u32>(),
        ) == 0
            && libc::syscall(libc::SYS_setresgid, n, n, n) == 0
            && libc::syscall(libc::SYS_setresuid, n, n, n) == 0
    }
}

impl Forked {
    pub fn start(how: Start) -> Forked {
        let (cmd_r, cmd_w) = nix::unistd::pipe().expect("pipe");
        let (ans_r, ans_w) = nix::unistd::pipe().expect("pipe");
        let devnull = CString::new("/dev/null").expect("path");
        // SAFETY: the child runs only async-signal-safe system calls on
        // memory prepared before the fork, then exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above.
            unsafe { forked_child(&how, cmd_r.as_raw_fd(), ans_w.as_raw_fd(), &devnull) }
        }
        drop((cmd_r, ans_w));
        let mut f = Forked {
            pid,
            commands: File::from(cmd_w),
            answers: File::from(ans_r),
        };
        f.expect_answer(b'R');
        f
    }

    fn expect_answer(&mut self, want: u8) {
        let mut fds = [libc::pollfd {
            fd: self.answers.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll reads and writes the one pollfd we own.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) };
        assert_eq!(ready, 1, "forked process {} did not answer", self.pid);
        let mut got = [0u8];
        self.answers.read_exact(&mut got).expect("answer");
        assert_eq!(got[0], want, "forked process {} failed", self.pid);
    }

    /// Make it not dumpable (`prctl(PR_SET_DUMPABLE, 0)`).
    pub fn make_undumpable(&mut self) {
        self.commands.write_all(b"N").expect("command");
        self.expect_answer(b'N');
    }
}

/// The forked process: see [`Forked`].
///
/// # Safety
///
/// Only in the child right after fork.
pub unsafe fn forked_child(how: &Start, commands: i32, answers: i32, devnull: &CString) -> ! {
    // SAFETY (whole function): async-signal-safe system calls on our own
    // stack and on memory prepared before the fork.
    unsafe {
        // Not a single descriptor of this test process stays open in here
        // (another test waits for EOF on some pipe), nor its stdout.
        let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        let (lo, hi) = (commands.min(answers), commands.max(answers));
        for (first, last) in [(3, lo - 1), (lo + 1, hi - 1), (hi + 1, i32::MAX)] {
            if first <= last {
                libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32);
            }
        }
        let mut secret = [0u8; 256];
        let ok = match how {
            Start::RootReadsThenDrops(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                let read = fd >= 0 && libc::read(fd, secret.as_mut_ptr().cast(), secret.len()) > 0;
                libc::close(fd);
                read && set_ids_nobody()
            }
            Start::Nobody => set_ids_nobody() && libc::prctl(libc::PR_SET_DUMPABLE, 1) == 0,
        };
        std::hint::black_box(&secret);
        let answer: u8 = if ok { b'R' } else { b'E' };
        libc::write(answers, (&answer as *const u8).cast(), 1);
        loop {
            let mut c = 0u8;
            if libc::read(commands, (&mut c as *mut u8).cast(), 1) != 1 {
                libc::_exit(0);
            }
            if c == b'N' {
                libc::prctl(libc::PR_SET_DUMPABLE, 0);
                libc::write(answers, (&c as *const u8).cast(), 1);
            }
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own unreaped child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Whether `pid` is dumpable, as the kernel shows it: the files of a
/// process that is not belong to root (its /proc/PID directory does not).
pub fn dumpable_as(pid: i32, uid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/mem")).is_ok_and(|m| m.uid() == uid)
}

// ---------------------------------------------------------------------------
// Sockets as nobody

/// Runs `f` on a thread with nobody's credentials. The kernel keeps
/// credentials per thread, and the raw system calls change only the
/// calling thread's (glibc's wrappers would change every thread's), so the
/// rest of this process stays root; sockets the thread connects carry
/// nobody's credentials (SO_PEERCRED).
pub fn as_nobody<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                assert!(set_ids_nobody(), "{}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("nobody's thread")
    })
}

/// A connection to the agent that never waits: `Err` if the listen queue
/// is full.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    // SAFETY: we own the descriptor and hand it over.
    Ok(unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}

/// Whether the agent closed this (non-blocking) connection: EOF after
/// whatever it said, or an error.
pub fn closed_by_peer(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Raise this test process's soft descriptor limit to its hard one.
pub fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}
