//! The trigger path, end to end: a real `chpox-agent` with its real eBPF
//! program turns trigger signals sent to real processes into checkpoints.
//!
//! Every test starts its own agent (own run directory, image directory and
//! BPF maps), so the tests run in parallel. Waits are bounded polls of
//! `chpox list --json`, the agent's log or `/proc`, never bare sleeps.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chpox::image::ImageReader;
use common::agent::{
    AGENTS, Agent, NOBODY, SIGSYS, STATE_TIMEOUT, Scratch, assert_refused, catches, ignores,
    no_core, poll, scratch, send, stdout_ok,
};
use common::procs::{Guard, cmdline, kill_tree, stat, tree_pids};
use common::{Target, bin, check_pattern, chmod, chpox_bin, free_pid, path_str, run_chpox, show};
use serde_json::Value;

/// How long a target may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Small helpers

/// Panics unless the target is still running.
fn assert_running(t: &mut Target) {
    if let Some(status) = t.child.try_wait().expect("try_wait") {
        panic!(
            "pid {} exited ({status}) but should run on\n--- stdout ---\n{}\n--- stderr ---\n{}",
            t.pid,
            t.stdout(),
            t.stderr()
        );
    }
}

// ---------------------------------------------------------------------------
// Targets

/// Test program `name` started directly (not registered), as root.
fn plain_target(s: &Scratch, name: &str, args: &[&str]) -> Target {
    let mut cmd = Command::new(bin(name));
    cmd.args(args);
    no_core(&mut cmd, &s.logs);
    Target::spawn_command(cmd, name, &s.logs)
}

/// Test program `name` started directly as `nobody`.
fn nobody_target(s: &Scratch, name: &str, args: &[&str]) -> Target {
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
fn run_target(
    agent: &Agent,
    s: &Scratch,
    name: &str,
    args: &[&str],
    chpox_args: &[&str],
) -> Target {
    let mut cmd = agent.client(chpox_bin());
    cmd.arg("run")
        .args(chpox_args)
        .arg("--")
        .arg(bin(name))
        .args(args);
    no_core(&mut cmd, &s.logs);
    Target::spawn_command(cmd, name, &s.logs)
}

// ---------------------------------------------------------------------------
// Images

/// `chpox inspect` accepts the image, its checksums verify, and it is of `pid`.
fn check_image(path: &Path, pid: i32) -> ImageReader {
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
fn output_of(entry: &Value) -> PathBuf {
    PathBuf::from(entry["output"].as_str().expect("output is a string"))
}

// ---------------------------------------------------------------------------
// 1. chpox run + kill -31

#[test]
fn run_and_kill_31_writes_a_valid_image_while_the_target_runs_on() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = run_target(
        &agent,
        &s,
        "mempattern",
        &["16", "--finish-after-rounds", "50"],
        &[],
    );
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));

    // Registered before its first instruction, with SIGSYS ignored.
    let e = agent.entry(t.pid).expect("registered by chpox run");
    assert_eq!(e["signal"], 31, "{e}");
    assert_eq!(e["uid"], 0, "{e}");
    assert_eq!(e["checkpoints"], 0, "{e}");
    assert_eq!(e["state"], "idle", "{e}");
    assert!(ignores(t.pid, SIGSYS), "SIGSYS is not ignored");

    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(t.pid, 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    assert_eq!(e["signals"], 1, "{e}");
    let image = output_of(&e);
    assert!(
        image.starts_with(&s.images),
        "default image {} is not in the image directory",
        image.display()
    );
    assert_eq!(agent.events_for("checkpoint written", t.pid), 1);
    let reader = check_image(&image, t.pid);
    check_pattern(&reader, addr, len);
    assert_running(&mut t);

    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
    agent.wait_gone(t.pid);
}

// ---------------------------------------------------------------------------
// 2. chpox register / unregister on a running process

