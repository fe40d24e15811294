//! Helpers of the dump tests (`dump_errors.rs`, `dump_outcome.rs`,
//! `snapshot.rs`): scratch
//! directories, running `chpox dump` as root or as `nobody`, the one-line
//! errors it must give, and the state it must leave the target in.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chpox::image::ImageReader;
use chpox::image::model::Metadata;

use super::{Target, bin, chmod, chpox_bin, chpox_ok, path_str, run_chpox, show, spawn_retrying};

pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to reach an expected state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);
pub const POLL: Duration = Duration::from_millis(10);
/// uid and gid of `nobody`, the unprivileged user of these tests.
pub const NOBODY: u32 = 65534;
/// `sleeper` sleeps this long after `READY`.
pub const SLEEPER_SLEEP: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Directories and files

/// A test's scratch space: `logs` for the targets' output, `out` for
/// images (so that listing `out` shows exactly what chpox left there).
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub logs: PathBuf,
    pub out: PathBuf,
}

pub fn scratch() -> Scratch {
    let tmp = tempfile::tempdir().expect("tempdir");
    let logs = tmp.path().join("logs");
    let out = tmp.path().join("out");
    fs::create_dir(&logs).expect("mkdir logs");
    fs::create_dir(&out).expect("mkdir out");
    Scratch { tmp, logs, out }
}

/// A scratch space whose `out` directory `nobody` may write to (and whose
/// parent it may traverse).
pub fn scratch_for_nobody() -> Scratch {
    let s = scratch();
    chmod(s.tmp.path(), 0o755);
    chmod(&s.logs, 0o755);
    chmod(&s.out, 0o777);
    s
}

/// Names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

pub fn assert_absent(path: &Path) {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(m) => panic!("{} exists ({:?})", path.display(), m.file_type()),
        Err(e) => panic!("lstat {}: {e}", path.display()),
    }
}

