//! The trigger path and restore: a checkpoint the agent made is restored
//! and registered again (`chpox restore --register`), for one process and
//! for a process tree, and what the tree flag (FLAGS 8) makes the trigger
//! checkpoint.
//!
//! Every test starts its own agent (own run directory, image directory and
//! BPF maps), so the tests run in parallel. Waits are bounded polls of
//! `chpox list --json`, the agent's log or `/proc`, never bare sleeps.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::agent::{
    AGENTS, Agent, EXIT_TIMEOUT, NOBODY, SIGSYS, STATE_TIMEOUT, Scratch, assert_refused,
    assert_running, check_image, ignores, no_core, output_of, plain_target, poll, run_target,
    scratch, send, stdout_ok,
};
use common::procs::{Guard, cmdline, kill_tree, stat, tree_pids};
use common::{Target, chmod, chpox_bin, path_str, show};
use serde_json::Value;

// ---------------------------------------------------------------------------
// 13. The whole loop: chpox run, kill -31, the crash, chpox restore --register,
//     kill -31 again, the crash again, chpox restore

/// `chpox restore IMAGE ARGS` talking to `agent`, waiting for the restored
/// process; its stderr goes to a file in the logs.
fn spawn_restore(agent: &Agent, s: &Scratch, image: &Path, args: &[&str]) -> Child {
    let n = AGENTS.fetch_add(1, Ordering::SeqCst);
    let mut cmd = agent.client(chpox_bin());
    cmd.arg("restore")
        .args(args)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(File::create(s.logs.join(format!("restore.{n}.stderr"))).expect("stderr file"));
    cmd.spawn().expect("spawn chpox restore")
}

/// Kills `pid` (the program, crashing) and waits until its PID is free.
fn crash(pid: i32) {
    send(pid, libc::SIGKILL);
    common::wait_pid_free(pid);
}

#[test]
fn the_whole_loop_run_kill31_crash_restore_register_and_again() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = run_target(
        &agent,
        &s,
        "mempattern",
        &["16", "--finish-after-rounds", "60"],
        &["--signal", "12", "--flags", "2"],
    );
    let len = t.ready_u64("len");
    let pid = t.pid;

    t.signal(12);
    let image = output_of(&agent.wait_checkpoints(pid, 1));
    let summary = common::chpox_ok(&["inspect", path_str(&image)]);
    assert!(
        summary.contains("taken by chpox-agent: signal 12, flags 2"),
        "{summary}"
    );
    assert_running(&mut t);
    t.child.kill().expect("kill -9");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());

    // Back under its PID, registered as it was: signal 12, FLAGS 2, same file.
    let mut restore = spawn_restore(&agent, &s, &image, &["--register", "--pid", "same"]);
    let e = agent.wait_for(
        "the restored process to be registered",
        STATE_TIMEOUT,
        || agent.entry(pid),
    );
    assert_eq!(
        (e["signal"].as_u64(), e["flags"].as_u64()),
        (Some(12), Some(2)),
        "{e}"
    );
    assert_eq!(output_of(&e), image, "{e}");
    assert!(ignores(pid, 12), "signal 12 is not ignored after restore");

    // Its trigger checkpoints it again, with the executable embedded.
    send(pid, 12);
    let e = agent.wait_checkpoints(pid, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    let reader = check_image(&image, pid);
    assert!(
        reader.metadata().files.iter().any(|f| f.embedded.is_some()),
        "FLAGS 2 did not embed the executable"
    );

    // chpox restore exits as the restored process did: killed by 9.
    crash(pid);
    let status = restore.wait().expect("wait chpox restore");
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status}");
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());

    // From the second-generation image, to the end.
    let mut restore = spawn_restore(&agent, &s, &image, &[]);
    let status = poll(
        "the twice-restored process to finish",
        EXIT_TIMEOUT,
        || format!("{:?}\n{}", t.lines(), agent.describe()),
        || restore.try_wait().expect("try_wait chpox restore"),
    );
    assert!(status.success(), "{status}; {:?}", t.lines());
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

/// `--register` without an agent: one line saying so, and nothing restored.
#[test]
fn restore_register_without_an_agent_starts_nothing() {
    let s = scratch();
    let mut t = plain_target(&s, "sleeper", &[]);
    let pid = t.pid;
    let image = s.logs.join("sleeper.img");
    let pid_s = pid.to_string();
    common::chpox_ok(&[
        "dump",
        &pid_s,
        "-o",
        path_str(&image),
        "--kill",
        "--unsupported-fd",
        "null",
    ]);
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);

    let out = Command::new(chpox_bin())
        .args(["restore", "--register", path_str(&image)])
        .env("CHPOX_RUN_DIR", s.tmp.path().join("no-agent-here"))
        .stdin(Stdio::null())
        .output()
        .expect("run chpox restore");
    assert_refused("restore --register without an agent", &out, "chpox-agent");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{}",
        show(&out)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "PID {pid} was restored although registering it was bound to fail"
    );
}