#[test]
fn register_makes_31_harmless_and_unregister_makes_it_fatal_again() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = plain_target(&s, "mempattern", &["8"]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let pid = t.pid.to_string();
    assert!(!ignores(t.pid, SIGSYS), "SIGSYS ignored from the start");

    let out = agent.chpox_ok(&["register", &pid]);
    assert!(out.contains(&format!("registered PID {pid}")), "{out}");
    assert!(ignores(t.pid, SIGSYS), "register did not set SIG_IGN");
    assert!(!catches(t.pid, SIGSYS));

    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(t.pid, 1);
    assert_running(&mut t);
    check_pattern(&check_image(&output_of(&e), t.pid), addr, len);

    let out = agent.chpox_ok(&["unregister", &pid]);
    assert!(out.contains(&format!("unregistered PID {pid}")), "{out}");
    assert!(!ignores(t.pid, SIGSYS), "unregister left SIGSYS ignored");
    assert!(agent.entry(t.pid).is_none(), "still listed");

    t.signal(SIGSYS);
    let status = t.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.signal(), Some(SIGSYS), "exited with {status}");
    // No checkpoint came of the fatal signal.
    assert_eq!(agent.events_for("checkpoint written", t.pid), 1);
}

// ---------------------------------------------------------------------------
// 3. Unregistered processes are not affected

#[test]
fn an_unregistered_process_still_dies_from_31() {
    let s = scratch();
    let agent = Agent::start(&s);
    // A registered process next to it, so the program has work to skip.
    let mut registered = run_target(&agent, &s, "mempattern", &["4"], &[]);
    let mut t = plain_target(&s, "mempattern", &["4"]);
    assert!(!ignores(t.pid, SIGSYS));

    t.signal(SIGSYS);
    let status = t.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.signal(), Some(SIGSYS), "exited with {status}");

    assert_eq!(agent.events_for("checkpoint written", t.pid), 0);
    let e = agent.entry(registered.pid).expect("registered");
    assert_eq!(e["signals"], 0, "another PID's signal was counted: {e}");
    assert_eq!(e["checkpoints"], 0, "{e}");
    assert_running(&mut registered);
}

// ---------------------------------------------------------------------------
// 4. Signals are coalesced

#[test]
fn a_burst_of_100_signals_makes_one_or_two_checkpoints() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = run_target(&agent, &s, "mempattern", &["64"], &[]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));

    let started = Instant::now();
    for _ in 0..100 {
        send(t.pid, SIGSYS);
    }
    let burst = started.elapsed();
    let e = agent.settled(t.pid);
    let checkpoints = e["checkpoints"].as_u64().expect("checkpoints");
    assert!(
        (1..=2).contains(&checkpoints),
        "{checkpoints} checkpoints for a burst of 100 signals sent in {burst:?}: {e}\n{}",
        agent.describe()
    );
    assert_eq!(e["signals"], 100, "{e}");
    assert_eq!(e["last_error"], Value::Null, "{e}");
    // Every signal either asked for a checkpoint or was folded into one.
    let coalesced = e["coalesced"].as_u64().expect("coalesced");
    assert_eq!(100 - coalesced, checkpoints, "{e}");
    assert_eq!(
        agent.events_for("checkpoint written", t.pid) as u64,
        checkpoints,
        "{}",
        agent.describe()
    );
    assert_running(&mut t);
    check_pattern(&check_image(&output_of(&e), t.pid), addr, len);

    // Back to idle: the next signal makes exactly one more.
    t.signal(SIGSYS);
    let e = agent.wait_checkpoints(t.pid, checkpoints + 1);
    let e = if e["state"] == "idle" {
        e
    } else {
        agent.settled(t.pid)
    };
    assert_eq!(e["checkpoints"].as_u64(), Some(checkpoints + 1), "{e}");
    assert_eq!(e["signals"], 101, "{e}");
    assert_running(&mut t);
}

// ---------------------------------------------------------------------------
// 5. Exit

