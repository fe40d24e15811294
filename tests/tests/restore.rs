//! `chpox restore` on real processes: each program is checkpointed right
//! after it is ready, killed, restored from the image, and must finish with
//! exactly the output of an uninterrupted run (see `programs.rs`). Its
//! stdout was a regular file; the restored process reopens it at the saved
//! offset and appends the rest.
//!
//! Also: the PID it comes back with, refusals (damaged images, changed
//! files, missing CPU features, threads), and checkpoint → restore →
//! checkpoint → restore.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chpox::image::model::{FdKind, RobustList};
use chpox::image::{ImageReader, ImageWriter, WriteOptions};
use common::agent::poll_until;
use common::procs::{become_subreaper, restore_detached, wait_pid};
use common::{
    Target, chpox_bin, chpox_ok, path_str, profile_dir, run_chpox, tempdir, wait_pid_free,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `chpox dump PID -o IMAGE --unsupported-fd null --kill [extra]`.
fn dump_kill(pid: i32, image: &Path, extra: &[&str]) {
    dump(pid, image, &[&["--kill"], extra].concat());
}

/// `chpox dump PID -o IMAGE --unsupported-fd null [extra]`.
fn dump(pid: i32, image: &Path, extra: &[&str]) {
    let pid_s = pid.to_string();
    let mut args = vec![
        "dump",
        &pid_s,
        "-o",
        path_str(image),
        "--unsupported-fd",
        "null",
    ];
    args.extend_from_slice(extra);
    chpox_ok(&args);
}

/// Checkpoint a spawned target into `image`, kill it and reap it.
fn checkpoint(t: &mut Target, image: &Path, extra: &[&str]) {
    dump_kill(t.pid, image, extra);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
}

/// Runs `program restore-args...` until it exits; returns its exit code
/// and stderr.
fn run_waiting(program: &Path, args: &[&str], dir: &Path) -> (i32, String) {
    let err_path = dir.join("restore.stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("run restore");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} {args:?} did not finish", program.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    (status.code().unwrap_or(-1), stderr)
}

/// `chpox restore IMAGE [extra]`, waiting for the restored process.
fn restore_and_wait(image: &Path, extra: &[&str], dir: &Path) -> (i32, String) {
    let mut args = vec!["restore", path_str(image)];
    args.extend_from_slice(extra);
    run_waiting(&chpox_bin(), &args, dir)
}

/// Union of SigPnd and ShdPnd of `pid`.
fn pending_mask(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .map(|v| common::parse_hex(v.trim()))
        .fold(0, |a, b| a | b)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

fn wait_not_pending(pid: i32, sig: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pending_mask(pid) & (1u64 << (sig - 1)) != 0 {
        assert!(Instant::now() < deadline, "signal {sig} stays pending");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGUSR1 to restored `pid`, which must then exit 0; returns the
/// stdout lines of `t` (the original) after its READY line.
fn finish_on_usr1(pid: i32, t: &Target) -> Vec<String> {
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    t.lines_after_ready()
}

fn expect_failure(image: &Path, extra: &[&str], dir: &Path) -> String {
    let (code, stderr) = restore_and_wait(image, extra, dir);
    assert_ne!(code, 0, "restore succeeded; stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    stderr
}

#[test]
fn sleeper_restarts_its_sleep() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
}

/// Waits until `pid` sleeps in `nanosleep` or `clock_nanosleep`.
fn wait_asleep_in_nanosleep(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let nr = syscall.split_whitespace().next().unwrap_or("");
        if nr == libc::SYS_nanosleep.to_string() || nr == libc::SYS_clock_nanosleep.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PID {pid} is not asleep: /proc/{pid}/syscall says {syscall:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A sleep cut by the checkpoint goes on with the time that was left, not
/// from the start, when the program let the kernel say what was left
/// (`nanosleep(&ts, &ts)`, as `sleep()` and `thread::sleep` do). Measured
/// by the kernel itself: a signal cuts the restored sleep short and the
/// program prints the whole seconds still left. A full 30 s restart would
/// leave 29; after 2 s slept before the checkpoint, at most 28 may remain.
#[test]
fn an_interrupted_sleep_goes_on_with_the_time_left() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &["--report-left", "30"], dir.path());
    std::thread::sleep(Duration::from_secs(2));
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    // A signal that came before the sleep began again would run the
    // handler first and leave the sleep whole.
    wait_asleep_in_nanosleep(pid);
    let lines = finish_on_usr1(pid, &t);
    let left: u64 = match lines.as_slice() {
        [line] => common::parse_kv(line)
            .get("secs")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not a LEFT line: {line:?}")),
        other => panic!("expected one LEFT line, got {other:?}"),
    };
    assert!(left <= 28, "{left} s left: the sleep started over");
}

#[test]
fn ld_chpox_restores_like_chpox_restore() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let ld = profile_dir().join("ld-chpox");
    let (code, stderr) = run_waiting(&ld, &[path_str(&image)], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
}

#[test]
fn mempattern_memory_comes_back() {
    let dir = tempdir();
    let mut t = Target::spawn(
        "mempattern",
        &["8", "--finish-after-rounds", "20"],
        dir.path(),
    );
    let len = t.ready_u64("len");
    let image = dir.path().join("mem.img");
    checkpoint(&mut t, &image, &[]);
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

/// Resident anonymous memory of `pid`, in bytes (`RssAnon`).
fn rss_anon(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in status");
    kb * 1024
}

/// 4 GiB with one page touched every 64 MiB, plus an untouched 1 GiB: the
/// restored process sees every touched page, and restore did not fault in
/// the untouched gigabytes (the mapping stays sparse).
#[test]
fn sparse_gigabytes_come_back_sparse() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("sparse", &["4"], dir.path());
    let image = dir.path().join("sparse.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    let rss = rss_anon(pid);
    assert!(
        rss < 64 << 20,
        "restored process has {rss} bytes of anonymous memory resident; \
         the image holds 64 pages"
    );
    assert_eq!(finish_on_usr1(pid, &t), ["DONE ok"]);
}

/// Shared anonymous memory comes back whole, with the pages a forked
/// child wrote before the checkpoint.
#[test]
fn shared_memory_comes_back() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("sharedanon", &["8"], dir.path());
    let image = dir.path().join("shared.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    assert_eq!(finish_on_usr1(pid, &t), ["DONE ok"]);
}

#[test]
fn compressed_image_restores_with_a_new_pid() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn(
        "mempattern",
        &["8", "--finish-after-rounds", "20"],
        dir.path(),
    );
    let len = t.ready_u64("len");
    let image = dir.path().join("mem.img");
    checkpoint(&mut t, &image, &["--compress"]);
    let pid = restore_detached(&image, &["--pid", "any"]);
    assert_ne!(pid, t.pid);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0);
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

#[test]
fn avxregs_keeps_its_registers() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("avxregs", &[], dir.path());
    // Let it load its registers and reach the spin loop.
    std::thread::sleep(Duration::from_millis(200));
    let image = dir.path().join("avx.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(finish_on_usr1(pid, &t), ["REGS OK"]);
}

#[test]
fn signal_handlers_fire_after_restore_with_the_same_pid() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("sighandler", &[], dir.path());
    let original = t.pid;
    // SIGHUP is blocked: it stays pending, and must be pending again after
    // the restore.
    t.signal(libc::SIGHUP);
    let image = dir.path().join("sig.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &["--pid", "same"]);
    assert_eq!(pid, original);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.contains("SigBlk:\t0000000000000001"),
        "SIGHUP not blocked: {status}"
    );
    assert_ne!(
        pending_mask(pid) & (1 << (libc::SIGHUP - 1)),
        0,
        "SIGHUP no longer pending: {status}"
    );
    for _ in 0..3 {
        signal(pid, libc::SIGUSR1);
        wait_not_pending(pid, libc::SIGUSR1);
    }
    signal(pid, libc::SIGUSR2);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0);
    assert_eq!(t.lines_after_ready(), ["COUNT=3"]);
}

#[test]
fn busy_pid_is_refused_with_pid_same() {
    let dir = tempdir();
    let mut t = Target::spawn("sighandler", &[], dir.path());
    let image = dir.path().join("sig.img");
    // Checkpoint without killing: the PID stays taken.
    chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&image),
        "--unsupported-fd",
        "null",
    ]);
    let err = expect_failure(&image, &["--pid", "same"], dir.path());
    assert!(err.contains(&format!("PID {} is in use", t.pid)), "{err}");
    t.signal(libc::SIGUSR2);
    t.wait_success(EXIT_TIMEOUT);
}

