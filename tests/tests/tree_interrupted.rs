//! A member of a tree killed in the middle of the tree's dump, while the
//! remote system calls of every member run at once (`overlap`): the dump
//! ends (an error, or an image of what was left), never hangs, writes no
//! half image, and every other member runs on untouched.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::dumps::tracer_of;
use common::procs::tree_pids;
use common::{Target, bin, chpox_bin};

const MEMBERS: usize = 4;

fn state_of(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn a_member_killed_during_the_overlapped_remote_calls_leaves_the_others_running() {
    let dir = common::tempdir();
    let image = dir.path().join("img");
    let busy = bin("busythreads");
    let busy = busy.to_str().expect("utf-8");
    for round in 0..16u64 {
        // A shell with MEMBERS busythreads of 12 threads each: 52 threads
        // whose remote calls run interleaved.
        let script = format!("for i in $(seq {MEMBERS}); do {busy} 12 & done; wait");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut tree = Target::spawn_command(cmd, "shtree", dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        while tree.stdout().matches("READY").count() < MEMBERS {
            assert!(Instant::now() < deadline, "members not ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        let members: Vec<i32> = tree_pids(tree.pid)
            .into_iter()
            .filter(|&p| p != tree.pid)
            .collect();
        assert_eq!(members.len(), MEMBERS, "{members:?}");
        // A failed round must not leave 36 busy threads behind.
        let mut guard = common::procs::Guard::default();
        guard.watch_tree(tree.pid);
        let victim = members[round as usize % MEMBERS];

        let _ = std::fs::remove_file(&image);
        let mut dumper = Command::new(chpox_bin())
            .args(["dump", &tree.pid.to_string(), "-o"])
            .arg(&image)
            .args(["--unsupported-fd", "null", "--no-precopy"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chpox");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tracer_of(tree.pid) != Some(dumper.id() as i32) {
            assert!(Instant::now() < deadline, "chpox never seized the tree");
            std::thread::sleep(Duration::from_micros(100));
        }
        // From the freeze to well into the remote calls (tens of
        // milliseconds for 52 threads in a debug build).
        std::thread::sleep(Duration::from_micros(round * round * 150));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the victim");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = dumper.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = dumper.kill();
                panic!(
                    "chpox dump still runs 20 s after member {victim} was killed {}µs into round {round}",
                    round * round * 150
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut said = String::new();
        if let Some(mut err) = dumper.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut said);
        }
        eprintln!(
            "round {round}: member {victim} killed {}µs in, dump {status}: {}",
            round * round * 150,
            said.trim()
        );
        if !status.success() {
            assert!(!image.exists(), "a failed dump left an image");
            // Whatever step the kill cut short (an attach, which the
            // kernel refuses an exiting task with EPERM; a ptrace request;
            // a /proc read), the user hears which process exited.
            assert!(
                said.contains(&format!("PID {victim} exited while being checkpointed")),
                "round {round}: the killed member's exit not named: {said}"
            );
            assert!(
                !said.contains("WARN"),
                "round {round}: a killed member's threads reported as our failure: {said}"
            );
        }
        // Every other member is released and runs on.
        for &pid in members.iter().filter(|&&p| p != victim) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let state = state_of(pid);
                if tracer_of(pid) == Some(0) && (state.starts_with('S') || state.starts_with('R')) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "member {pid} not released in round {round}: {state}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            common::procs::signal(pid, libc::SIGUSR1);
        }
        // Their threads' arithmetic held (a thread left with altered
        // registers prints BAD and exits 3), and they stop cleanly.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tree.stdout().matches("DONE rounds=").count() < MEMBERS - 1 {
            assert!(
                !tree.stdout().contains("BAD"),
                "round {round}: {}",
                tree.stdout()
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: the members did not finish: {}",
                tree.stdout()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        tree.wait_exit(Duration::from_secs(30));
        assert!(!tree.stdout().contains("BAD"), "{}", tree.stdout());
    }
}
