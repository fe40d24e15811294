//! The trigger path, end to end: a real `chpox-agent` with its real eBPF
//! program turns trigger signals sent to real processes into checkpoints.
//!
//! Every test starts its own agent (own run directory, image directory and
//! BPF maps), so the tests run in parallel. Waits are bounded polls of
//! `chpox list --json`, the agent's log or `/proc`, never bare sleeps.

mod common;

use std::fs::{self};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::time::Instant;

use common::agent::{
    Agent, EXIT_TIMEOUT, NOBODY, SIGSYS, STATE_TIMEOUT, assert_refused, assert_running, catches,
    check_image, ignores, nobody_target, output_of, plain_target, poll, run_target, scratch, send,
    stdout_ok,
};
use common::{Target, check_pattern, chmod, chpox_bin, free_pid, path_str, show};
use serde_json::Value;

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
// 7. chpox checkpoint

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
// 8. A process that handles the signal itself

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
// 9. Agent restart

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