#[test]
fn proc_self_exe_cmdline_and_comm_come_back() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("selfexe", &["one", "two words"], dir.path());
    let image = dir.path().join("self.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    assert_eq!(finish_on_usr1(pid, &t), ["EXE OK", "CMDLINE OK", "COMM OK"]);
}

#[test]
fn files_and_offsets_come_back() {
    become_subreaper();
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = Target::spawn("openfiles", &[&d], dir.path());
    let image = dir.path().join("files.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    assert_eq!(finish_on_usr1(pid, &t), common::OPENFILES_OUTPUT);
    let b = std::fs::read(dir.path().join("b.log")).expect("read b.log");
    assert_eq!(b.len(), 78);
}

#[test]
fn checkpoint_restore_twice() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn(
        "mempattern",
        &["8", "--finish-after-rounds", "40"],
        dir.path(),
    );
    let len = t.ready_u64("len");
    let first = dir.path().join("first.img");
    checkpoint(&mut t, &first, &[]);
    let pid = restore_detached(&first, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let second = dir.path().join("second.img");
    dump_kill(pid, &second, &[]);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 128 + libc::SIGKILL);
    wait_pid_free(pid);
    let (code, stderr) = restore_and_wait(&second, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

/// A copy of test program `name` in `dir`, to change behind a checkpoint's back.
fn copy_program(name: &str, dir: &Path) -> PathBuf {
    let copy = dir.join(format!("{name}-copy"));
    std::fs::copy(common::bin(name), &copy).expect("copy program");
    copy
}

fn append_byte(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(b"\0").expect("append");
}

#[test]
fn changed_executable_is_refused_by_name() {
    let dir = tempdir();
    let copy = copy_program("sleeper", dir.path());
    let size = std::fs::metadata(&copy).expect("stat").len();
    let mut t = Target::spawn_command(Command::new(&copy), "sleeper", dir.path());
    let image = dir.path().join("copy.img");
    checkpoint(&mut t, &image, &[]);
    append_byte(&copy);
    let err = expect_failure(&image, &[], dir.path());
    assert!(
        err.contains(&format!(
            "{} changed since the checkpoint (size {size} → {})",
            copy.display(),
            size + 1
        )),
        "{err}"
    );
    assert!(err.contains("--embed-exe"), "{err}");
    // Nothing ran: the program's output stops at READY.
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.lines_after_ready().is_empty());
}

#[test]
fn changed_executable_restores_from_its_embedded_copy() {
    let dir = tempdir();
    let copy = copy_program("sleeper", dir.path());
    let mut t = Target::spawn_command(Command::new(&copy), "sleeper", dir.path());
    let image = dir.path().join("copy.img");
    checkpoint(&mut t, &image, &["--embed-exe"]);
    append_byte(&copy);
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
}

/// An executable deleted while its process runs has no name left to
/// reopen: the dump embeds it without being asked, and restore uses that.
#[test]
fn a_deleted_executable_is_embedded_and_restores() {
    let dir = tempdir();
    let copy = copy_program("sleeper", dir.path());
    let mut t = Target::spawn_command(Command::new(&copy), "sleeper", dir.path());
    std::fs::remove_file(&copy).expect("delete the executable");
    let image = dir.path().join("deleted.img");
    checkpoint(&mut t, &image, &[]);
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
}

#[test]
fn corrupt_image_is_refused() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let offset = {
        let reader = ImageReader::open(&image).expect("open");
        reader
            .metadata()
            .root
            .vmas
            .iter()
            .flat_map(|v| v.pages.iter())
            .next()
            .expect("a stored page")
            .data
            .offset
    };
    let mut bytes = std::fs::read(&image).expect("read image");
    bytes[offset as usize + 100] ^= 0xff;
    std::fs::write(&image, &bytes).expect("write image");
    let err = expect_failure(&image, &[], dir.path());
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(t.lines_after_ready().is_empty());
}

