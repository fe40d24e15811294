//! `chpox-agent` against a hostile local user (issue 10): each test runs
//! an attack as `nobody` (uid 65534) against a real agent with its real
//! eBPF program, and checks that the attack fails and that the agent goes
//! on serving everybody else.
//!
//! Every test starts its own agent (own run directory and image directory),
//! with the soft descriptor limit of a systemd service (1024). Attacks that
//! need nobody's credentials on a socket run on a thread of this process
//! that took them (credentials are per thread in the kernel); processes
//! that must start as root and drop to nobody without exec are forked.

mod common;

use std::ffi::CString;
use std::fs::{self};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{
    Agent, AgentOptions, NOBODY, POLL, SIGSYS, Scratch, assert_ok, assert_refused, ignores,
    no_core, poll, scratch_with_out, tool,
};
use common::nobody::{
    Forked, Start, as_nobody, closed_by_peer, connect_nonblocking, dumpable_as, nobody_command,
    raise_own_fd_limit, setuid_root_copy, uids, wait_euid_root,
};
use common::procs::{Guard, stat};
use common::{Target, bin, chmod, chpox_bin, free_pid, path_str, show};

/// How long root's `chpox list` may take while an attack goes on: it
/// answers in milliseconds when nothing holds the agent up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The agent

/// An agent serving the scratch space's run directory, with default
/// images going to `images`, started as a systemd service would be; root's
/// `chpox list` must answer within [`ANSWER_TIMEOUT`].
fn start_agent(s: &Scratch, images: &Path, extra: &[&str]) -> Agent {
    Agent::start_opts(
        s,
        AgentOptions {
            images: Some(images),
            args: extra,
            service_nofile: true,
            list_timeout: Some(ANSWER_TIMEOUT),
            log_tail: Some(8000),
        },
    )
}

// ---------------------------------------------------------------------------
// Defect 1: only what the user could trace

/// A setuid-root program started by the user (uids 65534/0/0/0) holds
/// what root gave it; a checkpoint would hand it to the user. Refused at
/// registration, by every way to register; started registered through
/// `chpox run`, it is refused at the checkpoint.
#[test]
fn a_setuid_root_program_started_by_a_user_is_not_the_users_to_checkpoint() {
    let s = scratch_with_out();
    let agent = start_agent(&s, &s.path("images"), &[]);
    let suid = setuid_root_copy(&s, "/bin/sleep", "suid-sleep");

    let mut cmd = Command::new("bash");
    cmd.args(["-c", "echo READY; exec \"$0\" 600"]).arg(&suid);
    let t = nobody_command(&s, cmd, "suid-sleep");
    wait_euid_root(t.pid);
    assert_eq!(uids(t.pid), [NOBODY, 0, 0, 0]);
    let pid = t.pid.to_string();
    let img = s.out.join("stolen.chpox");

    let out = agent.chpox_as(Some(NOBODY), &["register", &pid, "-o", path_str(&img)]);
    assert_refused(
        "chpox register of a setuid-root process",
        &out,
        "permission denied",
    );
    let out = agent.chpoxctl_as(Some(NOBODY), &["add", &pid, "31", "1", path_str(&img)]);
    assert_refused(
        "chpoxctl add of a setuid-root process",
        &out,
        "permission denied",
    );
    assert!(agent.entry(t.pid).is_none(), "registered anyway");
    assert!(!ignores(t.pid, SIGSYS), "its SIGSYS was changed anyway");

    // Registered as itself (`chpox run` registers before exec), then the
    // setuid program: the checkpoint is refused, by name.
    let run_img = s.out.join("run.chpox");
    let mut cmd = agent.client(chpox_bin());
    cmd.args(["run", "-o", path_str(&run_img), "--", "bash", "-c"])
        .arg("echo READY; exec \"$0\" 600")
        .arg(&suid);
    let run = nobody_command(&s, cmd, "run-suid-sleep");
    wait_euid_root(run.pid);
    let run_pid = run.pid.to_string();
    let out = agent.chpox_as(Some(NOBODY), &["checkpoint", &run_pid, "--timeout", "20"]);
    assert_refused(
        "checkpoint of a registered process that ran a setuid program",
        &out,
        &format!("permission denied for PID {run_pid}"),
    );
    assert!(
        !run_img.exists(),
        "an image was written: {}",
        run_img.display()
    );
    let entry = agent.entry(run.pid).expect("still registered");
    assert!(
        entry["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied")),
        "chpox list does not say why: {entry}"
    );
}

