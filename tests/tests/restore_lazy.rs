//! `chpox restore --lazy`: memory filled on demand through userfaultfd.
//!
//! `lazytouch` is checkpointed with 128 MiB of patterned memory (with
//! holes), restored lazily and at once told to check every word, in
//! random orders from two threads and a forked child, after discarding and
//! moving some of it: the faults race the page server's background copy.
//! No timing is asserted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chpox::image::ImageReader;
use common::procs::{become_subreaper, wait_pid};
use common::{Target, chpox_bin, chpox_ok, path_str, run_chpox, tempdir, wait_pid_free};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: &str = "128";

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// `lazytouch` checkpointed into `image` and killed.
fn checkpointed(dir: &Path, image: &Path) -> Target {
    let mut t = Target::spawn("lazytouch", &[MIB], dir);
    let pid = t.pid.to_string();
    chpox_ok(&[
        "dump",
        &pid,
        "-o",
        path_str(image),
        "--unsupported-fd",
        "null",
        "--kill",
    ]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
    t
}

/// `chpox restore --detach IMAGE [extra]`; the restored PID. Its stderr
/// goes to a file: the page server keeps it open until every page is in,
/// and a pipe would make us wait for that.
fn restore_detached(image: &Path, extra: &[&str]) -> i32 {
    let err = image.with_extension("stderr");
    let out = Command::new(chpox_bin())
        .args(["restore", "--detach", path_str(image)])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .output()
        .expect("run chpox restore");
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(out.status.success(), "chpox restore failed: {stderr}");
    let printed = String::from_utf8_lossy(&out.stdout);
    printed
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore printed {printed:?}, not a PID: {e}"))
}

#[test]
fn lazy_memory_is_right_touched_in_random_order_forked_moved_and_discarded() {
    become_subreaper();
    let dir = tempdir();
    let image = dir.path().join("lazy.img");
    let t = checkpointed(dir.path(), &image);
    let pid = restore_detached(&image, &["--lazy"]);
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["DONE ok"]);
}

/// The same program restored eagerly: what the lazy test expects is what
/// an ordinary restore gives.
#[test]
fn eager_restore_gives_the_same() {
    become_subreaper();
    let dir = tempdir();
    let image = dir.path().join("eager.img");
    let t = checkpointed(dir.path(), &image);
    let pid = restore_detached(&image, &[]);
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["DONE ok"]);
}

