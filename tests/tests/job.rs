//! `chpox job`: a batch job that carries on from its last checkpoint when
//! it is run again after any interruption — `kill -9` of the job, or of
//! `chpox job` itself — forwarding signals and exit status like a shell.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use common::agent::{Agent, SIGSYS, Scratch, no_core, scratch_with_out, send};
use common::{Target, bin, chpox_bin, path_str, show, wait_pid_free};

/// How long a `chpox job` of a few seconds' work may take to end.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// What `steps N` prints after `READY`, computed by an uninterrupted run
/// that does not sleep.
fn expected_steps(n: u32) -> Vec<String> {
    let out = Command::new(bin("steps"))
        .args([&n.to_string(), "0"])
        .output()
        .expect("run steps");
    assert!(out.status.success(), "steps {n} 0 {}", show(&out));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(lines[0].starts_with("READY"), "{text}");
    lines[1..].to_vec()
}

/// `chpox job ARGS` talking to `agent`, in the scratch space's log
/// directory (no core files anywhere).
fn job_command(agent: &Agent, s: &Scratch, args: &[&str]) -> Command {
    let mut cmd = agent.client(chpox_bin());
    cmd.arg("job").args(args);
    no_core(&mut cmd, &s.logs);
    cmd
}

/// `chpox job` started until its job printed `READY`; the job's PID from
/// the pidfile.
fn start_job(agent: &Agent, s: &Scratch, args: &[&str]) -> (Target, i32) {
    let pidfile = s.path("job.pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut full = vec!["--pidfile", path_str(&pidfile)];
    full.extend_from_slice(args);
    let t = Target::spawn_command(job_command(agent, s, &full), "job", &s.logs);
    let pid = agent.wait_for("the job's pidfile", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    (t, pid)
}

/// Runs `chpox job ARGS` to its end (stdout and stderr captured).
fn run_job(agent: &Agent, s: &Scratch, args: &[&str]) -> Output {
    let mut child = job_command(agent, s, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn chpox job");
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() >= deadline {
            send(pid, libc::SIGKILL);
            let out = child.wait_with_output().expect("output");
            panic!(
                "chpox job {args:?} still running after {JOB_TIMEOUT:?} {}\n{}",
                show(&out),
                agent.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("chpox job output")
}

/// Whether `pid` has the image's lock file open.
fn holds_lock(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().ends_with(".lock"))
            })
        })
        .unwrap_or(false)
}

fn code(status: ExitStatus) -> Option<i32> {
    status.code()
}

fn image_in(s: &Scratch) -> PathBuf {
    s.out.join("job.chpox")
}

/// The job's steps printed so far (after `READY`), as complete lines.
fn steps_done(t: &Target) -> usize {
    t.lines_after_ready()
        .iter()
        .filter(|l| l.starts_with("STEP"))
        .count()
}

fn wait_steps(agent: &Agent, t: &Target, n: usize) {
    agent.wait_for(&format!("{n} steps of the job"), JOB_TIMEOUT, || {
        (steps_done(t) >= n).then_some(())
    });
}

/// The first run's output file, which the restored job writes on (it is
/// part of the job's state): READY, then exactly the uninterrupted output.
fn assert_output_complete(t: &Target, n: u32, image: &Path) {
    let got = t.lines_after_ready();
    assert_eq!(
        got,
        expected_steps(n),
        "the resumed job's output is not an uninterrupted run's (image {})",
        image.display()
    );
}