/// Whether a user other than the owner can run the file at `path`: every
/// directory above it searchable by others, the file readable (a binary
/// the user cannot read runs non-dumpable, so not ptraceable by that user)
/// and executable by others.
pub fn others_can_run(path: &Path) -> bool {
    let mode = |p: &Path| fs::metadata(p).map(|m| m.mode()).unwrap_or(0);
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

/// `path`, or a copy of it in `dir` if `nobody` could not run it there.
pub fn runnable_by_nobody(path: &Path, dir: &Path) -> PathBuf {
    if others_can_run(path) {
        return path.to_path_buf();
    }
    let copy = dir.join(path.file_name().expect("file name"));
    if !copy.exists() {
        fs::copy(path, &copy).expect("copy binary");
        chmod(&copy, 0o755);
    }
    assert!(
        others_can_run(&copy),
        "{} is not runnable by uid {NOBODY}",
        copy.display()
    );
    copy
}

// ---------------------------------------------------------------------------
// Running chpox

pub fn dump_args(pid: i32, image: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "dump".into(),
        pid.to_string(),
        "-o".into(),
        path_str(image).into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `chpox dump PID -o IMAGE EXTRA...` as root.
pub fn dump(pid: i32, image: &Path, extra: &[&str]) -> Output {
    let args = dump_args(pid, image, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_chpox(&args)
}

/// A dump as root that must succeed; stray descriptors inherited from the
/// test harness are not under test, hence `--unsupported-fd null`.
pub fn dump_ok(pid: i32, image: &Path, extra: &[&str]) -> String {
    let args = dump_args(
        pid,
        image,
        &[&["--unsupported-fd", "null"][..], extra].concat(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    chpox_ok(&args)
}

/// `chpox dump PID -o IMAGE --unsupported-fd null EXTRA...` as root,
/// started (not waited for), stdout to /dev/null, stderr to `stderr`.
pub fn spawn_dump(pid: i32, image: &Path, extra: &[&str], stderr: Stdio) -> Child {
    Command::new(chpox_bin())
        .args(dump_args(
            pid,
            image,
            &[&["--unsupported-fd", "null"][..], extra].concat(),
        ))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start chpox")
}

/// `chpox ARGS...` run as `nobody`, from a copy in `dir` if need be.
pub fn run_chpox_as_nobody(args: &[String], dir: &Path) -> Output {
    let chpox = runnable_by_nobody(&chpox_bin(), dir);
    let child = spawn_retrying(
        Command::new(chpox)
            .args(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    child.wait_with_output().expect("wait for chpox")
}

/// Asserts chpox failed with exit code 1, printed nothing on stdout and
/// exactly one line on stderr, which starts with `prefix` and contains
/// every one of `phrases`. Returns the line.
pub fn assert_error_line(out: &Output, prefix: &str, phrases: &[&str]) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "chpox should fail: {}",
        show(out)
    );
    assert!(out.stdout.is_empty(), "no stdout on failure: {}", show(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.ends_with('\n') && stderr.lines().count() == 1,
        "stderr must be exactly one line: {}",
        show(out)
    );
    let line = stderr.trim_end_matches('\n');
    assert!(
        line.starts_with(prefix),
        "error line {line:?} does not start with {prefix:?}"
    );
    for phrase in phrases {
        assert!(
            line.contains(phrase),
            "error line {line:?} does not say {phrase:?}"
        );
    }
    line.to_string()
}

pub fn assert_dump_error(out: &Output, pid: i32, phrases: &[&str]) -> String {
    assert_error_line(
        out,
        &format!("chpox: cannot checkpoint PID {pid}: "),
        phrases,
    )
}

pub fn assert_inspect_error(image: &Path, phrases: &[&str]) -> String {
    let out = run_chpox(&["inspect", path_str(image)]);
    let line = assert_error_line(
        &out,
        &format!("chpox: cannot read image {}: ", image.display()),
        phrases,
    );
    // The JSON form fails the same way.
    let out = run_chpox(&["inspect", path_str(image), "--json"]);
    let json_line = assert_error_line(
        &out,
        &format!("chpox: cannot read image {}: ", image.display()),
        phrases,
    );
    assert_eq!(line, json_line);
    line
}

/// Opens the image, checks every checksum, and returns its metadata.
pub fn open_image(image: &Path) -> Metadata {
    let reader = ImageReader::open(image)
        .unwrap_or_else(|e| panic!("image {} does not open: {e}", image.display()));
    reader
        .verify_all()
        .unwrap_or_else(|e| panic!("image {} does not verify: {e}", image.display()));
    reader.metadata().clone()
}

/// The image holds `mempattern`'s region `[addr, addr + len)` intact.
pub fn check_pattern(image: &Path, addr: u64, len: u64) {
    let reader = ImageReader::open(image).expect("image opens");
    super::check_pattern(&reader, addr, len);
}

// ---------------------------------------------------------------------------
// Process state

/// The value of `key` (e.g. `"State:"`) in /proc/PID/status; `None` if the
/// process is gone.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The process tracing `pid` (0: none); `None` if it is gone.
pub fn tracer_of(pid: i32) -> Option<i32> {
    status_field(pid, "TracerPid:")?.parse().ok()
}

/// The one-letter state from /proc/PID/stat; `None` if the process is gone.
pub fn stat_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

pub fn describe_status(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| format!("({e})"))
}

pub fn assert_untraced(pid: i32) {
    assert_eq!(
        status_field(pid, "TracerPid:").as_deref(),
        Some("0"),
        "PID {pid} is still traced (or gone):\n{}",
        describe_status(pid)
    );
}

/// Whether `dumper` was seen holding `target` frozen before it ended (a
/// brief freeze can pass between two looks).
pub fn seen_frozen(target: i32, dumper: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracer_of(target) != Some(dumper.id() as i32) {
        if dumper.try_wait().expect("try_wait").is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "chpox never seized the target");
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// The process is alive, not stopped or traced: running or sleeping.
pub fn assert_running_untraced(pid: i32) {
    assert_untraced(pid);
    let state = status_field(pid, "State:").unwrap_or_default();
    assert!(
        state.starts_with('R') || state.starts_with('S') || state.starts_with('D'),
        "PID {pid} should be running, is {state:?}:\n{}",
        describe_status(pid)
    );
}

/// Waits until /proc/PID/stat shows state `want`.
pub fn wait_for_state(pid: i32, want: char) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        if stat_state(pid) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PID {pid} did not reach state {want} within {STATE_TIMEOUT:?}:\n{}",
            describe_status(pid)
        );
        std::thread::sleep(POLL);
    }
}

/// The process is in a job-control stop (`T (stopped)`), not a ptrace stop,
/// and no one traces it.
pub fn assert_stopped_untraced(pid: i32) {
    wait_for_state(pid, 'T');
    assert_eq!(
        status_field(pid, "State:").as_deref(),
        Some("T (stopped)"),
        "{}",
        describe_status(pid)
    );
    assert_untraced(pid);
}

/// Waits for `sleeper` to exit and asserts it slept its full time without
/// noticing anything.
pub fn assert_sleeper_finishes(t: &mut Target) {
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE slept"], "{}", t.stderr());
}

/// Waits for `mempattern --finish-after-rounds` to exit and asserts its
/// memory stayed intact.
pub fn assert_mempattern_finishes(t: &mut Target) {
    let len = t.ready_u64("len");
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), [super::mempattern_done(len)]);
}

/// Starts program `name` as `nobody`, stdout and stderr to files in `logs`,
/// and waits for its `READY` line.
pub fn spawn_as_nobody(name: &str, args: &[&str], logs: &Path) -> Target {
    let prog = runnable_by_nobody(&bin(name), logs);
    let mut cmd = Command::new(prog);
    cmd.args(args).uid(NOBODY).gid(NOBODY);
    let t = Target::spawn_command(cmd, &format!("{name}.nobody"), logs);
    let pid = t.pid;
    assert_eq!(
        status_field(pid, "Uid:").as_deref(),
        Some("65534\t65534\t65534\t65534")
    );
    t
}

/// A child killed and reaped when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sleeper` with its stdout a pipe we hold, and the write end of another
/// pipe of ours on its fd 3: a pipe to another process that is not stdio,
/// which chpox cannot restore. Returns the child (its `READY` line read),
/// the stdout pipe's read end, the fd 3 link target (`pipe:[N]`), and the
/// fd 3 pipe's read end.
pub fn sleeper_with_pipe() -> (
    Reaped,
    BufReader<std::process::ChildStdout>,
    String,
    std::os::fd::OwnedFd,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (extra_read, extra_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    let w = extra_write.as_raw_fd();
    let mut cmd = Command::new(bin("sleeper"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the hook only calls dup2/fcntl, async-signal-safe, on
    // descriptors the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if w == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(w, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().expect("spawn sleeper"));
    drop(extra_write);
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout pipe"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read READY");
    assert_eq!(line, "READY\n");
    let pid = child.0.id();
    let link = fs::read_link(format!("/proc/{pid}/fd/3")).expect("readlink fd 3");
    let link = link.to_string_lossy().into_owned();
    assert!(link.starts_with("pipe:["), "fd 3 is {link}");
    (child, stdout, link, extra_read)
}

/// Reads the rest of the pipe-holding sleeper's output and checks it
/// finished normally.
pub fn assert_piped_sleeper_finishes(
    mut child: Reaped,
    mut stdout: BufReader<std::process::ChildStdout>,
) {
    let mut rest = String::new();
    stdout
        .read_to_string(&mut rest)
        .expect("read sleeper output");
    let status = child.0.wait().expect("wait sleeper");
    assert!(status.success(), "sleeper exited with {status}: {rest:?}");
    assert_eq!(rest, "DONE slept\n");
}

/// Every slice of `cowwriters` reads `g+1` up to one point and `g` after
/// it (see the program). Returns the first violation.
pub fn point_in_time(region: &[u8], threads: usize, slice: usize) -> Result<(), String> {
    for t in 0..threads {
        let tag = (t as u64 + 1) << 48;
        let words: Vec<u64> = region[t * slice..(t + 1) * slice]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let pass = |w: usize| -> Result<u64, String> {
            let v = words[w];
            if v >> 48 != tag >> 48 {
                return Err(format!(
                    "thread {t} word {w}: {v:#x} lacks the thread's tag"
                ));
            }
            Ok(v & ((1 << 48) - 1))
        };
        let first = pass(0)?;
        let mut step_at = None;
        for w in 1..words.len() {
            let p = pass(w)?;
            let before = pass(w - 1)?;
            if p == before {
                continue;
            }
            if p + 1 != before || step_at.is_some() {
                return Err(format!(
                    "thread {t}: pass {before} then {p} at word {w} (first {first}, earlier step at {step_at:?}): not one instant"
                ));
            }
            step_at = Some(w);
        }
    }
    Ok(())
}
