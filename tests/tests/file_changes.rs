//! Files change between a checkpoint and its restore (a job left running
//! goes on writing them, someone edits them): the image holds processes,
//! not file contents, so restore reopens them as they are now, and says
//! which changed, except those the process only appends to.
//!
//! Needs root (ptrace). Run with `cargo test -p chpox-tests --test file_changes`.

mod common;

use std::io::Write;

use common::procs::signal;
use common::{chpox_ok, path_str, python, run_chpox, show, tempdir, wait_pid_free};

/// Writes a line to `data` (truncated) and to `log` (appended), then idles.
const WRITER: &str = r#"import time
data = open("data", "w")
data.write("first line\n")
data.flush()
log = open("log", "a")
log.write("started\n")
log.flush()
print("READY", flush=True)
while True:
    time.sleep(0.1)
"#;

#[test]
fn restore_names_an_open_file_that_changed_since_the_checkpoint() {
    let dir = tempdir();
    let mut t = python(WRITER, &[], dir.path());
    let image = dir.path().join("w.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    // After the checkpoint: both files grow.
    for name in ["data", "log"] {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(name))
            .expect("open for appending");
        f.write_all(b"written after the checkpoint\n")
            .expect("append");
    }
    t.child.kill().expect("kill the original");
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);

    let out = run_chpox(&["restore", "--detach", path_str(&image)]);
    assert!(out.status.success(), "restore: {}", show(&out));
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("restore --detach prints the PID");
    let err = String::from_utf8_lossy(&out.stderr);
    let data = format!("{}/data", dir.path().display());
    assert!(
        err.lines()
            .any(|l| l.contains(&data) && l.contains("changed since the checkpoint")),
        "no word about {data}: {err}"
    );
    assert!(
        !err.contains(&format!("{}/log", dir.path().display())),
        "an appended log is not worth a warning: {err}"
    );
    signal(pid, libc::SIGKILL);
    wait_pid_free(pid);
}

#[test]
fn restore_says_nothing_when_the_files_are_as_they_were() {
    let dir = tempdir();
    let mut t = python(WRITER, &[], dir.path());
    let image = dir.path().join("w.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
    let out = run_chpox(&["restore", "--detach", path_str(&image)]);
    assert!(out.status.success(), "restore: {}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("changed since"), "{err}");
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("restore --detach prints the PID");
    signal(pid, libc::SIGKILL);
    wait_pid_free(pid);
}
