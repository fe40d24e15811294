//! Helpers for the tests of process trees (`tree.rs`, `tree_shared.rs`):
//! jobs started in their own session and killed with their tree, the
//! `forktree` program, dumping and restoring a tree, its image as
//! `chpox inspect --json` shows it.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::poll;
use super::procs::{Stat, cmdline, exists, kill_tree, stat, tree, tree_pids};
use super::{Target, chpox_bin, chpox_ok, only_stdio, path_str};

/// How long a tree may take to finish, a restore to return, a state to be
/// reached.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long the PIDs of a killed tree may take to be free (PID 1 reaps
/// orphans about a second late here).
pub const GONE_TIMEOUT: Duration = Duration::from_secs(15);
pub const POLL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// /proc

/// A listing of `root`'s tree for failure messages.
pub fn describe_tree(root: i32) -> String {
    tree(root)
        .iter()
        .map(|s| {
            format!(
                "  {} ppid={} pgrp={} sid={} state={} {} {:?}\n",
                s.pid,
                s.ppid,
                s.pgrp,
                s.session,
                s.state,
                s.comm,
                cmdline(s.pid)
            )
        })
        .collect()
}

/// Where every thread of `root`'s tree waits (its kernel wait channel and
/// system call), for the failure message of a job that never ends.
pub fn describe_waits(root: i32) -> String {
    let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
    let mut out = describe_tree(root);
    for pid in tree_pids(root) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let tid = task.file_name().to_string_lossy().into_owned();
            out += &format!(
                "  {pid}/{tid} wchan={} syscall={}\n",
                read(format!("/proc/{pid}/task/{tid}/wchan")),
                read(format!("/proc/{pid}/task/{tid}/syscall")).trim()
            );
        }
    }
    out
}

/// Whether `pid` is blocked in a sleeping system call.
pub fn asleep(pid: i32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let nr: Option<i64> = s.split_whitespace().next().and_then(|n| n.parse().ok());
    nr.is_some_and(|nr| {
        [
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_select,
            libc::SYS_pselect6,
        ]
        .contains(&nr)
    })
}

