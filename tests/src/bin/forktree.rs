//! `forktree shared DIR` | `forktree zombie DIR` | `forktree session` |
//! `forktree sharedfs DIR` | `forktree reaper PROGRAM [ARGS...]`
//!
//! Process trees for `tests/tree.rs`. The tree modes print `READY ...`
//! once the whole tree is set up; `shared` and `zombie` then wait until the
//! file `DIR/go` exists (polled every 10 ms, no time limit), `session`
//! until its child's process group gets SIGUSR1. After the trigger every
//! wait has a 10 s limit, and a check that fails prints a `FAIL ...` line
//! and makes the root exit 1.
//!
//! * `shared DIR`: opens `DIR/shared.log` (`O_WRONLY|O_CREAT|O_TRUNC`, no
//!   `O_APPEND`: what moves is the one offset parent and child share through
//!   `fork`) and writes `parent-before\n`; maps one page
//!   `MAP_SHARED|MAP_ANONYMOUS`; forks. The child writes `child-before\n`
//!   through the inherited fd and stores a word in the page; the parent
//!   waits for that word, then prints `READY child=<pid> fd=<fd>
//!   map=0x<addr>`. After `go`, turn by turn through the page: the parent
//!   writes `parent-after\n` and stores a word; the child sees that word and
//!   the offset the parent's write left (`CHILD MAP OK`, `CHILD OFFSET OK`),
//!   writes `child-after\n`, stores a word and exits 0; the parent sees the
//!   child's word and the offset after its write (`PARENT MAP OK`,
//!   `PARENT OFFSET OK`), reaps it (`CHILD EXIT OK`) and reads the file back
//!   (`FILE OK`: the four lines in that order). Exit 0.
//! * `zombie DIR`: forks a child that exits with status 7 and is not reaped
//!   (the parent waits for it with `WNOWAIT`), and a child that stops itself
//!   with SIGSTOP (the parent waits for the stop). Prints `READY
//!   zombie=<pid> stopped=<pid>`. After `go`: reaps the zombie (`ZOMBIE
//!   exit=7`), sends the stopped child SIGCONT, upon which it exits with 9,
//!   and reaps it (`STOPPED exit=9`). Exit 0.
//! * `session`: becomes a session leader (`setsid`), forks a child that
//!   makes its own process group (`setpgid(0, 0)`) and forks a grandchild
//!   in that group. All three have a SIGUSR1 handler that prints `USR1
//!   root`, `USR1 child` or `USR1 grandchild`. Prints `READY child=<pid>
//!   grandchild=<pid>`. On SIGUSR1 the grandchild exits 0, the child reaps
//!   it (`CHILD REAPED GRANDCHILD exit=0`) and exits 0, and the root, which
//!   waits for the child all along, reaps it (`ROOT REAPED CHILD exit=0`)
//!   and exits 0. `kill -USR1 -- -<child>` thus prints the two `USR1` lines
//!   of the group (in either order) and then those two.
//! * `sharedfs DIR`: makes a child with `clone(CLONE_FS)` (a fork that
//!   shares the working directory and umask with its parent); both start
//!   in DIR. Prints `READY child=<pid>`. After `go` (`DIR/go`), the child
//!   changes directory to `DIR/sub` and sets umask 077, and exits 0; the
//!   parent reaps it and prints `CWD <its working directory, relative to
//!   DIR>` and `UMASK <its umask, octal>`: `CWD sub` and `UMASK 77` when the
//!   context is shared. Exit 0.
//! * `reaper PROGRAM [ARGS...]`: becomes a child subreaper, runs PROGRAM
//!   (stdio inherited) and waits for it. Every process PROGRAM left behind
//!   has been reparented to the reaper by then: each child of the reaper
//!   that does not exit by itself within 2 s is reported as `LEFT pid=<pid>
//!   comm=<comm> state=<state>`, killed and reaped (and so on for what it
//!   leaves in turn). Ends with `REAPER exit=<PROGRAM's exit code, or 128 +
//!   signal> left=<number of LEFT lines>` and exits 0.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chpox_tests::{check, install_handler, say, sleep_interruptible};

const POLL: Duration = Duration::from_millis(10);
const LIMIT: Duration = Duration::from_secs(10);
const PAGE: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("shared") => shared(Path::new(dir_arg(&args))),
        Some("zombie") => zombie(Path::new(dir_arg(&args))),
        Some("session") => session(),
        Some("sharedfs") => shared_fs(Path::new(dir_arg(&args))),
        Some("reaper") if args.len() >= 2 => reaper(&args[1], &args[2..]),
        _ => panic!("usage: forktree shared DIR | zombie DIR | session | reaper PROGRAM [ARGS...]"),
    }
}

fn dir_arg(args: &[String]) -> &str {
    args.get(1).map(String::as_str).expect("DIR argument")
}