/// A root process that read a secret and then dropped to the user's uid
/// has every uid the user's, but the kernel made it not dumpable: the user
/// may not trace it, so may not register it.
#[test]
fn a_root_process_that_dropped_to_a_user_is_not_the_users_to_checkpoint() {
    let s = scratch_with_out();
    let agent = start_agent(&s, &s.path("images"), &[]);
    let secret = s.path("secret");
    fs::write(&secret, format!("chpox-secret-{}", free_pid())).expect("write secret");
    chmod(&secret, 0o600);

    let f = Forked::start(Start::RootReadsThenDrops(
        CString::new(path_str(&secret)).expect("path"),
    ));
    assert_eq!(uids(f.pid), [NOBODY; 4]);
    assert!(
        !dumpable_as(f.pid, NOBODY),
        "the dropped process is dumpable"
    );
    let pid = f.pid.to_string();
    let img = s.out.join("stolen.chpox");

    let out = agent.chpox_as(Some(NOBODY), &["register", &pid, "-o", path_str(&img)]);
    assert_refused(
        "chpox register of a non-dumpable process",
        &out,
        "not dumpable",
    );
    let out = agent.chpoxctl_as(Some(NOBODY), &["add", &pid, "31", "9", path_str(&img)]);
    assert_refused(
        "chpoxctl add of a non-dumpable process",
        &out,
        "not dumpable",
    );
    assert!(agent.entry(f.pid).is_none(), "registered anyway");
    assert!(!ignores(f.pid, SIGSYS), "its SIGSYS was changed anyway");
    assert!(!img.exists());
}

/// A registered process can stop being one the user could trace: make
/// itself not dumpable, or run a setuid program that makes itself root
/// (every uid 0). Its checkpoints are refused while it is frozen, the log
/// says so, and `chpox list` shows why.
#[test]
fn a_process_that_stops_being_traceable_after_registration_is_not_checkpointed() {
    let s = scratch_with_out();
    let agent = start_agent(&s, &s.path("images"), &[]);

    // Not dumpable after registration.
    let mut f = Forked::start(Start::Nobody);
    assert!(dumpable_as(f.pid, NOBODY));
    let pid = f.pid.to_string();
    let img = s.out.join("undumpable.chpox");
    let out = agent.chpox_as(Some(NOBODY), &["register", &pid, "-o", path_str(&img)]);
    assert_ok("nobody registering its own process", &out);
    f.make_undumpable();
    assert!(!dumpable_as(f.pid, NOBODY));
    let out = agent.chpox_as(Some(NOBODY), &["checkpoint", &pid, "--timeout", "20"]);
    assert_refused(
        "checkpoint of a process now not dumpable",
        &out,
        "not dumpable",
    );
    assert!(!img.exists(), "an image was written: {}", img.display());
    let listed = agent.chpox_as(Some(NOBODY), &["list"]);
    assert_ok("chpox list", &listed);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains(&pid) && text.contains("failed: ") && text.contains("not dumpable"),
        "chpox list does not say why: {text}"
    );
    let logged = agent
        .log_text()
        .lines()
        .any(|l| l.contains("checkpoint failed") && l.contains(&format!("pid={pid}")));
    assert!(logged, "the log does not say so\n{}", agent.describe());

    // Root after registration: a setuid-root setpriv makes every id 0.
    let setpriv = setuid_root_copy(&s, "/usr/bin/setpriv", "suid-setpriv");
    let root_img = s.out.join("became-root.chpox");
    let mut cmd = agent.client(chpox_bin());
    cmd.args(["run", "-o", path_str(&root_img), "--"])
        .arg(&setpriv)
        .args(["--reuid=0", "--regid=0", "--clear-groups", "bash", "-c"])
        .arg("echo READY; exec sleep 600");
    let t = nobody_command(&s, cmd, "became-root");
    poll(
        "the registered process to become root",
        Duration::from_secs(10),
        || format!("uids {:?}", uids(t.pid)),
        || (uids(t.pid) == [0; 4]).then_some(()),
    );
    let pid = t.pid.to_string();
    let out = agent.chpox_as(Some(NOBODY), &["checkpoint", &pid, "--timeout", "20"]);
    assert_refused(
        "checkpoint of a registered process that became root",
        &out,
        &format!("permission denied for PID {pid}"),
    );
    assert!(
        !root_img.exists(),
        "a root process's image was written for uid {NOBODY}: {}",
        root_img.display()
    );
}