// ---------------------------------------------------------------------------
// 14. Process trees: FLAGS 8 (the default of `chpox run` and `chpox
//     register`) checkpoints the process and its descendants; without it,
//     the process alone, and the agent says what was left out.

/// Waits until none of `pids` exists (PID 1 reaps orphans about a second
/// late here), so a restore can have them back.
fn wait_all_gone(pids: &BTreeSet<i32>, context: &str) {
    poll(
        &format!("every PID of {pids:?} to be free {context}"),
        EXIT_TIMEOUT,
        || {
            let left: Vec<_> = pids
                .iter()
                .filter_map(|&p| Some((p, stat(p)?, cmdline(p))))
                .collect();
            format!("still there: {left:?}")
        },
        || {
            pids.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
                .then_some(())
        },
    );
}

/// A shell script started with `chpox run CHPOX_ARGS -- bash SCRIPT ARGS`;
/// the script prints the `READY` line.
fn run_script_target(
    agent: &Agent,
    s: &Scratch,
    name: &str,
    script: &str,
    args: &[&str],
    chpox_args: &[&str],
) -> Target {
    let path = s.logs.join(format!("{name}.sh"));
    fs::write(&path, script).expect("write the script");
    let mut cmd = agent.client(chpox_bin());
    cmd.arg("run")
        .args(chpox_args)
        .args(["--", "bash"])
        .arg(&path)
        .args(args);
    no_core(&mut cmd, &s.logs);
    Target::spawn_command(cmd, name, &s.logs)
}

/// `chpox inspect IMAGE --json`.
fn inspect_json(image: &Path) -> Value {
    let out = common::chpox_ok(&["inspect", path_str(image), "--json"]);
    serde_json::from_str(&out).expect("inspect --json prints JSON")
}

fn json_pid(v: &Value) -> i32 {
    v.as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or_else(|| panic!("{v} is not a PID"))
}

/// The PIDs of the live processes in an image (`inspect --json`).
fn image_pids(img: &Value) -> BTreeSet<i32> {
    std::iter::once(img)
        .chain(img["descendants"].as_array().into_iter().flatten())
        .map(|p| json_pid(&p["process"]["pid"]))
        .collect()
}

/// `children_not_saved` of an image or a list entry.
fn children_not_saved(v: &Value) -> Vec<i32> {
    v["children_not_saved"]
        .as_array()
        .unwrap_or_else(|| panic!("no children_not_saved array in {v}"))
        .iter()
        .map(json_pid)
        .collect()
}

