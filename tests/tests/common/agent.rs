//! A real `chpox-agent` for a test: its scratch space, starting and
//! stopping it, running the clients (`chpox`, `chpoxctl`) against it, and
//! small helpers about processes and client output.
//!
//! Every test starts its own agent (own run directory, image directory and
//! BPF maps), so the tests run in parallel.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use chpox::image::ImageReader;

use super::{Target, bin, chmod, chpox_bin, parse_hex, parse_kv, path_str, run_chpox, show};

/// The default trigger signal (SIGSYS on x86-64).
pub const SIGSYS: i32 = 31;
/// uid and gid of `nobody`, the unprivileged user of these tests.
pub const NOBODY: u32 = 65534;

/// How long the agent may take to load its eBPF program and serve.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a checkpoint may take from the signal to `chpox list` counting it.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to notice a change (exit, FIFO line).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agent's log, `chpox list` and `/proc` are polled.
pub const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Scratch space, tools, small helpers

/// A test's scratch space, traversable by everyone (so `nobody` reaches the
/// agent's socket): `run` is the agent's run directory, `images` its
/// default image directory (both created by the agent), `logs` holds the
/// output of the agent and of the targets. `out` is where a test's images
/// conventionally go: [`scratch_with_out`] creates it writable by all,
/// [`scratch`] leaves it to the test.
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub run: PathBuf,
    pub images: PathBuf,
    pub logs: PathBuf,
    pub out: PathBuf,
}

pub fn scratch() -> Scratch {
    let tmp = tempfile::tempdir().expect("tempdir");
    chmod(tmp.path(), 0o755);
    let logs = tmp.path().join("logs");
    fs::create_dir(&logs).expect("mkdir logs");
    chmod(&logs, 0o755);
    Scratch {
        run: tmp.path().join("run"),
        images: tmp.path().join("images"),
        out: tmp.path().join("out"),
        logs,
        tmp,
    }
}

/// A [`scratch`] space whose `out` exists, writable by all (mode 1777).
pub fn scratch_with_out() -> Scratch {
    let s = scratch();
    fs::create_dir(&s.out).expect("mkdir");
    chmod(&s.out, 0o1777);
    s
}

impl Scratch {
    /// The path `name` in the scratch space.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A new directory `name` (with its parents) in the scratch space with
    /// `mode`.
    pub fn dir(&self, name: &str, mode: u32) -> PathBuf {
        let d = self.path(name);
        fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        chmod(&d, mode);
        d
    }

    /// [`Scratch::dir`], owned by `uid` (group `uid` too).
    pub fn dir_owned(&self, name: &str, mode: u32, uid: u32) -> PathBuf {
        let d = self.dir(name, mode);
        std::os::unix::fs::chown(&d, Some(uid), Some(uid)).expect("chown");
        d
    }
}

/// A binary of `chpox-user` (`chpox-agent`, `chpoxctl`), next to `chpox`.
pub fn tool(name: &str) -> PathBuf {
    let p = chpox_bin().with_file_name(name);
    assert!(
        p.is_file(),
        "{} not found; build it with `cargo build -p chpox-user`",
        p.display()
    );
    p
}

/// The stdout of a client command that must have succeeded.
pub fn stdout_ok(what: &str, out: Output) -> String {
    assert!(out.status.success(), "{what} failed {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed {}", show(out));
}

/// Asserts that a client command failed and said `phrase` on stderr.
pub fn assert_refused(what: &str, out: &Output, phrase: &str) {
    assert!(
        !out.status.success(),
        "{what} succeeded but should have been refused {}",
        show(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(phrase),
        "{what}: stderr does not say {phrase:?} {}",
        show(out)
    );
}

/// The tracing output without colour escapes (in case NO_COLOR is ignored).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// [`poll`] for a condition with no value.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> bool,
) {
    poll(what, timeout, context, || f().then_some(()))
}

/// Polls `f` every [`POLL`] until it returns `Some`, for at most `timeout`;
/// on timeout panics with `what` and `context()`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Processes

