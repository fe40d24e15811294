//! The trigger's promises, end to end with a real agent: `kill -31` never
//! kills a registered process whatever it does with its dispositions, a
//! checkpoint that cannot bring back what it saw fails by name and keeps
//! the previous image, periodic checkpoints coalesce with signals, and the
//! small things around registration (the output checked at once, the
//! register FIFO that outlives the agent, the agent's settings file).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::{
    Agent, SIGSYS, STATE_TIMEOUT, assert_refused, ignores, no_core, run_program, scratch, send,
};
use common::{Target, bin, chpox_bin, path_str};
use serde_json::Value;

/// How long a target may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Whether the agent attached the BPF LSM guard (it says so at start).
fn guard_active(agent: &Agent) -> bool {
    agent.log_text().contains("trigger guard active")
}

/// Waits until the agent has set SIG_IGN again after `pid` reset it.
fn wait_ignored_again(agent: &Agent, pid: i32) {
    agent.wait_for(
        &format!("the agent to ignore SIGSYS in PID {pid} again"),
        STATE_TIMEOUT,
        || {
            (agent.events_for(
                "the process set its trigger signal back to the default",
                pid,
            ) > 0
                && ignores(pid, SIGSYS))
            .then_some(())
        },
    );
}

fn list_u64(e: &Value, key: &str) -> u64 {
    e[key].as_u64().unwrap_or_else(|| panic!("no {key} in {e}"))
}

// ---------------------------------------------------------------------------
// 1. kill -31 never kills a registered process

/// Node.js resets every signal disposition at start-up, undoing the
/// SIG_IGN that `chpox run` set: the agent sees it and sets it again (and,
/// with the BPF LSM guard, no SIGSYS would have reached it meanwhile).
#[test]
fn node_started_with_chpox_run_survives_kill_31_and_is_checkpointed() {
    let Ok(node) = which("node") else {
        panic!("node is not installed (the test suite installs Debian's nodejs)");
    };
    let s = scratch();
    let agent = Agent::start(&s);
    let script = s.logs.join("ticker.js");
    fs::write(
        &script,
        "let n = 0;\n\
         console.log('READY');\n\
         setInterval(() => { n++; }, 20);\n\
         process.on('SIGTERM', () => { console.log('DONE ' + (n > 0)); process.exit(0); });\n",
    )
    .expect("write the script");
    let image = s.path("node.chpox");
    // Node holds epoll and eventfd descriptors, which chpox cannot
    // restore yet: this registration opts in to /dev/null for them.
    let mut t = run_program(
        &agent,
        &s,
        &node,
        &[path_str(&script)],
        &["-o", path_str(&image), "--unsupported-fd=null"],
    );
    wait_ignored_again(&agent, t.pid);
    for n in 1..=2 {
        send(t.pid, SIGSYS);
        let e = agent.wait_checkpoints(t.pid, n);
        assert_eq!(e["last_error"], Value::Null, "{e}");
        assert_running(&mut t);
    }
    assert!(image.exists(), "no image at {}", image.display());
    send(t.pid, libc::SIGTERM);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE true"]);
}

/// A program that sets SIGSYS back to SIG_DFL itself after it was
/// registered survives `kill -31` and is checkpointed; unregistering then
/// leaves it the default it chose.
#[test]
fn a_program_that_sets_sigsys_back_to_default_survives_kill_31() {
    let s = scratch();
    let agent = Agent::start(&s);
    let image = s.path("reset.chpox");
    let mut t = run_program(&agent, &s, &bin("resetsig"), &[], &["-o", path_str(&image)]);
    assert!(ignores(t.pid, SIGSYS));
    send(t.pid, libc::SIGUSR1);
    t.wait_for_line("RESET", STATE_TIMEOUT);
    if guard_active(&agent) {
        // The guard holds even before the agent has set SIG_IGN again
        // (`kill` fails with EPERM until then, or succeeds if the agent
        // was quicker).
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(t.pid, SIGSYS) };
        let err = std::io::Error::last_os_error();
        assert!(
            rc == 0 || err.raw_os_error() == Some(libc::EPERM),
            "kill: {err}"
        );
        agent.wait_checkpoints(t.pid, 1);
        assert_running(&mut t);
    }
    wait_ignored_again(&agent, t.pid);
    let before = list_u64(&agent.entry(t.pid).expect("registered"), "checkpoints");
    send(t.pid, SIGSYS);
    let e = agent.wait_checkpoints(t.pid, before + 1);
    assert_eq!(e["last_error"], Value::Null, "{e}");
    assert_running(&mut t);
    assert!(image.exists());

    // Its own choice comes back with the unregistration: SIG_DFL.
    agent.chpox_ok(&["unregister", &t.pid.to_string()]);
    assert!(
        !ignores(t.pid, SIGSYS),
        "SIGSYS still ignored after unregister"
    );
    send(t.pid, libc::SIGTERM);
    t.wait_success(EXIT_TIMEOUT);
}

