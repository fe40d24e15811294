//! Files the root agent reads or writes on a user's behalf must be reached
//! with that user's rights, never with root's:
//!
//! - content embedded in an image the user owns (the executable with FLAGS
//!   2, a deleted file the process holds open) is read as the user: a file
//!   they may not read fails the checkpoint, named, instead of being copied
//!   to them;
//! - the directory an image is written to is resolved without following a
//!   symbolic link another user could have planted, so a user cannot swap a
//!   path component for a link and have root's write land in `/etc`.
//!
//! Each test starts its own `chpox-agent` (own run and image directories)
//! and acts as `nobody`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, NOBODY, POLL, STARTUP_TIMEOUT, assert_ok, no_inherited_fds, scratch};
use common::{Target, bin, chmod, chpox_bin, path_str, show};

/// Set in the environment of a copy of this test program that is to act
/// as a target (see [`dumpable_target_helper`]).
const HELPER_ENV: &str = "CHPOX_SECURITY_FILES_HELPER";

// ---------------------------------------------------------------------------
// Checks

/// Asserts that a checkpoint failed and that both its own output and
/// `chpox list` (the registration's last error) say every one of `phrases`.
fn assert_failed_saying(agent: &Agent, pid: i32, out: &Output, phrases: &[&str]) {
    assert!(
        !out.status.success(),
        "the checkpoint succeeded but must fail {}",
        show(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let entry = agent.entry(pid).expect("still registered");
    let last_error = entry["last_error"].as_str().unwrap_or_default().to_string();
    for phrase in phrases {
        assert!(
            stderr.contains(phrase),
            "`chpox checkpoint` does not say {phrase:?} {}",
            show(out)
        );
        assert!(
            last_error.contains(phrase),
            "`chpox list` does not say {phrase:?}: {entry}"
        );
    }
    assert_eq!(
        last_error.lines().count(),
        1,
        "the error is not one line: {last_error:?}"
    );
}

/// Runs `program ARGS` as `nobody` in `dir`; it must succeed.
fn as_nobody(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert_ok(&format!("{program} {args:?} as nobody"), &out);
}

/// Makes descriptor `fd` of ours descriptor `to` of the program `cmd` runs.
fn hand_over(cmd: &mut Command, fd: i32, to: i32) {
    // SAFETY: the hook only calls dup2 and fcntl, which are
    // async-signal-safe, on descriptors, touching no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let rc = if fd == to {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, to)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// A target whose executable its user may not read

/// Not a test of its own: with [`HELPER_ENV`] set, this is the body of a
/// target process, a copy of this very test program run as `nobody`. The
/// kernel makes a process whose executable its user may not read
/// non-dumpable (and a user may not checkpoint a process that is not);
/// the program may make itself dumpable again, as this one does, which
/// leaves the executable file itself the only thing its user may not read.
#[test]
fn dumpable_target_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_DUMPABLE: {}",
        std::io::Error::last_os_error()
    );
    // After the harness's "test … " on a line of its own.
    println!("\nREADY pid={}", std::process::id());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Defect 2: FLAGS 2 must not hand a user the bytes of an executable they
/// may only execute. A root-owned 0711 program run by `nobody`, registered
/// by `nobody` with FLAGS 3 (`chpoxctl add PID 31 3 FILE`): the checkpoint
/// fails and says which file `nobody` may not read; no image holds the
/// program's bytes.
#[test]
fn an_execute_only_executable_is_not_embedded_for_its_user() {
    let s = scratch();
    let agent = Agent::start(&s);
    let bin_dir = s.dir_owned("bin", 0o755, 0);
    let exe = bin_dir.join("execute-only");
    fs::copy(std::env::current_exe().expect("current_exe"), &exe).expect("copy the program");
    chmod(&exe, 0o711);
    let exe_bytes = fs::read(&exe).expect("read the program");
    // A page near the end of the file: debugging information, which the
    // process does not map, so only an embedded copy of the file holds it.
    let at = (exe_bytes.len() * 9 / 10) & !4095;
    let page = &exe_bytes[at..at + 4096];
    assert!(
        page.iter().any(|&b| b != 0),
        "a page of zeros proves nothing"
    );
    let out_dir = s.dir_owned("out", 0o755, NOBODY);
    let img = out_dir.join("img.chpox");

    let mut cmd = Command::new(&exe);
    no_inherited_fds(&mut cmd);
    cmd.args(["dumpable_target_helper", "--exact", "--nocapture"])
        .env(HELPER_ENV, "1")
        .current_dir(&s.logs)
        .uid(NOBODY)
        .gid(NOBODY);
    let t = Target::spawn_command(cmd, "execute-only", &s.logs);
    assert_eq!(
        fs::read_link(format!("/proc/{}/exe", t.pid)).expect("exe link"),
        exe
    );
    // Dumpable again: /proc/PID belongs to its user.
    assert_eq!(
        fs::metadata(format!("/proc/{}", t.pid))
            .expect("proc")
            .uid(),
        NOBODY
    );
    // nobody may run the program but not read it.
    let read = Command::new("head")
        .args(["-c", "1", path_str(&exe)])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .expect("run head");
    assert!(!read.status.success(), "nobody can read {}", exe.display());

    let pid = t.pid.to_string();
    let add = agent.chpoxctl_as(NOBODY, &["add", &pid, "31", "3", path_str(&img)]);
    assert_ok("chpoxctl add PID 31 3 FILE as nobody", &add);
    let out = agent.checkpoint_as(NOBODY, t.pid);

    for image in [img.clone(), img.with_extension("chpox.1")] {
        if let Ok(bytes) = fs::read(&image) {
            assert!(
                !contains(&bytes, page),
                "uid {NOBODY} got the execute-only {} embedded in its image {} (owned by uid {})\n\
                 checkpoint: {}",
                exe.display(),
                image.display(),
                fs::metadata(&image).map(|m| m.uid()).unwrap_or(0),
                show(&out)
            );
        }
    }
    assert_failed_saying(
        &agent,
        t.pid,
        &out,
        &[path_str(&exe), "uid 65534 may not read it"],
    );
    assert!(!img.exists(), "an image without the executable was written");
}

/// Defect 2, for descriptors: a deleted file the process holds open is
/// embedded, and it too must be read with its user's rights. `nobody`'s
/// process was handed a write-only descriptor of a root-only file (as a
/// daemon hands a log to a job), then the file was deleted: `nobody` may
/// write to it but never read it, and the checkpoint must not read it for
/// them.
#[test]
fn a_deleted_root_only_file_held_open_is_not_embedded_for_its_user() {
    let s = scratch();
    let agent = Agent::start(&s);
    let secret = s.tmp.path().join("root-only");
    let marker = format!("chpox-secret-{}-{:?}", std::process::id(), Instant::now());
    fs::write(&secret, marker.repeat(64)).expect("write the secret");
    chmod(&secret, 0o600);
    let handed = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_APPEND)
        .open(&secret)
        .expect("open the secret");
    fs::remove_file(&secret).expect("delete the secret");
    let out_dir = s.dir_owned("out", 0o755, NOBODY);
    let img = out_dir.join("img.chpox");

    let raw = handed.as_raw_fd();
    let mut cmd = Command::new(bin("mempattern"));
    no_inherited_fds(&mut cmd);
    cmd.arg("4").current_dir(&s.logs).uid(NOBODY).gid(NOBODY);
    hand_over(&mut cmd, raw, 7);
    let t = Target::spawn_command(cmd, "mempattern", &s.logs);
    drop(handed);
    let fd7 = fs::read_link(format!("/proc/{}/fd/7", t.pid)).expect("fd 7");
    assert!(
        fd7.to_string_lossy().ends_with(" (deleted)"),
        "fd 7 is {}",
        fd7.display()
    );

    let pid = t.pid.to_string();
    let reg = agent.chpox_as(NOBODY, &["register", &pid, "-o", path_str(&img)]);
    assert_ok("chpox register as nobody", &reg);
    let out = agent.checkpoint_as(NOBODY, t.pid);

    if let Ok(bytes) = fs::read(&img) {
        assert!(
            !contains(&bytes, marker.as_bytes()),
            "uid {NOBODY} got the deleted root-only {} embedded in its image {}\ncheckpoint: {}",
            secret.display(),
            img.display(),
            show(&out)
        );
    }
    assert_failed_saying(
        &agent,
        t.pid,
        &out,
        &[path_str(&secret), "fd 7", "uid 65534 may not read it"],
    );
    assert!(!img.exists(), "an image without the file was written");
}

/// What the user may read is still embedded when read with their rights:
/// `nobody`'s FLAGS 3 checkpoint of a program they may read, holding open
/// a deleted file they may read, embeds both.
#[test]
fn a_users_readable_executable_and_deleted_file_are_embedded() {
    let s = scratch();
    let agent = Agent::start(&s);
    let readable = s.tmp.path().join("readable");
    let marker = format!("chpox-readable-{}-{:?}", std::process::id(), Instant::now());
    fs::write(&readable, &marker).expect("write");
    chmod(&readable, 0o644);
    let handed = File::open(&readable).expect("open");
    fs::remove_file(&readable).expect("delete");
    let out_dir = s.dir_owned("out", 0o755, NOBODY);
    let img = out_dir.join("img.chpox");

    let raw = handed.as_raw_fd();
    let mut cmd = Command::new(bin("mempattern"));
    no_inherited_fds(&mut cmd);
    cmd.arg("4").current_dir(&s.logs).uid(NOBODY).gid(NOBODY);
    hand_over(&mut cmd, raw, 8);
    let t = Target::spawn_command(cmd, "mempattern", &s.logs);
    drop(handed);

    let pid = t.pid.to_string();
    let add = agent.chpoxctl_as(NOBODY, &["add", &pid, "31", "3", path_str(&img)]);
    assert_ok("chpoxctl add PID 31 3 FILE as nobody", &add);
    assert_ok("the checkpoint", &agent.checkpoint_as(NOBODY, t.pid));
    let reader = chpox::image::ImageReader::open(&img).expect("the image");
    let meta = reader.metadata();
    let exe = meta
        .files
        .iter()
        .find(|f| f.role == chpox::image::model::FileRole::Executable)
        .expect("the executable is recorded");
    let data = exe
        .embedded
        .as_ref()
        .expect("FLAGS 2 embedded the executable");
    assert_eq!(
        reader.read_data(data).expect("read it"),
        fs::read(bin("mempattern")).expect("read mempattern")
    );
    let fd8 = meta
        .root
        .fds
        .iter()
        .find(|e| e.fd == 8)
        .expect("fd 8 is recorded");
    let chpox::image::model::FdKind::RegularFile {
        embedded: Some(data),
        ..
    } = &fd8.kind
    else {
        panic!("the deleted file on fd 8 is not embedded: {:?}", fd8.kind);
    };
    assert_eq!(reader.read_data(data).expect("read it"), marker.as_bytes());
}

// ---------------------------------------------------------------------------
// The output path

/// Root registers `nobody`'s process to a path under a directory `nobody`
/// owns; the first checkpoint lands there. Then `nobody` swaps a path
/// component for a symbolic link to a root-only directory: the next
/// checkpoint must not follow it (nothing appears in the root-only
/// directory) and must fail, naming the link.
#[test]
fn a_user_cannot_redirect_roots_checkpoint_with_a_symlink() {
    let s = scratch();
    let agent = Agent::start(&s);
    let user_dir = s.dir_owned("userdir", 0o755, NOBODY);
    let sub = user_dir.join("sub");
    as_nobody(&user_dir, "mkdir", &["sub"]);
    let root_only = s.dir_owned("root-only", 0o700, 0);
    let img = sub.join("img.chpox");

    let mut cmd = Command::new(bin("mempattern"));
    no_inherited_fds(&mut cmd);
    cmd.arg("4").current_dir(&s.logs).uid(NOBODY).gid(NOBODY);
    let t = Target::spawn_command(cmd, "mempattern", &s.logs);
    let pid = t.pid.to_string();
    let reg = agent.chpox(&["register", &pid, "-o", path_str(&img)]);
    assert_ok("chpox register (root) of nobody's process", &reg);

    // Into the real directory: fine, and the image is nobody's.
    let first = agent.checkpoint_as(None, t.pid);
    assert_ok("the first checkpoint", &first);
    let meta = fs::metadata(&img).expect("the first image");
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));

    as_nobody(&user_dir, "mv", &["sub", "sub.away"]);
    as_nobody(&user_dir, "ln", &["-s", path_str(&root_only), "sub"]);
    let out = agent.checkpoint_as(None, t.pid);

    let landed: Vec<PathBuf> = fs::read_dir(&root_only)
        .expect("read the root-only directory")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        landed.is_empty(),
        "root's checkpoint followed nobody's link {} into {}: {landed:?}\ncheckpoint: {}",
        sub.display(),
        root_only.display(),
        show(&out)
    );
    assert_failed_saying(
        &agent,
        t.pid,
        &out,
        &[path_str(&sub), "symbolic link", "uid 65534"],
    );
}