#[test]
fn job_resumes_after_kill_9_of_the_job_and_forwards_its_exit_status() {
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let args = [
        "--image",
        path_str(&image),
        "--",
        path_str(&steps),
        "60",
        "100",
        "3",
    ];
    let (mut t, pid) = start_job(&agent, &s, &args);
    assert_ne!(pid, t.pid, "the job is a child of chpox job, not chpox job");
    assert_eq!(
        common::agent::proc_status(pid, "PPid:").as_deref(),
        Some(t.pid.to_string().as_str()),
        "the job is chpox job's child"
    );
    wait_steps(&agent, &t, 5);
    // SIGSYS to `chpox job` checkpoints the job now.
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(pid, 1);
    let at_checkpoint = steps_done(&t);
    wait_steps(&agent, &t, at_checkpoint + 3);
    send(pid, libc::SIGKILL);
    let status = t.wait_exit(JOB_TIMEOUT);
    assert_eq!(
        code(status),
        Some(128 + libc::SIGKILL),
        "chpox job exits as its job did: {status}\n{}",
        t.stderr()
    );
    wait_pid_free(pid);

    // Run again: the same command carries the job on from its image.
    let out = run_job(&agent, &s, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("restored from"),
        "the second run did not restore {}",
        show(&out)
    );
    assert_eq!(
        code(out.status),
        Some(3),
        "the restored job's exit status is chpox job's {}\n{}",
        show(&out),
        agent.describe()
    );
    assert_output_complete(&t, 60, &image);
}

#[test]
fn job_resumes_after_kill_9_of_chpox_job_and_leaves_no_stray_process_of_its_tree() {
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let args = [
        "--image",
        path_str(&image),
        "--every",
        "1s",
        "--",
        path_str(&steps),
        "60",
        "100",
        "0",
        "--child",
    ];
    let (mut t, pid) = start_job(&agent, &s, &args);
    // The job is a tree: its child must not be left running either.
    let child: i32 = t.ready_value("child").parse().expect("child pid");
    // Periodic checkpoints, without asking.
    agent.wait_checkpoints(pid, 2);
    assert!(
        !holds_lock(pid),
        "the job must not hold chpox job's lock (it would outlive chpox job)"
    );
    send(t.pid, libc::SIGKILL);
    t.wait_exit(JOB_TIMEOUT);
    // The job dies with chpox job: it must not run on beside its restored
    // self.
    agent.wait_for(
        "the job to die with chpox job",
        Duration::from_secs(10),
        || {
            let gone = |p: i32| !Path::new(&format!("/proc/{p}")).exists();
            (gone(pid) && gone(child)).then_some(())
        },
    );
    let steps_at_kill = steps_done(&t);
    assert!(steps_at_kill < 60, "the job finished before the kill");

    let out = run_job(&agent, &s, &args);
    assert!(
        out.status.success(),
        "the second run {}\n{}",
        show(&out),
        agent.describe()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("restored from"));
    assert_output_complete(&t, 60, &image);
    // Nothing of either run is left: the restored job was reaped by the
    // second chpox job, and the agent forgot it.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!Path::new(&format!("/proc/{child}")).exists());
    agent.wait_gone(pid);
}

#[test]
fn job_forwards_hup_and_term_and_exits_as_the_job_did() {
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let (mut t, pid) = start_job(
        &agent,
        &s,
        &[
            "--image",
            path_str(&image),
            "--",
            path_str(&steps),
            "100000",
            "100",
            "0",
            "--hup",
        ],
    );
    wait_steps(&agent, &t, 1);
    // One job per image: a second `chpox job` on it starts nothing.
    let out = job_command(&agent, &s, &["--image", path_str(&image), "--", "true"])
        .output()
        .expect("run chpox job");
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another chpox job") && stderr.contains(&t.pid.to_string()),
        "{}",
        show(&out)
    );
    // A handled signal: the job gets it and runs on.
    send(t.pid, libc::SIGHUP);
    t.wait_for_line("HUP", JOB_TIMEOUT);
    let after = steps_done(&t);
    wait_steps(&agent, &t, after + 2);
    // A fatal one: the job dies of it, and chpox job says so.
    send(t.pid, libc::SIGTERM);
    let status = t.wait_exit(JOB_TIMEOUT);
    assert_eq!(
        code(status),
        Some(128 + libc::SIGTERM),
        "{status}\n{}",
        t.stderr()
    );
    wait_pid_free(pid);
    assert!(
        !image.exists(),
        "no checkpoint was asked for, none may be written"
    );
}