/// Without --detach, chpox waits for the process while the page server
/// fills it, and exits with its status.
#[test]
fn lazy_restore_waits_for_the_process() {
    let dir = tempdir();
    let image = dir.path().join("wait.img");
    let t = checkpointed(dir.path(), &image);
    let mut restore = Command::new(chpox_bin())
        .args(["restore", "--lazy", "--pid", "same", path_str(&image)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run chpox restore");
    // The restored process has the saved PID; it runs once it sleeps.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", t.pid)).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if state == Some("S") {
            break;
        }
        assert!(
            restore.try_wait().expect("try_wait").is_none(),
            "chpox restore ended before the process ran"
        );
        assert!(Instant::now() < deadline, "the restored process never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(t.pid, libc::SIGUSR1);
    let status = restore.wait().expect("wait for chpox restore");
    assert_eq!(status.code(), Some(0), "{:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["DONE ok"]);
}

/// Flip a byte in a page run three quarters into the patterned memory
/// (the mapping with most runs): one the second of two threads takes.
fn damage_largest_run(image: &Path) {
    damaged_page(image);
}

/// As [`damage_largest_run`]; the damaged page's number in the region.
fn damaged_page(image: &Path) -> u64 {
    let (offset, page) = {
        let reader = ImageReader::open(image).expect("open");
        let vma = reader
            .metadata()
            .root
            .vmas
            .iter()
            .max_by_key(|v| v.pages.len())
            .expect("a mapping");
        let run = vma.pages[vma.pages.len() * 3 / 4];
        (run.data.offset, (run.addr - vma.start) / 4096)
    };
    let mut bytes = std::fs::read(image).expect("read image");
    bytes[offset as usize + 100] ^= 0xff;
    std::fs::write(image, &bytes).expect("write image");
    page
}

/// Without --lazy, the damaged run (one the second verifying thread
/// takes) is found before any process exists, and the restore fails in one
/// line; nothing runs.
#[test]
fn eager_restore_of_a_damaged_image_is_refused() {
    let dir = tempdir();
    let image = dir.path().join("bad-eager.img");
    let t = checkpointed(dir.path(), &image);
    damage_largest_run(&image);
    let out = run_chpox(&["restore", "--pid", "same", path_str(&image)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        !Path::new(&format!("/proc/{}", t.pid)).exists() || {
            std::thread::sleep(Duration::from_millis(1500));
            !Path::new(&format!("/proc/{}", t.pid)).exists()
        }
    );
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());
}

/// A page run damaged in the image: the lazily restored process runs, but
/// the page server's verification finds the run bad, says so, and kills
/// it.
#[test]
fn lazy_restore_of_a_damaged_image_kills_the_process_and_says_why() {
    become_subreaper();
    let dir = tempdir();
    let image = dir.path().join("bad.img");
    let t = checkpointed(dir.path(), &image);
    damage_largest_run(&image);
    // Output waits for the page server's stderr to close: it has ended.
    let out = run_chpox(&["restore", "--detach", "--lazy", path_str(&image)]);
    assert!(out.status.success(), "{out:?}");
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a PID");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 128 + libc::SIGKILL);
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());
}

/// A tree (a shell waiting for `lazytouch`) restored lazily: one page
/// server fills both processes, each through its own userfaultfd.
#[test]
fn lazy_tree_comes_back_whole() {
    become_subreaper();
    let dir = tempdir();
    let mut cmd = Command::new("sh");
    let program = common::bin("lazytouch");
    cmd.args(["-c", &format!("{} 32 & wait", program.display())]);
    let mut t = Target::spawn_command(cmd, "lazytree", dir.path());
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", t.pid))
        .expect("children of the shell");
    let touch: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("lazytouch's PID");
    let image = dir.path().join("tree.img");
    let pid = t.pid.to_string();
    chpox_ok(&[
        "dump",
        &pid,
        "-o",
        path_str(&image),
        "--unsupported-fd",
        "null",
        "--kill",
    ]);
    t.child.wait().expect("reap the original");
    // Orphaned by the killed shell, it came to us, its subreaper.
    wait_pid(touch, EXIT_TIMEOUT);
    wait_pid_free(t.pid);
    wait_pid_free(touch);
    let root = restore_detached(&image, &["--lazy"]);
    assert_eq!(root, t.pid);
    signal(touch, libc::SIGUSR1);
    assert_eq!(wait_pid(root, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["DONE ok"]);
}

/// Threads restored lazily under new TIDs: the restore writes each new TID
/// into the thread's control block, memory that is not in yet; the thread
/// of chpox serving faults during the rebuild brings those pages in.
#[test]
fn lazy_threads_come_back_under_new_tids() {
    become_subreaper();
    let dir = tempdir();
    let mut t = Target::spawn("threads", &["3"], dir.path());
    let image = dir.path().join("threads.img");
    let pid = t.pid.to_string();
    chpox_ok(&[
        "dump",
        &pid,
        "-o",
        path_str(&image),
        "--unsupported-fd",
        "null",
        "--kill",
    ]);
    t.child.wait().expect("reap the original");
    let restored = restore_detached(&image, &["--lazy", "--pid", "any"]);
    assert_not_pinned(restored);
    signal(restored, libc::SIGUSR1);
    assert_eq!(wait_pid(restored, EXIT_TIMEOUT), 0, "{:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["DONE", "T0=ok", "T1=ok", "T2=ok"]);
}

/// The CPUs a task may run on, as /proc says.
fn cpus_allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .expect("Cpus_allowed_list in status")
}

/// A lazy restore runs on one CPU with the process it rebuilds (see
/// `restore::pin`): every thread must be let go with the CPUs it would
/// have had, those of the restorer (ours).
fn assert_not_pinned(pid: i32) {
    let ours = cpus_allowed(&std::fs::read_to_string("/proc/self/status").expect("our status"));
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    let mut seen = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).expect("task status");
        assert_eq!(
            cpus_allowed(&status),
            ours,
            "task {:?} of PID {pid}",
            task.file_name()
        );
        seen += 1;
    }
    assert!(seen > 1, "the restored process has {seen} thread(s)");
}

/// A damaged page run that the process reads the moment it runs: it is
/// verified before it is served, so the process never sees the damage (no
/// CORRUPT line): it is killed while it waits for the page, the page
/// server says which run was bad, and nothing is left behind.
#[test]
fn lazy_restore_never_serves_a_damaged_page() {
    become_subreaper();
    let dir = tempdir();
    let image = dir.path().join("bad-first.img");
    let first_file = dir.path().join("first-page");
    let mut cmd = Command::new(common::bin("lazytouch"));
    cmd.arg(MIB).env("LAZYTOUCH_FIRST", &first_file);
    let mut t = Target::spawn_command(cmd, "lazytouch", dir.path());
    chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&image),
        "--unsupported-fd",
        "null",
        "--kill",
    ]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
    // Read by the restored process when told to start.
    std::fs::write(&first_file, damaged_page(&image).to_string()).expect("first-page");
    let err = image.with_extension("stderr");
    let out = Command::new(chpox_bin())
        .args(["restore", "--detach", "--lazy", path_str(&image)])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .output()
        .expect("run chpox restore");
    assert!(out.status.success(), "{:?}", std::fs::read_to_string(&err));
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a PID");
    // At once: the damaged page is its first read.
    signal(pid, libc::SIGUSR1);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 128 + libc::SIGKILL);
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());
    // The page server names the run and ends.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let stderr = loop {
        let stderr = std::fs::read_to_string(&err).unwrap_or_default();
        if stderr.contains("checksum mismatch") || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(
        stderr.contains("the restored processes were killed"),
        "{stderr}"
    );
}
