//! Helpers for the integration tests: finding the programs, running a
//! target program until it is `READY`, signalling it, reading its output,
//! and running `chpox`.
//!
//! Use from a test file with `mod common;`.

#![allow(dead_code)]

pub mod agent;
pub mod dumps;
pub mod images;
pub mod nobody;
pub mod procs;
pub mod restore;
pub mod sockets;
pub mod tree;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long [`Target::spawn`] waits for the `READY` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often output files and exit status are polled.
const POLL: Duration = Duration::from_millis(10);

/// The profile directory the test executable was built into, e.g.
/// `target/debug` (tests run from `target/debug/deps/<test>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent directory")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path of the `chpox-tests` program `name` (`tests/src/bin/<name>.rs`).
///
/// Cargo builds a package's binaries before its integration tests, so
/// these are always there under `cargo test -p chpox-tests`.
pub fn bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.is_file(),
        "test program {} not found; build it with `cargo build -p chpox-tests --bins`",
        p.display()
    );
    p
}

/// Path of the `chpox` binary: `$CHPOX_BIN` if set, else `chpox` next to
/// the test programs. `cargo test -p chpox-tests` does not build it (it is
/// a binary of another package); `cargo test --workspace` or
/// `cargo build -p chpox-user` does.
pub fn chpox_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CHPOX_BIN") {
        return PathBuf::from(p);
    }
    let p = profile_dir().join("chpox");
    assert!(
        p.is_file(),
        "chpox binary {} not found; build it with `cargo build -p chpox-user` \
         (or run `cargo test --workspace`), or set CHPOX_BIN",
        p.display()
    );
    p
}