#[test]
fn a_registered_process_that_exits_leaves_the_list() {
    let s = scratch();
    let agent = Agent::start(&s);

    // Exits by itself.
    let mut t = run_target(&agent, &s, "sleeper", &[], &[]);
    assert!(agent.entry(t.pid).is_some(), "sleeper not registered");
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
    agent.wait_gone(t.pid);
    agent.wait_for("the exit in the log", STATE_TIMEOUT, || {
        (agent.events_for("registered process exited", t.pid) == 1).then_some(())
    });

    // Killed, with several threads.
    let mut m = plain_target(&s, "threads", &["4"]);
    agent.chpox_ok(&["register", &m.pid.to_string()]);
    assert!(agent.entry(m.pid).is_some(), "threads not registered");
    m.signal(libc::SIGKILL);
    let status = m.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    agent.wait_gone(m.pid);
    assert!(agent.list().is_empty(), "{:?}", agent.list());
}

// ---------------------------------------------------------------------------
// 6. Users

#[test]
fn users_register_their_own_processes_only() {
    let s = scratch();
    let out_dir = s.dir("out", 0o777);
    let agent = Agent::start(&s);

    // Root's process: refused to nobody.
    let mut roots = plain_target(&s, "mempattern", &["4"]);
    let root_pid = roots.pid.to_string();
    let img = out_dir.join("stolen");
    let out = agent.chpox_as(NOBODY, &["register", &root_pid, "-o", path_str(&img)]);
    assert_refused(
        "register of root's process by nobody",
        &out,
        "permission denied",
    );
    assert!(agent.entry(roots.pid).is_none(), "registered anyway");
    assert!(!ignores(roots.pid, SIGSYS), "its SIGSYS was changed anyway");

    // Nobody's own process.
    let mut mine = nobody_target(&s, "mempattern", &["4"]);
    let (addr, len) = (mine.ready_hex("addr"), mine.ready_u64("len"));
    let my_pid = mine.pid.to_string();
    let my_img = out_dir.join("mine.chpox");
    let out = agent.chpox_as(NOBODY, &["register", &my_pid, "-o", path_str(&my_img)]);
    assert!(
        out.status.success(),
        "nobody registering its own process {}",
        show(&out)
    );
    assert!(ignores(mine.pid, SIGSYS));

    // Root registers its own; each user lists only theirs, root all.
    agent.chpox_ok(&["register", &root_pid]);
    let theirs = agent.parse_list(&stdout_ok(
        "chpox list as nobody",
        agent.chpox_as(NOBODY, &["list", "--json"]),
    ));
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(theirs[0]["pid"], mine.pid);
    assert_eq!(theirs[0]["uid"], NOBODY);
    assert_eq!(agent.list().len(), 2);

    // Nobody cannot touch root's registration.
    let out = agent.chpox_as(NOBODY, &["unregister", &root_pid]);
    assert_refused(
        "unregister of root's process by nobody",
        &out,
        "permission denied",
    );
    let out = agent.chpox_as(NOBODY, &["checkpoint", &root_pid, "--timeout", "5"]);
    assert_refused(
        "checkpoint of root's process by nobody",
        &out,
        "permission denied",
    );
    assert!(ignores(roots.pid, SIGSYS));
    assert_eq!(agent.entry(roots.pid).expect("listed")["signals"], 0);

    // Nobody's checkpoint is nobody's file.
    mine.signal(SIGSYS);
    agent.wait_checkpoints(mine.pid, 1);
    let meta = fs::metadata(&my_img).expect("image written");
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    check_pattern(&check_image(&my_img, mine.pid), addr, len);

    let out = agent.chpox_as(NOBODY, &["unregister", &my_pid]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!ignores(mine.pid, SIGSYS));
    assert_running(&mut mine);
    assert_running(&mut roots);
}

