//! Process trees: `chpox dump PID` saves PID and all its descendants,
//! `chpox restore` brings the whole tree back under the original PIDs, and
//! the job goes on where it was.
//!
//! Each test starts a real tree, waits until it is in the state that
//! matters, dumps the root — with `--kill`, or leaving it running and then
//! killing every process of the original tree here and waiting until all
//! their PIDs are free — and restores the image. What the restored tree
//! does afterwards must be what an uninterrupted run does; every check
//! depends on the processes below the root having been saved. The
//! `fixture_*` tests run the same trees without chpox: the uninterrupted
//! baseline.
//!
//! Every process a test starts is killed when the test ends, also when it
//! fails: the roots we spawn are [`Job`]s or [`Target`]s, and a [`Guard`]
//! kills the trees below them and the restored trees.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent::poll;
use common::procs::{Guard, cmdline, exists, signal, stat, tree};
use common::tree::{
    Dump, Image, Job, SHARED_OK, TIMEOUT, asleep, describe_tree, dump, finish_original, forktree,
    int, job_output, mentions, ready_pid, restore_and_wait, restore_detached, restore_job,
    wait_gone, wait_lines,
};
use common::{chpox_bin, chpox_ok, path_str, tempdir};

// ---------------------------------------------------------------------------
// A shell job whose steps run in children, one after the other

const STEPS_SCRIPT: &str = r#"exec >>"$1"
for i in 1 2 3 4 5 6; do
    python3 -c 'import sys, time; time.sleep(0.5); print("step", sys.argv[1], flush=True)' "$i"
done
echo done
exit 5
"#;

/// What the steps script leaves in its output file after `steps` steps.
fn steps_done(steps: usize) -> String {
    (1..=steps).map(|i| format!("step {i}\n")).collect()
}

/// The steps script (exit status 5), appending to `DIR/steps.out`.
fn start_steps(dir: &Path) -> (Job, PathBuf) {
    let script = dir.join("steps.sh");
    std::fs::write(&script, STEPS_SCRIPT).expect("write the script");
    let out = dir.join("steps.out");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&out).current_dir(dir);
    (Job::spawn(cmd, "steps", dir), out)
}

#[test]
fn fixture_steps_script_runs_all_steps() {
    let dir = tempdir();
    let (mut job, out) = start_steps(dir.path());
    let status = job.wait(TIMEOUT);
    assert_eq!(status.code(), Some(5), "{}", job.describe());
    assert_eq!(
        std::fs::read_to_string(&out).expect("read output"),
        steps_done(6) + "done\n"
    );
    assert_eq!(job.stderr(), "");
}

/// The job is checkpointed while the third step's child sleeps: the image
/// holds the shell and that child (under its PID), the restored child
/// finishes its step and the shell runs the last three. The output file is not part of the
/// image: it is cut back to what it held at the checkpoint (the offset the
/// image saved for the shell's stdout) before the restore.
fn steps_resume(how: Dump) {
    let dir = tempdir();
    let (mut job, out) = start_steps(dir.path());
    let mut guard = Guard::default();
    let context = || {
        format!(
            "{}\n--- output ---\n{}\n--- tree ---\n{}",
            job_output(&job),
            std::fs::read_to_string(&out).unwrap_or_default(),
            describe_tree(job.pid)
        )
    };
    let root = job.pid;
    let step3 = poll("step 3 asleep", TIMEOUT, context, || {
        tree(root)
            .into_iter()
            .find(|s| {
                s.comm == "python3"
                    && cmdline(s.pid).last().map(String::as_str) == Some("3")
                    && asleep(s.pid)
            })
            .map(|s| s.pid)
    });
    guard.watch_tree(root);
    assert!(job.running(), "{}", job.describe());

    let image = dir.path().join("steps.img");
    let pids = dump(root, &image, how, &[]);
    let img = Image::inspect(&image);
    assert_eq!(
        img.all_pids(),
        pids,
        "the image holds other processes than the tree: {}",
        img.summary()
    );
    assert!(pids.contains(&step3), "{pids:?} lacks step 3's {step3}");
    let pos = img.fd(root, 1)["kind"]["RegularFile"]["pos"]
        .as_u64()
        .unwrap_or_else(|| panic!("fd 1 of the shell: {}", img.fd(root, 1)));
    finish_original(&mut job.child, how, &pids);

    let written = std::fs::read_to_string(&out).expect("read output");
    assert!(
        written.len() as u64 >= pos,
        "the image says {pos} bytes were written, the file has {written:?}"
    );
    let at_checkpoint = &written[..pos as usize];
    assert_eq!(at_checkpoint, steps_done(2), "output at the checkpoint");
    if how == Dump::Kill {
        assert_eq!(written, steps_done(2), "output after `dump --kill`");
    }
    std::fs::write(&out, at_checkpoint).expect("put the output back");

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(
        code,
        5,
        "the restored job's exit status; chpox stderr: {stderr}\n{}",
        job_output(&job)
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("read output"),
        steps_done(6) + "done\n",
        "{}",
        job_output(&job)
    );
    assert_eq!(job.stderr(), "", "the job's stderr");
}