/// One page `MAP_SHARED | MAP_ANONYMOUS`, seen as 64-bit atomic words.
fn shared_words() -> &'static [AtomicU64] {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the page is zero-filled, aligned, never unmapped, and only
    // ever accessed through these atomics (by this process and its forks).
    unsafe { std::slice::from_raw_parts(p.cast::<AtomicU64>(), PAGE / 8) }
}

/// Polls `f` every 10 ms until it holds; gives up after `limit` (`None`:
/// never). Returns whether it held.
fn poll(limit: Option<Duration>, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if limit.is_some_and(|l| start.elapsed() >= l) {
            return false;
        }
        sleep_interruptible(POLL);
    }
}

/// Waits, without a time limit, until `DIR/go` exists.
fn wait_for_go(dir: &Path) {
    let go = dir.join("go");
    poll(None, || go.exists());
}

fn fork() -> libc::pid_t {
    // SAFETY: the programs here are single-threaded when they fork, so the
    // child may go on running Rust code.
    check(unsafe { libc::fork() }, "fork")
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit skips atexit handlers and stdio buffers (say flushes
    // every line), which a forked child must not run twice.
    unsafe { libc::_exit(code) }
}

/// `waitpid(pid, 0)`, retried on EINTR; the raw status or the error.
fn wait_child(pid: libc::pid_t, flags: libc::c_int) -> Result<libc::c_int, std::io::Error> {
    loop {
        let mut status = 0;
        // SAFETY: waiting for a child of ours into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc == pid {
            return Ok(status);
        }
        let err = std::io::Error::last_os_error();
        if rc == -1 && err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(err);
    }
}

/// `exit=N` for a normal exit, else the raw status.
fn describe_status(status: Result<libc::c_int, std::io::Error>) -> String {
    match status {
        Ok(s) if libc::WIFEXITED(s) => format!("exit={}", libc::WEXITSTATUS(s)),
        Ok(s) if libc::WIFSIGNALED(s) => format!("signal={}", libc::WTERMSIG(s)),
        Ok(s) => format!("status={s:#x}"),
        Err(e) => format!("error={e}"),
    }
}

fn write_all(fd: libc::c_int, bytes: &[u8]) {
    // SAFETY: writes from a live buffer.
    let n = check(
        unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) },
        "write",
    );
    assert_eq!(n as usize, bytes.len(), "short write");
}

fn offset(fd: libc::c_int) -> i64 {
    // SAFETY: lseek on our own descriptor.
    check(unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }, "lseek")
}

// ---------------------------------------------------------------------------
// shared

const PARENT_BEFORE: &[u8] = b"parent-before\n";
const CHILD_BEFORE: &[u8] = b"child-before\n";
const PARENT_AFTER: &[u8] = b"parent-after\n";
const CHILD_AFTER: &[u8] = b"child-after\n";

/// Words of the shared page.
const W_PARENT_BEFORE: usize = 0;
const W_CHILD_BEFORE: usize = 1;
const W_TURN: usize = 2;
const W_PARENT_AFTER: usize = 3;
const W_CHILD_AFTER: usize = 4;

const V_PARENT_BEFORE: u64 = 0x1111_2222_3333_4444;
const V_CHILD_BEFORE: u64 = 0x5555_6666_7777_8888;
const V_PARENT_AFTER: u64 = 0xa11c_e000_0000_0001;
const V_CHILD_AFTER: u64 = 0xb0b0_0000_0000_0002;