#[test]
fn job_exit_status_and_errors() {
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let out = run_job(
        &agent,
        &s,
        &[
            "--image",
            path_str(&image),
            "--",
            path_str(&steps),
            "2",
            "10",
            "7",
        ],
    );
    assert_eq!(code(out.status), Some(7), "{}", show(&out));

    // Bad input: one line each, nothing started, nothing left registered.
    let missing = s.path("no-such-program");
    for (args, phrase) in [
        (
            vec!["--image", path_str(&image), "--", path_str(&missing)],
            "cannot run",
        ),
        (
            vec![
                "--image",
                path_str(&image),
                "--requeue",
                "--",
                path_str(&steps),
            ],
            "SLURM_JOB_ID",
        ),
        (
            vec!["--image", path_str(&s.out), "--", path_str(&steps)],
            "not a regular file",
        ),
    ] {
        let mut cmd = job_command(&agent, &s, &args);
        if args.contains(&"--requeue") {
            cmd.env_remove("SLURM_JOB_ID");
        }
        let out = cmd.output().expect("run chpox job");
        assert!(!out.status.success(), "{args:?} {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(phrase), "{args:?}: {}", show(&out));
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {}", show(&out));
    }
    let out = agent.chpox(&[
        "job",
        "--image",
        path_str(&image),
        "--every",
        "5x",
        "--",
        "true",
    ]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown unit"),
        "{}",
        show(&out)
    );
    assert!(agent.list().is_empty(), "{:?}", agent.list());
    assert!(!image.exists());

    // No agent: nothing starts.
    let out = Command::new(chpox_bin())
        .env("CHPOX_RUN_DIR", s.path("no-agent"))
        .args(["job", "--image", path_str(&image), "--"])
        .arg(&steps)
        .args(["2", "10"])
        .output()
        .expect("run chpox job");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs chpox-agent"),
        "{}",
        show(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("READY"));
}

/// `--requeue` against a stand-in `scontrol` that records its arguments
/// (the real Slurm test is `tests/slurm.rs`): SIGSYS stops the job, writes
/// its image and asks for the requeue; a refused requeue lets the job run
/// on; after an accepted one the job does nothing more, so a job writing
/// to an append-mode file (as Slurm's `--open-mode=append`) resumes
/// without a line written twice.
#[test]
fn job_requeue_stops_the_job_after_its_last_image_and_asks_scontrol() {
    use std::os::unix::process::CommandExt;
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let fake = s.path("fakebin");
    std::fs::create_dir(&fake).expect("mkdir");
    let calls = s.path("scontrol.calls");
    let refuse = s.path("scontrol.refuse");
    std::fs::write(
        fake.join("scontrol"),
        format!(
            "#!/bin/sh\necho \"$@\" >> {calls}\nif [ -e {refuse} ]; then echo 'requeue refused' >&2; exit 1; fi\n",
            calls = path_str(&calls),
            refuse = path_str(&refuse)
        ),
    )
    .expect("write scontrol");
    common::chmod(&fake.join("scontrol"), 0o755);
    let path = format!(
        "{}:{}",
        path_str(&fake),
        std::env::var("PATH").unwrap_or_default()
    );
    let out_path = s.logs.join("requeue.out");
    let err_path = s.logs.join("requeue.err");
    let args = [
        "--image",
        path_str(&image),
        "--requeue",
        "--",
        path_str(&steps),
        "60",
        "100",
    ];
    let append = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .expect("open the output")
    };
    let mut cmd = job_command(&agent, &s, &args);
    cmd.env("PATH", &path)
        .env("SLURM_JOB_ID", "4242")
        .stdout(append())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .process_group(0);
    let mut first = common::spawn_retrying(&mut cmd);
    let chpox_pid = first.id() as i32;
    let lines = || -> Vec<String> {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let end = text.rfind('\n').map_or(0, |i| i + 1);
        text[..end].lines().map(str::to_string).collect()
    };
    let describe = || {
        format!(
            "--- chpox job stderr ---\n{}\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default(),
            agent.describe()
        )
    };
    let step_count = || lines().iter().filter(|l| l.starts_with("STEP")).count();
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        common::agent::poll(what, JOB_TIMEOUT, describe, || f().then_some(()))
    };
    wait("3 steps", &mut || step_count() >= 3);
    let pid: i32 = agent.list()[0]["pid"].as_i64().expect("pid") as i32;

    // Refused: the job runs on.
    std::fs::write(&refuse, "").expect("touch");
    send(chpox_pid, SIGSYS);
    wait("the refused requeue", &mut || {
        std::fs::read_to_string(&err_path).is_ok_and(|e| e.contains("requeue refused"))
    });
    let at = step_count();
    wait("the job to run on", &mut || step_count() >= at + 2);

    // Accepted: the job is stopped for its image, then killed: Slurm's
    // SIGCONT before its SIGTERM must not let it run past the image.
    std::fs::remove_file(&refuse).expect("rm");
    send(chpox_pid, SIGSYS);
    wait("the requeue", &mut || {
        std::fs::read_to_string(&calls).is_ok_and(|c| c.lines().count() == 2)
    });
    assert_eq!(
        std::fs::read_to_string(&calls).expect("calls"),
        "requeue 4242\nrequeue 4242\n"
    );
    let frozen_at = step_count();
    let status = first.wait().expect("wait chpox job");
    assert_eq!(code(status), Some(128 + libc::SIGKILL), "{}", describe());
    assert!(
        std::fs::read_to_string(&err_path).is_ok_and(|e| e.contains("requeued; it resumes from")),
        "the requeue is said before the job goes: {}",
        describe()
    );
    assert_eq!(
        step_count(),
        frozen_at,
        "the job ran on after its last image"
    );
    wait_pid_free(pid);

    // The next run restores it running, and the output has every line once.
    let out = run_job(&agent, &s, &["--image", path_str(&image), "--", "true"]);
    assert!(out.status.success(), "{}\n{}", show(&out), describe());
    let got = lines();
    assert!(got[0].starts_with("READY"), "{got:?}");
    assert_eq!(got[1..].to_vec(), expected_steps(60), "{}", describe());
    // Both images were of the stopped job, and both were written (a
    // SIGSTOP left pending by chpox job would fail them).
    assert_eq!(agent.events("checkpoint failed").len(), 0, "{}", describe());
}

