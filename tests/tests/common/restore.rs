//! Helpers of the restore tests (`restore.rs`, `restore_programs.rs`):
//! checkpointing a target with `chpox dump`, and restoring it until the
//! restored process exits.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Target, chpox_bin, chpox_ok, path_str, wait_pid_free};

pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `chpox dump PID -o IMAGE --unsupported-fd null --kill [extra]`.
pub fn dump_kill(pid: i32, image: &Path, extra: &[&str]) {
    dump(pid, image, &[&["--kill"], extra].concat());
}

/// `chpox dump PID -o IMAGE --unsupported-fd null [extra]`.
pub fn dump(pid: i32, image: &Path, extra: &[&str]) {
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
pub fn checkpoint(t: &mut Target, image: &Path, extra: &[&str]) {
    dump_kill(t.pid, image, extra);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
}

/// Runs `program restore-args...` until it exits; returns its exit code
/// and stderr.
pub fn run_waiting(program: &Path, args: &[&str], dir: &Path) -> (i32, String) {
    run_waiting_within(program, args, dir, EXIT_TIMEOUT)
}

/// [`run_waiting`] for at most `timeout`.
pub fn run_waiting_within(
    program: &Path,
    args: &[&str],
    dir: &Path,
    timeout: Duration,
) -> (i32, String) {
    let err_path = dir.join("restore.stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("run restore");
    let deadline = Instant::now() + timeout;
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
pub fn restore_and_wait(image: &Path, extra: &[&str], dir: &Path) -> (i32, String) {
    restore_and_wait_within(image, extra, dir, EXIT_TIMEOUT)
}

/// [`restore_and_wait`] for a restored program that may run for up to
/// `timeout` (a real program's remaining work on a loaded machine).
pub fn restore_and_wait_within(
    image: &Path,
    extra: &[&str],
    dir: &Path,
    timeout: Duration,
) -> (i32, String) {
    let mut args = vec!["restore", path_str(image)];
    args.extend_from_slice(extra);
    run_waiting_within(&chpox_bin(), &args, dir, timeout)
}
