//! `chpox dump` on bad input, and the promises around the image file and
//! the target's state, on real processes:
//!
//! - a refused dump says why in one line on stderr, exits 1, writes nothing
//!   at the output path, and leaves the target running and untraced;
//! - an image appears atomically (a failed dump keeps the old one intact,
//!   leaves no temporary files), with mode 0600, owned by the process owner;
//! - `--kill`, `--leave-stopped`, and an already stopped target end in the
//!   state they promise;
//! - `chpox inspect` rejects a corrupt image with a one-line reason.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chpox::image::model::{AfterDump, FdKind, Metadata};
use chpox::image::{ImageError, ImageReader};
use common::{
    Target, bin, chmod, chpox_bin, chpox_ok, free_pid, path_str, run_chpox, show, spawn_retrying,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to reach an expected state.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// uid and gid of `nobody`, the unprivileged user of these tests.
const NOBODY: u32 = 65534;
/// `sleeper` sleeps this long after `READY`.
const SLEEPER_SLEEP: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Directories and files

/// A test's scratch space: `logs` for the targets' output, `out` for
/// images (so that listing `out` shows exactly what chpox left there).
struct Scratch {
    tmp: tempfile::TempDir,
    logs: PathBuf,
    out: PathBuf,
}

fn scratch() -> Scratch {
    let tmp = tempfile::tempdir().expect("tempdir");
    let logs = tmp.path().join("logs");
    let out = tmp.path().join("out");
    fs::create_dir(&logs).expect("mkdir logs");
    fs::create_dir(&out).expect("mkdir out");
    Scratch { tmp, logs, out }
}

/// A scratch space whose `out` directory `nobody` may write to (and whose
/// parent it may traverse).
fn scratch_for_nobody() -> Scratch {
    let s = scratch();
    chmod(s.tmp.path(), 0o755);
    chmod(&s.logs, 0o755);
    chmod(&s.out, 0o777);
    s
}

/// Names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
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

fn assert_absent(path: &Path) {
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
fn others_can_run(path: &Path) -> bool {
    let mode = |p: &Path| fs::metadata(p).map(|m| m.mode()).unwrap_or(0);
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

/// `path`, or a copy of it in `dir` if `nobody` could not run it there.
fn runnable_by_nobody(path: &Path, dir: &Path) -> PathBuf {
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

fn dump_args(pid: i32, image: &Path, extra: &[&str]) -> Vec<String> {
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
fn dump(pid: i32, image: &Path, extra: &[&str]) -> Output {
    let args = dump_args(pid, image, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_chpox(&args)
}

/// A dump as root that must succeed; stray descriptors inherited from the
/// test harness are not under test, hence `--unsupported-fd null`.
fn dump_ok(pid: i32, image: &Path, extra: &[&str]) -> String {
    let args = dump_args(
        pid,
        image,
        &[&["--unsupported-fd", "null"][..], extra].concat(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    chpox_ok(&args)
}

/// `chpox ARGS...` run as `nobody`, from a copy in `dir` if need be.
fn run_chpox_as_nobody(args: &[String], dir: &Path) -> Output {
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
fn assert_error_line(out: &Output, prefix: &str, phrases: &[&str]) -> String {
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

fn assert_dump_error(out: &Output, pid: i32, phrases: &[&str]) -> String {
    assert_error_line(
        out,
        &format!("chpox: cannot checkpoint PID {pid}: "),
        phrases,
    )
}

fn assert_inspect_error(image: &Path, phrases: &[&str]) -> String {
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
fn open_image(image: &Path) -> Metadata {
    let reader = ImageReader::open(image)
        .unwrap_or_else(|e| panic!("image {} does not open: {e}", image.display()));
    reader
        .verify_all()
        .unwrap_or_else(|e| panic!("image {} does not verify: {e}", image.display()));
    reader.metadata().clone()
}

/// The image holds `mempattern`'s region `[addr, addr + len)` intact.
fn check_pattern(image: &Path, addr: u64, len: u64) {
    let reader = ImageReader::open(image).expect("image opens");
    common::check_pattern(&reader, addr, len);
}

// ---------------------------------------------------------------------------
// Process state

/// The value of `key` (e.g. `"State:"`) in /proc/PID/status; `None` if the
/// process is gone.
fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The one-letter state from /proc/PID/stat; `None` if the process is gone.
fn stat_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

fn describe_status(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| format!("({e})"))
}

fn assert_untraced(pid: i32) {
    assert_eq!(
        status_field(pid, "TracerPid:").as_deref(),
        Some("0"),
        "PID {pid} is still traced (or gone):\n{}",
        describe_status(pid)
    );
}

/// The process is alive, not stopped or traced: running or sleeping.
fn assert_running_untraced(pid: i32) {
    assert_untraced(pid);
    let state = status_field(pid, "State:").unwrap_or_default();
    assert!(
        state.starts_with('R') || state.starts_with('S') || state.starts_with('D'),
        "PID {pid} should be running, is {state:?}:\n{}",
        describe_status(pid)
    );
}

/// Waits until /proc/PID/stat shows state `want`.
fn wait_for_state(pid: i32, want: char) {
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
fn assert_stopped_untraced(pid: i32) {
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
fn assert_sleeper_finishes(t: &mut Target) {
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE slept"], "{}", t.stderr());
}

/// Waits for `mempattern --finish-after-rounds` to exit and asserts its
/// memory stayed intact.
fn assert_mempattern_finishes(t: &mut Target) {
    let len = t.ready_u64("len");
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

/// Starts program `name` as `nobody`, stdout and stderr to files in `logs`,
/// and waits for its `READY` line.
fn spawn_as_nobody(name: &str, args: &[&str], logs: &Path) -> Target {
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
struct Reaped(Child);

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
fn sleeper_with_pipe() -> (
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
fn assert_piped_sleeper_finishes(
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

// ---------------------------------------------------------------------------
// Refused dumps

#[test]
fn dump_of_missing_pid_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    for pid in [free_pid(), pid_max + 1, 0] {
        let out = dump(pid, &image, &["--unsupported-fd", "null"]);
        assert_dump_error(&out, pid, &[&format!("no process with PID {pid}")]);
        assert_absent(&image);
        assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    }
}

#[test]
fn dump_of_kernel_thread_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // PID 2 is kthreadd.
    let out = dump(2, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(&out, 2, &["PID 2 is a kernel thread"]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_untraced(2);
    let state = stat_state(2).expect("PID 2 exists");
    assert!(!matches!(state, 't' | 'T'), "kthreadd is in state {state}");
}

#[test]
fn dump_of_chpox_itself_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // After exec, chpox has the shell's PID, which `$$` named.
    let child = Command::new("sh")
        .args([
            "-c",
            r#"exec "$0" dump "$$" -o "$1" --unsupported-fd null"#,
            path_str(&chpox_bin()),
            path_str(&image),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let pid = child.id() as i32;
    let out = child.wait_with_output().expect("wait chpox");
    assert_dump_error(&out, pid, &["this chpox process itself"]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
}

#[test]
fn dump_of_zombie_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // Not waited for until the end: a zombie meanwhile.
    let mut child = Reaped(Command::new("true").spawn().expect("spawn true"));
    let pid = child.0.id() as i32;
    wait_for_state(pid, 'Z');
    let out = dump(pid, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(&out, pid, &[&format!("PID {pid} is a zombie")]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    // Still a zombie for us, its parent, to reap.
    assert_eq!(stat_state(pid), Some('Z'));
    let status = child.0.wait().expect("reap");
    assert!(status.success(), "{status}");
}

#[test]
fn dump_of_other_users_process_is_permission_denied() {
    let s = scratch_for_nobody();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let image = s.out.join("img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &image, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert_dump_error(
        &out,
        t.pid,
        &[
            &format!("permission denied for PID {}", t.pid),
            "run as root",
        ],
    );
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_into_missing_directory_fails() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let missing = s.out.join("missing");
    let image = missing.join("img");
    let out = dump(t.pid, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(
        &out,
        t.pid,
        &[&format!("directory {} does not exist", missing.display())],
    );
    assert_absent(&missing);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_onto_symlink_is_refused() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let real = s.out.join("real");
    let content = b"precious data, not an image\n";
    fs::write(&real, content).expect("write real");
    let link = s.out.join("img");
    std::os::unix::fs::symlink("real", &link).expect("symlink");
    // A dangling link must not create its target either.
    let dangling = s.out.join("dangling");
    std::os::unix::fs::symlink("nowhere", &dangling).expect("symlink");

    for l in [&link, &dangling] {
        let out = dump(t.pid, l, &["--unsupported-fd", "null"]);
        assert_dump_error(&out, t.pid, &["symbolic link"]);
    }

    assert_eq!(fs::read(&real).expect("read real"), content);
    for (l, to) in [(&link, "real"), (&dangling, "nowhere")] {
        let m = fs::symlink_metadata(l).expect("lstat link");
        assert!(
            m.file_type().is_symlink(),
            "{} is no longer a link",
            l.display()
        );
        assert_eq!(fs::read_link(l).expect("readlink"), Path::new(to));
    }
    assert_eq!(entries(&s.out), ["dangling", "img", "real"]);
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_into_unwritable_directory_fails() {
    let s = scratch_for_nobody();
    // nobody dumps its own process into root's 0755 directory.
    let mut t = spawn_as_nobody("sleeper", &[], &s.logs);
    let root_dir = s.out.join("root-only");
    fs::create_dir(&root_dir).expect("mkdir");
    chmod(&root_dir, 0o755);
    let image = root_dir.join("img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &image, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert_dump_error(
        &out,
        t.pid,
        &[
            &format!("permission denied writing {}", image.display()),
            "choose a writable directory with -o",
        ],
    );
    assert!(entries(&root_dir).is_empty(), "{:?}", entries(&root_dir));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_with_pipe_fd_fails_naming_it_unless_replaced_by_null() {
    let s = scratch();
    let (child, stdout, pipe, _extra) = sleeper_with_pipe();
    let pid = child.0.id() as i32;
    let image = s.out.join("img");

    let out = dump(pid, &image, &[]);
    assert_dump_error(
        &out,
        pid,
        &[
            "cannot checkpoint file descriptors of kinds chpox does not support",
            &format!("fd 3 ({pipe}, whose other end a process outside the checkpoint holds)"),
            "--unsupported-fd=null",
        ],
    );
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(pid);

    dump_ok(pid, &image, &[]);
    assert_running_untraced(pid);
    let json: serde_json::Value =
        serde_json::from_str(&chpox_ok(&["inspect", path_str(&image), "--json"]))
            .expect("inspect --json is JSON");
    assert_eq!(json["checksums"]["ok"], true, "{json}");
    let fd3 = json["fds"]
        .as_array()
        .expect("fds array")
        .iter()
        .find(|f| f["fd"] == 3)
        .unwrap_or_else(|| panic!("no fd 3 in {}", json["fds"]));
    assert_eq!(
        fd3["kind"],
        serde_json::json!({ "ReplacedByNull": { "was": pipe } }),
        "{fd3}"
    );
    let meta = open_image(&image);
    let entry = meta
        .root
        .fds
        .iter()
        .find(|f| f.fd == 3)
        .expect("fd 3 in image");
    assert!(
        matches!(&entry.kind, FdKind::ReplacedByNull { was } if *was == pipe),
        "{:?}",
        entry.kind
    );

    assert_piped_sleeper_finishes(child, stdout);
}

// ---------------------------------------------------------------------------
// The image file

#[test]
fn failed_dump_keeps_previous_image_and_leaves_no_temporary_file() {
    let s = scratch();
    let (child, stdout, pipe, _extra) = sleeper_with_pipe();
    let pid = child.0.id() as i32;
    let image = s.out.join("img");

    dump_ok(pid, &image, &[]);
    let first = fs::read(&image).expect("read first image");
    let first_meta = open_image(&image);

    // Without --unsupported-fd null the pipe fails the dump, after chpox has
    // started writing the new image.
    let out = dump(pid, &image, &[]);
    assert_dump_error(&out, pid, &[&format!("fd 3 ({pipe}")]);
    assert_eq!(
        fs::read(&image).expect("read image"),
        first,
        "a failed dump changed the existing image"
    );
    assert_eq!(entries(&s.out), ["img"]);
    assert_running_untraced(pid);

    dump_ok(pid, &image, &[]);
    assert_eq!(entries(&s.out), ["img"]);
    let second_meta = open_image(&image);
    assert!(
        second_meta.created_unix_ns > first_meta.created_unix_ns,
        "image not replaced: created {} then {}",
        first_meta.created_unix_ns,
        second_meta.created_unix_ns
    );
    assert_ne!(fs::read(&image).expect("read image"), first);
    assert_running_untraced(pid);

    assert_piped_sleeper_finishes(child, stdout);
}

fn assert_image_file(image: &Path, uid: u32, gid: u32) {
    let m = fs::symlink_metadata(image).expect("stat image");
    assert!(m.file_type().is_file());
    assert_eq!(m.mode() & 0o7777, 0o600, "mode {:o}", m.mode() & 0o7777);
    assert_eq!(
        (m.uid(), m.gid()),
        (uid, gid),
        "owner of {}",
        image.display()
    );
}

#[test]
fn image_is_private_and_owned_by_the_process_owner() {
    let s = scratch_for_nobody();

    // root's process, dumped by root.
    let root_target = Target::spawn("mempattern", &["4"], &s.logs);
    let root_image = s.out.join("root.img");
    dump_ok(root_target.pid, &root_image, &[]);
    assert_image_file(&root_image, 0, 0);
    drop(root_target);

    // nobody's process, dumped by root: the image goes to nobody.
    let t = spawn_as_nobody("mempattern", &["4"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let by_root = s.out.join("by-root.img");
    dump_ok(t.pid, &by_root, &[]);
    assert_image_file(&by_root, NOBODY, NOBODY);
    let meta = open_image(&by_root);
    assert_eq!(meta.root.process.creds.uid, [NOBODY; 4]);
    assert_eq!(meta.root.process.creds.gid, [NOBODY; 4]);
    check_pattern(&by_root, addr, len);
    assert_running_untraced(t.pid);

    // nobody dumps its own process.
    let by_nobody = s.out.join("by-nobody.img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &by_nobody, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert!(out.status.success(), "nobody's dump failed {}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
    assert_image_file(&by_nobody, NOBODY, NOBODY);
    open_image(&by_nobody);
    check_pattern(&by_nobody, addr, len);
    assert_running_untraced(t.pid);

    assert_eq!(
        entries(&s.out),
        ["by-nobody.img", "by-root.img", "root.img"]
    );
}

// ---------------------------------------------------------------------------
// What becomes of the process

#[test]
fn dump_kill_writes_a_valid_image_then_kills() {
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["4"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let image = s.out.join("img");
    dump_ok(t.pid, &image, &["--kill"]);
    let status = t.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "expected death by SIGKILL, got {status}"
    );
    let meta = open_image(&image);
    assert_eq!(meta.after_dump, AfterDump::Kill);
    assert_eq!(meta.root.process.pid, t.pid);
    check_pattern(&image, addr, len);
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());
    assert_eq!(entries(&s.out), ["img"]);
}

/// Asserts the stopped `sleeper` makes no progress: once its sleep has
/// surely run out it is still stopped and has printed nothing more.
fn assert_sleeper_stays_stopped(t: &Target, ready_at: Instant) {
    let sleep_over = ready_at + SLEEPER_SLEEP + Duration::from_millis(500);
    if let Some(rest) = sleep_over.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    assert_stopped_untraced(t.pid);
    assert!(
        t.lines_after_ready().is_empty(),
        "a stopped sleeper printed {:?}",
        t.lines()
    );
}

#[test]
fn dump_leave_stopped_leaves_the_process_stopped() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let ready_at = Instant::now();
    let image = s.out.join("img");
    dump_ok(t.pid, &image, &["--leave-stopped"]);
    assert_stopped_untraced(t.pid);
    assert_eq!(open_image(&image).after_dump, AfterDump::LeaveStopped);
    assert_sleeper_stays_stopped(&t, ready_at);

    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_of_stopped_process_leaves_it_stopped() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let ready_at = Instant::now();
    t.signal(libc::SIGSTOP);
    assert_stopped_untraced(t.pid);

    let image = s.out.join("img");
    dump_ok(t.pid, &image, &[]);
    assert_stopped_untraced(t.pid);
    assert_eq!(open_image(&image).after_dump, AfterDump::LeaveRunning);
    assert_sleeper_stays_stopped(&t, ready_at);

    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_twice_in_a_row() {
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["4", "--finish-after-rounds", "30"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let first = s.out.join("first.img");
    let second = s.out.join("second.img");

    dump_ok(t.pid, &first, &[]);
    assert_running_untraced(t.pid);
    let report: serde_json::Value =
        serde_json::from_str(&dump_ok(t.pid, &second, &["--json"])).expect("dump --json is JSON");
    assert_eq!(report["pid"], t.pid, "{report}");
    assert_eq!(report["image"], path_str(&second), "{report}");
    assert_running_untraced(t.pid);

    let (m1, m2) = (open_image(&first), open_image(&second));
    assert_eq!(m1.root.process.pid, t.pid);
    assert_eq!(m2.root.process.pid, t.pid);
    assert_eq!(
        m1.root.process.start_time_ticks,
        m2.root.process.start_time_ticks
    );
    assert!(m2.created_unix_ns > m1.created_unix_ns);
    check_pattern(&first, addr, len);
    check_pattern(&second, addr, len);
    assert_eq!(entries(&s.out), ["first.img", "second.img"]);

    assert_mempattern_finishes(&mut t);
}

// ---------------------------------------------------------------------------
// chpox inspect on bad images

#[test]
fn inspect_rejects_corrupt_images() {
    let s = scratch();
    let t = Target::spawn("mempattern", &["4"], &s.logs);
    let addr = t.ready_hex("addr");
    let good = s.out.join("good.img");
    dump_ok(t.pid, &good, &[]);
    drop(t);
    let bytes = fs::read(&good).expect("read image");
    let reader = ImageReader::open(&good).expect("good image opens");
    let meta_offset = reader.header().meta_offset as usize;
    let data_end = (reader.header().data_offset + reader.header().data_len) as usize;
    // The middle of the stored pattern: a byte some checksum covers.
    let pattern_run = reader
        .metadata()
        .root
        .vmas
        .iter()
        .find(|v| v.start == addr)
        .and_then(|v| v.pages.first())
        .expect("the pattern region has stored pages")
        .data;
    let in_pattern = (pattern_run.offset + pattern_run.stored_len / 2) as usize;
    drop(reader);
    assert!(data_end > 4 << 20, "data area of {data_end} bytes");

    let write = |name: &str, content: &[u8]| {
        let p = s.out.join(name);
        fs::write(&p, content).expect("write test file");
        p
    };

    // Cut in the middle of the page data.
    let cut = write("cut-data.img", &bytes[..data_end / 2]);
    assert_inspect_error(&cut, &["image is truncated: data area is incomplete"]);
    assert!(matches!(
        ImageReader::open(&cut),
        Err(ImageError::Truncated { section }) if section == "data area"
    ));

    // Cut in the metadata at the end.
    let cut = write("cut-meta.img", &bytes[..bytes.len() - 1]);
    assert!(bytes.len() - 1 > meta_offset);
    assert_inspect_error(&cut, &["image is truncated: metadata is incomplete"]);

    // Cut in the header.
    let cut = write("cut-header.img", &bytes[..100]);
    assert_inspect_error(&cut, &["image is truncated: header is incomplete"]);

    // Magic overwritten.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"NOTCHPOX");
    let bad = write("bad-magic.img", &bad);
    assert_inspect_error(&bad, &["not a chpox image"]);
    assert!(matches!(ImageReader::open(&bad), Err(ImageError::BadMagic)));

    // Not an image at all: 64 KiB of noise.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let noise = write("noise", &noise);
    assert_inspect_error(&noise, &["not a chpox image"]);

    // No such file.
    let missing = s.out.join("missing.img");
    assert_inspect_error(&missing, &["does not exist"]);

    // A flipped byte in the page data: the image opens, but its checksums
    // fail, and inspect says so.
    let mut flipped = bytes.clone();
    flipped[in_pattern] ^= 0xff;
    let flipped = write("flipped.img", &flipped);
    let reader = ImageReader::open(&flipped).expect("metadata is intact");
    assert!(
        matches!(reader.verify_all(), Err(ImageError::Checksum { .. })),
        "verify_all of a corrupt image"
    );
    let out = run_chpox(&["inspect", path_str(&flipped)]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("checksums: FAILED: checksum mismatch in"),
        "{}",
        show(&out)
    );
    // Scripts tell a damaged image by the exit status.
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    let out = run_chpox(&["inspect", path_str(&flipped), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["checksums"]["ok"], false, "{json}");
    assert_eq!(out.status.code(), Some(1));

    // The original is untouched by all this.
    open_image(&good);
}

// ---------------------------------------------------------------------------
// Message wording: kept separate so that the tests above check behaviour,
// these the wording.

/// The reason in an error line must appear once: errors that wrap another
/// one (an image error, an I/O error) must not print the inner message
/// both in their own text and again as the cause.
#[test]
fn dump_error_reasons_are_not_repeated() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let link = s.out.join("link");
    std::os::unix::fs::symlink("elsewhere", &link).expect("symlink");
    let missing_lib = s.out.join("no-such-lib.so");
    let missing_dir_image = s.out.join("missing").join("img");

    let cases: [(Output, &str); 3] = [
        (
            dump(t.pid, &missing_dir_image, &["--unsupported-fd", "null"]),
            "does not exist",
        ),
        (
            dump(t.pid, &link, &["--unsupported-fd", "null"]),
            "symbolic link",
        ),
        (
            dump(
                t.pid,
                &s.out.join("img"),
                &[
                    "--unsupported-fd",
                    "null",
                    "--embed-lib",
                    path_str(&missing_lib),
                ],
            ),
            "No such file or directory",
        ),
    ];
    let mut repeated = Vec::new();
    for (out, phrase) in &cases {
        let line = assert_dump_error(out, t.pid, &[phrase]);
        if line.matches(phrase).count() != 1 {
            repeated.push(line);
        }
    }
    assert!(
        repeated.is_empty(),
        "error reasons printed twice:\n{}",
        repeated.join("\n")
    );
    assert_eq!(entries(&s.out), ["link"]);
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

/// A short file that does not start with the magic is "not a chpox image",
/// not a truncated one.
#[test]
fn inspect_of_short_non_image_file_says_not_an_image() {
    let s = scratch();
    let text = s.out.join("notes.txt");
    fs::write(&text, "just some text\n").expect("write");
    assert_inspect_error(&text, &["not a chpox image"]);
}

/// Released, a process that was stopped goes back into its stop by itself
/// (the group stop is still in effect): no SIGSTOP of ours may be left
/// pending, or the next checkpoint meets it in a remote syscall and fails.
#[test]
fn a_stopped_process_dumped_twice_keeps_no_sigstop_pending() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    t.signal(libc::SIGSTOP);
    assert_stopped_untraced(t.pid);
    for n in 0..2 {
        dump_ok(t.pid, &s.out.join(format!("img{n}")), &[]);
        assert_stopped_untraced(t.pid);
        let pending = t.pending_mask().expect("the sleeper is alive");
        assert_eq!(
            pending & (1 << (libc::SIGSTOP - 1)),
            0,
            "SIGSTOP left pending after dump {n} ({pending:#x})"
        );
    }
    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}