#[test]
fn truncated_image_is_refused() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let len = std::fs::metadata(&image).expect("stat").len();
    File::options()
        .write(true)
        .open(&image)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let err = expect_failure(&image, &[], dir.path());
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn missing_cpu_features_are_refused() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    // The same process, but its thread claims state in an XSAVE component
    // this CPU does not enable (AMX, APX, … whichever is missing). Bulk
    // data is left out: the check comes first.
    let (xcr0, _) = chpox::registers::host_xfeatures();
    let bit = (17..63).find(|b| xcr0 & (1u64 << b) == 0).expect("a bit");
    let mut meta = ImageReader::open(&image).expect("open").metadata().clone();
    let bv_at = 512..520;
    let xsave = &mut meta.root.threads[0].xsave;
    let bv = u64::from_le_bytes(xsave[bv_at.clone()].try_into().expect("8 bytes")) | (1 << bit);
    xsave[bv_at].copy_from_slice(&bv.to_le_bytes());
    for v in &mut meta.root.vmas {
        v.pages.clear();
    }
    for f in &mut meta.files {
        f.embedded = None;
    }
    for fd in &mut meta.root.fds {
        if let FdKind::RegularFile { embedded, .. } = &mut fd.kind {
            *embedded = None;
        }
    }
    let edited = dir.path().join("edited.img");
    let writer = ImageWriter::create(&edited, WriteOptions::default()).expect("create");
    writer.finish(&meta).expect("write edited image");
    let err = expect_failure(&edited, &[], dir.path());
    assert!(
        err.contains("this CPU lacks features") && err.contains(&format!("component {bit})")),
        "{err}"
    );
}