/// A process that sets SIGSYS back to the default while no agent runs is
/// taken back, and ignores it again, when the agent restarts.
#[test]
fn a_reset_while_no_agent_ran_is_undone_when_the_agent_restarts() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let image = s.path("restart.chpox");
    let mut t = run_program(&agent, &s, &bin("resetsig"), &[], &["-o", path_str(&image)]);
    agent.stop();
    send(t.pid, libc::SIGUSR1);
    t.wait_for_line("RESET", STATE_TIMEOUT);
    assert!(!ignores(t.pid, SIGSYS));
    let agent = Agent::start(&s);
    assert!(
        agent.entry(t.pid).is_some(),
        "registration lost\n{}",
        agent.describe()
    );
    assert!(ignores(t.pid, SIGSYS), "SIGSYS not ignored again");
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    assert_running(&mut t);
    send(t.pid, libc::SIGTERM);
    t.wait_success(EXIT_TIMEOUT);
}

// ---------------------------------------------------------------------------
// 2. Never a checkpoint that cannot come back

/// A checkpoint of a process that now holds a descriptor chpox cannot
/// restore fails, names the descriptor in `chpox list` and once in the
/// log, and the previous image stays as it was.
#[test]
fn a_checkpoint_that_would_lose_a_descriptor_fails_and_keeps_the_previous_image() {
    let s = scratch();
    let agent = Agent::start(&s);
    let image = s.path("policy.chpox");
    let mut t = run_program(&agent, &s, &bin("resetsig"), &[], &["-o", path_str(&image)]);
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let good = fs::read(&image).expect("the first image");

    send(t.pid, libc::SIGUSR2);
    let opened = t.wait_for_line("OPENED", STATE_TIMEOUT);
    let fd = opened.trim_start_matches("OPENED fd=").to_string();
    for attempt in 1..=2u64 {
        send(t.pid, SIGSYS);
        let e = agent.wait_for("the checkpoint to fail", STATE_TIMEOUT, || {
            let e = agent.entry(t.pid)?;
            (list_u64(&e, "signals") > attempt
                && e["state"] == "idle"
                && !e["last_error"].is_null())
            .then_some(e)
        });
        let why = e["last_error"].as_str().expect("last_error");
        assert!(
            why.contains(&format!("fd {fd} ")) && why.contains("io_uring"),
            "the reason does not name fd {fd}: {why}"
        );
        assert_eq!(list_u64(&e, "checkpoints"), 1, "{e}");
    }
    assert_eq!(
        fs::read(&image).expect("the image"),
        good,
        "the previous image changed"
    );
    let text = agent.chpox_ok(&["list"]);
    assert!(
        text.lines().any(|l| l.contains(&t.pid.to_string())
            && l.contains("failed: ")
            && l.contains(&format!("fd {fd} "))),
        "chpox list does not show the failure: {text}"
    );
    assert_eq!(
        agent.events_for("checkpoint failed", t.pid),
        1,
        "the same reason logged more than once\n{}",
        agent.describe()
    );
    assert_running(&mut t);
    send(t.pid, libc::SIGTERM);
    t.wait_success(EXIT_TIMEOUT);
}