fn shared(dir: &Path) {
    let path = dir.join("shared.log");
    let c = CString::new(path.as_os_str().as_bytes()).expect("path contains NUL");
    // SAFETY: c is a valid NUL-terminated path.
    let fd = check(
        unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            )
        },
        "open shared.log",
    );
    write_all(fd, PARENT_BEFORE);
    let words = shared_words();
    words[W_PARENT_BEFORE].store(V_PARENT_BEFORE, Ordering::SeqCst);

    let child = fork();
    if child == 0 {
        shared_child(dir, fd, words);
    }
    if !poll(Some(LIMIT), || {
        words[W_CHILD_BEFORE].load(Ordering::SeqCst) == V_CHILD_BEFORE
    }) {
        panic!("the child did not set up within {LIMIT:?}");
    }
    say!(
        "READY child={child} fd={fd} map={:#x}",
        words.as_ptr() as usize
    );

    wait_for_go(dir);
    let mut ok = true;
    write_all(fd, PARENT_AFTER);
    words[W_PARENT_AFTER].store(V_PARENT_AFTER, Ordering::SeqCst);
    words[W_TURN].store(1, Ordering::SeqCst);
    if !poll(Some(LIMIT), || words[W_TURN].load(Ordering::SeqCst) == 2) {
        say!("FAIL parent: the child did not take its turn within {LIMIT:?}");
        // SAFETY: plain kill of our child.
        unsafe { libc::kill(child, libc::SIGKILL) };
        let _ = wait_child(child, 0);
        std::process::exit(1);
    }
    let before = words[W_CHILD_BEFORE].load(Ordering::SeqCst);
    let after = words[W_CHILD_AFTER].load(Ordering::SeqCst);
    if before == V_CHILD_BEFORE && after == V_CHILD_AFTER {
        say("PARENT MAP OK");
    } else {
        say!("FAIL parent map: child-before word {before:#x}, child-after word {after:#x}");
        ok = false;
    }
    let want =
        (PARENT_BEFORE.len() + CHILD_BEFORE.len() + PARENT_AFTER.len() + CHILD_AFTER.len()) as i64;
    match offset(fd) {
        o if o == want => say("PARENT OFFSET OK"),
        o => {
            say!("FAIL parent offset {o}, want {want}");
            ok = false;
        }
    }
    match describe_status(wait_child(child, 0)).as_str() {
        "exit=0" => say("CHILD EXIT OK"),
        other => {
            say!("FAIL child {other}");
            ok = false;
        }
    }
    let want_file = [PARENT_BEFORE, CHILD_BEFORE, PARENT_AFTER, CHILD_AFTER].concat();
    match std::fs::read(&path) {
        Ok(got) if got == want_file => say("FILE OK"),
        Ok(got) => {
            say!("FAIL file {:?}", String::from_utf8_lossy(&got));
            ok = false;
        }
        Err(e) => {
            say!("FAIL file: {e}");
            ok = false;
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn shared_child(dir: &Path, fd: libc::c_int, words: &[AtomicU64]) -> ! {
    assert_eq!(
        words[W_PARENT_BEFORE].load(Ordering::SeqCst),
        V_PARENT_BEFORE
    );
    write_all(fd, CHILD_BEFORE);
    words[W_CHILD_BEFORE].store(V_CHILD_BEFORE, Ordering::SeqCst);

    wait_for_go(dir);
    if !poll(Some(LIMIT), || words[W_TURN].load(Ordering::SeqCst) == 1) {
        say!("FAIL child: the parent did not take its turn within {LIMIT:?}");
        exit_now(1);
    }
    let mut ok = true;
    let before = words[W_PARENT_BEFORE].load(Ordering::SeqCst);
    let after = words[W_PARENT_AFTER].load(Ordering::SeqCst);
    if before == V_PARENT_BEFORE && after == V_PARENT_AFTER {
        say("CHILD MAP OK");
    } else {
        say!("FAIL child map: parent-before word {before:#x}, parent-after word {after:#x}");
        ok = false;
    }
    let want = (PARENT_BEFORE.len() + CHILD_BEFORE.len() + PARENT_AFTER.len()) as i64;
    match offset(fd) {
        o if o == want => say("CHILD OFFSET OK"),
        o => {
            say!("FAIL child offset {o}, want {want}");
            ok = false;
        }
    }
    write_all(fd, CHILD_AFTER);
    words[W_CHILD_AFTER].store(V_CHILD_AFTER, Ordering::SeqCst);
    words[W_TURN].store(2, Ordering::SeqCst);
    exit_now(if ok { 0 } else { 1 });
}

// ---------------------------------------------------------------------------
// zombie

fn zombie(dir: &Path) {
    let zombie = fork();
    if zombie == 0 {
        exit_now(7);
    }
    let stopped = fork();
    if stopped == 0 {
        // SAFETY: raise has no preconditions.
        unsafe { libc::raise(libc::SIGSTOP) };
        exit_now(9);
    }
    // Wait for the exit without reaping: it stays a zombie.
    // SAFETY: an all-zero siginfo_t is valid; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child into a local.
    check(
        unsafe {
            libc::waitid(
                libc::P_PID,
                zombie as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        },
        "waitid(WNOWAIT)",
    );
    let status = wait_child(stopped, libc::WUNTRACED).expect("waitpid(WUNTRACED)");
    assert!(
        libc::WIFSTOPPED(status),
        "the second child did not stop: {status:#x}"
    );
    say!("READY zombie={zombie} stopped={stopped}");

    wait_for_go(dir);
    say!("ZOMBIE {}", describe_status(wait_child(zombie, 0)));
    // SAFETY: plain kill of our child.
    if unsafe { libc::kill(stopped, libc::SIGCONT) } == -1 {
        say!("FAIL SIGCONT: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    say!("STOPPED {}", describe_status(wait_child(stopped, 0)));
}

// ---------------------------------------------------------------------------
// session

/// 0 root, 1 child, 2 grandchild: which line the SIGUSR1 handler writes.
static ROLE: AtomicUsize = AtomicUsize::new(0);
static GOT_USR1: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_sig: libc::c_int) {
    const LINES: [&[u8]; 3] = [b"USR1 root\n", b"USR1 child\n", b"USR1 grandchild\n"];
    let line = LINES[ROLE.load(Ordering::SeqCst).min(2)];
    // SAFETY: write is async-signal-safe; line is a static.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    GOT_USR1.store(true, Ordering::SeqCst);
}

fn session() {
    // SAFETY: setsid has no preconditions.
    check(unsafe { libc::setsid() }, "setsid");
    install_handler(libc::SIGUSR1, on_usr1, libc::SA_RESTART, &[]);
    let grandchild_pid = &shared_words()[0];

    let child = fork();
    if child == 0 {
        ROLE.store(1, Ordering::SeqCst);
        // SAFETY: setpgid has no memory-safety preconditions.
        check(unsafe { libc::setpgid(0, 0) }, "setpgid");
        let grandchild = fork();
        if grandchild == 0 {
            ROLE.store(2, Ordering::SeqCst);
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() };
            grandchild_pid.store(me as u64, Ordering::SeqCst);
            poll(None, || GOT_USR1.load(Ordering::SeqCst));
            exit_now(0);
        }
        poll(None, || GOT_USR1.load(Ordering::SeqCst));
        say!(
            "CHILD REAPED GRANDCHILD {}",
            describe_status(wait_child(grandchild, 0))
        );
        exit_now(0);
    }
    // Also from here, so the group exists whichever runs first.
    // SAFETY: as above.
    let rc = unsafe { libc::setpgid(child, child) };
    if rc == -1 {
        let err = std::io::Error::last_os_error();
        // EACCES: the child got there first and went on.
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "setpgid: {err}");
    }
    if !poll(Some(LIMIT), || grandchild_pid.load(Ordering::SeqCst) != 0) {
        panic!("the grandchild did not start within {LIMIT:?}");
    }
    let grandchild = grandchild_pid.load(Ordering::SeqCst);
    say!("READY child={child} grandchild={grandchild}");
    say!(
        "ROOT REAPED CHILD {}",
        describe_status(wait_child(child, 0))
    );
}

// ---------------------------------------------------------------------------
// reaper

/// Our children now, from `/proc/*/stat`: (pid, comm, state).
fn children_of(parent: i32) -> Vec<(i32, String, char)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) =
            std::fs::read_to_string(PathBuf::from("/proc").join(pid.to_string()).join("stat"))
        else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push((pid, comm, state));
        }
    }
    out
}