/// The agent writes images as root, so it must not write one where the
/// user who registered the process could not: here, over a root-owned file
/// in a root-owned directory.
#[test]
fn a_user_cannot_have_the_agent_replace_a_root_file() {
    let s = scratch();
    let protected = s.dir("protected", 0o755);
    let victim = protected.join("victim");
    fs::write(&victim, "root's file\n").expect("write victim");
    chmod(&victim, 0o644);
    let agent = Agent::start(&s);

    let mine = nobody_target(&s, "mempattern", &["4"]);
    let pid = mine.pid.to_string();
    let reg = agent.chpox_as(NOBODY, &["register", &pid, "-o", path_str(&victim)]);
    let mut attempt = None;
    if reg.status.success() {
        attempt = Some(agent.chpox_as(NOBODY, &["checkpoint", &pid, "--timeout", "30"]));
    }
    let meta = fs::metadata(&victim).expect("victim still there");
    let content = fs::read(&victim).expect("read victim");
    assert!(
        content == b"root's file\n" && meta.uid() == 0,
        "uid {NOBODY} had chpox-agent replace root's {} (now uid {}, {} bytes)\n\
         register: {}\ncheckpoint: {}",
        victim.display(),
        meta.uid(),
        content.len(),
        show(&reg),
        attempt.as_ref().map(show).unwrap_or_default()
    );
}

/// `chpoxctl addlib` files are read by the agent as root and embedded in
/// an image the user owns: a user must not get a file they cannot read.
#[test]
fn a_user_cannot_have_a_root_only_file_embedded() {
    let s = scratch();
    let out_dir = s.dir("out", 0o777);
    let secret = s.tmp.path().join("secret");
    let marker = format!("chpox-secret-{}-{}", std::process::id(), free_pid());
    fs::write(&secret, &marker).expect("write secret");
    chmod(&secret, 0o600);
    let agent = Agent::start(&s);

    let mine = nobody_target(&s, "mempattern", &["4"]);
    let pid = mine.pid.to_string();
    let add = agent.chpoxctl_as(NOBODY, &["addlib", path_str(&secret)]);
    if !add.status.success() {
        return; // refused up front: fine
    }
    let img = out_dir.join("img");
    let reg = agent.chpox_as(
        NOBODY,
        &["register", &pid, "-o", path_str(&img), "--flags", "4"],
    );
    assert!(reg.status.success(), "{}", show(&reg));
    let attempt = agent.chpox_as(NOBODY, &["checkpoint", &pid, "--timeout", "30"]);
    let Ok(bytes) = fs::read(&img) else {
        return; // the checkpoint was refused: fine
    };
    let leaked = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
    let owner = fs::metadata(&img).expect("image").uid();
    assert!(
        !leaked,
        "uid {NOBODY} got root-only {} (mode 0600) embedded in its image {} (owned by uid {owner})\n\
         addlib: {}\ncheckpoint: {}",
        secret.display(),
        img.display(),
        show(&add),
        show(&attempt)
    );
}

// ---------------------------------------------------------------------------
// 7. The register FIFO

/// Writes `data` to the agent's register FIFO in one write (as root).
fn write_fifo(agent: &Agent, data: &[u8]) {
    let path = agent.run_dir.join("register");
    // Non-blocking: with no reader (agent gone) this fails instead of hanging.
    let mut f = poll(
        "the agent to open its register FIFO",
        STATE_TIMEOUT,
        || agent.describe(),
        || match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
            Err(e) => panic!("open {}: {e}", path.display()),
        },
    );
    f.write_all(data).expect("write to the FIFO");
}

