//! Descriptor kinds beyond files, pipes and socket pairs, each on a real
//! process that checks its own state after dump → kill → restore
//! (`fdkinds`): eventfd, timerfd, signalfd, epoll, inotify, memfd, pidfd,
//! and two opens of one pipe with different O_NONBLOCK. Also the kinds
//! refused by name: io_uring, AIO, an inotify watch whose file is gone or
//! on procfs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Target, chpox_bin, chpox_ok, path_str, run_chpox, tempdir, wait_pid_free};

/// Test program `name` with no descriptor from us but 0-2 (the test
/// runner's own would be pipes to a process outside the checkpoint).
fn spawn_clean(name: &str, args: &[&str], dir: &Path) -> Target {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(common::bin(name));
    cmd.args(args);
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Target::spawn_command(cmd, name, dir)
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// `chpox restore IMAGE [extra]`, waited for; the restored job's exit code.
fn restore_and_go(image: &Path, go: &Path, extra: &[&str]) -> i32 {
    let mut restore = Command::new(chpox_bin())
        .args(["restore", path_str(image)])
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("run chpox restore");
    // Let it come back before it is told to check.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(go, b"").expect("create go");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = restore.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = restore.kill();
            panic!("the restored job did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_kind_comes_back_in_its_state() {
    every_kind_comes_back(&[]);
}

/// In a new PID namespace, the pidfds name the processes by the PIDs they
/// see there, their saved ones.
#[test]
fn every_kind_comes_back_in_a_pid_namespace() {
    every_kind_comes_back(&["--pid-ns"]);
}

fn every_kind_comes_back(restore_args: &[&str]) {
    let dir = tempdir();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let mut t = spawn_clean("fdkinds", &[path_str(&work)], dir.path());
    let child: i32 = t.ready_value("child").parse().expect("child pid");
    let image = dir.path().join("fdkinds.img");
    // No --unsupported-fd: every descriptor is one chpox saves. A first
    // dump lets it run on: it must take nothing away (an expiration, a
    // count, an event) that the checks after the restore look for.
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap");
    wait_pid_free(t.pid);
    wait_pid_free(child);
    let inspect = chpox_ok(&["inspect", path_str(&image)]);
    for what in [
        "eventfd",
        "timerfd",
        "signalfd",
        "epoll watching",
        "inotify watching",
        "memfd:chpox-test",
        "pidfd of PID",
    ] {
        assert!(
            inspect.contains(what),
            "inspect shows no {what}:\n{inspect}"
        );
    }

    let code = restore_and_go(&image, &work.join("go"), restore_args);
    let out = t.stdout();
    let after: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("READY"))
        .skip(1)
        .collect();
    for name in [
        "EVENTFD",
        "EVENTFD64",
        "TIMER_REL",
        "TIMER_ABS",
        "TIMER_TICKS",
        "SIGNALFD",
        "EPOLL",
        "INOTIFY",
        "MEMFD",
        "PIDFD_SELF",
        "PIDFD_CHILD",
        "PIPE_FLAGS",
    ] {
        let line = after
            .iter()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} line; output:\n{out}\nstderr:\n{}", t.stderr()));
        assert_eq!(*line, format!("{name} ok"), "output:\n{out}");
    }
    assert!(after.contains(&"DONE"), "output:\n{out}");
    assert_eq!(code, 0, "output:\n{out}");
}

/// What chpox cannot save is refused in one line naming it, even with
/// `--unsupported-fd null`, and the process runs on.
#[test]
fn io_uring_aio_and_a_watch_without_a_path_are_refused_by_name() {
    for (mode, phrase) in [
        ("uring", "is an io_uring instance"),
        ("aio", "has an AIO context"),
        ("inotify-gone", "which has no path any more"),
        ("inotify-proc", "cannot be opened again"),
    ] {
        let dir = tempdir();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("mkdir");
        let mut t = spawn_clean("fdrefused", &[mode, path_str(&work)], dir.path());
        let image = dir.path().join("img");
        let pid = t.pid.to_string();
        for extra in [&[][..], &["--unsupported-fd", "null"][..]] {
            let mut args = vec!["dump", &pid, "-o", path_str(&image)];
            args.extend_from_slice(extra);
            let out = run_chpox(&args);
            common::agent::assert_refused(mode, &out, phrase);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.trim().lines().count(), 1, "{mode}: {stderr}");
            assert!(!image.exists(), "{mode}: an image was written");
        }
        std::fs::write(work.join("go"), b"").expect("create go");
        t.wait_success(TIMEOUT);
        assert!(t.stdout().contains("ALIVE"), "{mode}: {}", t.stdout());
    }
}

/// inotify events queued and not read at the checkpoint cannot be put
/// into the restored instance: the dump says so (the watches come back).
#[test]
fn queued_inotify_events_are_named_as_not_kept() {
    let dir = tempdir();
    let watched = dir.path().join("watched");
    std::fs::create_dir(&watched).expect("mkdir");
    let script = format!(
        r#"
import ctypes, os, time
libc = ctypes.CDLL(None)
fd = libc.inotify_init1(0)
assert libc.inotify_add_watch(fd, b"{}", 0x100) >= 0  # IN_CREATE
open(os.path.join("{}", "new"), "w").close()
print("READY", flush=True)
time.sleep(3600)
"#,
        path_str(&watched),
        path_str(&watched)
    );
    let mut t = common::python(&script, &[], dir.path());
    let out = run_chpox(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&dir.path().join("img")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("events queued and not read yet are not kept"),
        "{stderr}"
    );
    let _ = t.child.kill();
    let _ = t.child.wait();
}