/// Waits until none of `pids` exists any more; `context` says after what.
pub fn wait_gone(pids: &BTreeSet<i32>, context: &str) {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        if pids.iter().all(|&p| !exists(p)) {
            return;
        }
        let left: Vec<Stat> = pids.iter().filter_map(|&p| stat(p)).collect();
        assert!(
            Instant::now() < deadline,
            "{context}: processes still there after {GONE_TIMEOUT:?}: {left:#?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Whether `text` names `pid` as a number of its own.
pub fn mentions(text: &str, pid: i32) -> bool {
    let pid = pid.to_string();
    text.split(|c: char| !c.is_ascii_digit()).any(|w| w == pid)
}

// ---------------------------------------------------------------------------
// Processes we start, and clean-up

static JOBS: AtomicUsize = AtomicUsize::new(0);

/// A child we started (stdin /dev/null, stdout and stderr to files); when
/// dropped, unless reaped already, it and its whole tree are killed.
pub struct Job {
    pub child: Child,
    pub pid: i32,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Job {
    pub fn spawn(mut cmd: Command, name: &str, dir: &Path) -> Job {
        let n = JOBS.fetch_add(1, Ordering::SeqCst);
        let stdout_path = dir.join(format!("{name}.{n}.stdout"));
        let stderr_path = dir.join(format!("{name}.{n}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout file"))
            .stderr(File::create(&stderr_path).expect("create stderr file"));
        only_stdio(&mut cmd);
        let child = super::spawn_retrying(&mut cmd);
        let pid = child.id() as i32;
        Job {
            child,
            pid,
            stdout_path,
            stderr_path,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn describe(&self) -> String {
        format!(
            "PID {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid,
            self.stdout(),
            self.stderr()
        )
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits up to `timeout` for it to exit; panics, showing its output,
    /// on timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_child(&mut self.child, timeout) {
            Some(status) => status,
            None => panic!("did not exit within {timeout:?}; {}", self.describe()),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill_tree(self.pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `timeout` for our child to exit (and reaps it).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Test program `forktree` with `args`, running until its `READY` line.
pub fn forktree(args: &[&str], dir: &Path) -> Target {
    let mut cmd = Command::new(super::bin("forktree"));
    cmd.args(args);
    only_stdio(&mut cmd);
    Target::spawn_command(cmd, "forktree", dir)
}

/// Waits until `t` (the original, dead by now: the restored tree writes to
/// its stdout file) has printed `n` lines after `READY`, or a `FAIL` line,
/// or the restored `root` is gone; returns those lines.
pub fn wait_lines(t: &Target, n: usize, root: i32) -> Vec<String> {
    poll(
        &format!("{n} lines after READY"),
        TIMEOUT,
        || {
            format!(
                "--- stdout ---\n{}\n--- stderr ---\n{}",
                t.stdout(),
                t.stderr()
            )
        },
        || {
            let gone = !exists(root);
            let lines = t.lines_after_ready();
            (gone || lines.len() >= n || lines.iter().any(|l| l.starts_with("FAIL")))
                .then_some(lines)
        },
    )
}

/// The `READY` value `key` as a PID.
pub fn ready_pid(t: &Target, key: &str) -> i32 {
    let v = t.ready_value(key);
    v.parse()
        .unwrap_or_else(|e| panic!("READY {key}={v:?} is not a PID: {e}"))
}

// ---------------------------------------------------------------------------
// Checkpoint and restore

/// What `chpox dump` does to the original tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dump {
    /// `--kill`: the dump kills the tree once the image is on disk.
    Kill,
    /// The tree runs on; the test kills it itself.
    LeaveRunning,
}

/// `chpox dump ROOT -o IMAGE [--kill] [extra]`. Returns the PIDs of the
/// tree as `/proc` showed them just before.
pub fn dump(root: i32, image: &Path, how: Dump, extra: &[&str]) -> BTreeSet<i32> {
    let before = tree_pids(root);
    let root_s = root.to_string();
    let mut args = vec!["dump", root_s.as_str(), "-o", path_str(image)];
    if how == Dump::Kill {
        args.push("--kill");
    }
    args.extend_from_slice(extra);
    chpox_ok(&args);
    before
}

/// After [`dump`] of the tree of our child `root` (whose PIDs were
/// `pids`): makes sure every process of the original tree is gone and its
/// PID free. With [`Dump::Kill`] the dump must have killed them all; with
/// [`Dump::LeaveRunning`] the root must still run, and the tree is killed
/// here.
pub fn finish_original(root: &mut Child, how: Dump, pids: &BTreeSet<i32>) {
    let pid = root.id() as i32;
    let mut all = pids.clone();
    match how {
        Dump::Kill => {
            let status = wait_child(root, Duration::from_secs(10)).unwrap_or_else(|| {
                panic!(
                    "the root still runs after `chpox dump --kill`:\n{}",
                    describe_tree(pid)
                )
            });
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "the root was not killed by `chpox dump --kill`: {status}"
            );
            wait_gone(&all, "after `chpox dump --kill`");
        }
        Dump::LeaveRunning => {
            if let Some(status) = root.try_wait().expect("try_wait") {
                panic!("the root ended ({status}) after a dump that was to leave it running");
            }
            all.extend(kill_tree(pid));
            root.wait().expect("reap the original root");
            wait_gone(&all, "after killing the original tree");
        }
    }
}

/// `chpox inspect IMAGE --json`.
pub struct Image(pub Value);

impl Image {
    pub fn inspect(image: &Path) -> Image {
        let out = chpox_ok(&["inspect", path_str(image), "--json"]);
        Image(serde_json::from_str(&out).expect("inspect --json prints JSON"))
    }

    /// The root, then every descendant: `{process, threads, vmas, fds,
    /// signals}` each.
    pub fn processes(&self) -> Vec<&Value> {
        std::iter::once(&self.0)
            .chain(self.0["descendants"].as_array().into_iter().flatten())
            .collect()
    }

    pub fn zombies(&self) -> Vec<&Value> {
        self.0["zombies"].as_array().into_iter().flatten().collect()
    }

    /// PIDs of the live processes.
    pub fn pids(&self) -> BTreeSet<i32> {
        self.processes()
            .iter()
            .map(|p| int(&p["process"]["pid"]))
            .collect()
    }

    /// PIDs of the live processes and the zombies.
    pub fn all_pids(&self) -> BTreeSet<i32> {
        let mut pids = self.pids();
        pids.extend(self.zombies().iter().map(|z| int(&z["pid"])));
        pids
    }

    /// The entry of live process `pid`.
    pub fn process(&self, pid: i32) -> &Value {
        self.processes()
            .into_iter()
            .find(|p| int(&p["process"]["pid"]) == pid)
            .unwrap_or_else(|| panic!("PID {pid} not in the image: {}", self.summary()))
    }

    /// Descriptor `fd` of live process `pid`.
    pub fn fd(&self, pid: i32, fd: i32) -> &Value {
        let p = self.process(pid);
        p["fds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| int(&e["fd"]) == fd)
            .unwrap_or_else(|| panic!("PID {pid} has no fd {fd} in the image: {}", p["fds"]))
    }

    /// PID, parent and comm of every process in the image, for messages.
    pub fn summary(&self) -> String {
        let live: Vec<String> = self
            .processes()
            .iter()
            .map(|p| {
                let q = &p["process"];
                format!("{} (ppid {}, {})", q["pid"], q["ppid"], q["comm"])
            })
            .collect();
        format!("processes {live:?}, zombies {:?}", self.0["zombies"])
    }
}

/// A JSON number as an `i32` (PIDs, fds).
pub fn int(v: &Value) -> i32 {
    v.as_i64()
        .unwrap_or_else(|| panic!("{v} is not a number"))
        .try_into()
        .expect("fits in i32")
}

/// `chpox restore IMAGE [extra]` in the background: it waits for the
/// restored root and exits with its exit status.
pub fn restore_job(image: &Path, extra: &[&str], dir: &Path) -> Job {
    let mut cmd = Command::new(chpox_bin());
    cmd.arg("restore").arg(image).args(extra);
    Job::spawn(cmd, "restore", dir)
}

/// `chpox restore IMAGE [extra]` until it exits; its exit code (128 +
/// signal if killed) and stderr.
pub fn restore_and_wait(image: &Path, extra: &[&str], dir: &Path) -> (i32, String) {
    let mut job = restore_job(image, extra, dir);
    let status = job.wait(TIMEOUT);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    (code, job.stderr())
}

/// `chpox restore --detach IMAGE [extra]`; the restored root's PID.
pub fn restore_detached(image: &Path, extra: &[&str], dir: &Path) -> i32 {
    let mut cmd = Command::new(chpox_bin());
    cmd.args(["restore", "--detach"]).arg(image).args(extra);
    let mut job = Job::spawn(cmd, "restore-detach", dir);
    let status = job.wait(TIMEOUT);
    assert!(
        status.success(),
        "chpox restore --detach failed ({status}); {}",
        job.describe()
    );
    let out = job.stdout();
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore --detach printed {out:?}, not a PID: {e}"))
}

/// What `forktree shared` prints after `READY` when parent and child share
/// the file offset and the mapping.
pub const SHARED_OK: [&str; 6] = [
    "CHILD MAP OK",
    "CHILD OFFSET OK",
    "PARENT MAP OK",
    "PARENT OFFSET OK",
    "CHILD EXIT OK",
    "FILE OK",
];

pub fn job_output(job: &Job) -> String {
    format!(
        "--- job stdout ---\n{}\n--- job stderr ---\n{}",
        job.stdout(),
        job.stderr()
    )
}