#[test]
fn the_register_fifo_takes_good_lines_and_rejects_garbage() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let fifo = agent.run_dir.join("register");
    let meta = fs::metadata(&fifo).expect("register FIFO");
    assert!(
        meta.file_type().is_fifo(),
        "{} is not a FIFO",
        fifo.display()
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);

    let mut t = plain_target(&s, "mempattern", &["4"]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let img = s.tmp.path().join("from-fifo.chpox");
    write_fifo(
        &agent,
        format!("{}:31:1:{}\n", t.pid, img.display()).as_bytes(),
    );
    let e = agent.wait_for("the FIFO registration", STATE_TIMEOUT, || {
        agent.entry(t.pid)
    });
    assert_eq!(e["signal"], 31);
    assert_eq!(e["flags"], 1);
    assert_eq!(output_of(&e), img);
    assert!(ignores(t.pid, SIGSYS));
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    check_pattern(&check_image(&img, t.pid), addr, len);

    let before = agent.list();
    let nowhere = s.tmp.path().join("nowhere.chpox");
    let bad = [
        "hello".to_string(),
        "1:2:3".to_string(),
        "12:31:99:/tmp/x".to_string(),
        format!("{}:31:1:{}", free_pid(), nowhere.display()),
        format!("{}:31:1:relative/path", t.pid),
    ];
    for (i, line) in bad.iter().enumerate() {
        write_fifo(&agent, format!("{line}\n").as_bytes());
        agent.wait_for(
            &format!("the agent to reject {line:?}"),
            STATE_TIMEOUT,
            || (agent.events("register line rejected").len() > i).then_some(()),
        );
        let last = agent
            .log_text()
            .lines()
            .filter(|l| l.contains("chpox::agent::fifo: register line rejected"))
            .nth(i)
            .map(str::to_string)
            .unwrap_or_default();
        assert!(last.contains(line.as_str()), "{line:?} not in {last:?}");
        assert!(last.contains("reason="), "no reason given: {last}");
        agent.assert_alive();
    }
    assert_eq!(agent.list(), before, "garbage changed the registrations");
    assert!(!nowhere.exists(), "{} appeared", nowhere.display());

    // Still serving, the FIFO included.
    let mut u = plain_target(&s, "mempattern", &["4"]);
    let img2 = s.tmp.path().join("second.chpox");
    write_fifo(
        &agent,
        format!("{}:31:1:{}\n", u.pid, img2.display()).as_bytes(),
    );
    agent.wait_for("the second FIFO registration", STATE_TIMEOUT, || {
        agent.entry(u.pid)
    });
    u.signal(SIGSYS);
    agent.wait_checkpoints(u.pid, 1);
    check_image(&img2, u.pid);
    agent.assert_alive();
    assert_running(&mut t);
    assert_running(&mut u);
}

/// A line that is not UTF-8 is garbage like any other: logged as rejected,
/// and the lines after it in the same write still count.
#[test]
fn a_non_utf8_fifo_line_is_rejected_without_losing_the_next_line() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let t = plain_target(&s, "mempattern", &["4"]);
    let img = s.tmp.path().join("after-garbage.chpox");
    let mut data = b"\xff\xfe not utf-8\n".to_vec();
    data.extend_from_slice(format!("{}:31:1:{}\n", t.pid, img.display()).as_bytes());
    write_fifo(&agent, &data);
    agent.wait_for(
        "the good line after a non-UTF-8 line to register",
        STATE_TIMEOUT,
        || agent.entry(t.pid),
    );
    agent.wait_for(
        "the non-UTF-8 line to be logged as rejected",
        STATE_TIMEOUT,
        || (!agent.events("register line rejected").is_empty()).then_some(()),
    );
    agent.assert_alive();
}

// ---------------------------------------------------------------------------
// 8. chpox checkpoint