#[test]
fn shell_job_goes_on_in_its_child_after_dump_kill() {
    steps_resume(Dump::Kill);
}

#[test]
fn shell_job_goes_on_in_its_child_after_dump_leaving_it_running() {
    steps_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// A zombie child and a stopped child

const ZOMBIE_OK: [&str; 2] = ["ZOMBIE exit=7", "STOPPED exit=9"];

/// Asserts `pid` is a child of `parent` in state `state`.
fn assert_child_state(pid: i32, parent: i32, state: char, when: &str) {
    let s = stat(pid).unwrap_or_else(|| panic!("{when}: PID {pid} does not exist"));
    assert_eq!(
        (s.ppid, s.state),
        (parent, state),
        "{when}: PID {pid} should be a child of {parent} in state {state}: {s:?}"
    );
}

#[test]
fn fixture_forktree_zombie_and_stopped_children() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["zombie", &d], dir.path());
    let zombie = ready_pid(&t, "zombie");
    let stopped = ready_pid(&t, "stopped");
    assert_child_state(zombie, t.pid, 'Z', "before");
    assert_child_state(stopped, t.pid, 'T', "before");
    std::fs::write(dir.path().join("go"), "").expect("create go");
    t.wait_success(TIMEOUT);
    assert_eq!(t.lines_after_ready(), ZOMBIE_OK);
}

/// The dump leaves the zombie a zombie and the stopped child stopped; the
/// restored tree has them so again, and the parent's `waitpid` gets the
/// zombie's exit status 7; the stopped child, continued, runs on to its
/// exit (9).
#[test]
fn zombie_and_stopped_children_come_back_as_they_were() {
    zombie_resume(Dump::LeaveRunning);
}

#[test]
fn zombie_and_stopped_children_come_back_after_dump_kill() {
    zombie_resume(Dump::Kill);
}