/// A descriptor chpox cannot bring back (here a pipe whose other end
/// only the test holds) fails the agent's checkpoint by default, and
/// becomes /dev/null in the image of a registration that opted in.
#[test]
fn a_registration_that_opted_in_gets_dev_null_for_such_a_descriptor() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let mut targets = Vec::new();
    for (name, opt_in) in [("fail.chpox", false), ("null.chpox", true)] {
        let image = s.path(name);
        let mut cmd = agent.client(chpox_bin());
        cmd.arg("run").args(["-o", path_str(&image)]);
        if opt_in {
            cmd.arg("--unsupported-fd=null");
        }
        cmd.arg("--").arg(bin("resetsig"));
        no_core(&mut cmd, &s.logs);
        let read_end = fds[0];
        // SAFETY: dup2 is async-signal-safe and touches no memory; it runs
        // after no_core's hook, so fd 7 stays open across the exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read_end, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        targets.push((
            Target::spawn_command(cmd, "resetsig", &s.logs),
            image,
            opt_in,
        ));
    }
    for (t, image, opt_in) in &mut targets {
        send(t.pid, SIGSYS);
        let e = agent.wait_for("the checkpoint", STATE_TIMEOUT, || {
            let e = agent.entry(t.pid)?;
            (e["state"] == "idle"
                && list_u64(&e, "signals") == 1
                && (list_u64(&e, "checkpoints") == 1 || !e["last_error"].is_null()))
            .then_some(e)
        });
        if *opt_in {
            assert_eq!(e["last_error"], Value::Null, "{e}");
            assert_eq!(e["unsupported_fd_null"], true, "{e}");
            let inspect = common::run_chpox(&["inspect", path_str(image)]);
            assert!(inspect.status.success(), "{}", common::show(&inspect));
        } else {
            let why = e["last_error"].as_str().expect("last_error");
            assert!(why.contains("fd 7 "), "fd 7 not named: {why}");
            assert!(!image.exists(), "an image was written");
        }
        assert_running(t);
        send(t.pid, libc::SIGTERM);
        t.wait_success(EXIT_TIMEOUT);
    }
    // SAFETY: closing our own two descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

// ---------------------------------------------------------------------------
// 3. Periodic checkpoints

