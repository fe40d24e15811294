//! Root restoring an image it did not make: an image is checksummed, not
//! signed, so whoever can write the file can change anything in it and
//! seal it again. Restore trusts an image only as far as the owner of the
//! image file could have made it.
//!
//! Each test dumps a real process of `nobody` (so the image belongs to
//! `nobody`, as a user's own checkpoint does), edits the image the way a
//! hostile user would (an extra descriptor on a root-only file, root's
//! uids, nice -20, unlimited limits), seals it again, and has root restore
//! it: none of it may reach the process, unless root says `--trust-image`.
//! And an image claiming 100 000 threads is refused before chpox makes a
//! single process.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chpox::image::model::{FdEntry, FdKind, GpRegs, Metadata, ThreadState};
use common::images::reseal;
use common::procs::become_subreaper;
use common::{Target, bin, chmod, chpox_bin, chpox_ok, path_str, tempdir, wait_pid_free};
use nix::sys::ptrace;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// uid and gid of `nobody`, the unprivileged user of these tests.
const NOBODY: u32 = 65534;
/// The descriptor a hostile user adds to their image.
const STOLEN_FD: i32 = 100;
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// A scratch directory everyone may enter (not read or write), holding a
/// file only root may read and write.
struct Scratch {
    dir: tempfile::TempDir,
    secret: PathBuf,
}

const SECRET: &str = "root's secret\n";

fn scratch() -> Scratch {
    let dir = tempdir();
    chmod(dir.path(), 0o711);
    let secret = dir.path().join("secret");
    fs::write(&secret, SECRET).expect("write secret");
    chmod(&secret, 0o600);
    Scratch { dir, secret }
}

impl Scratch {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `mempattern 1 [--finish-after-rounds R]` running as `nobody`, in the
/// scratch directory, its stdout and stderr files given to `nobody` (a
/// user's job writes to the user's files).
fn nobody_mempattern(s: &Scratch, rounds: Option<u32>) -> Target {
    let mut cmd = Command::new(bin("mempattern"));
    cmd.arg("1");
    let rounds = rounds.map(|r| r.to_string());
    if let Some(r) = &rounds {
        cmd.args(["--finish-after-rounds", r]);
    }
    cmd.uid(NOBODY).gid(NOBODY).current_dir(s.path());
    let t = Target::spawn_command(cmd, "mempattern", s.path());
    for p in [&t.stdout_path, &t.stderr_path] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).expect("chown output");
    }
    assert_eq!(
        fs::metadata(format!("/proc/{}", t.pid))
            .expect("proc")
            .uid(),
        NOBODY
    );
    t
}

/// Root's `chpox dump --kill` of `t` into `image`; the original is reaped
/// and its PID free.
fn dump_kill(t: &mut Target, image: &Path) {
    chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(image),
        "--unsupported-fd",
        "null",
        "--kill",
    ]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
}

/// An image of a process of `nobody`, owned by `nobody`, as root's dump
/// writes it; with the target, whose output files the restored process
/// goes on writing.
fn nobodys_image(s: &Scratch, rounds: Option<u32>) -> (Target, PathBuf) {
    let mut t = nobody_mempattern(s, rounds);
    let image = s.path().join("nobody.img");
    dump_kill(&mut t, &image);
    let md = fs::metadata(&image).expect("image");
    assert_eq!(
        (md.uid(), md.gid()),
        (NOBODY, NOBODY),
        "the dump gives a user's image to the user"
    );
    (t, image)
}

/// Adds descriptor [`STOLEN_FD`], `path` opened read-write at offset 0,
/// to the root process of `meta`.
fn add_rdwr_fd(meta: &mut Metadata, path: &Path) {
    let md = fs::metadata(path).expect("stat");
    meta.root.fds.push(FdEntry {
        fd: STOLEN_FD,
        flags: libc::O_RDWR as u32,
        cloexec: false,
        kind: FdKind::RegularFile {
            path: path_str(path).to_string(),
            pos: 0,
            embedded: None,
            dev: md.dev(),
            ino: md.ino(),
            mode: None,
            stamp: None,
        },
        description: 0x5EC2E7,
        locks: Vec::new(),
    });
}

/// A restored process, killed and reaped when dropped.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(self.0), None);
    }
}

/// What `chpox restore --detach` did: the restored process, or the
/// refusal (its stderr).
enum Outcome {
    Restored(Restored),
    Refused(String),
}