/// Reaps `pid` if it has exited; true also when it is not our child (any
/// more).
fn try_reap(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waiting into a local.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    rc == pid || rc == -1
}

fn reaper(program: &str, args: &[String]) {
    // SAFETY: plain prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        "PR_SET_CHILD_SUBREAPER",
    );
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let me = std::process::id() as i32;
    let mut left = 0;
    loop {
        let kids = children_of(me);
        if kids.is_empty() {
            break;
        }
        for (pid, comm, state) in kids {
            // A process on its way out (killed by PROGRAM just before it
            // exited, say) is reaped here within moments.
            if poll(Some(Duration::from_secs(2)), || try_reap(pid)) {
                continue;
            }
            say!("LEFT pid={pid} comm={comm} state={state}");
            left += 1;
            // SAFETY: plain kill of a process reparented to us.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_child(pid, 0);
        }
    }
    say!("REAPER exit={code} left={left}");
}

fn shared_fs(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir sub");
    std::env::set_current_dir(dir).expect("chdir DIR");
    // SAFETY: clone without CLONE_VM is a fork (with the filesystem context
    // shared); the child only makes raw syscalls and std calls that do not
    // need locks another thread could hold (this program is one thread).
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_FS | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    assert!(
        child >= 0,
        "clone(CLONE_FS): {}",
        std::io::Error::last_os_error()
    );
    if child == 0 {
        let go = dir.join("go");
        while !go.exists() {
            std::thread::sleep(POLL);
        }
        std::env::set_current_dir("sub").expect("chdir sub");
        // SAFETY: umask only sets a process attribute.
        unsafe { libc::umask(0o077) };
        // SAFETY: leaves without running the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    say!("READY child={child}");
    let mut status = 0;
    // SAFETY: waits for our own child into a local.
    check(
        unsafe { libc::waitpid(child as i32, &mut status, 0) },
        "waitpid",
    );
    let cwd = std::env::current_dir().expect("cwd");
    let rel = cwd
        .strip_prefix(std::fs::canonicalize(dir).expect("canonicalize DIR"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| cwd.display().to_string());
    // SAFETY: umask only reads and sets a process attribute.
    let mask = unsafe {
        let m = libc::umask(0);
        libc::umask(m);
        m
    };
    say!("CWD {rel}");
    say!("UMASK {mask:o}");
}