#[test]
fn checkpoint_waits_for_the_image_and_keeps_the_previous_one() {
    let s = scratch();
    let agent = Agent::start(&s);
    let img_dir = s.dir("out", 0o755);
    let img = img_dir.join("ck.chpox");
    let mut t = run_target(&agent, &s, "mempattern", &["8"], &["-o", path_str(&img)]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let pid = t.pid.to_string();
    let generation1 = img_dir.join("ck.chpox.1");
    let generation2 = img_dir.join("ck.chpox.2");

    let printed = agent.chpox_ok(&["checkpoint", &pid, "--timeout", "60"]);
    assert_eq!(printed.trim(), path_str(&img));
    let first = check_image(&img, t.pid);
    check_pattern(&first, addr, len);
    let first_created = first.metadata().created_unix_ns;
    assert!(!generation1.exists(), "FILE.1 after the first checkpoint");

    let printed = agent.chpox_ok(&["checkpoint", &pid, "--timeout", "60"]);
    assert_eq!(printed.trim(), path_str(&img));
    let second = check_image(&img, t.pid);
    let kept = check_image(&generation1, t.pid);
    assert_eq!(
        kept.metadata().created_unix_ns,
        first_created,
        "FILE.1 is not the first image"
    );
    assert!(second.metadata().created_unix_ns > first_created);
    let second_created = second.metadata().created_unix_ns;

    // --keep 1: only one earlier image.
    agent.chpox_ok(&["checkpoint", &pid]);
    assert_eq!(
        check_image(&generation1, t.pid).metadata().created_unix_ns,
        second_created
    );
    assert!(!generation2.exists(), "FILE.2 kept with --keep 1");
    assert_eq!(agent.entry(t.pid).expect("listed")["checkpoints"], 3);
    assert_running(&mut t);

    // Only registered processes.
    let other = plain_target(&s, "mempattern", &["4"]);
    let out = agent.chpox(&["checkpoint", &other.pid.to_string(), "--timeout", "5"]);
    assert_refused(
        "checkpoint of an unregistered process",
        &out,
        "not registered",
    );
}

// ---------------------------------------------------------------------------
// 9. A process that handles the signal itself

#[test]
fn a_process_handling_the_signal_is_refused_unless_forced() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = plain_target(&s, "sighandler", &[]);
    let pid = t.pid.to_string();
    let usr1 = libc::SIGUSR1;
    assert!(catches(t.pid, usr1));

    let out = agent.chpox(&["register", &pid, "--signal", "10"]);
    assert_refused("register over a handled signal", &out, "handles signal");
    assert!(agent.entry(t.pid).is_none());
    assert!(
        catches(t.pid, usr1) && !ignores(t.pid, usr1),
        "handler changed anyway"
    );

    agent.chpox_ok(&["register", &pid, "--signal", "10", "--force"]);
    assert!(
        ignores(t.pid, usr1) && !catches(t.pid, usr1),
        "not taken over"
    );
    assert_eq!(agent.entry(t.pid).expect("listed")["signal"], 10);
    t.signal(usr1);
    let e = agent.wait_checkpoints(t.pid, 1);
    check_image(&output_of(&e), t.pid);
    assert_running(&mut t);

    agent.chpox_ok(&["unregister", &pid]);
    assert!(
        catches(t.pid, usr1) && !ignores(t.pid, usr1),
        "handler not restored"
    );
    // The handler counts from here: the SIGUSR1 that checkpointed did not run it.
    t.signal(usr1);
    t.wait_not_pending(usr1, STATE_TIMEOUT);
    t.signal(libc::SIGUSR2);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["COUNT=1"]);
}

// ---------------------------------------------------------------------------
// 10. chpoxctl

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

