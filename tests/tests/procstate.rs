//! Per-process state beyond memory and descriptors, on real processes:
//! timers that are not descriptors, files mapped shared and writable, and
//! the small attributes (oom_score_adj, prctl flags, locked memory,
//! madvise flags, seccomp) a program can check on itself. Each program is
//! checkpointed, killed, restored, and must finish as an uninterrupted run
//! would.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent::poll_until;
use common::procs::{become_subreaper, restore_detached, wait_pid};
use common::restore::dump;
use common::{Target, chpox_bin, path_str, tempdir, wait_pid_free};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `chpox restore IMAGE [extra]`, waiting for the process: its exit code
/// and chpox's stderr.
fn restore_and_wait(image: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(chpox_bin())
        .arg("restore")
        .arg(image)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run chpox restore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checkpoint a target, kill it and reap it.
fn checkpoint_kill(t: &mut Target, image: &Path, extra: &[&str]) {
    dump(t.pid, image, &[&["--kill"], extra].concat());
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
}

/// Restore `image` detached, send SIGUSR1 to the restored process (the
/// programs check themselves on it), and return its exit code.
fn restore_and_check(image: &Path, extra: &[&str]) -> i32 {
    become_subreaper();
    let pid = restore_detached(image, extra);
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0, "kill({pid})");
    wait_pid(pid, EXIT_TIMEOUT)
}

// ---------------------------------------------------------------------------
// A JVM: thread pool, JIT, GC threads, and /tmp/hsperfdata_USER/PID mapped
// shared and writable, which it writes on after the checkpoint.

const POOL_JAVA: &str = r#"import java.util.*;
import java.util.concurrent.*;

public class Pool {
    static long work(int chunk) {
        long s = 0;
        for (long n = chunk * 100000L; n < (chunk + 1) * 100000L; n++) s += (n * n) % 1000003L;
        return s;
    }
    public static void main(String[] args) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(4);
        long total = 0;
        for (int round = 0; round < 30; round++) {
            List<Future<Long>> fs = new ArrayList<>();
            for (int c = 0; c < 8; c++) { final int ch = round * 8 + c; fs.add(pool.submit(() -> work(ch))); }
            long s = 0;
            for (Future<Long> f : fs) s += f.get();
            total += s;
            System.out.println("round " + round + " " + s);
            Thread.sleep(200);
        }
        pool.shutdown();
        pool.awaitTermination(10, TimeUnit.SECONDS);
        System.out.println("TOTAL " + total);
    }
}
"#;

/// What `POOL_JAVA` prints.
fn pool_output() -> String {
    let work = |chunk: i64| -> i64 {
        (chunk * 100_000..(chunk + 1) * 100_000)
            .map(|n| (n * n) % 1_000_003)
            .sum()
    };
    let mut out = String::new();
    let mut total = 0i64;
    for round in 0..30 {
        let s: i64 = (0..8).map(|c| work(round * 8 + c)).sum();
        total += s;
        out.push_str(&format!("round {round} {s}\n"));
    }
    out.push_str(&format!("TOTAL {total}\n"));
    out
}