fn zombie_resume(how: Dump) {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["zombie", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let zombie = ready_pid(&t, "zombie");
    let stopped = ready_pid(&t, "stopped");
    assert_child_state(zombie, root, 'Z', "before the dump");
    assert_child_state(stopped, root, 'T', "before the dump");

    let image = dir.path().join("zombie.img");
    let pids = dump(root, &image, how, &[]);
    assert_eq!(pids, BTreeSet::from([root, zombie, stopped]));
    if how == Dump::LeaveRunning {
        assert_child_state(zombie, root, 'Z', "after the dump");
        assert_child_state(stopped, root, 'T', "after the dump");
    }
    let img = Image::inspect(&image);
    assert_eq!(
        img.pids(),
        BTreeSet::from([root, stopped]),
        "{}",
        img.summary()
    );
    let zombies = img.zombies();
    assert_eq!(zombies.len(), 1, "{}", img.summary());
    assert_eq!(
        (int(&zombies[0]["pid"]), int(&zombies[0]["ppid"])),
        (zombie, root),
        "{}",
        img.summary()
    );
    finish_original(&mut t.child, how, &pids);

    let restored = restore_detached(&image, &[], dir.path());
    guard.watch_tree(restored);
    assert_eq!(restored, root, "the root's PID");
    assert_child_state(zombie, root, 'Z', "after the restore");
    assert_child_state(stopped, root, 'T', "after the restore");
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(wait_lines(&t, 2, root), ZOMBIE_OK, "{}", t.stderr());
    wait_gone(&pids, "after the restored tree finished");
}

// ---------------------------------------------------------------------------
// Process groups and the session

/// (pid, ppid, pgrp, session) of each of `pids`.
fn ids(pids: &[i32]) -> Vec<(i32, i32, i32, i32)> {
    pids.iter()
        .map(|&p| {
            let s = stat(p).unwrap_or_else(|| panic!("PID {p} does not exist"));
            (p, s.ppid, s.pgrp, s.session)
        })
        .collect()
}

/// The `session` tree's lines after SIGUSR1 to the child's group, with
/// the two `USR1` lines (whose order is the scheduler's) sorted.
fn session_lines(mut lines: Vec<String>) -> Vec<String> {
    if lines.len() >= 2 {
        lines[..2].sort();
    }
    lines
}

const SESSION_OK: [&str; 4] = [
    "USR1 child",
    "USR1 grandchild",
    "CHILD REAPED GRANDCHILD exit=0",
    "ROOT REAPED CHILD exit=0",
];

#[test]
fn fixture_forktree_session_and_group() {
    let dir = tempdir();
    let mut t = forktree(&["session"], dir.path());
    let (root, child, grandchild) = (t.pid, ready_pid(&t, "child"), ready_pid(&t, "grandchild"));
    assert_eq!(
        ids(&[root, child, grandchild]),
        [
            (root, std::process::id() as i32, root, root),
            (child, root, child, root),
            (grandchild, child, child, root)
        ]
    );
    assert!(signal(-child, libc::SIGUSR1));
    t.wait_success(TIMEOUT);
    assert_eq!(session_lines(t.lines_after_ready()), SESSION_OK);
}

/// A session leader with a child that leads its own process group (with a
/// grandchild in it): the restored tree has the same process groups and
/// session, and a signal to the child's group reaches the child and the
/// grandchild and not the root.
#[test]
fn process_groups_and_session_come_back() {
    session_resume(Dump::Kill);
}

#[test]
fn process_groups_and_session_come_back_after_dump_leaving_them_running() {
    session_resume(Dump::LeaveRunning);
}

fn session_resume(how: Dump) {
    let dir = tempdir();
    let mut t = forktree(&["session"], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let (root, child, grandchild) = (t.pid, ready_pid(&t, "child"), ready_pid(&t, "grandchild"));
    let before = ids(&[root, child, grandchild]);
    assert_eq!(
        before[1..],
        [(child, root, child, root), (grandchild, child, child, root)]
    );

    let image = dir.path().join("session.img");
    let pids = dump(root, &image, how, &[]);
    assert_eq!(pids, BTreeSet::from([root, child, grandchild]));
    let img = Image::inspect(&image);
    assert_eq!(img.all_pids(), pids, "{}", img.summary());
    for &(pid, _, pgid, sid) in &before {
        let p = &img.process(pid)["process"];
        assert_eq!(
            (int(&p["pgid"]), int(&p["sid"])),
            (pgid, sid),
            "pgid and sid of {pid} in the image"
        );
    }
    finish_original(&mut t.child, how, &pids);

    let restored = restore_detached(&image, &[], dir.path());
    guard.watch_tree(restored);
    assert_eq!(restored, root, "the root's PID");
    let after = ids(&[root, child, grandchild]);
    // The root's parent is whoever restored it; the rest must match.
    assert_eq!(
        (after[0].2, after[0].3),
        (before[0].2, before[0].3),
        "pgid and sid of the root"
    );
    assert_eq!(after[1..], before[1..]);

    assert!(signal(-child, libc::SIGUSR1), "kill -USR1 -- -{child}");
    assert_eq!(
        session_lines(wait_lines(&t, 4, root)),
        SESSION_OK,
        "{}",
        t.stderr()
    );
    wait_gone(&pids, "after the restored tree finished");
}

// ---------------------------------------------------------------------------
// A PID of the tree is taken

/// `forktree reaper PROGRAM ARGS...`: runs PROGRAM and reports what it
/// left behind. Returns PROGRAM's exit code, stderr (PROGRAM's: the reaper
/// itself writes to stdout only), and the number of processes left.
fn run_reaped(program: &Path, args: &[&str], dir: &Path) -> (i32, String, usize, String) {
    let mut cmd = Command::new(common::bin("forktree"));
    cmd.arg("reaper").arg(program).args(args);
    let mut job = Job::spawn(cmd, "reaper", dir);
    let status = job.wait(TIMEOUT);
    assert!(status.success(), "reaper failed: {}", job.describe());
    let out = job.stdout();
    let last = out
        .lines()
        .find(|l| l.starts_with("REAPER "))
        .unwrap_or_else(|| panic!("no REAPER line; {}", job.describe()));
    let kv = common::parse_kv(last);
    let code = kv["exit"].parse().expect("exit code");
    let left = kv["left"].parse().expect("left count");
    (code, job.stderr(), left, out)
}

#[test]
fn fixture_reaper_reports_what_a_program_leaves_behind() {
    let dir = tempdir();
    let (code, _, left, out) = run_reaped(
        Path::new("/bin/sh"),
        &["-c", "sleep 30 & exit 3"],
        dir.path(),
    );
    assert_eq!((code, left), (3, 1), "{out}");
    assert!(out.contains("LEFT pid="), "{out}");
    let (code, _, left, out) = run_reaped(Path::new("/bin/true"), &[], dir.path());
    assert_eq!((code, left), (0, 0), "{out}");
}

/// A second restore of the same image while the first restored tree runs
/// (so its PIDs are all taken): refused in one line naming a PID of the
/// tree, with a non-zero exit, leaving no process behind, and the running
/// tree unharmed.
#[test]
fn restore_while_the_tree_runs_fails_naming_a_pid() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["shared", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");
    let image = dir.path().join("shared.img");
    let pids = dump(root, &image, Dump::Kill, &[]);
    assert_eq!(pids, BTreeSet::from([root, child]));
    finish_original(&mut t.child, Dump::Kill, &pids);

    let restored = restore_detached(&image, &[], dir.path());
    guard.watch_tree(restored);
    assert_eq!(restored, root);
    assert_eq!(
        stat(child).map(|s| s.ppid),
        Some(root),
        "the restored child"
    );
    let first = ids(&[root, child]);
    let starts: Vec<u64> = [root, child]
        .iter()
        .map(|&p| stat(p).expect("restored").start)
        .collect();

    for extra in [&[][..], &["--pid", "same"][..]] {
        let mut args = vec!["restore"];
        args.extend_from_slice(extra);
        args.push(path_str(&image));
        let (code, stderr, left, out) = run_reaped(&chpox_bin(), &args, dir.path());
        assert_ne!(code, 0, "chpox {args:?} succeeded: {stderr}\n{out}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "chpox {args:?}: not one line: {stderr}"
        );
        assert!(
            mentions(&stderr, root) || mentions(&stderr, child),
            "chpox {args:?} names neither {root} nor {child}: {stderr}"
        );
        assert_eq!(left, 0, "chpox {args:?} left processes behind:\n{out}");
    }

    assert_eq!(ids(&[root, child]), first, "the running tree");
    let starts_now: Vec<u64> = [root, child]
        .iter()
        .map(|&p| stat(p).expect("still running").start)
        .collect();
    assert_eq!(starts_now, starts, "the running tree's processes changed");
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(
        wait_lines(&t, SHARED_OK.len(), root),
        SHARED_OK,
        "{}",
        t.stderr()
    );
    wait_gone(&pids, "after the restored tree finished");
}

// ---------------------------------------------------------------------------
// --no-children

/// `--no-children` dumps the root alone, and the image says children were
/// left out; the tree runs on undisturbed.
#[test]
fn no_children_dumps_the_root_alone_and_says_so() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["shared", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");

    let image = dir.path().join("root-only.img");
    dump(root, &image, Dump::LeaveRunning, &["--no-children"]);
    let img = Image::inspect(&image);
    assert_eq!(img.all_pids(), BTreeSet::from([root]), "{}", img.summary());
    let summary = chpox_ok(&["inspect", path_str(&image)]);
    assert!(
        summary.to_lowercase().contains("children"),
        "`chpox inspect` does not mention the children left out:\n{summary}"
    );

    assert_eq!(stat(child).map(|s| s.ppid), Some(root), "the child");
    std::fs::write(dir.path().join("go"), "").expect("create go");
    t.wait_success(TIMEOUT);
    assert_eq!(t.lines_after_ready(), SHARED_OK);
}

// ---------------------------------------------------------------------------
// --pid-ns

/// The innermost PID of `pid` (last field of `NSpid:`) and how many PID
/// namespaces it is seen in.
fn ns_pid(pid: i32) -> Option<(i32, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let pids: Vec<i32> = line
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    Some((*pids.last()?, pids.len()))
}

/// With `--pid-ns` the tree comes back in a new PID namespace under its
/// original PIDs, while the original tree still holds those PIDs outside.
#[test]
fn pid_ns_restores_the_tree_while_the_original_pids_are_taken() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["shared", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");
    let image = dir.path().join("shared.img");
    let pids = dump(root, &image, Dump::LeaveRunning, &[]);
    assert_eq!(pids, BTreeSet::from([root, child]));

    let mut restore = restore_job(&image, &["--pid-ns"], dir.path());
    let restorer = restore.pid;
    // Both original PIDs inside a nested namespace, below the restorer.
    poll(
        "the tree restored in a PID namespace",
        TIMEOUT,
        || {
            format!(
                "{}\n--- below the restorer ---\n{}",
                restore.describe(),
                describe_tree(restorer)
            )
        },
        || {
            if stat(restorer).is_none_or(|s| s.state == 'Z') {
                panic!("chpox restore --pid-ns ended; {}", restore.describe());
            }
            let inner: BTreeSet<i32> = tree(restorer)
                .iter()
                .filter_map(|s| ns_pid(s.pid))
                .filter(|&(_, depth)| depth > 1)
                .map(|(p, _)| p)
                .collect();
            (inner.contains(&root) && inner.contains(&child)).then_some(())
        },
    );
    assert!(exists(root) && exists(child), "the original tree");
    finish_original(&mut t.child, Dump::LeaveRunning, &pids);

    std::fs::write(dir.path().join("go"), "").expect("create go");
    let status = restore.wait(TIMEOUT);
    assert!(
        status.success(),
        "restored root: {status}; {}\n--- program output ---\n{}",
        restore.describe(),
        t.stdout()
    );
    assert_eq!(t.lines_after_ready(), SHARED_OK, "{}", t.stderr());
}

// ---------------------------------------------------------------------------
// `make -j2` building a C project, checkpointed mid-build

/// A project of 24 C files (each slow enough to compile that the build
/// takes seconds) and a main that prints a sum over all of them, compiled
/// with `cflags`.
fn write_c_project(dir: &Path, cflags: &str) {
    use std::fmt::Write as _;
    for i in 1..=24 {
        let mut src = String::new();
        for k in 1..=120 {
            let _ = writeln!(
                src,
                "static int g{k}(int x) {{ int s = 0; for (int i = 0; i < x; i++) s += (i * {k}) ^ (x >> ({k} % 7)); return s; }}"
            );
        }
        let _ = write!(src, "int f{i}(int x) {{ int s = {i};");
        for k in 1..=120 {
            let _ = write!(src, " s += g{k}(x);");
        }
        src.push_str(" return s; }\n");
        std::fs::write(dir.join(format!("f{i}.c")), src).expect("write a C file");
    }
    let mut main = String::from("#include <stdio.h>\n");
    for i in 1..=24 {
        let _ = writeln!(main, "int f{i}(int);");
    }
    main.push_str("int main(void) { long t = 0;");
    for i in 1..=24 {
        let _ = write!(main, " t += f{i}(100);");
    }
    main.push_str(" printf(\"%ld\\n\", t); return 0; }\n");
    std::fs::write(dir.join("main.c"), main).expect("write main.c");
    std::fs::write(
        dir.join("Makefile"),
        format!("OBJS := $(patsubst %.c,%.o,$(wildcard *.c))\nprog: $(OBJS)\n\tgcc -o $@ $^\n%.o: %.c\n\tgcc {cflags} -c $< -o $@\n"),
    )
    .expect("write the Makefile");
}

fn start_make(dir: &Path) -> Job {
    let mut cmd = Command::new("make");
    cmd.args(["-j2"]).current_dir(dir);
    Job::spawn(cmd, "make", dir)
}

/// The program a finished build prints, built without chpox alongside.
fn prog_output(dir: &Path) -> String {
    let out = Command::new(dir.join("prog"))
        .output()
        .expect("run the built program");
    assert!(out.status.success(), "prog: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_resume(how: Dump) {
    let dir = tempdir();
    let (baseline_dir, build_dir) = (dir.path().join("baseline"), dir.path().join("build"));
    // gcc writes its assembly to a temporary file that it deletes once
    // the object is made. A tree left running goes past the checkpoint
    // and may delete it, and a restore cannot bring back a file deleted
    // after the checkpoint (it refuses, naming it): that run pipes its
    // assembly from cc1 to as instead, through a pipe inside the tree.
    let cflags = match how {
        Dump::Kill => "-O2",
        Dump::LeaveRunning => "-O2 -pipe",
    };
    for d in [&baseline_dir, &build_dir] {
        std::fs::create_dir(d).expect("mkdir");
        write_c_project(d, cflags);
    }
    let mut job = start_make(&build_dir);
    let mut guard = Guard::default();
    guard.watch_tree(job.pid);
    let root = job.pid;
    // Mid-build: some objects exist, compilers are running.
    poll(
        "make halfway, compiling",
        TIMEOUT,
        || describe_tree(root),
        || {
            let objects = std::fs::read_dir(&build_dir)
                .map(|d| {
                    d.filter(|e| {
                        e.as_ref()
                            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".o"))
                    })
                    .count()
                })
                .unwrap_or(0);
            let compiling = tree(root).iter().any(|s| s.comm == "cc1");
            (objects >= 4 && compiling).then_some(())
        },
    );
    let image = dir.path().join("make.img");
    let before_dump = std::time::SystemTime::now();
    let pids = dump(root, &image, how, &[]);
    assert!(pids.len() >= 3, "make and its compilers: {pids:?}");
    let img = Image::inspect(&image);
    assert!(
        img.processes()
            .iter()
            .any(|p| p["process"]["comm"].as_str() == Some("cc1")),
        "no compiler in the image: {}",
        img.summary()
    );
    finish_original(&mut job.child, how, &pids);
    // What the original wrote after the checkpoint must not count: the
    // restored make finds the build directory as it was then, give or
    // take objects it rewrites.
    let _ = std::fs::remove_file(build_dir.join("prog"));
    if how == Dump::LeaveRunning {
        // The checkpoint is the freeze, which a pre-copy puts after the
        // dump began: the image's creation time is taken while frozen.
        let frozen_at = img.0["created_unix_us"]
            .as_u64()
            .map(|us| std::time::UNIX_EPOCH + std::time::Duration::from_micros(us))
            .unwrap_or(before_dump);
        forget_objects_made_after(&build_dir, frozen_at.max(before_dump), &img);
    }

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "chpox stderr: {stderr}\n{}", job.describe());
    let mut baseline = start_make(&baseline_dir);
    let status = baseline.wait(TIMEOUT);
    assert!(status.success(), "{}", baseline.describe());
    assert_eq!(prog_output(&build_dir), prog_output(&baseline_dir));
}