/// The file offset of the root's descriptor `fd` (a regular file) in an image.
fn root_fd_pos(img: &Value, fd: i32) -> u64 {
    let entry = img["fds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["fd"] == fd)
        .unwrap_or_else(|| panic!("the root has no fd {fd} in the image: {}", img["fds"]));
    entry["kind"]["RegularFile"]["pos"]
        .as_u64()
        .unwrap_or_else(|| panic!("fd {fd} of the root is not a regular file: {entry}"))
}

/// Steps run by children of the shell one after the other, each a python3
/// that sleeps and then appends its line; the script ends with status 7.
const TREE_STEPS: usize = 8;
const TREE_SCRIPT: &str = r#"echo READY
exec >>"$1"
for i in 1 2 3 4 5 6 7 8; do
    python3 -c 'import sys, time; time.sleep(0.5); print("step", sys.argv[1], flush=True)' "$i"
done
echo done
exit 7
"#;

/// What the tree script leaves in its output after `n` steps.
fn tree_steps_done(n: usize) -> String {
    (1..=n).map(|i| format!("step {i}\n")).collect()
}

/// A step child of `root` at step `from` or later, asleep in its step:
/// its PID and step.
fn step_asleep(root: i32, from: usize) -> Option<(i32, usize)> {
    tree_pids(root).into_iter().find_map(|pid| {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if !comm.starts_with("python") {
            return None;
        }
        let step: usize = cmdline(pid).last()?.parse().ok()?;
        let syscall = fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
        let nr: i64 = syscall.split_whitespace().next()?.parse().ok()?;
        let sleeping = [
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_select,
        ]
        .contains(&nr);
        (step >= from && sleeping).then_some((pid, step))
    })
}

/// Kills the whole tree of `root` (a crash of the job), has its parent
/// reap it (`reap`), waits until every PID of it and of `also` is free and
/// the agent has let `root` go, and cuts the job's output back to `pos`,
/// what the image's root had written (the output file is not part of the
/// image); returns what was kept.
fn crash_tree(
    agent: &Agent,
    root: i32,
    reap: impl FnOnce(),
    also: &BTreeSet<i32>,
    out: &Path,
    pos: u64,
) -> String {
    let mut pids = kill_tree(root);
    reap();
    pids.extend(also);
    pids.insert(root);
    wait_all_gone(&pids, "after killing the tree");
    agent.wait_gone(root);
    let written = fs::read_to_string(out).expect("read the output");
    assert!(
        written.len() as u64 >= pos,
        "the image says {pos} bytes were written, the file has {written:?}"
    );
    let kept = written[..pos as usize].to_string();
    fs::write(out, &kept).expect("cut the output back");
    kept
}

/// The whole loop for a tree: `chpox run` of a shell whose steps run in
/// children, `kill -31` through the agent while a step's child sleeps,
/// the crash of every process of the tree, `chpox restore --register`,
/// `kill -31` of the restored root (a tree again), the crash again, and a
/// plain restore that runs the job to its end: every step exactly once,
/// and the script's exit status.
#[test]
fn a_registered_tree_is_checkpointed_restored_registered_and_checkpointed_again() {
    let s = scratch();
    let agent = Agent::start(&s);
    let img_dir = s.dir("out", 0o755);
    let image = img_dir.join("tree.chpox");
    let out = s.logs.join("steps.out");
    let mut guard = Guard::default();
    let mut t = run_script_target(
        &agent,
        &s,
        "steps",
        TREE_SCRIPT,
        &[path_str(&out)],
        &["-o", path_str(&image)],
    );
    let root = t.pid;
    guard.watch_tree(root);
    let job_stderr = t.stderr_path.clone();
    let context = || {
        format!(
            "--- output ---\n{}\n--- job stderr ---\n{}\n{}",
            fs::read_to_string(&out).unwrap_or_default(),
            fs::read_to_string(&job_stderr).unwrap_or_default(),
            agent.describe()
        )
    };

    // `chpox run` registers with FLAGS 9: the process and its children.
    let e = agent.entry(root).expect("registered by chpox run");
    assert_eq!(e["flags"], 9, "{e}");

    // 1. The first checkpoint, while step 3's child sleeps.
    let (child1, step1) = poll("step 3 asleep", EXIT_TIMEOUT, context, || {
        step_asleep(root, 3)
    });
    send(root, SIGSYS);
    let e = agent.wait_checkpoints(root, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    assert_eq!(children_not_saved(&e), Vec::<i32>::new(), "{e}");
    let img = inspect_json(&image);
    let saved1 = image_pids(&img);
    assert!(
        saved1.contains(&root) && saved1.contains(&child1),
        "the image holds {saved1:?}, not the shell {root} and step {step1}'s child {child1}"
    );
    assert_eq!(children_not_saved(&img), Vec::<i32>::new());
    let written: Vec<_> = agent
        .events("checkpoint written")
        .into_iter()
        .filter(|kv| kv.get("pid") == Some(&root.to_string()))
        .collect();
    assert_eq!(written.len(), 1, "{}", agent.describe());
    assert_eq!(
        written[0].get("processes"),
        Some(&saved1.len().to_string()),
        "{}",
        agent.describe()
    );
    assert_running(&mut t);
    let pos1 = root_fd_pos(&img, 1);

    // The crash: every process of the tree.
    let child = &mut t.child;
    let reap = || {
        child.wait().expect("reap the original root");
    };
    let kept = crash_tree(&agent, root, reap, &saved1, &out, pos1);
    assert_eq!(kept, tree_steps_done(step1 - 1), "output at the checkpoint");

    // 2. Restored with its PIDs and registered as it was.
    let mut restore = spawn_restore(&agent, &s, &image, &["--register"]);
    let e = agent.wait_for(
        "the restored tree's root to be registered",
        STATE_TIMEOUT,
        || agent.entry(root),
    );
    guard.watch_tree(root);
    assert_eq!(e["flags"], 9, "{e}");
    assert_eq!(output_of(&e), image, "{e}");
    assert!(ignores(root, SIGSYS), "SIGSYS is not ignored after restore");

    // Its trigger checkpoints the restored tree, a later step's child in it.
    let (child2, step2) = poll(
        &format!("a step after {} asleep in the restored tree", step1 + 1),
        EXIT_TIMEOUT,
        context,
        || step_asleep(root, step1 + 2),
    );
    send(root, SIGSYS);
    let e = agent.wait_checkpoints(root, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    let img = inspect_json(&image);
    let saved2 = image_pids(&img);
    assert!(
        saved2.contains(&root) && saved2.contains(&child2),
        "the second image holds {saved2:?}, not the shell {root} and step {step2}'s child {child2}"
    );
    assert_eq!(img["registration"]["flags"], 9, "{}", img["registration"]);
    let pos2 = root_fd_pos(&img, 1);

    // The crash again; `chpox restore` reports the root's death.
    let mut status = None;
    let reap = || {
        status = Some(poll(
            "chpox restore to return after the crash",
            EXIT_TIMEOUT,
            context,
            || restore.try_wait().expect("try_wait chpox restore"),
        ));
    };
    let kept = crash_tree(&agent, root, reap, &saved2, &out, pos2);
    let status = status.expect("reaped");
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status}");
    assert_eq!(kept, tree_steps_done(step2 - 1), "output at the checkpoint");

    // 3. From the second image, to the end.
    let mut restore = spawn_restore(&agent, &s, &image, &[]);
    let status = poll(
        "the twice-restored tree to finish",
        EXIT_TIMEOUT,
        context,
        || restore.try_wait().expect("try_wait chpox restore"),
    );
    assert_eq!(status.code(), Some(7), "{status}\n{}", context());
    assert_eq!(
        fs::read_to_string(&out).expect("read the output"),
        tree_steps_done(TREE_STEPS) + "done\n",
        "{}",
        context()
    );
    assert_eq!(t.stderr(), "", "the job's stderr");
    assert!(
        agent.entry(root).is_none(),
        "the last restore was not to register"
    );
}

/// A shell with one child that sleeps; `READY child=PID`.
const PARENT_SCRIPT: &str = r#"sleep 120 &
echo "READY child=$!"
wait
"#;

/// The agent's warning that a checkpoint left children out.
const CHILDREN_WARNING: &str = "children not in the checkpoint";

/// Registered without FLAGS 8 (`chpoxctl add PID 31 1 FILE`, `chpox register
/// --no-children`), a process with a child is checkpointed alone: the image
/// holds it only and names the child left out, `chpox list` and `chpox
/// checkpoint` say so, and the agent's log warns once per registration.
/// `chpox register` (FLAGS 9) then takes the child too.
#[test]
fn flags_without_8_checkpoint_the_process_alone_and_say_so() {
    let s = scratch();
    let agent = Agent::start(&s);
    let img_dir = s.dir("out", 0o755);
    let script = s.logs.join("parent.sh");
    fs::write(&script, PARENT_SCRIPT).expect("write the script");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    no_core(&mut cmd, &s.logs);
    let mut t = Target::spawn_command(cmd, "parent", &s.logs);
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let pid = t.pid;
    let pid_s = pid.to_string();
    let child: i32 = t.ready_value("child").parse().expect("child PID");
    guard.watch_tree(child);
    assert_eq!(stat(child).map(|s| s.ppid), Some(pid), "the child's parent");

    // chpoxctl keeps old chpox's FLAGS: 1 is the process alone.
    let alone = img_dir.join("alone.chpox");
    agent.chpoxctl_ok(&["add", &pid_s, "31", "1", path_str(&alone)]);
    assert_eq!(agent.entry(pid).expect("registered")["flags"], 1);
    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(pid, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    assert_eq!(children_not_saved(&e), [child], "{e}");
    let img = inspect_json(&alone);
    assert_eq!(image_pids(&img), BTreeSet::from([pid]));
    assert_eq!(img["descendants"].as_array().map(Vec::len), Some(0));
    assert_eq!(children_not_saved(&img), [child]);
    let written = agent.events("checkpoint written");
    assert_eq!(written.len(), 1, "{}", agent.describe());
    assert_eq!(written[0].get("processes").map(String::as_str), Some("1"));
    assert_eq!(
        agent.events_for(CHILDREN_WARNING, pid),
        1,
        "{}",
        agent.describe()
    );

    // `chpox list` (and `chpoxctl list`) say so after the table.
    for listed in [agent.chpox_ok(&["list"]), agent.chpoxctl_ok(&["list"])] {
        let note = listed
            .lines()
            .find(|l| l.contains("not in the image"))
            .unwrap_or_else(|| panic!("no note on the children left out in:\n{listed}"));
        assert!(
            note.contains(&pid_s) && note.contains(&child.to_string()),
            "{note}"
        );
    }

    // Every checkpoint leaves the child out, `chpox checkpoint` says so too;
    // the log warns once per registration.
    let out = agent.chpox(&["checkpoint", &pid_s, "--timeout", "60"]);
    let printed = stdout_ok("chpox checkpoint", out.clone());
    assert_eq!(printed.trim(), path_str(&alone));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not in the image") && stderr.contains(&child.to_string()),
        "chpox checkpoint does not warn of the child left out {}",
        show(&out)
    );
    assert_eq!(agent.entry(pid).expect("listed")["checkpoints"], 2);
    assert_eq!(
        agent.events_for(CHILDREN_WARNING, pid),
        1,
        "{}",
        agent.describe()
    );
    agent.chpoxctl_ok(&["del", &pid_s]);

    // `chpox register --no-children`: FLAGS 1 as well; a new registration,
    // a new warning.
    let no_children = img_dir.join("no-children.chpox");
    agent.chpox_ok(&[
        "register",
        &pid_s,
        "--no-children",
        "-o",
        path_str(&no_children),
    ]);
    assert_eq!(agent.entry(pid).expect("registered")["flags"], 1);
    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(pid, 1);
    assert_eq!(children_not_saved(&e), [child], "{e}");
    let img = inspect_json(&no_children);
    assert_eq!(image_pids(&img), BTreeSet::from([pid]));
    assert_eq!(children_not_saved(&img), [child]);
    assert_eq!(
        agent.events_for(CHILDREN_WARNING, pid),
        2,
        "{}",
        agent.describe()
    );
    agent.chpox_ok(&["unregister", &pid_s]);

    // `chpox register` with its default FLAGS 9: the child is in the image.
    let whole = img_dir.join("whole.chpox");
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&whole)]);
    assert_eq!(agent.entry(pid).expect("registered")["flags"], 9);
    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(pid, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    assert_eq!(children_not_saved(&e), Vec::<i32>::new(), "{e}");
    let img = inspect_json(&whole);
    assert_eq!(image_pids(&img), BTreeSet::from([pid, child]));
    assert_eq!(children_not_saved(&img), Vec::<i32>::new());
    assert_eq!(
        agent.events_for(CHILDREN_WARNING, pid),
        2,
        "{}",
        agent.describe()
    );
    let listed = agent.chpox_ok(&["list"]);
    assert!(!listed.contains("not in the image"), "{listed}");

    // The checkpoints left both running.
    assert_running(&mut t);
    assert_eq!(stat(child).map(|s| s.ppid), Some(pid), "the child's parent");
}