/// A JVM with a thread pool, checkpointed while it runs on (as the agent
/// does), killed a little later and restored without `--embed-all-libs`:
/// the performance-data file it maps shared and writable has changed since
/// the checkpoint, which is its state, not a changed library.
#[test]
fn a_jvm_with_a_thread_pool_restores() {
    let java = Path::new("/usr/bin/java");
    let javac = Path::new("/usr/bin/javac");
    assert!(
        java.exists() && javac.exists(),
        "java/javac missing: apt-get install openjdk-17-jdk-headless"
    );
    let dir = tempdir();
    std::fs::write(dir.path().join("Pool.java"), POOL_JAVA).expect("write Pool.java");
    let built = Command::new(javac)
        .args(["-d", "classes", "Pool.java"])
        .current_dir(dir.path())
        .output()
        .expect("run javac");
    assert!(built.status.success(), "javac: {}", common::show(&built));

    let out = dir.path().join("pool.out");
    let err = dir.path().join("pool.err");
    let mut child = Command::new(java)
        .args(["-Xmx64m", "-cp", "classes", "Pool"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("create stdout"))
        .stderr(File::create(&err).expect("create stderr"))
        .spawn()
        .expect("spawn java");
    let pid = child.id() as i32;
    let show = || {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    let lines = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
    };
    poll_until("3 rounds", Duration::from_secs(60), show, || lines() >= 3);
    let image = dir.path().join("jvm.img");
    dump(pid, &image, &[]);
    let at_dump = lines();
    assert!(at_dump < 31, "finished before the dump\n{}", show());
    // It runs on, and writes its performance data, before it dies.
    poll_until("another round", Duration::from_secs(60), show, || {
        lines() > at_dump
    });
    child.kill().expect("kill java");
    child.wait().expect("reap java");
    wait_pid_free(pid);

    let meta = chpox::image::ImageReader::open(&image)
        .expect("open image")
        .metadata()
        .clone();
    assert!(
        meta.root
            .vmas
            .iter()
            .any(|v| v.shared && v.write && v.name.contains("hsperfdata")),
        "the JVM maps no performance-data file shared and writable"
    );

    let (code, stderr) = restore_and_wait(&image, &["--pid", "any"]);
    assert_eq!(code, 0, "{stderr}\n{}", show());
    assert_eq!(
        std::fs::read_to_string(&out).expect("read stdout"),
        pool_output(),
        "{}",
        show()
    );
}

// ---------------------------------------------------------------------------
// Timers that are not descriptors

/// `setitimer` and POSIX timers come back with their IDs, clocks, signals,
/// values, intervals and the time they had left; a SIGEV_THREAD_ID timer
/// goes on signalling its thread.
#[test]
fn timers_come_back() {
    let dir = tempdir();
    let mut t = Target::spawn("timers", &[], dir.path());
    assert_eq!(t.ready_value("timers"), "5");
    let image = dir.path().join("timers.img");
    checkpoint_kill(&mut t, &image, &[]);
    let code = restore_and_check(&image, &[]);
    assert_eq!(code, 0, "{}\n{}", t.stdout(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        [
            "OK itimer real",
            "OK itimer virtual",
            "OK itimer prof",
            "OK posix ids",
            "OK posix times",
            "OK ticker",
            "OK glibc thread timer",
            "DONE"
        ]
    );
}

/// With new TIDs, a SIGEV_THREAD_ID timer signals the thread that took its
/// thread's place.
#[test]
fn a_thread_timer_follows_its_thread_to_a_new_tid() {
    let dir = tempdir();
    let mut t = Target::spawn("timers", &[], dir.path());
    let image = dir.path().join("timers.img");
    checkpoint_kill(&mut t, &image, &[]);
    let code = restore_and_check(&image, &["--pid", "any"]);
    assert_eq!(code, 0, "{}\n{}", t.stdout(), t.stderr());
    assert_eq!(
        t.lines_after_ready().last().map(String::as_str),
        Some("DONE")
    );
}

// ---------------------------------------------------------------------------
// Small per-process attributes

/// oom_score_adj, THP disabling, dumpability, no_new_privs, two seccomp
/// filters on both threads, the madvise/mlock state of mappings,
/// mlockall(MCL_FUTURE) and a removed working directory come back.
#[test]
fn small_process_attributes_come_back() {
    let dir = tempdir();
    let cwd = dir.path().join("gone");
    let mut t = Target::spawn("procattrs", &[path_str(&cwd)], dir.path());
    let image = dir.path().join("attrs.img");
    checkpoint_kill(&mut t, &image, &[]);
    let code = restore_and_check(&image, &[]);
    assert_eq!(code, 0, "{}\n{}", t.stdout(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        [
            "OK oom_score_adj",
            "OK prctl",
            "OK seccomp",
            "OK vmflags",
            "OK cwd",
            "DONE"
        ]
    );
}

// ---------------------------------------------------------------------------
// Deleted files

/// Two descriptions of one deleted file come back as one file, with the
/// file's mode.
#[test]
fn a_deleted_file_open_twice_comes_back_as_one_file_with_its_mode() {
    let dir = tempdir();
    let mut t = Target::spawn("deletedfiles", &[path_str(dir.path())], dir.path());
    let image = dir.path().join("deleted.img");
    checkpoint_kill(&mut t, &image, &[]);
    let code = restore_and_check(&image, &[]);
    assert_eq!(code, 0, "{}\n{}", t.stdout(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        ["OK mode and content", "OK one file", "OK mapped", "DONE"]
    );
}

// ---------------------------------------------------------------------------
// A signal that comes after the restore interrupts the restored sleep

/// Python sleeps an hour; SIGUSR1 makes it print and exit. `time.sleep`
/// runs the handler only once the sleep returns EINTR.
const SLEEPER: &str = r#"
import signal, sys, time
def done(*_):
    print("WOKEN", flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, done)
print("READY", flush=True)
time.sleep(3600)
print("SLEPT", flush=True)
"#;

/// Checkpointed stopped (SIGSTOP in its sleep), the process comes back
/// stopped; SIGUSR1 is sent, then SIGCONT. As the original would, the
/// restored process must leave its sleep through the handler. It used to
/// be let go on its `syscall` instruction: the handler ran first and the
/// sleep then started over for an hour (what a loaded machine did to a
/// signal sent right after any restore).
#[test]
fn a_signal_after_the_restore_interrupts_the_restored_sleep() {
    become_subreaper();
    let dir = tempdir();
    let mut t = common::python(SLEEPER, &[], dir.path());
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(t.pid, libc::SIGSTOP) }, 0);
    common::dumps::wait_for_state(t.pid, 'T');
    let image = dir.path().join("sleeper.img");
    checkpoint_kill(&mut t, &image, &[]);

    let pid = restore_detached(&image, &[]);
    let mut guard = common::procs::Guard::default();
    guard.watch_tree(pid);
    common::dumps::wait_for_state(pid, 'T');
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGUSR1), 0);
        assert_eq!(libc::kill(pid, libc::SIGCONT), 0);
    }
    poll_until(
        "the restored sleeper to run its handler",
        Duration::from_secs(20),
        || t.stdout(),
        || t.stdout().contains("WOKEN"),
    );
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 0, "{}", t.stdout());
}