#[test]
fn chpoxctl_registers_and_manages_libraries() {
    let s = scratch();
    let agent = Agent::start(&s);
    let img_dir = s.dir("out", 0o755);
    let mut t = plain_target(&s, "mempattern", &["4"]);
    let pid = t.pid.to_string();

    let plain = img_dir.join("plain.chpox");
    agent.chpoxctl_ok(&["add", &pid, "31", "1", path_str(&plain)]);
    let e = agent.entry(t.pid).expect("registered by chpoxctl add");
    assert_eq!(
        (e["signal"].as_u64(), e["flags"].as_u64()),
        (Some(31), Some(1))
    );
    assert_eq!(output_of(&e), plain);
    assert!(ignores(t.pid, SIGSYS));
    let listed = agent.chpoxctl_ok(&["list"]);
    assert!(
        listed.contains(&pid) && listed.contains(path_str(&plain)),
        "{listed}"
    );
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let reader = check_image(&plain, t.pid);
    let libc_file = reader
        .metadata()
        .files
        .iter()
        .find(|f| f.path == LIBC)
        .unwrap_or_else(|| panic!("{LIBC} not among the image's files"));
    assert!(libc_file.embedded.is_none(), "FLAGS 1 embedded {LIBC}");

    agent.chpoxctl_ok(&["del", &pid]);
    assert!(agent.entry(t.pid).is_none());
    assert!(!ignores(t.pid, SIGSYS), "del did not restore SIGSYS");

    // The library list.
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    agent.chpoxctl_ok(&["addlib", LIBC]);
    agent.chpoxctl_ok(&["addlib", LIBC]);
    assert_eq!(
        agent.chpoxctl_ok(&["listlibs"]).lines().collect::<Vec<_>>(),
        [LIBC]
    );
    agent.chpoxctl_ok(&["dellib", LIBC]);
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    let out = agent.chpoxctl(&["dellib", LIBC]);
    assert!(
        !out.status.success(),
        "dellib of a library not listed {}",
        show(&out)
    );
    let out = agent.chpoxctl(&["addlib", "/no/such/lib.so"]);
    assert!(
        !out.status.success(),
        "addlib of a missing file {}",
        show(&out)
    );
    agent.chpoxctl_ok(&["addlib", LIBC]);

    // FLAGS 4 embeds them.
    let with_libs = img_dir.join("libs.chpox");
    agent.chpoxctl_ok(&["add", &pid, "31", "4", path_str(&with_libs)]);
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let reader = check_image(&with_libs, t.pid);
    let libc_file = reader
        .metadata()
        .files
        .iter()
        .find(|f| f.path == LIBC)
        .unwrap_or_else(|| panic!("{LIBC} not among the image's files"));
    let data = libc_file
        .embedded
        .as_ref()
        .unwrap_or_else(|| panic!("FLAGS 4 did not embed {LIBC}"));
    let embedded = reader.read_data(data).expect("read embedded libc");
    assert!(
        embedded == fs::read(LIBC).expect("read libc"),
        "embedded {LIBC} differs from the file"
    );

    agent.chpoxctl_ok(&["clearlibs"]);
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    agent.chpoxctl_ok(&["del", &pid]);
    assert!(!ignores(t.pid, SIGSYS));
    assert_running(&mut t);
}

// ---------------------------------------------------------------------------
// 11. Agent restart

