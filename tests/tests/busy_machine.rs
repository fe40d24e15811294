//! Dumps on a machine whose every core is busy, as CI's other tests and a
//! shared lab's other users keep it: each dump ends (with an image, or
//! with an error when its target died) and none waits for good on one of
//! its own helper threads. A helper left at idle priority (`SCHED_IDLE`)
//! once never ran beside a busy process, and the dump waited for it.
//!
//! These tests have a file of their own: the load they start would slow
//! the other tests of a file, which run beside them.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::Target;
use common::dumps::{assert_running_untraced, seen_frozen, spawn_dump};
use common::procs::Guard;
use common::tree::Image;

/// One test at a time: each brings its own load.
static ONE_LOAD: Mutex<()> = Mutex::new(());

/// A process spinning 64 threads per core at normal priority (a thread at
/// idle priority beside it runs a few microseconds a second), and the
/// right to run it.
fn load(dir: &std::path::Path) -> (MutexGuard<'static, ()>, Target) {
    let turn = ONE_LOAD.lock().unwrap_or_else(PoisonError::into_inner);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinning = Target::spawn("busythreads", &[&(64 * cores).to_string()], dir);
    (turn, spinning)
}

/// Wait for `dumper` to end; a dump still running after `limit` is hung
/// (a dump of these small targets takes a few seconds at most even here,
/// most of it waiting for the targets to be scheduled and stop).
fn assert_ends(dumper: &mut Child, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while dumper.try_wait().expect("try_wait chpox").is_none() {
        if Instant::now() > deadline {
            let threads = where_threads_are(dumper.id() as i32);
            let _ = dumper.kill();
            let _ = dumper.wait();
            panic!("chpox dump still runs {limit:?} after {what}; its threads:\n{threads}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Each thread of `pid`: name, state, scheduling policy and nice value
/// (`stat`), what it waits in (`wchan`) and its kernel stack: where a hung
/// dump hangs.
fn where_threads_are(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(/proc/{pid}/task unreadable)");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // After the name: state is field 3, nice 19, policy 41.
        let fields: Vec<&str> = stat
            .rfind(')')
            .map(|i| stat[i + 1..].split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or("?");
        out.push_str(&format!(
            "{} {:?} state {} nice {} policy {} wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            field(3),
            field(19),
            field(41),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

/// The target killed (SIGKILL, as the OOM killer or a user would) at many
/// points of its dump: each dump ends, with an error or an image, and
/// never hangs. A multi-threaded process killed while we hold it in a
/// remote syscall used to hang the dump for good: its leader's death is
/// reported only once its other threads are reaped, by us.
#[test]
fn a_multithreaded_target_killed_during_its_dump_never_hangs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("img");
    let _load = load(dir.path());
    for round in 0..30u64 {
        // A freeze passed unseen (a short one, on a loaded machine) proves
        // nothing: that round again, with a new target.
        let (mut target, mut dumper) = (1..=5)
            .find_map(|_| {
                let mut target = Target::spawn("busythreads", &["8"], dir.path());
                // Without pre-copy, whose freezes are brief.
                let mut dumper = spawn_dump(target.pid, &image, &["--no-precopy"], Stdio::null());
                if seen_frozen(target.pid, &mut dumper) {
                    return Some((target, dumper));
                }
                let _ = target.child.kill();
                let _ = target.child.wait();
                common::wait_pid_free(target.pid);
                None
            })
            .unwrap_or_else(|| panic!("round {round}: five dumps froze unseen"));
        // From the freeze to well into the remote system calls.
        let into = Duration::from_micros(round * round * 40);
        std::thread::sleep(into);
        target.child.kill().expect("kill the target");
        // Not reaped yet: a hung dump would hang our wait too.
        assert_ends(
            &mut dumper,
            Duration::from_secs(10),
            &format!("its target was killed {into:?} into round {round}"),
        );
        target.child.wait().expect("reap the target");
        common::wait_pid_free(target.pid);
    }
}

/// A tree of eight, pre-copied and dumped leaving it running, again and
/// again: every dump ends with an image of all eight. The dump reads each
/// process as the freeze hands it over on a helper thread, and then waits
/// for what that helper took.
#[test]
fn a_tree_dumped_on_a_busy_machine_is_saved_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _load = load(dir.path());
    let mut guard = Guard::default();
    let tree = Target::spawn("memtree", &["8", "1"], dir.path());
    guard.watch_tree(tree.pid);
    let pids: BTreeSet<i32> = tree
        .ready_value("pids")
        .split(',')
        .map(|p| p.parse().expect("a PID in READY"))
        .collect();
    assert_eq!(pids.len(), 8, "{}", tree.ready_line);
    for round in 0..3 {
        let image = dir.path().join(format!("tree{round}.img"));
        let mut dumper = spawn_dump(tree.pid, &image, &[], Stdio::null());
        assert_ends(
            &mut dumper,
            Duration::from_secs(60),
            &format!("it started (round {round})"),
        );
        let status = dumper.wait().expect("wait chpox");
        assert!(status.success(), "round {round}: chpox dump {status}");
        assert_eq!(Image::inspect(&image).all_pids(), pids, "round {round}");
    }
    // Each dump let the whole tree go.
    for pid in pids {
        assert_running_untraced(pid);
    }
}