/// Root's checkpoint of a user's job whose child runs setuid root: the
/// image holds the child's memory, so it must stay root's, not become the
/// user's (who could then read it, or have it written by `kill -31`).
#[test]
fn roots_image_of_a_users_tree_with_a_setuid_child_stays_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let suid = dir.path().join("suid-sleep");
    fs::copy("/bin/sleep", &suid).expect("copy sleep");
    chmod(&suid, 0o4755);
    let mut cmd = Command::new("bash");
    cmd.args(["-c", "\"$0\" 600 & echo READY; wait"])
        .arg(&suid)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut shell = cmd.spawn().expect("start the job");
    let parent = shell.id() as i32;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let child = loop {
        let found = fs::read_dir("/proc").ok().and_then(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .find(|p| {
                    let status =
                        fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                    let field = |key: &str, n: usize| {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix(key))
                            .and_then(|v| v.split_whitespace().nth(n))
                            .and_then(|v| v.parse::<i32>().ok())
                    };
                    field("PPid:", 0) == Some(parent) && field("Uid:", 1) == Some(0)
                })
        });
        if let Some(c) = found {
            break c;
        }
        assert!(Instant::now() < deadline, "no setuid child appeared");
        std::thread::sleep(POLL);
    };
    let image = dir.path().join("job.chpox");
    let out = Command::new(chpox_bin())
        .args([
            "dump",
            &parent.to_string(),
            "-o",
            path_str(&image),
            "--unsupported-fd",
            "null",
        ])
        .output()
        .expect("run chpox dump");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::kill(parent, libc::SIGKILL);
    }
    let _ = shell.wait();
    assert!(out.status.success(), "chpox dump: {}", show(&out));
    let meta = fs::metadata(&image).expect("image written");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "the image of a tree holding a setuid-root process went to its user"
    );
}