/// Root's `chpox restore --detach IMAGE extra…`. `hard_memlock`: the
/// restorer's hard (and soft) RLIMIT_MEMLOCK, set before it starts.
fn restore(image: &Path, extra: &[&str], hard_memlock: Option<u64>) -> Outcome {
    let mut cmd = Command::new(chpox_bin());
    cmd.args(["restore", "--detach", path_str(image)])
        .args(extra)
        .stdin(Stdio::null());
    if let Some(limit) = hard_memlock {
        // SAFETY: setrlimit is async-signal-safe and touches no memory of
        // the parent.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run chpox restore");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Outcome::Refused(stderr);
    }
    let pid = stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore printed {stdout:?}, not a PID ({e}); {stderr}"));
    Outcome::Restored(Restored(pid))
}

/// A refusal of a user's image must say what to do about it, in one line.
fn assert_refusal_names_trust_image(stderr: &str) {
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(
        stderr.contains("--trust-image"),
        "the refusal does not mention --trust-image: {stderr}"
    );
}

/// The values of line `key` of /proc/PID/status.
fn status_field(pid: i32, key: &str) -> Vec<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in the status of {pid}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn ids(pid: i32, key: &str) -> Vec<u32> {
    status_field(pid, key)
        .iter()
        .map(|v| v.parse().expect("id"))
        .collect()
}

fn caps(pid: i32, key: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, key)[0], 16).expect("hex")
}

/// The process is `nobody`'s through and through: every uid and gid, no
/// capability in any set.
fn assert_plain_nobody(pid: i32) {
    assert_eq!(ids(pid, "Uid:"), [NOBODY; 4], "uids of {pid}");
    assert_eq!(ids(pid, "Gid:"), [NOBODY; 4], "gids of {pid}");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(caps(pid, set), 0, "{set} of {pid}");
    }
}

/// The nice value of thread `tid`.
fn nice(tid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{tid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    // Fields from 3 (state) on; nice is field 19.
    after_comm
        .split_whitespace()
        .nth(19 - 3)
        .expect("nice field")
        .parse()
        .expect("nice")
}

/// The hard RLIMIT_MEMLOCK of `pid`, from /proc/PID/limits.
fn hard_memlock(pid: i32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .expect("memlock line");
    let hard = line.split_whitespace().nth(4).expect("hard limit column");
    if hard == "unlimited" {
        u64::MAX
    } else {
        hard.parse().expect("limit")
    }
}

fn fd_target(pid: i32, fd: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()
}

#[test]
fn a_users_image_does_not_get_a_root_only_file_opened_for_it() {
    become_subreaper();
    let s = scratch();
    let (_t, image) = nobodys_image(&s, None);
    let edited = s.path().join("stolen-fd.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        add_rdwr_fd(m, &s.secret);
    });
    match restore(&edited, &[], None) {
        Outcome::Refused(err) => {
            assert_refusal_names_trust_image(&err);
            assert!(err.contains(path_str(&s.secret)), "{err}");
        }
        Outcome::Restored(p) => {
            assert_ne!(
                fd_target(p.0, STOLEN_FD).as_deref(),
                Some(s.secret.as_path()),
                "root's restore gave nobody's process root's file, read-write"
            );
        }
    }
    assert_eq!(fs::read_to_string(&s.secret).expect("secret"), SECRET);
}

#[test]
fn a_users_image_claiming_roots_uids_gets_neither_root_nor_capabilities() {
    become_subreaper();
    let s = scratch();
    let (_t, image) = nobodys_image(&s, None);
    let edited = s.path().join("root-uids.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        m.root.process.creds.uid = [NOBODY, 0, 0, 0];
    });
    match restore(&edited, &[], None) {
        Outcome::Refused(err) => {
            assert_refusal_names_trust_image(&err);
            assert!(err.contains("65534/0/0/0"), "{err}");
        }
        Outcome::Restored(p) => assert_plain_nobody(p.0),
    }
}

#[test]
fn a_users_image_gets_no_lower_nice_nor_higher_limits_than_its_owner_could_set() {
    become_subreaper();
    let s = scratch();
    let (t, image) = nobodys_image(&s, Some(40));
    let edited = s.path().join("nice.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        m.root.process.sched.nice = -20;
        let memlock = m
            .root
            .process
            .rlimits
            .iter_mut()
            .find(|l| l.resource == libc::RLIMIT_MEMLOCK)
            .expect("RLIMIT_MEMLOCK saved");
        // A soft limit the user chose; the hard one claims more.
        memlock.soft = 1 << 20;
        memlock.hard = u64::MAX;
        // Root's privileges would set these for anyone: an OOM-proof
        // process, and memory locked past the user's limit.
        m.root.process.attrs.oom_score_adj = Some(-1000);
        for v in m.root.vmas.iter_mut().filter(|v| !v.kind.is_special()) {
            v.vm_flags.push("lo".into());
        }
    });
    // A restorer whose own hard limit is finite: a user could not go past it.
    let ours = 8 << 20;
    match restore(&edited, &[], Some(ours)) {
        Outcome::Refused(err) => assert_refusal_names_trust_image(&err),
        Outcome::Restored(p) => {
            let pid = p.0;
            assert!(nice(pid) >= 0, "nice {} kept", nice(pid));
            assert!(
                hard_memlock(pid) <= ours,
                "hard RLIMIT_MEMLOCK raised to {}",
                hard_memlock(pid)
            );
            let adj =
                fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("oom_score_adj");
            assert!(adj.trim() != "-1000", "oom_score_adj lowered to {adj}");
            let locked_kb: u64 = status_field(pid, "VmLck:")
                .first()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(
                locked_kb * 1024 <= 1 << 20,
                "{locked_kb} kB locked past the process's RLIMIT_MEMLOCK"
            );
            assert_plain_nobody(pid);
            // And it is nobody's job, going on where it was.
            let deadline = Instant::now() + TIMEOUT;
            let code = loop {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => break code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(_) => {}
                    Err(e) => panic!("waitpid {pid}: {e}"),
                }
                assert!(Instant::now() < deadline, "{pid} did not finish");
                std::thread::sleep(POLL);
            };
            assert_eq!(code, 0, "{:?} {}", t.lines(), t.stderr());
            assert_eq!(
                t.lines_after_ready(),
                [common::mempattern_done(1 << 20)],
                "{}",
                t.stderr()
            );
        }
    }
}