// ---------------------------------------------------------------------------
// Defect 3: nothing a user names can block the agent

/// `chpoxctl addlib FIFO`: opened blocking, the agent would wait for a
/// writer, holding its lock. It is refused at once, and root's `chpox list`
/// answers meanwhile.
#[test]
fn a_fifo_given_to_addlib_stalls_nobody() {
    let s = scratch_with_out();
    let agent = start_agent(&s, &s.path("images"), &[]);
    let home = s.dir("home", 0o755);
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).expect("chown home");
    let fifo = home.join("f");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    std::os::unix::fs::chown(&fifo, Some(NOBODY), Some(NOBODY)).expect("chown fifo");

    let mut addlib = agent
        .client_as(tool("chpoxctl"), NOBODY)
        .args(["addlib", path_str(&fifo)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chpoxctl addlib");
    // Give it time to reach the agent (it answers at once when fixed).
    let deadline = Instant::now() + Duration::from_secs(2);
    while addlib.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    let listed = agent.try_list(ANSWER_TIMEOUT);
    let finished = addlib.try_wait().expect("try_wait").is_some();
    if !finished {
        // Let a stuck agent go: a writer opens the FIFO.
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        let _ = addlib.kill();
    }
    let out = addlib.wait_with_output().expect("chpoxctl addlib");
    if let Err(e) = listed {
        panic!(
            "while nobody's addlib of a FIFO was pending: {e}\n{}",
            agent.describe()
        );
    }
    assert!(finished, "chpoxctl addlib of a FIFO did not return");
    assert_refused("chpoxctl addlib of a FIFO", &out, "not a regular file");
    let libs = agent.chpoxctl_as(Some(NOBODY), &["listlibs"]);
    assert_ok("chpoxctl listlibs", &libs);
    assert!(libs.stdout.is_empty(), "{}", show(&libs));
}

// ---------------------------------------------------------------------------
// Defect 4: a flood of connections

/// 1100 idle connections from nobody against an agent started with a soft
/// limit of 1024 descriptors: root's `chpox list` still answers, the
/// registrations survive the agent's rescans, a checkpoint is written, the
/// agent neither spins nor floods its log, and it closes nobody's idle
/// connections, after which nobody is served again.
#[test]
fn a_thousand_idle_connections_from_one_user_starve_nobody_else() {
    let s = scratch_with_out();
    let mut agent = start_agent(&s, &s.path("images"), &[]);
    assert!(
        raise_own_fd_limit() > 1500,
        "this test needs 1500 descriptors"
    );

    let mut roots = Command::new(bin("mempattern"));
    roots.arg("4");
    no_core(&mut roots, &s.logs);
    let roots = Target::spawn_command(roots, "mempattern", &s.logs);
    let mut mine = Command::new(bin("mempattern"));
    mine.arg("4");
    let mine = nobody_command(&s, mine, "mempattern");
    let out = agent.chpox_as(None, &["register", &roots.pid.to_string()]);
    assert_ok("root registering its process", &out);
    let my_img = s.out.join("mine.chpox");
    let out = agent.chpox_as(
        Some(NOBODY),
        &["register", &mine.pid.to_string(), "-o", path_str(&my_img)],
    );
    assert_ok("nobody registering its process", &out);

    let socket = agent.socket();
    let mut flood: Vec<UnixStream> = as_nobody(|| {
        (0..1100)
            .filter_map(|_| connect_nonblocking(&socket).ok())
            .collect()
    });
    assert!(flood.len() >= 1000, "only {} connections", flood.len());
    let (cpu0, log0, t0) = (agent.cpu_secs(), agent.log_len(), Instant::now());

    // Three rescans (every 2 s) with the connections open; root is served
    // throughout.
    while t0.elapsed() < Duration::from_secs(7) {
        let listed = agent.try_list(ANSWER_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "with {} connections of nobody open: {e}\n{}",
                flood.len(),
                agent.describe()
            )
        });
        let pids: Vec<i64> = listed.iter().filter_map(|e| e["pid"].as_i64()).collect();
        for t in [&roots, &mine] {
            assert!(
                pids.contains(&(t.pid as i64)),
                "the registration of PID {} was dropped: {pids:?}\n{}",
                t.pid,
                agent.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = agent.chpox_as(
        None,
        &["checkpoint", &roots.pid.to_string(), "--timeout", "30"],
    );
    assert_ok("root's checkpoint during the flood", &out);
    let image = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(image.is_file(), "no image at {}", image.display());

    let cpu_s = agent.cpu_secs() - cpu0;
    let wall_s = t0.elapsed().as_secs_f64();
    assert!(
        cpu_s < wall_s * 0.5,
        "the agent used {cpu_s:.1} s of CPU in {wall_s:.1} s\n{}",
        agent.describe()
    );
    let grown = agent.log_len() - log0;
    assert!(
        grown < 256 * 1024,
        "the agent's log grew by {grown} bytes\n{}",
        agent.describe()
    );

    // Idle connections are closed (10 s idle timeout by default).
    poll(
        "the agent to close nobody's idle connections",
        Duration::from_secs(30),
        || agent.describe(),
        || {
            flood.retain_mut(|c| !closed_by_peer(c));
            flood.is_empty().then_some(())
        },
    );
    let out = agent.chpox_as(Some(NOBODY), &["list"]);
    assert_ok("nobody's chpox list after the flood", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&mine.pid.to_string()));
    agent.assert_alive();
}

// ---------------------------------------------------------------------------
// Defect 5: a request line without end

/// nobody sends a request line that never ends: the agent stops reading
/// it at 64 KiB and closes the connection; it does not grow, and it keeps
/// answering.
#[test]
fn an_endless_request_line_is_cut_off_and_costs_the_agent_no_memory() {
    let s = scratch_with_out();
    let mut agent = start_agent(&s, &s.path("images"), &[]);
    let peak_before = agent.status_kb("VmHWM:");

    let socket = agent.socket();
    const MAX_SENT: usize = 256 << 20;
    let (sent, error) = as_nobody(|| {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        while sent < MAX_SENT {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => return (sent, Some(e)),
            }
        }
        (sent, None)
    });
    let hwm = agent.status_kb("VmHWM:");
    assert!(
        sent < 16 << 20,
        "the agent took {sent} bytes of one request line (last error {error:?}); peak RSS {hwm} kB\n{}",
        agent.describe()
    );
    assert!(
        hwm < peak_before + 32 * 1024,
        "the agent's peak RSS went from {peak_before} kB to {hwm} kB\n{}",
        agent.describe()
    );
    agent.list();
    let out = agent.chpox_as(Some(NOBODY), &["list"]);
    assert_ok("nobody's chpox list afterwards", &out);
    let logged = agent.log_text().contains("request line too long");
    assert!(logged, "the log does not say so\n{}", agent.describe());
    agent.assert_alive();
}