/// Checkpoint multi-threaded `t` into `image` leaving it stopped, then
/// kill and reap it here: killing from the dump would wait for the leader
/// before the other threads.
fn checkpoint_stopped(t: &mut Target, image: &Path) {
    dump(t.pid, image, &["--leave-stopped"]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    wait_pid_free(t.pid);
}

/// Thread `tid`'s robust-futex list.
fn robust_list(tid: i32) -> Option<RobustList> {
    chpox::threads::robust_list(tid).unwrap_or_else(|e| panic!("robust list of {tid}: {e}"))
}

#[test]
fn threads_come_back_with_their_tids_names_and_state() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("threads", &["3"], dir.path());
    let tids: Vec<i32> = t
        .ready_value("tids")
        .split(',')
        .map(|s| s.parse().expect("tid"))
        .collect();
    let all_tids: Vec<i32> = std::iter::once(t.pid).chain(tids.iter().copied()).collect();
    let robust_before: Vec<Option<RobustList>> =
        all_tids.iter().map(|&tid| robust_list(tid)).collect();
    assert!(
        robust_before.iter().all(Option::is_some),
        "glibc registers a robust list for every thread: {robust_before:?}"
    );
    let image = dir.path().join("threads.img");
    checkpoint_stopped(&mut t, &image);
    let pid = restore_detached(&image, &["--pid", "same"]);
    assert_eq!(pid, t.pid);
    for (i, tid) in tids.iter().enumerate() {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).expect("thread comm");
        assert_eq!(comm.trim_end(), format!("worker-{i}"));
    }
    let robust_after: Vec<Option<RobustList>> =
        all_tids.iter().map(|&tid| robust_list(tid)).collect();
    assert_eq!(robust_after, robust_before, "robust-futex lists");
    // Let the workers count a little in their new life.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(finish_on_usr1(pid, &t), ["DONE", "T0=ok", "T1=ok", "T2=ok"]);
}

#[test]
fn threads_come_back_with_new_tids() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("threads", &["2"], dir.path());
    let image = dir.path().join("threads.img");
    checkpoint_stopped(&mut t, &image);
    let pid = restore_detached(&image, &["--pid", "any"]);
    assert_eq!(finish_on_usr1(pid, &t), ["DONE", "T0=ok", "T1=ok"]);
}