/// A user's registered job must not carry a process the user could not
/// trace into the user's image: here a setuid-root child (euid 0) of the
/// user's shell. The checkpoint fails by name; no image appears.
#[test]
fn a_users_tree_with_a_setuid_child_is_not_checkpointed() {
    let s = scratch();
    let out_dir = s.dir("out", 0o777);
    let bin_dir = s.dir("bin", 0o755);
    let suid = bin_dir.join("suid-sleep");
    fs::copy("/bin/sleep", &suid).expect("copy sleep");
    chmod(&suid, 0o4755);
    let agent = Agent::start(&s);

    let mut cmd = Command::new("bash");
    cmd.args(["-c", "\"$0\" 600 & echo READY; wait"])
        .arg(&suid)
        .uid(NOBODY)
        .gid(NOBODY);
    no_core(&mut cmd, &s.logs);
    let mut shell = Target::spawn_command(cmd, "suid-parent", &s.logs);
    let child = poll(
        "the setuid child to run as root",
        Duration::from_secs(10),
        String::new,
        || {
            let parent = shell.pid;
            fs::read_dir("/proc").ok()?.find_map(|e| {
                let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let field = |key: &str, n: usize| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(key))?
                        .split_whitespace()
                        .nth(n)?
                        .parse::<i32>()
                        .ok()
                };
                (field("PPid:", 0) == Some(parent) && field("Uid:", 1) == Some(0)).then_some(pid)
            })
        },
    );
    let pid = shell.pid.to_string();
    let img = out_dir.join("job.chpox");
    let out = agent.chpox_as(NOBODY, &["register", &pid, "-o", path_str(&img)]);
    assert!(out.status.success(), "register: {}", show(&out));
    let out = agent.chpox_as(NOBODY, &["checkpoint", &pid, "--timeout", "10"]);
    assert_refused(
        "checkpoint of a tree with a setuid child",
        &out,
        &format!("permission denied for PID {child}"),
    );
    assert!(!img.exists(), "an image was written: {}", img.display());
    assert_running(&mut shell);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child, libc::SIGKILL) };
}