/// A checkpoint that caught a SIGTERM on its way to the job (as when Slurm
/// ends a job during a periodic checkpoint) is not kept: restored, the job
/// would die again at once. The previous image takes its place.
#[test]
fn a_checkpoint_that_caught_the_jobs_sigterm_gives_way_to_the_previous_one() {
    let s = scratch_with_out();
    let agent = Agent::start(&s);
    let image = image_in(&s);
    let steps = bin("steps");
    let args = [
        "--image",
        path_str(&image),
        "--",
        path_str(&steps),
        "60",
        "100",
    ];
    let (mut t, pid) = start_job(&agent, &s, &args);
    wait_steps(&agent, &t, 3);
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(pid, 1);
    let first = std::fs::read(&image).expect("read the first image");
    // Held stopped, the job keeps a SIGTERM pending, as a frozen one does.
    send(pid, libc::SIGSTOP);
    agent.wait_for("the job to stop", Duration::from_secs(10), || {
        common::agent::proc_status(pid, "State:")?
            .starts_with('T')
            .then_some(())
    });
    send(pid, libc::SIGTERM);
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(pid, 2);
    agent.wait_for("chpox job to notice", JOB_TIMEOUT, || {
        t.stderr().contains("caught SIGTERM").then_some(())
    });
    assert!(
        std::fs::read(&image).expect("read the image") == first,
        "the image is not the first one again\n{}",
        t.stderr()
    );
    // The job ends of its SIGTERM; the next run carries on from the first
    // image.
    send(pid, libc::SIGCONT);
    let status = t.wait_exit(JOB_TIMEOUT);
    assert_eq!(code(status), Some(128 + libc::SIGTERM), "{}", t.stderr());
    wait_pid_free(pid);
    let out = run_job(&agent, &s, &args);
    assert!(out.status.success(), "{}\n{}", show(&out), agent.describe());
    assert_output_complete(&t, 60, &image);
}