#[test]
fn restore_of_a_missing_image_fails_cleanly() {
    let dir = tempdir();
    let out = run_chpox(&["restore", path_str(&dir.path().join("nope.img"))]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}

// ---------------------------------------------------------------------------
// Real programs nobody wrote for chpox, stopped mid-work

/// A child we spawned ourselves (not a [`Target`]: no `READY` line), killed
/// and reaped when dropped unless already reaped.
struct Spawned(std::process::Child);

impl Spawned {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Panics (with `context`) if the child has already exited.
    fn assert_running(&mut self, context: impl Fn() -> String) {
        if let Some(status) = self.0.try_wait().expect("try_wait") {
            panic!(
                "PID {} exited ({status}) too early\n{}",
                self.pid(),
                context()
            );
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stdin /dev/null and stdout and stderr to `stdout` and
/// `stderr`.
fn spawn_to_files(mut cmd: Command, stdout: &Path, stderr: &Path) -> Spawned {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(stdout).expect("create stdout file"))
        .stderr(File::create(stderr).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Spawned(child)
}

/// Checkpoints our spawned child with `--kill`, reaps it and waits for its
/// PID to be free.
fn checkpoint_spawned(child: &mut Spawned, image: &Path) {
    let pid = child.pid();
    dump_kill(pid, image, &[]);
    let status = child.0.wait().expect("reap the original");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the original was not killed by the dump: {status}"
    );
    wait_pid_free(pid);
}

const PRIMES_SCRIPT: &str = r#"import time

N = 200000
CHUNKS = 20
SIZE = N // CHUNKS


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


total = 0
for c in range(CHUNKS):
    s = sum(n for n in range(c * SIZE, (c + 1) * SIZE) if is_prime(n))
    total += s
    print(f"chunk {c} {s}", flush=True)
    time.sleep(0.1)
print(f"TOTAL {total}", flush=True)
"#;

/// What `PRIMES_SCRIPT` prints, computed here with a sieve.
fn primes_script_output() -> String {
    const N: usize = 200_000;
    const CHUNKS: usize = 20;
    let mut composite = vec![false; N];
    composite[0] = true;
    composite[1] = true;
    for i in 2..N {
        if !composite[i] {
            for j in (i * i..N).step_by(i) {
                composite[j] = true;
            }
        }
    }
    let size = N / CHUNKS;
    let mut out = String::new();
    let mut total = 0u64;
    for c in 0..CHUNKS {
        let sum: u64 = (c * size..(c + 1) * size)
            .filter(|&n| !composite[n])
            .map(|n| n as u64)
            .sum();
        total += sum;
        out.push_str(&format!("chunk {c} {sum}\n"));
    }
    out.push_str(&format!("TOTAL {total}\n"));
    out
}

/// CPython running an ordinary script: interpreter state, heap and the
/// interrupted sleep (or computation) all come back, under a new PID.
#[test]
fn a_real_interpreter_restores_mid_script() {
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "/usr/bin/python3 is missing");
    let dir = tempdir();
    let script = dir.path().join("primes.py");
    std::fs::write(&script, PRIMES_SCRIPT).expect("write script");
    let out = dir.path().join("primes.out");
    let err = dir.path().join("primes.err");
    let mut cmd = Command::new(python);
    cmd.arg(&script).current_dir(dir.path());
    let mut child = spawn_to_files(cmd, &out, &err);
    let show = || {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    // Mid-way: a few chunks done, most still to come.
    poll_until("3 chunk lines", Duration::from_secs(20), show, || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            >= 3
    });
    child.assert_running(show);
    let image = dir.path().join("python.img");
    checkpoint_spawned(&mut child, &image);
    let before = std::fs::read_to_string(&out).expect("read stdout");
    assert!(
        !before.contains("TOTAL"),
        "finished before the dump: {before}"
    );

    let (code, stderr) = restore_and_wait(&image, &["--pid", "any"], dir.path());
    assert_eq!(code, 0, "{stderr}\n{}", show());
    assert_eq!(
        std::fs::read_to_string(&out).expect("read stdout"),
        primes_script_output(),
        "{}",
        show()
    );
    assert_eq!(std::fs::read_to_string(&err).unwrap_or_default(), "");
}

/// Writes `blocks` × 4 MiB of deterministic, compressible data (16 letters
/// and space, xorshift-chosen; each block starts with its number) to `path`.
fn write_compressible(path: &Path, blocks: usize) -> u64 {
    use std::io::Write;
    const BLOCK: usize = 4 << 20;
    const ALPHABET: &[u8; 17] = b"abcdefghijklmnop ";
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; BLOCK];
    for chunk in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ALPHABET[((x >> (i * 8)) % 17) as usize];
        }
    }
    let mut f = std::io::BufWriter::new(File::create(path).expect("create input"));
    for n in 0..blocks {
        block[..8].copy_from_slice(format!("{n:08}").as_bytes());
        f.write_all(&block).expect("write input");
    }
    f.flush().expect("flush input");
    (blocks * BLOCK) as u64
}

