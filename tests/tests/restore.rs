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
use common::procs::{become_subreaper, restore_detached, wait_pid};
use common::restore::{EXIT_TIMEOUT, checkpoint, dump, dump_kill, restore_and_wait, run_waiting};
use common::{
    Target, chpox_bin, chpox_ok, path_str, profile_dir, run_chpox, tempdir, wait_pid_free,
};

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

/// Waits until `pid` sleeps in `nanosleep` or `clock_nanosleep`, or in
/// `restart_syscall` continuing one: a restored thread is let go at the
/// entry of its sleep, and the wake-up of that release makes the kernel
/// restart the call through its restart block, with the time left.
fn wait_asleep_in_nanosleep(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let nr = syscall.split_whitespace().next().unwrap_or("");
        if [
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_restart_syscall,
        ]
        .iter()
        .any(|n| nr == n.to_string())
        {
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
    // Published uncompressed before the kill, compressed after it.
    let reader = chpox::image::ImageReader::open(&image).expect("image");
    let runs = common::root_page_runs(&reader);
    assert!(!runs.is_empty());
    assert!(
        runs.iter()
            .all(|r| r.data.compression == chpox::image::model::Compression::Zstd),
        "{runs:?}"
    );
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