// ---------------------------------------------------------------------------
// Defect 7: paths from process names

/// A process that named itself `../../../etc/pw` (PR_SET_NAME, here by
/// writing /proc/self/comm) registered without `-o`, by root and by its
/// user: its images go to the image directory (the user's own directory
/// in it), under a safe name, never where the name points.
#[test]
fn a_process_name_cannot_steer_its_image_out_of_the_image_directory() {
    let s = scratch_with_out();
    // ../../../etc from images is the scratch space's etc.
    let images = s.path("a/b/images");
    let etc = s.dir("etc", 0o777);
    let agent = start_agent(&s, &images, &[]);
    let mut guard = Guard::default();

    let mut renamed = |name: &str| {
        let mut cmd = Command::new("bash");
        cmd.args([
            "-c",
            "sleep 600 & printf %s \"$1\" > /proc/$$/comm && echo READY; wait",
            "renamed",
            "../../../etc/pw",
        ]);
        let t = nobody_command(&s, cmd, name);
        guard.watch_tree(t.pid);
        assert_eq!(
            stat(t.pid).expect("stat").comm,
            "../../../etc/pw",
            "the process did not rename itself"
        );
        t
    };

    for (who, uid, dir) in [
        ("root", None, images.clone()),
        ("nobody", Some(NOBODY), images.join(NOBODY.to_string())),
    ] {
        let t = renamed(who);
        let pid = t.pid.to_string();
        let out = agent.chpox_as(uid, &["register", &pid]);
        assert_ok(&format!("{who} registering a renamed process"), &out);
        let entry = agent.entry(t.pid).expect("registered");
        let output = PathBuf::from(entry["output"].as_str().expect("output"));
        assert_eq!(
            output.parent(),
            Some(dir.as_path()),
            "{who}'s default image is not in {}: {}",
            dir.display(),
            output.display()
        );
        let name = output.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            !name.starts_with('.')
                && name.ends_with(&format!("-{pid}.chpox"))
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c)),
            "unsafe image name {name:?}"
        );
        let out = agent.chpox_as(uid, &["checkpoint", &pid, "--timeout", "30"]);
        assert_ok(&format!("{who}'s checkpoint of the renamed process"), &out);
        assert!(output.is_file(), "no image at {}", output.display());
    }
    let strays: Vec<_> = fs::read_dir(&etc).expect("etc").flatten().collect();
    assert!(
        strays.is_empty(),
        "images escaped into {}: {strays:?}",
        etc.display()
    );
}