#[test]
fn trust_image_restores_a_users_image_as_saved() {
    become_subreaper();
    let s = scratch();
    let (_t, image) = nobodys_image(&s, None);
    let edited = s.path().join("trusted.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        add_rdwr_fd(m, &s.secret);
        m.root.process.creds.uid = [NOBODY, 0, 0, 0];
        m.root.process.sched.nice = -20;
    });
    let p = match restore(&edited, &["--trust-image"], None) {
        Outcome::Restored(p) => p,
        Outcome::Refused(err) => panic!("--trust-image refused: {err}"),
    };
    assert_eq!(
        fd_target(p.0, STOLEN_FD).as_deref(),
        Some(s.secret.as_path())
    );
    assert_eq!(ids(p.0, "Uid:"), [NOBODY, 0, 0, 0]);
    assert_eq!(nice(p.0), -20);
}

#[test]
fn an_image_writable_by_others_is_refused() {
    become_subreaper();
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["1"], s.path());
    let image = s.path().join("root.img");
    dump_kill(&mut t, &image);
    chmod(&image, 0o666);
    match restore(&image, &[], None) {
        Outcome::Refused(err) => {
            assert_refusal_names_trust_image(&err);
            assert!(err.contains("writable"), "{err}");
        }
        Outcome::Restored(p) => panic!(
            "restored PID {} from an image anyone could have written",
            p.0
        ),
    }
}

// ---------------------------------------------------------------------------
// Counts

/// What a `chpox` run did, watched with ptrace.
struct Watched {
    /// Exit code, or 128 + the signal that killed it.
    code: i32,
    stderr: String,
    /// Processes (not threads) it made; each was killed at once.
    made: Vec<i32>,
}