/// Asserts `gzip -dc gz` succeeds (CRC and length check) and yields exactly
/// the bytes of `original`.
fn assert_gunzips_to(gz: &Path, original: &Path) {
    use std::io::Read;
    let mut gunzip = Command::new("gzip")
        .arg("-dc")
        .arg(gz)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gzip -dc");
    let mut decoded = gunzip.stdout.take().expect("stdout");
    let mut want = std::io::BufReader::new(File::open(original).expect("open input"));
    let mut got_buf = vec![0u8; 1 << 20];
    let mut want_buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = decoded.read(&mut got_buf).expect("read gzip -dc");
        if n == 0 {
            break;
        }
        let m = want.read(&mut want_buf[..n]).expect("read input");
        want.read_exact(&mut want_buf[m..n]).unwrap_or_else(|_| {
            panic!("decompressed output is longer than the input (> {offset} bytes)")
        });
        if got_buf[..n] != want_buf[..n] {
            let i = (0..n).find(|&i| got_buf[i] != want_buf[i]).unwrap_or(0);
            panic!("decompressed output differs at byte {}", offset + i as u64);
        }
        offset += n as u64;
    }
    drop(decoded);
    let out = gunzip.wait_with_output().expect("wait gzip -dc");
    assert!(
        out.status.success(),
        "gzip -dc failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rest = Vec::new();
    want.read_to_end(&mut rest).expect("read input");
    assert!(
        rest.is_empty(),
        "decompressed output stops at {offset} of {} bytes",
        offset + rest.len() as u64
    );
}

