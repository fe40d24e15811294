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

use chpox::image::model::FdKind;
use chpox::image::{ImageReader, ImageWriter, WriteOptions};
use common::{Target, chpox_bin, chpox_ok, profile_dir, run_chpox};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Orphans are reparented to this test process instead of PID 1: a
/// `--detach`ed restored process becomes our child once chpox exits, so we
/// can reap it and see its exit status.
fn become_subreaper() {
    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits until `/proc/PID` is gone (the PID is free again).
fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "PID {pid} still exists");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `chpox dump PID -o IMAGE --unsupported-fd null --kill [extra]`.
fn dump_kill(pid: i32, image: &Path, extra: &[&str]) {
    let pid_s = pid.to_string();
    let mut args = vec![
        "dump",
        &pid_s,
        "-o",
        s(image),
        "--unsupported-fd",
        "null",
        "--kill",
    ];
    args.extend_from_slice(extra);
    chpox_ok(&args);
}

/// Checkpoint a spawned target into `image`, kill it and reap it.
fn checkpoint(t: &mut Target, image: &Path, extra: &[&str]) {
    dump_kill(t.pid, image, extra);
    t.child.wait().expect("reap the original");
    wait_gone(t.pid);
}

/// Waits for our child (or adopted orphan) `pid` to exit; returns its exit
/// code, or 128 + the signal that killed it.
fn wait_pid(pid: i32, timeout: Duration) -> i32 {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "PID {pid} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `chpox restore --detach IMAGE [extra]`; returns the restored PID.
fn restore_detached(image: &Path, extra: &[&str]) -> i32 {
    let mut args = vec!["restore", "--detach", s(image)];
    args.extend_from_slice(extra);
    let out = chpox_ok(&args);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore printed {out:?}, not a PID: {e}"))
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
    let mut args = vec!["restore", s(image)];
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

/// The stdout lines of `t` after its READY line.
fn lines_after_ready(t: &Target) -> Vec<String> {
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
    assert_eq!(lines_after_ready(&t), ["DONE slept"]);
}

#[test]
fn ld_chpox_restores_like_chpox_restore() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    let image = dir.path().join("sleeper.img");
    checkpoint(&mut t, &image, &[]);
    let ld = profile_dir().join("ld-chpox");
    let (code, stderr) = run_waiting(&ld, &[s(&image)], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines_after_ready(&t), ["DONE slept"]);
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
    assert_eq!(
        lines_after_ready(&t),
        [format!("DONE sum={:#x}", chpox_tests::pattern_sum(len))]
    );
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
    assert_eq!(
        lines_after_ready(&t),
        [format!("DONE sum={:#x}", chpox_tests::pattern_sum(len))]
    );
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
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(lines_after_ready(&t), ["REGS OK"]);
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
    assert_eq!(lines_after_ready(&t), ["COUNT=3"]);
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
        s(&image),
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
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(lines_after_ready(&t), ["EXE OK", "CMDLINE OK", "COMM OK"]);
}

#[test]
fn files_and_offsets_come_back() {
    become_subreaper();
    let dir = tempdir();
    let d = s(dir.path()).to_string();
    let mut t = Target::spawn("openfiles", &[&d], dir.path());
    let image = dir.path().join("files.img");
    checkpoint(&mut t, &image, &[]);
    let pid = restore_detached(&image, &[]);
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(
        lines_after_ready(&t),
        [
            "A=tuvwxyzabc",
            "POS=133",
            "B_POS=78",
            "C_POS=4096",
            "D=here\\nstill",
            "D_POS=60"
        ]
    );
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
    wait_gone(pid);
    let (code, stderr) = restore_and_wait(&second, &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        lines_after_ready(&t),
        [format!("DONE sum={:#x}", chpox_tests::pattern_sum(len))]
    );
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
    assert!(lines_after_ready(&t).is_empty());
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
    assert_eq!(lines_after_ready(&t), ["DONE slept"]);
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
    assert!(lines_after_ready(&t).is_empty());
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
    let xsave = &mut meta.threads[0].xsave;
    let bv = u64::from_le_bytes(xsave[bv_at.clone()].try_into().expect("8 bytes")) | (1 << bit);
    xsave[bv_at].copy_from_slice(&bv.to_le_bytes());
    for v in &mut meta.vmas {
        v.pages.clear();
    }
    for f in &mut meta.files {
        f.embedded = None;
    }
    for fd in &mut meta.fds {
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
    let image = dir.path().join("threads.img");
    // Killing from the dump would wait for the leader before the other
    // threads; kill and reap here instead.
    chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        s(&image),
        "--unsupported-fd",
        "null",
        "--leave-stopped",
    ]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    wait_gone(t.pid);
    let pid = restore_detached(&image, &["--pid", "same"]);
    assert_eq!(pid, t.pid);
    for (i, tid) in tids.iter().enumerate() {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).expect("thread comm");
        assert_eq!(comm.trim_end(), format!("worker-{i}"));
    }
    // Let the workers count a little in their new life.
    std::thread::sleep(Duration::from_millis(100));
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(lines_after_ready(&t), ["DONE", "T0=ok", "T1=ok", "T2=ok"]);
}

#[test]
fn threads_come_back_with_new_tids() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("threads", &["2"], dir.path());
    let image = dir.path().join("threads.img");
    chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        s(&image),
        "--unsupported-fd",
        "null",
        "--leave-stopped",
    ]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    let pid = restore_detached(&image, &["--pid", "any"]);
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(lines_after_ready(&t), ["DONE", "T0=ok", "T1=ok"]);
}

#[test]
fn restore_of_a_missing_image_fails_cleanly() {
    let dir = tempdir();
    let out = run_chpox(&["restore", s(&dir.path().join("nope.img"))]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}