/// chpox saves processes, not the files they write. The original tree,
/// left running, goes on building after the checkpoint; an object it
/// started after the freeze and left half-written when it was killed is
/// newer than its source, so the restored make would take it as done
/// and link a broken program. Roll the directory back as a user would:
/// remove every object written since the checkpoint (make rebuilds
/// whatever is missing), except those the restored processes hold open.
fn forget_objects_made_after(dir: &Path, since: std::time::SystemTime, img: &Image) {
    let held: BTreeSet<String> = img
        .processes()
        .iter()
        .flat_map(|p| p["fds"].as_array().into_iter().flatten())
        .filter_map(|fd| fd["kind"]["RegularFile"]["path"].as_str())
        .map(str::to_owned)
        .collect();
    for entry in std::fs::read_dir(dir).expect("read the build directory") {
        let path = entry.expect("directory entry").path();
        let is_object = path.extension().is_some_and(|e| e == "o");
        let newer = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= since);
        if is_object && newer && !held.contains(path_str(&path)) {
            std::fs::remove_file(&path).expect("remove an object made after the checkpoint");
        }
    }
}

#[test]
fn make_j2_finishes_the_build_after_dump_kill() {
    make_resume(Dump::Kill);
}

#[test]
fn make_j2_finishes_the_build_after_dump_leaving_it_running() {
    make_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// A child of a thread other than the leader

/// Python forks `sleep` from a second thread that stays alive: the kernel
/// lists that child under the thread (`/proc/PID/task/TID/children`), not
/// under the leader. The freeze reads every frozen thread's list, so the
/// child is part of the tree and comes back as the root's child.
const THREAD_CHILD_SCRIPT: &str = r#"
import subprocess, threading, time
spawned = threading.Event()
box = {}
def run():
    box["child"] = subprocess.Popen(["sleep", "1000"])
    spawned.set()
    time.sleep(1000)
threading.Thread(target=run, daemon=True).start()
spawned.wait()
print("READY child=%d" % box["child"].pid, flush=True)
time.sleep(1000)
"#;

#[test]
fn a_child_forked_by_a_second_thread_is_part_of_the_tree() {
    let dir = tempdir();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", THREAD_CHILD_SCRIPT]);
    let mut t = common::Target::spawn_command(cmd, "threadchild", dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");
    let forker = std::fs::read_dir(format!("/proc/{root}/task"))
        .expect("list threads")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&tid| {
            std::fs::read_to_string(format!("/proc/{root}/task/{tid}/children"))
                .is_ok_and(|c| c.split_whitespace().any(|p| p == child.to_string()))
        });
    assert!(
        forker.is_some_and(|tid| tid != root),
        "the child {child} is not listed under a second thread of {root} (forker {forker:?}):\n{}",
        describe_tree(root)
    );

    let image = dir.path().join("threadchild.img");
    let pids = dump(root, &image, Dump::Kill, &[]);
    let img = Image::inspect(&image);
    assert_eq!(
        img.all_pids(),
        BTreeSet::from([root, child]),
        "{}",
        img.summary()
    );
    finish_original(&mut t.child, Dump::Kill, &pids);

    let restored = restore_detached(&image, &[], dir.path());
    assert_eq!(restored, root);
    guard.watch_tree(root);
    poll(
        "the restored child under the root",
        TIMEOUT,
        || describe_tree(root),
        || (stat(child).map(|s| s.ppid) == Some(root)).then_some(()),
    );
    assert_eq!(cmdline(child).first().map(String::as_str), Some("sleep"));
}