/// The value of `key` (`Uid:`, `VmRSS:`, …) in /proc/PID/status, trimmed.
pub fn proc_status(pid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The bit of signal `sig` in a /proc signal mask.
pub fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// A signal mask (`SigIgn`, `SigCgt`, …) from /proc/PID/status.
pub fn sig_mask(pid: i32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    parse_hex(v.trim())
}

pub fn ignores(pid: i32, sig: i32) -> bool {
    sig_mask(pid, "SigIgn:") & bit(sig) != 0
}

pub fn catches(pid: i32, sig: i32) -> bool {
    sig_mask(pid, "SigCgt:") & bit(sig) != 0
}

pub fn send(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// No core files from targets killed by SIGSYS (its default action dumps
/// core), and none in the source tree either: targets run in `dir`. Nor
/// inherited descriptors (see [`no_inherited_fds`]).
pub fn no_core(cmd: &mut Command, dir: &Path) {
    cmd.current_dir(dir);
    no_inherited_fds(cmd);
    // SAFETY: the hook only calls setrlimit, which is async-signal-safe
    // and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The program `cmd` runs gets none of the descriptors the test runner
/// inherited (a build tool's jobserver pipe, say): a checkpoint of it
/// would rightly refuse a pipe to an unrelated process, which is not what
/// these tests are about. Call it before handing descriptors over in a
/// later `pre_exec` hook (hooks run in order).
pub fn no_inherited_fds(cmd: &mut Command) {
    // SAFETY: the hook only calls close_range, which is async-signal-safe
    // and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // Close-on-exec rather than closed: the standard library's own
            // pipe to report a failed exec must stay open until the exec.
            if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// The agent

/// Numbers the agents' logs (and other logs of a test process).
pub static AGENTS: AtomicUsize = AtomicUsize::new(0);

/// How [`Agent::start_opts`] starts and watches an agent; the default is
/// what [`Agent::start`] does.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentOptions<'a> {
    /// The default image directory; `None`: the scratch space's `images`.
    pub images: Option<&'a Path>,
    /// More arguments for `chpox-agent`.
    pub args: &'a [&'a str],
    /// Start the agent as a systemd service would: soft RLIMIT_NOFILE at
    /// most 1024.
    pub service_nofile: bool,
    /// How long [`Agent::list`] waits for root's `chpox list` before it
    /// panics; `None`: as long as it takes.
    pub list_timeout: Option<Duration>,
    /// [`Agent::describe`] shows only the log's last this many bytes.
    pub log_tail: Option<usize>,
}

/// A running `chpox-agent`, stopped with SIGTERM when dropped.
pub struct Agent {
    pub child: Child,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    pub stopped: bool,
    list_timeout: Option<Duration>,
    log_tail: Option<usize>,
}

impl Agent {
    /// An agent for the scratch space, with default options.
    pub fn start(s: &Scratch) -> Agent {
        Agent::start_with(s, &[])
    }

    /// An agent for the scratch space with more arguments `extra`.
    pub fn start_with(s: &Scratch, extra: &[&str]) -> Agent {
        Agent::start_opts(
            s,
            AgentOptions {
                args: extra,
                ..AgentOptions::default()
            },
        )
    }

    pub fn start_opts(s: &Scratch, opts: AgentOptions) -> Agent {
        let n = AGENTS.fetch_add(1, Ordering::SeqCst);
        let log = s.logs.join(format!("agent.{n}.log"));
        let mut cmd = Command::new(tool("chpox-agent"));
        cmd.arg("--run-dir")
            .arg(&s.run)
            .arg("--image-dir")
            .arg(opts.images.unwrap_or(&s.images))
            .args(opts.args)
            // The machine's /etc/chpox/agent.toml is not the test's.
            .args(
                (!opts.args.contains(&"--config"))
                    .then_some(["--config", "/dev/null"])
                    .into_iter()
                    .flatten(),
            )
            .env("CHPOX_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CHPOX_RUN_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create agent log"));
        if opts.service_nofile {
            // SAFETY: the hook only calls getrlimit and setrlimit, which are
            // async-signal-safe and touch no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = lim.rlim_max.min(1024);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn chpox-agent");
        let mut agent = Agent {
            child,
            run_dir: s.run.clone(),
            log,
            stopped: false,
            list_timeout: opts.list_timeout,
            log_tail: opts.log_tail,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if agent.log_text().contains("chpox-agent ready") && agent.socket().exists() {
                return agent;
            }
            if let Some(status) = agent.child.try_wait().expect("try_wait agent") {
                agent.stopped = true;
                panic!(
                    "chpox-agent exited ({status}) before serving\n{}",
                    agent.describe()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chpox-agent not ready within {STARTUP_TIMEOUT:?}\n{}",
                agent.describe()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    pub fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    pub fn describe(&self) -> String {
        let text = self.log_text();
        match self.log_tail {
            None => format!("--- agent log ---\n{text}"),
            Some(n) => {
                // The end of a log that exploded is what tells.
                let tail = &text[text.len().saturating_sub(n)..];
                format!("--- agent log (last {n} bytes) ---\n{tail}")
            }
        }
    }

    /// The `key=value` fields of the agent's own log lines with `message`.
    /// (The agent logs from `chpox::trigger::agent` and its submodules.)
    pub fn events(&self, message: &str) -> Vec<HashMap<String, String>> {
        self.log_text()
            .lines()
            .filter(|l| {
                // `chpox::trigger::agent` since the crate's re-layout.
                l.split_once(" chpox::trigger::agent")
                    .or_else(|| l.split_once(" chpox::agent"))
                    .and_then(|(_, rest)| rest.split_once(": "))
                    .is_some_and(|(module, text)| {
                        (module.is_empty() || module.starts_with("::")) && text.starts_with(message)
                    })
            })
            .map(parse_kv)
            .collect()
    }

    /// Log lines with `message` about `pid`.
    pub fn events_for(&self, message: &str, pid: i32) -> usize {
        let pid = pid.to_string();
        self.events(message)
            .iter()
            .filter(|kv| kv.get("pid") == Some(&pid))
            .count()
    }

    /// A client program talking to this agent, as root.
    pub fn client(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("CHPOX_RUN_DIR", &self.run_dir)
            .env_remove("CHPOX_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// A client program talking to this agent, as `uid` (and group `uid`);
    /// `None`: as root, with no change of ids.
    pub fn client_as(&self, program: PathBuf, uid: impl Into<Option<u32>>) -> Command {
        let mut cmd = self.client(program);
        if let Some(uid) = uid.into() {
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    pub fn chpox(&self, args: &[&str]) -> Output {
        self.client(chpox_bin())
            .args(args)
            .output()
            .expect("run chpox")
    }

    pub fn chpox_ok(&self, args: &[&str]) -> String {
        stdout_ok(&format!("chpox {args:?}"), self.chpox(args))
    }

    /// `chpox ARGS` as `uid` (`None`: as root, like [`Agent::chpox`]).
    pub fn chpox_as(&self, uid: impl Into<Option<u32>>, args: &[&str]) -> Output {
        self.client_as(chpox_bin(), uid)
            .args(args)
            .output()
            .expect("run chpox")
    }

    pub fn chpoxctl(&self, args: &[&str]) -> Output {
        self.client(tool("chpoxctl"))
            .args(args)
            .output()
            .expect("run chpoxctl")
    }

    pub fn chpoxctl_ok(&self, args: &[&str]) -> String {
        stdout_ok(&format!("chpoxctl {args:?}"), self.chpoxctl(args))
    }

    /// `chpoxctl ARGS` as `uid` (`None`: as root, like [`Agent::chpoxctl`]).
    pub fn chpoxctl_as(&self, uid: impl Into<Option<u32>>, args: &[&str]) -> Output {
        self.client_as(tool("chpoxctl"), uid)
            .args(args)
            .output()
            .expect("run chpoxctl")
    }

    /// Asks for a checkpoint of `pid` as `uid` and waits for its outcome.
    pub fn checkpoint_as(&self, uid: impl Into<Option<u32>>, pid: i32) -> Output {
        self.chpox_as(uid, &["checkpoint", &pid.to_string(), "--timeout", "60"])
    }

    pub fn parse_list(&self, stdout: &str) -> Vec<Value> {
        match serde_json::from_str(stdout) {
            Ok(Value::Array(entries)) => entries,
            other => panic!(
                "chpox list --json printed {stdout:?} ({other:?})\n{}",
                self.describe()
            ),
        }
    }

    /// `chpox list --json` as root, which must answer within `timeout`;
    /// `Err` says what went wrong.
    pub fn try_list(&self, timeout: Duration) -> Result<Vec<Value>, String> {
        let mut child = self
            .client(chpox_bin())
            .args(["list", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chpox list");
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "root's `chpox list` got no answer within {timeout:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
        let out = child.wait_with_output().expect("chpox list output");
        if !out.status.success() {
            return Err(format!("root's `chpox list` failed {}", show(&out)));
        }
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(entries)) => Ok(entries),
            other => Err(format!("chpox list --json printed {other:?}")),
        }
    }

    /// `chpox list --json` as root (within the agent's `list_timeout`, if
    /// it has one).
    pub fn list(&self) -> Vec<Value> {
        if let Some(timeout) = self.list_timeout {
            return self
                .try_list(timeout)
                .unwrap_or_else(|e| panic!("{e}\n{}", self.describe()));
        }
        let out = self.chpox(&["list", "--json"]);
        if !out.status.success() {
            panic!("chpox list failed {}\n{}", show(&out), self.describe());
        }
        self.parse_list(&String::from_utf8_lossy(&out.stdout))
    }

    /// `chpox list --json`'s entry for `pid`, as root.
    pub fn entry(&self, pid: i32) -> Option<Value> {
        self.list().into_iter().find(|e| e["pid"] == pid)
    }

    pub fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        poll(what, timeout, || self.describe(), f)
    }

    /// Waits until `pid` has at least `n` checkpoints; returns its entry.
    pub fn wait_checkpoints(&self, pid: i32, n: u64) -> Value {
        self.wait_for(
            &format!("{n} checkpoint(s) of PID {pid}"),
            CHECKPOINT_TIMEOUT,
            || {
                let e = self.entry(pid)?;
                (e["checkpoints"].as_u64()? >= n).then_some(e)
            },
        )
    }

    /// Waits until `pid` is no longer listed.
    pub fn wait_gone(&self, pid: i32) {
        self.wait_for(
            &format!("PID {pid} to leave `chpox list`"),
            STATE_TIMEOUT,
            || self.entry(pid).is_none().then_some(()),
        );
    }

    /// Waits until `pid`'s entry is idle and has not changed for a second.
    pub fn settled(&self, pid: i32) -> Value {
        let mut last: Option<Value> = None;
        let mut since = Instant::now();
        self.wait_for(&format!("PID {pid} to settle"), CHECKPOINT_TIMEOUT, || {
            let e = self
                .entry(pid)
                .unwrap_or_else(|| panic!("PID {pid} left the list\n{}", self.describe()));
            if last.as_ref() != Some(&e) {
                last = Some(e);
                since = Instant::now();
                return None;
            }
            (e["state"] == "idle" && since.elapsed() >= Duration::from_secs(1)).then_some(e)
        })
    }

    /// Panics unless the agent process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait agent") {
            self.stopped = true;
            panic!("chpox-agent exited ({status})\n{}", self.describe());
        }
    }

    /// SIGTERM, and the agent must exit cleanly.
    pub fn stop(&mut self) {
        send(self.pid(), libc::SIGTERM);
        let log = self.log.clone();
        let child = &mut self.child;
        let status = poll(
            "chpox-agent to exit after SIGTERM",
            STATE_TIMEOUT,
            || strip_ansi(&fs::read_to_string(&log).unwrap_or_default()),
            || child.try_wait().expect("try_wait agent"),
        );
        self.stopped = true;
        assert!(
            status.success(),
            "chpox-agent exited with {status}\n{}",
            self.describe()
        );
    }

    /// A field of the agent's /proc/PID/status, in kB (`VmRSS:`, `VmHWM:`).
    pub fn status_kb(&self, key: &str) -> u64 {
        proc_status(self.pid(), key)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} for the agent"))
    }

    /// User and system CPU time the agent used, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        self.cpu_ticks() as f64 / hz as f64
    }

    /// User and system CPU time the agent used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("agent stat");
        let fields: Vec<&str> = text[text.rfind(')').expect("stat") + 1..]
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the PID is our
        // unreaped child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Targets and images of the trigger-path tests

/// How long a target may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Panics unless the target is still running.
pub fn assert_running(t: &mut Target) {
    if let Some(status) = t.child.try_wait().expect("try_wait") {
        panic!(
            "pid {} exited ({status}) but should run on\n--- stdout ---\n{}\n--- stderr ---\n{}",
            t.pid,
            t.stdout(),
            t.stderr()
        );
    }
}

/// Test program `name` started directly (not registered), as root.
pub fn plain_target(s: &Scratch, name: &str, args: &[&str]) -> Target {
    let mut cmd = Command::new(bin(name));
    cmd.args(args);
    no_core(&mut cmd, &s.logs);
    Target::spawn_command(cmd, name, &s.logs)
}

/// Test program `name` started directly as `nobody`.
pub fn nobody_target(s: &Scratch, name: &str, args: &[&str]) -> Target {
    let mut cmd = Command::new(bin(name));
    cmd.args(args).uid(NOBODY).gid(NOBODY);
    no_core(&mut cmd, &s.logs);
    let t = Target::spawn_command(cmd, name, &s.logs);
    assert_eq!(
        fs::metadata(format!("/proc/{}", t.pid)).unwrap().uid(),
        NOBODY
    );
    t
}

/// Test program `name` started with `chpox run CHPOX_ARGS -- PROGRAM ARGS`:
/// registered before its first instruction, under the PID of our child.
pub fn run_target(
    agent: &Agent,
    s: &Scratch,
    name: &str,
    args: &[&str],
    chpox_args: &[&str],
) -> Target {
    run_program(agent, s, &bin(name), args, chpox_args)
}

/// `chpox run CHPOX_ARGS -- PROGRAM ARGS`, PROGRAM a path (a test program
/// or any other).
pub fn run_program(
    agent: &Agent,
    s: &Scratch,
    program: &Path,
    args: &[&str],
    chpox_args: &[&str],
) -> Target {
    let mut cmd = agent.client(chpox_bin());
    cmd.arg("run")
        .args(chpox_args)
        .arg("--")
        .arg(program)
        .args(args);
    no_core(&mut cmd, &s.logs);
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Target::spawn_command(cmd, &name, &s.logs)
}

/// `chpox inspect` accepts the image, its checksums verify, and it is of `pid`.
pub fn check_image(path: &Path, pid: i32) -> ImageReader {
    let out = run_chpox(&["inspect", path_str(path)]);
    assert!(
        out.status.success(),
        "chpox inspect {} failed {}",
        path.display(),
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("checksums: ok"),
        "{}",
        show(&out)
    );
    let reader =
        ImageReader::open(path).unwrap_or_else(|e| panic!("open image {}: {e}", path.display()));
    reader
        .verify_all()
        .unwrap_or_else(|e| panic!("verify image {}: {e}", path.display()));
    assert_eq!(
        reader.metadata().root.process.pid,
        pid,
        "image of the wrong PID"
    );
    reader
}

/// The image at the `output` of a list entry.
pub fn output_of(entry: &Value) -> PathBuf {
    PathBuf::from(entry["output"].as_str().expect("output is a string"))
}