// ---------------------------------------------------------------------------
// Risks: private registrations, stale temporary files

/// `registrations.json` lists every user's PIDs and image paths: 0600,
/// also when an older agent left it readable by all.
#[test]
fn the_saved_registrations_are_readable_by_root_only() {
    let s = scratch_with_out();
    fs::create_dir(&s.run).expect("mkdir run");
    let saved = s.run.join("registrations.json");
    fs::write(&saved, "[]").expect("write");
    chmod(&saved, 0o644);
    let agent = start_agent(&s, &s.path("images"), &[]);
    let mode = |p: &Path| {
        fs::metadata(p)
            .expect("registrations.json")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&saved), 0o600, "after start");

    let mut cmd = Command::new(bin("mempattern"));
    cmd.arg("4");
    let t = nobody_command(&s, cmd, "mempattern");
    let out = agent.chpox_as(
        Some(NOBODY),
        &[
            "register",
            &t.pid.to_string(),
            "-o",
            path_str(&s.out.join("m")),
        ],
    );
    assert_ok("register", &out);
    assert_eq!(mode(&saved), 0o600, "after a registration");
    let read = as_nobody(|| fs::read(&saved).map(|_| ()));
    assert!(read.is_err(), "nobody can read {}", saved.display());
}

/// Temporary images of interrupted dumps (`.NAME.chpox-tmp.PID.N`, as the
/// image writer names them) whose writer is gone are removed at start, in
/// the image directory and in its per-user directories; anything else is
/// left alone: other names, links, directories, and a temporary file a
/// live process may still be writing.
#[test]
fn stale_temporary_images_are_removed_at_start() {
    let s = scratch_with_out();
    let images = s.dir("images", 0o755);
    let user_dir = s.dir(&format!("images/{NOBODY}"), 0o700);
    std::os::unix::fs::chown(&user_dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    let other_dir = s.dir("images/notauid", 0o755);
    let dead = free_pid();
    // A live writer: started before its temporary file was last written.
    let mut live = Command::new("sleep").arg("600").spawn().expect("sleep");
    let live_pid = live.id();

    let stale = [
        images.join(format!(".job-1.chpox.chpox-tmp.{dead}.0")),
        user_dir.join(format!(".mine-2.chpox.chpox-tmp.{dead}.7")),
    ];
    let kept = [
        images.join(format!(".job-3.chpox.chpox-tmp.{live_pid}.0")),
        images.join(format!("job.chpox.chpox-tmp.{dead}.0")),
        images.join(format!(".job.chpox.chpox-tmp.{dead}.0.bak")),
        images.join(format!(".job.chpox.chpox-tmp.{dead}")),
        images.join(format!(".job.chpox.chpox-tmp.x{dead}.0")),
        images.join(format!(".chpox-tmp.{dead}.0")),
        other_dir.join(format!(".job.chpox.chpox-tmp.{dead}.0")),
    ];
    for f in stale.iter().chain(&kept) {
        fs::write(f, vec![0u8; 4096]).expect("write temp");
    }
    let link = images.join(format!(".link.chpox-tmp.{dead}.0"));
    std::os::unix::fs::symlink(stale[0].clone(), &link).expect("symlink");
    let dir = images.join(format!(".dir.chpox-tmp.{dead}.0"));
    fs::create_dir(&dir).expect("mkdir");

    let _agent = start_agent(&s, &images, &[]);
    for f in &stale {
        assert!(!f.exists(), "stale {} was kept", f.display());
    }
    for f in &kept {
        assert!(f.exists(), "{} was removed", f.display());
    }
    assert!(fs::symlink_metadata(&link).is_ok(), "a link was removed");
    assert!(dir.is_dir(), "a directory was removed");
    let _ = live.kill();
    let _ = live.wait();
}