#[test]
fn a_restarted_agent_takes_its_registrations_back() {
    let s = scratch();
    let img_dir = s.dir("out", 0o755);
    let mut first = Agent::start(&s);
    let mut t = plain_target(&s, "mempattern", &["8"]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let pid = t.pid.to_string();
    let img = img_dir.join("kept.chpox");
    first.chpox_ok(&["register", &pid, "-o", path_str(&img)]);
    let mut lost = plain_target(&s, "mempattern", &["4"]);
    first.chpox_ok(&["register", &lost.pid.to_string()]);
    assert_eq!(first.list().len(), 2);

    first.stop();
    let saved = fs::read_to_string(s.run.join("registrations.json")).expect("saved registrations");
    assert!(saved.contains(&pid), "{saved}");

    // Between agents: SIGSYS is still harmless.
    assert!(ignores(t.pid, SIGSYS));
    t.signal(SIGSYS);
    t.wait_not_pending(SIGSYS, STATE_TIMEOUT);
    assert_running(&mut t);
    // One registration does not survive: its process is gone.
    lost.signal(libc::SIGKILL);
    lost.wait_exit(EXIT_TIMEOUT);

    let second = Agent::start(&s);
    let e = second
        .entry(t.pid)
        .unwrap_or_else(|| panic!("registration not taken back\n{}", second.describe()));
    assert_eq!(output_of(&e), img);
    assert_eq!(e["signal"], 31);
    assert!(second.entry(lost.pid).is_none(), "dead process taken back");
    assert_eq!(second.list().len(), 1);
    assert_eq!(
        second.events_for("registration taken back after restart", t.pid),
        1
    );

    t.signal(SIGSYS);
    second.wait_checkpoints(t.pid, 1);
    check_pattern(&check_image(&img, t.pid), addr, len);
    assert_running(&mut t);

    // The disposition from before the first agent comes back.
    second.chpox_ok(&["unregister", &pid]);
    assert!(
        !ignores(t.pid, SIGSYS),
        "SIG_DFL not restored after a restart"
    );
}

// ---------------------------------------------------------------------------
// More of the trigger path

#[test]
fn chpox_run_of_a_missing_command_leaves_no_registration() {
    let s = scratch();
    let agent = Agent::start(&s);
    let missing = s.tmp.path().join("no-such-program");
    let out = agent
        .client(chpox_bin())
        .arg("run")
        .arg("--")
        .arg(&missing)
        .output()
        .expect("run chpox");
    assert_refused("chpox run of a missing program", &out, "cannot run");
    assert!(agent.list().is_empty(), "{:?}", agent.list());
}

#[test]
fn agents_keep_their_registrations_apart() {
    let s = scratch();
    let other_scratch = scratch();
    let agent = Agent::start(&s);
    let other = Agent::start(&other_scratch);
    let mut t = run_target(&agent, &s, "mempattern", &["4"], &[]);
    assert!(other.list().is_empty(), "{:?}", other.list());
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    assert!(other.list().is_empty());
    assert_eq!(other.events("checkpoint written").len(), 0);
    assert_running(&mut t);
}

/// Sends the trigger to a worker thread of registered `threads` target `t`
/// (not to its PID); the process must run on and be checkpointed once.
fn trigger_a_worker_and_expect_a_checkpoint(agent: &Agent, t: &mut Target) {
    let worker: i32 = t
        .ready_value("tids")
        .split(',')
        .map(|v| v.parse().expect("tid"))
        .find(|&tid| tid != t.pid)
        .expect("a worker thread");
    // SAFETY: tgkill has no memory-safety preconditions.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, t.pid, worker, SIGSYS) };
    assert_eq!(rc, 0, "tgkill: {}", std::io::Error::last_os_error());
    assert_running(t);
    let seen = poll(
        "the trigger aimed at a thread to be counted",
        STATE_TIMEOUT,
        || format!("entry {:?}\n{}", agent.entry(t.pid), agent.describe()),
        || {
            let e = agent.entry(t.pid)?;
            (e["checkpoints"].as_u64()? >= 1).then_some(e)
        },
    );
    assert_eq!(seen["signals"], 1, "{seen}");
    check_image(&output_of(&seen), t.pid);
}

/// A trigger sent to one thread of a registered process (`tgkill`,
/// `pthread_kill`, `kill -31 TID`) is swallowed by SIG_IGN like any other;
/// it must checkpoint the process like one sent to the PID.
#[test]
fn a_trigger_aimed_at_a_thread_checkpoints_its_process() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = plain_target(&s, "threads", &["2"]);
    agent.chpox_ok(&["register", &t.pid.to_string()]);
    trigger_a_worker_and_expect_a_checkpoint(&agent, &mut t);
}

/// Threads created after registration (`chpox run` registers before the
/// program's first instruction): the eBPF program learns of them itself, at
/// thread creation, so a trigger aimed at one still checkpoints the process.
#[test]
fn a_trigger_aimed_at_a_thread_created_after_registration_checkpoints_its_process() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut t = run_target(&agent, &s, "threads", &["2"], &[]);
    trigger_a_worker_and_expect_a_checkpoint(&agent, &mut t);
}

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