/// gzip compressing a file into its stdout (a regular file), stopped after
/// a few MB: the input's read offset, the output's write offset and the
/// deflate state all come back, and the result decompresses to the input.
#[test]
fn a_compressor_restores_mid_file() {
    let dir = tempdir();
    let input = dir.path().join("input.dat");
    write_compressible(&input, 32);
    let gz = dir.path().join("input.dat.gz");
    let err = dir.path().join("gzip.err");
    let mut cmd = Command::new("gzip");
    cmd.args(["-c", "-1"]).arg(&input).current_dir(dir.path());
    let mut child = spawn_to_files(cmd, &gz, &err);
    let size = || std::fs::metadata(&gz).map(|m| m.len()).unwrap_or(0);
    let show = || {
        format!(
            "output {} bytes; stderr: {}",
            size(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    poll_until("4 MB of gzip output", Duration::from_secs(20), show, || {
        size() >= 4 << 20
    });
    child.assert_running(show);
    let image = dir.path().join("gzip.img");
    checkpoint_spawned(&mut child, &image);
    let partial = size();

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}\n{}", show());
    assert!(
        size() > partial,
        "no output after the restore ({partial} bytes)"
    );
    assert_eq!(std::fs::read_to_string(&err).unwrap_or_default(), "");
    assert_gunzips_to(&gz, &input);
}

/// The system call `pid` is blocked in (first field of /proc/PID/syscall),
/// if it is blocked in one.
fn blocked_syscall(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// `reader` blocked in read(2) on a FIFO it opened read-write. The restored
/// process must re-issue its read rather than see it fail with EINTR
/// (`reader` would print `EINTR` and exit 2), on the FIFO reopened by
/// path: what we write into the FIFO after the restore is what it reads.
#[test]
fn a_process_blocked_in_read_restores_and_reads_on() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut t = Target::spawn("reader", &[path_str(&fifo)], dir.path());
    let fd: i32 = t.ready_value("fd").parse().expect("fd number");
    poll_until(
        "reader to block in read(2)",
        Duration::from_secs(10),
        || std::fs::read_to_string(format!("/proc/{}/syscall", t.pid)).unwrap_or_default(),
        || blocked_syscall(t.pid) == Some(libc::SYS_read),
    );
    let image = dir.path().join("reader.img");
    checkpoint(&mut t, &image, &[]);
    let meta = ImageReader::open(&image)
        .expect("open image")
        .metadata()
        .clone();
    let entry = meta
        .root
        .fds
        .iter()
        .find(|e| e.fd == fd)
        .unwrap_or_else(|| panic!("fd {fd} not in the image: {:?}", meta.root.fds));
    assert!(
        matches!(&entry.kind, FdKind::Fifo { path, .. } if Path::new(path) == fifo),
        "fd {fd} saved as {:?}",
        entry.kind
    );

    let mut restore = Command::new(chpox_bin())
        .args(["restore", path_str(&image)])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chpox restore");
    poll_until(
        "the restored reader to block in read(2) again",
        Duration::from_secs(20),
        || std::fs::read_to_string(format!("/proc/{}/syscall", t.pid)).unwrap_or_default(),
        || blocked_syscall(t.pid) == Some(libc::SYS_read),
    );
    // The restored process holds the FIFO read-write: opening it to write
    // does not wait.
    std::fs::write(&fifo, "hi\n").expect("write into the FIFO");
    let status = restore.wait().expect("wait for chpox restore");
    assert!(status.success(), "restore: {status}; {:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["GOT hi\\n"]);
}

// ---------------------------------------------------------------------------
// Pipes

/// `pipes` with its stdin and stdout pipes to this test and no other
/// descriptor from us; returns it with its `READY` line read.
fn spawn_pipes() -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(common::bin("pipes"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn pipes");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read READY");
    assert_eq!(line, "READY\n");
    (child, out)
}

/// Pipes the process held both ends of come back with their unread bytes,
/// capacity and flags (and a dump that lets the process run on takes none
/// of the bytes away); pipes to another process on stdin and stdout become
/// the restorer's stdin and stdout. No `--unsupported-fd`: all of it is
/// supported.
#[test]
fn pipes_come_back_with_their_bytes_and_stdio_pipes_join_the_restorer() {
    use std::io::{Read, Write};
    let dir = tempdir();
    let (mut child, _out) = spawn_pipes();
    let pid = child.id() as i32;
    let image = dir.path().join("pipes.img");
    chpox_ok(&["dump", &pid.to_string(), "-o", path_str(&image)]);
    chpox_ok(&["dump", &pid.to_string(), "-o", path_str(&image), "--kill"]);
    child.wait().expect("reap");
    wait_pid_free(pid);

    let meta = ImageReader::open(&image)
        .expect("open image")
        .metadata()
        .clone();
    let kind_of = |fd: i32| {
        &meta
            .root
            .fds
            .iter()
            .find(|e| e.fd == fd)
            .unwrap_or_else(|| panic!("fd {fd} not in {:?}", meta.root.fds))
            .kind
    };
    for fd in [0, 1] {
        assert!(
            matches!(
                kind_of(fd),
                FdKind::Pipe {
                    internal: false,
                    ..
                }
            ),
            "fd {fd}: {:?}",
            kind_of(fd)
        );
    }
    let stored: Vec<u64> = meta
        .root
        .fds
        .iter()
        .filter_map(|e| match &e.kind {
            FdKind::Pipe { data: Some(d), .. } => Some(d.raw_len),
            _ => None,
        })
        .collect();
    assert_eq!(
        stored,
        [100_000],
        "unread bytes stored: {:?}",
        meta.root.fds
    );

    let mut restore = Command::new(chpox_bin())
        .args(["restore", path_str(&image)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(dir.path().join("restore.stderr")).expect("stderr file"))
        .spawn()
        .expect("run chpox restore");
    let mut stdin = restore.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("write stdin");
    drop(stdin);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = restore.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = restore.kill();
            panic!("restored pipes did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    restore
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read restored output");
    let stderr = std::fs::read_to_string(dir.path().join("restore.stderr")).unwrap_or_default();
    assert!(status.success(), "{status}: {stderr}\n{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "STDIN go",
            "KEPT ok",
            "CAPACITY 131072",
            "ROUNDTRIP ok",
            "EOF ok"
        ],
        "{stderr}"
    );
}

/// A mapped file whose content changed behind the checkpoint's back, its
/// size the same: its hash is compared while the process is built (on
/// another thread), and the restore fails by name before the process
/// runs, eager or `--lazy`, leaving nothing behind.
#[test]
fn same_size_change_is_refused_before_the_process_runs() {
    for lazy in [false, true] {
        let dir = tempdir();
        let copy = copy_program("sleeper", dir.path());
        let mut t = Target::spawn_command(Command::new(&copy), "sleeper", dir.path());
        let pid = t.pid;
        let image = dir.path().join("copy.img");
        checkpoint(&mut t, &image, &[]);
        let mut bytes = std::fs::read(&copy).expect("read the copy");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&copy, &bytes).expect("write the copy");
        let extra: &[&str] = if lazy { &["--lazy"] } else { &[] };
        let err = expect_failure(&image, extra, dir.path());
        assert!(
            err.contains("changed since the checkpoint (same size, different content)"),
            "{err}"
        );
        assert!(err.contains(&copy.display().to_string()), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(t.lines_after_ready().is_empty(), "lazy {lazy}");
        wait_pid_free(pid);
    }
}