/// Runs `chpox` with `args` and returns its output (stdin is /dev/null).
pub fn run_chpox(args: &[&str]) -> Output {
    Command::new(chpox_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run chpox")
}

/// Runs `chpox` with `args`, panics (showing stdout and stderr) unless it
/// succeeds, and returns its stdout.
pub fn chpox_ok(args: &[&str]) -> String {
    let out = run_chpox(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "chpox {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// Parses `key=value` tokens of a line (tokens without `=` are skipped).
pub fn parse_kv(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|tok| tok.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses `0x`-prefixed (or bare) hex.
pub fn parse_hex(s: &str) -> u64 {
    let t = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(t, 16).unwrap_or_else(|e| panic!("{s:?} is not hex: {e}"))
}

/// A running target program whose stdout and stderr go to files.
pub struct Target {
    pub child: Child,
    pub pid: i32,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The `key=value` pairs of the `READY` line.
    pub ready: HashMap<String, String>,
    /// The whole `READY` line.
    pub ready_line: String,
}

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

impl Target {
    /// Starts program `name` with `args` (stdin /dev/null, stdout and
    /// stderr to fresh files in `dir`) and waits up to [`READY_TIMEOUT`]
    /// for its `READY` line. Panics, showing its output, if it exits or
    /// times out first.
    pub fn spawn(name: &str, args: &[&str], dir: &Path) -> Target {
        let mut cmd = Command::new(bin(name));
        cmd.args(args);
        Target::spawn_command(cmd, name, dir)
    }

    /// A `READY` value; panics if the key is missing.
    pub fn ready_value(&self, key: &str) -> &str {
        self.ready
            .get(key)
            .unwrap_or_else(|| panic!("READY line {:?} has no key {key:?}", self.ready_line))
    }

    /// A `READY` value as hex (`0x...`).
    pub fn ready_hex(&self, key: &str) -> u64 {
        parse_hex(self.ready_value(key))
    }

    /// A `READY` value as a decimal number.
    pub fn ready_u64(&self, key: &str) -> u64 {
        let v = self.ready_value(key);
        v.parse()
            .unwrap_or_else(|e| panic!("READY {key}={v:?} is not a number: {e}"))
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The complete (newline-terminated) stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        let out = self.stdout();
        let complete = match out.rfind('\n') {
            Some(i) => &out[..=i],
            None => "",
        };
        complete.lines().map(str::to_string).collect()
    }

    /// The complete stdout lines after the `READY` line: the part of the
    /// output that must be the same for every run.
    pub fn lines_after_ready(&self) -> Vec<String> {
        let lines = self.lines();
        match lines.iter().position(|l| l.starts_with("READY")) {
            Some(i) => lines[i + 1..].to_vec(),
            None => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "pid {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid,
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits up to `timeout` for a complete stdout line starting with
    /// `prefix` and returns the first such line. Panics, showing the
    /// output, on timeout or if the program exits without printing it.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return l;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // It may have printed the line just before exiting.
                if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                    return l;
                }
                panic!(
                    "exited ({status}) without a line starting with {prefix:?}; {}",
                    self.describe()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "no line starting with {prefix:?} within {timeout:?}; {}",
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends signal `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid,
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` until `sig` is pending neither process-wide
    /// nor for any thread, i.e. it has been dequeued for delivery. Standard
    /// signals do not queue, so wait for this between two sends of the
    /// same signal. (A signal the target blocks stays pending: timeout.)
    pub fn wait_not_pending(&self, sig: i32, timeout: Duration) {
        let bit = 1u64 << (sig - 1);
        let deadline = Instant::now() + timeout;
        loop {
            if self.pending_mask().is_none_or(|m| m & bit == 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "signal {sig} still pending after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Union of `SigPnd` of all threads and `ShdPnd`, from `/proc`; `None`
    /// if the process is gone.
    pub fn pending_mask(&self) -> Option<u64> {
        let mut mask = 0u64;
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid)).ok()?;
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("SigPnd:")
                    .or_else(|| line.strip_prefix("ShdPnd:"))
                {
                    mask |= parse_hex(v.trim());
                }
            }
        }
        Some(mask)
    }

    /// Waits up to `timeout` for the process to exit and returns its
    /// status. Panics, showing the output, on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("did not exit within {timeout:?}; {}", self.describe());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for exit like [`Target::wait_exit`] and asserts exit code 0.
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        assert!(
            status.success(),
            "exited with {status}; {}",
            self.describe()
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    /// Like [`Target::spawn`], but runs `cmd` as given (its program,
    /// arguments, credentials, `pre_exec` hooks…) and only sets stdin to
    /// /dev/null and stdout and stderr to fresh files in `dir` named after
    /// `name`. For a wrapper that execs the program in place (`chpox run --
    /// <program>`), so that the child's PID is the program's.
    pub fn spawn_command(mut cmd: Command, name: &str, dir: &Path) -> Target {
        let n = SPAWNED.fetch_add(1, Ordering::SeqCst);
        let stdout_path = dir.join(format!("{name}.{n}.stdout"));
        let stderr_path = dir.join(format!("{name}.{n}.stderr"));
        let child = spawn_retrying(
            cmd.stdin(Stdio::null())
                .stdout(File::create(&stdout_path).expect("create stdout file"))
                .stderr(File::create(&stderr_path).expect("create stderr file")),
        );
        let pid = child.id() as i32;
        let mut t = Target {
            child,
            pid,
            stdout_path,
            stderr_path,
            ready: HashMap::new(),
            ready_line: String::new(),
        };
        let line = t.wait_for_line("READY", READY_TIMEOUT);
        t.ready = parse_kv(&line);
        t.ready_line = line;
        t
    }
}

/// Waits until `/proc/PID` is gone, so the PID is free for a restore that
/// wants it back (PID 1 here reaps orphans about a second late).
pub fn wait_pid_free(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "PID {pid} still exists");
        std::thread::sleep(POLL);
    }
}

/// Spawns `cmd`, retrying while another test's fork holds a freshly copied
/// binary open for writing (ETXTBSY).
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(POLL);
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    }
}

/// What `openfiles` prints after `READY` when it finishes correctly.
pub const OPENFILES_OUTPUT: [&str; 6] = [
    "A=tuvwxyzabc",
    "POS=133",
    "B_POS=78",
    "C_POS=4096",
    "D=here\\nstill",
    "D_POS=60",
];

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().expect("tempdir");
    // CHPOX_TEST_KEEP=1 leaves each test's directory (images, outputs)
    // behind for a post-mortem.
    if std::env::var_os("CHPOX_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// An exit status with both outputs, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A PID no process has: that of a child we started and reaped (PIDs are
/// handed out in increasing order, so it is not reused this soon).
pub fn free_pid() -> i32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id() as i32;
    child.wait().expect("wait true");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "PID {pid} still exists"
    );
    pid
}

/// The page runs of the image's root process, every mapping's in order.
pub fn root_page_runs(reader: &chpox::image::ImageReader) -> Vec<&chpox::image::model::PageRun> {
    reader
        .metadata()
        .root
        .vmas
        .iter()
        .flat_map(|v| &v.pages)
        .collect()
}

/// The image holds exactly `mempattern`'s pattern at `addr..addr+len`.
pub fn check_pattern(reader: &chpox::image::ImageReader, addr: u64, len: u64) {
    // An incremental image: with what it takes from its parent.
    let bytes = chpox::incremental::read_memory(reader, addr, len as usize)
        .expect("read memory")
        .expect("every page of the pattern is stored");
    for (i, word) in bytes.chunks_exact(8).enumerate() {
        let offset = i as u64 * 8;
        let got = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        assert_eq!(
            got,
            chpox_tests::pattern_word(offset),
            "pattern word at offset {offset} differs"
        );
    }
}

/// The line `mempattern --finish-after-rounds` ends with when the `len`
/// bytes of its pattern stayed intact.
pub fn mempattern_done(len: u64) -> String {
    format!("DONE sum={:#x}", chpox_tests::pattern_sum(len))
}

/// Only descriptors 0–2 reach the program: nothing of the test harness's
/// (a pipe to another process would make the dump refuse the tree).
pub fn only_stdio(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A Python script from `dir` (written there as `prog.py`), run until its
/// `READY` line.
pub fn python(script: &str, args: &[&str], dir: &Path) -> Target {
    let path = dir.join("prog.py");
    std::fs::write(&path, script).expect("write the script");
    let mut cmd = Command::new("python3");
    cmd.arg("-u").arg(&path).args(args).current_dir(dir);
    only_stdio(&mut cmd);
    Target::spawn_command(cmd, "prog", dir)
}

/// `chpox dump ROOT -o IMAGE --kill [extra]`, then waits until every
/// process of the tree is gone (and reaps our child).
pub fn dump_kill(t: &mut Target, image: &Path, extra: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let pids = procs::tree_pids(t.pid);
    let root = t.pid.to_string();
    let mut args = vec!["dump", root.as_str(), "-o", path_str(image), "--kill"];
    args.extend_from_slice(extra);
    chpox_ok(&args);
    let status = t.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed by the dump");
    for pid in pids {
        wait_pid_free(pid);
    }
}