fn tgid_of(tid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Root's `chpox restore --detach IMAGE`, traced (with `nofile` as its
/// RLIMIT_NOFILE if given): every fork, vfork and
/// clone it makes is reported to us before the new task runs. A new process
/// is recorded and killed, with chpox.
fn restore_watching_forks(image: &Path, dir: &Path, nofile: Option<u64>) -> Watched {
    let err_path = dir.join("watched.stderr");
    let mut cmd = Command::new(chpox_bin());
    cmd.args(["restore", "--detach", path_str(image)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err_path).expect("stderr file"));
    // SAFETY: setrlimit and PTRACE_TRACEME are single system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(n) = nofile {
                let l = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            ptrace::traceme().map_err(std::io::Error::from)
        });
    }
    // Reaped below by waitpid, which its tracer must do anyway.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("spawn chpox");
    let pid = Pid::from_raw(child.id() as i32);
    // The exec stops it.
    match waitpid(pid, Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {}
        other => panic!("chpox did not stop at its exec: {other:?}"),
    }
    ptrace::setoptions(
        pid,
        ptrace::Options::PTRACE_O_TRACEFORK
            | ptrace::Options::PTRACE_O_TRACEVFORK
            | ptrace::Options::PTRACE_O_TRACECLONE
            | ptrace::Options::PTRACE_O_EXITKILL,
    )
    .expect("PTRACE_SETOPTIONS");
    ptrace::cont(pid, None).expect("PTRACE_CONT");
    let new_task = [
        ptrace::Event::PTRACE_EVENT_FORK as i32,
        ptrace::Event::PTRACE_EVENT_VFORK as i32,
        ptrace::Event::PTRACE_EVENT_CLONE as i32,
    ];
    let mut tracees = vec![pid];
    let mut made = Vec::new();
    let mut code = None;
    let deadline = Instant::now() + TIMEOUT;
    while !tracees.is_empty() {
        if Instant::now() > deadline {
            for t in &tracees {
                let _ = kill(*t, Signal::SIGKILL);
            }
            panic!("chpox restore did not finish within {TIMEOUT:?}");
        }
        let mut idle = true;
        for t in tracees.clone() {
            let gone = |tracees: &mut Vec<Pid>| tracees.retain(|&x| x != t);
            match waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => continue,
                Ok(WaitStatus::PtraceEvent(_, _, event)) if new_task.contains(&event) => {
                    let new = ptrace::getevent(t).expect("PTRACE_GETEVENTMSG") as i32;
                    tracees.push(Pid::from_raw(new));
                    if tgid_of(new) == Some(new) {
                        made.push(new);
                        let _ = kill(Pid::from_raw(new), Signal::SIGKILL);
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    let _ = ptrace::cont(t, None);
                }
                // A new task's first stop, or an event we did not ask for.
                Ok(WaitStatus::Stopped(_, Signal::SIGSTOP) | WaitStatus::PtraceEvent(..)) => {
                    let _ = ptrace::cont(t, None);
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    let _ = ptrace::cont(t, sig);
                }
                Ok(WaitStatus::Exited(_, c)) => {
                    if t == pid {
                        code = Some(c);
                    }
                    gone(&mut tracees);
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    if t == pid {
                        code = Some(128 + sig as i32);
                    }
                    gone(&mut tracees);
                }
                Ok(_) => {
                    let _ = ptrace::cont(t, None);
                }
                Err(_) => gone(&mut tracees),
            }
            idle = false;
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Watched {
        code: code.expect("chpox's exit status"),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        made,
    }
}

/// An image of root's `mempattern` whose process claims `threads` threads
/// (the saved one, and copies of it as small as a thread gets: the count
/// is what matters, and the metadata must stay small enough to decode).
fn image_with_threads(s: &Scratch, threads: i32) -> PathBuf {
    let mut t = Target::spawn("mempattern", &["1"], s.path());
    let image = s.path().join("root.img");
    dump_kill(&mut t, &image);
    let edited = s.path().join("many.img");
    reseal(&image, &edited, None, |m| {
        let mut thread = m.root.threads[0].clone();
        thread.regs = GpRegs::default();
        thread.xsave = Vec::new();
        thread.comm = String::new();
        thread.sigaltstack = None;
        thread.pending = Vec::new();
        thread.rseq = None;
        thread.clear_child_tid = None;
        thread.robust_list = None;
        let base = thread.tid;
        m.root.threads.extend((1..threads).map(|i| ThreadState {
            tid: base + i,
            ..thread.clone()
        }));
    });
    edited
}

/// chpox refused `w`'s image in one line, and made no process for it.
fn assert_refused_before_any_process(w: &Watched) {
    assert_eq!(
        w.made,
        Vec::<i32>::new(),
        "chpox made processes for an image it cannot restore (exit {}): {}",
        w.code,
        w.stderr
    );
    assert_ne!(w.code, 0, "restored? {}", w.stderr);
    assert_eq!(
        w.stderr.trim_end().lines().count(),
        1,
        "not one line: {}",
        w.stderr
    );
}

#[test]
fn an_image_of_more_threads_than_free_pids_is_refused_before_any_process_exists() {
    become_subreaper();
    let s = scratch();
    // More tasks than the machine has PIDs (32768 here): small enough for
    // an image's metadata, too many for any restore.
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("read pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    let image = image_with_threads(&s, pid_max + 100);
    assert_refused_before_any_process(&restore_watching_forks(&image, s.path(), None));
}

/// A descriptor beyond the open-file limit the processes inherit from the
/// restorer: refused by number, naming the limit, before any process
/// exists (it used to fail once the process was half built).
#[test]
fn a_descriptor_beyond_the_restorers_open_file_limit_is_refused_before_any_process_exists() {
    become_subreaper();
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["1"], s.path());
    let image = s.path().join("root.img");
    dump_kill(&mut t, &image);
    let edited = s.path().join("high-fd.img");
    let null = fs::metadata("/dev/null").expect("/dev/null");
    reseal(&image, &edited, None, |m| {
        m.root.fds.push(FdEntry {
            fd: 5000,
            flags: libc::O_RDONLY as u32,
            cloexec: false,
            kind: FdKind::CharDevice {
                path: "/dev/null".into(),
                rdev: null.rdev(),
            },
            description: 0x5000,
            locks: Vec::new(),
        });
    });
    let w = restore_watching_forks(&edited, s.path(), Some(1024));
    assert_refused_before_any_process(&w);
    assert!(
        w.stderr.contains("descriptor 5000") && w.stderr.contains("RLIMIT_NOFILE"),
        "{}",
        w.stderr
    );
}