/// `--every 1s` makes at least 3 checkpoints in 4 s; `--keep 2` keeps two
/// earlier images; `chpox list` shows the interval and when the next one
/// is due. A burst of trigger signals while a timer checkpoint is being
/// written (a larger process, so that there is time to see it running)
/// makes at most one more.
#[test]
fn every_1s_checkpoints_on_a_timer_and_a_burst_on_top_makes_at_most_one_more() {
    let s = scratch();
    let agent = Agent::start(&s);
    let image = s.path("timer.chpox");
    let started = Instant::now();
    let mut t = run_program(
        &agent,
        &s,
        &bin("mempattern"),
        &["4"],
        &[
            "-o",
            path_str(&image),
            "--every",
            "1s",
            "--keep",
            "2",
            "--no-children",
        ],
    );
    let e = agent.entry(t.pid).expect("registered");
    assert_eq!(e["every_ms"], 1000, "{e}");
    assert_eq!(e["keep"], 2, "{e}");
    let due = list_u64(&e, "next_due_ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(due <= now_ms + 1500, "next due {due} ms, now {now_ms} ms");
    let text = agent.chpox_ok(&["list"]);
    assert!(
        text.contains("EVERY")
            && text
                .lines()
                .any(|l| l.contains(&t.pid.to_string()) && l.contains(" 1s ")),
        "{text}"
    );

    std::thread::sleep(Duration::from_secs(4).saturating_sub(started.elapsed()));
    let e = agent.entry(t.pid).expect("registered");
    assert!(
        list_u64(&e, "checkpoints") >= 3,
        "fewer than 3 checkpoints in 4 s: {e}"
    );
    assert_eq!(list_u64(&e, "signals"), 0, "{e}");
    assert_eq!(e["last_error"], Value::Null, "{e}");
    for kept in [
        image.with_extension("chpox.1"),
        image.with_extension("chpox.2"),
    ] {
        assert!(kept.exists(), "{} not kept", kept.display());
    }
    assert!(
        !image.with_extension("chpox.3").exists(),
        "more than 2 kept"
    );
    assert_running(&mut t);

    // A burst while a timer checkpoint is being written.
    let mut big = run_program(
        &agent,
        &s,
        &bin("mempattern"),
        &["128"],
        &[
            "-o",
            path_str(&s.path("big.chpox")),
            "--every",
            "1s",
            "--no-children",
        ],
    );
    agent.wait_for(
        "a timer checkpoint in progress",
        Duration::from_secs(60),
        || (agent.entry(big.pid)?["state"] == "running").then_some(()),
    );
    for _ in 0..50 {
        send(big.pid, SIGSYS);
    }
    let timer_then = list_u64(
        &agent.entry(big.pid).expect("registered"),
        "timer_checkpoints",
    );
    // Two timer checkpoints later, and idle: whatever the burst made is
    // written, and every checkpoint started is counted as written.
    let e = agent.wait_for(
        "two more timer checkpoints",
        Duration::from_secs(60),
        || {
            let e = agent.entry(big.pid)?;
            (e["state"] == "idle" && list_u64(&e, "timer_checkpoints") >= timer_then + 2)
                .then_some(e)
        },
    );
    assert_eq!(list_u64(&e, "signals"), 50, "{e}");
    assert_eq!(e["last_error"], Value::Null, "{e}");
    let by_signals = list_u64(&e, "checkpoints") - list_u64(&e, "timer_checkpoints");
    assert!(
        by_signals <= 1,
        "a burst made {by_signals} checkpoints: {e}"
    );
    assert!(list_u64(&e, "coalesced") >= 49, "{e}");
    assert_running(&mut big);
}

/// `/etc/chpox/agent.toml` (here `--config FILE`): its interval applies to
/// a registration that names none, and a flag overrides the file.
#[test]
fn the_agent_reads_its_settings_file_and_flags_override_it() {
    let s = scratch();
    let config = s.path("agent.toml");
    fs::write(&config, "interval = \"1s\"\nkeep = 5\n").expect("write config");
    let agent = Agent::start_with(&s, &["--config", path_str(&config), "--keep", "1"]);
    let mut t = run_program(
        &agent,
        &s,
        &bin("resetsig"),
        &[],
        &["-o", path_str(&s.path("cfg.chpox"))],
    );
    let e = agent.entry(t.pid).expect("registered");
    assert_eq!(e["every_ms"], 1000, "the file's interval: {e}");
    assert_eq!(e["keep"], 1, "the flag's keep: {e}");
    agent.wait_checkpoints(t.pid, 2);
    send(t.pid, libc::SIGTERM);
    t.wait_success(EXIT_TIMEOUT);

    // A mistake in the file stops the agent at once, naming the file.
    fs::write(&config, "intervall = \"1s\"\n").expect("write config");
    let out = Command::new(common::agent::tool("chpox-agent"))
        .args(["--config", path_str(&config), "--run-dir"])
        .arg(s.path("run2"))
        .output()
        .expect("run chpox-agent");
    assert_refused("a bad settings file", &out, path_str(&config));
    assert_refused("a bad settings file", &out, "unknown field");
}

// ---------------------------------------------------------------------------
// 4. Registration

/// An output nobody can create is refused when registering, for root too.
#[test]
fn register_refuses_an_output_that_cannot_be_created() {
    let s = scratch();
    let agent = Agent::start(&s);
    let t = Target::spawn("resetsig", &[], &s.logs);
    let pid = t.pid.to_string();
    let out = agent.chpox(&["register", &pid, "-o", "/nonexistent/dir/x.chpox"]);
    assert_refused("an output in a missing directory", &out, "/nonexistent/dir");
    assert!(agent.entry(t.pid).is_none(), "registered anyway");
    assert!(!ignores(t.pid, SIGSYS), "the disposition was changed");
    let out = agent.chpox(&["register", &pid, "-o", path_str(&s.logs)]);
    assert_refused("a directory as output", &out, "is a directory");
}

/// The register FIFO stays when the agent stops, so a line written
/// meanwhile waits for the next agent; a regular file found at its place
/// is moved aside, with a log line.
#[test]
fn the_register_fifo_outlives_the_agent_and_a_stray_file_is_moved_aside() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let fifo = s.run.join("register");
    agent.stop();
    let meta = fs::symlink_metadata(&fifo).expect("the FIFO after the agent stopped");
    assert!(meta.file_type().is_fifo(), "not a FIFO");
    assert_eq!(meta.mode() & 0o777, 0o600);

    // A writer while no agent runs waits, and its line is read later.
    let t = Target::spawn("resetsig", &[], &s.logs);
    let line = format!("{}:31:1:{}\n", t.pid, path_str(&s.path("fifo.chpox")));
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::write(&fifo, line))
    };
    let agent = Agent::start(&s);
    writer
        .join()
        .expect("writer thread")
        .expect("write the FIFO");
    agent.wait_for("the FIFO's line to register", STATE_TIMEOUT, || {
        agent.entry(t.pid)
    });
    drop(agent);

    // A regular file in its place (a writer before any agent ran).
    fs::remove_file(&fifo).expect("remove the FIFO");
    fs::write(&fifo, b"123:31:1:/tmp/x\n").expect("a stray file");
    let agent = Agent::start(&s);
    assert!(
        fs::symlink_metadata(&fifo)
            .expect("FIFO")
            .file_type()
            .is_fifo()
    );
    let strays: Vec<PathBuf> = fs::read_dir(&s.run)
        .expect("run dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("register.stray."))
        })
        .collect();
    assert_eq!(strays.len(), 1, "{strays:?}");
    assert_eq!(fs::read(&strays[0]).expect("stray"), b"123:31:1:/tmp/x\n");
    assert!(
        agent.log_text().contains("moved aside"),
        "no log line\n{}",
        agent.describe()
    );
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}
