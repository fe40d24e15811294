//! A dump reads a frozen process's dispositions, prctl values, limits,
//! alternate stacks and the like from the kernel's own structures when an
//! agent has loaded its eBPF `task` iterator (`process::kernelstate`), and
//! with remote syscalls and /proc otherwise. Both must record the same.

mod common;

use std::path::Path;
use std::process::Command;

use chpox::image::ImageReader;
use chpox::image::model::Metadata;
use common::agent::{Agent, scratch};
use common::restore::restore_and_wait;
use common::{Target, chpox_bin, tempdir, wait_pid_free};

/// Dump `pid` to `image`, the kernel's way or (`remote`) the remote
/// syscalls' way, with `extra` arguments; returns its metadata and
/// whether the kernel's way was taken.
fn dump_with(pid: i32, image: &Path, remote: bool, extra: &[&str]) -> (Metadata, bool) {
    let mut cmd = Command::new(chpox_bin());
    cmd.args(["dump", &pid.to_string(), "-o"])
        .arg(image)
        .args(["--unsupported-fd", "null", "--json"])
        .args(extra);
    if remote {
        cmd.env("CHPOX_REMOTE_STATE", "1");
    }
    let out = cmd.output().expect("run chpox dump");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chpox dump failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dump --json");
    let reader = ImageReader::open(image).expect("image opens");
    (reader.metadata().clone(), report["state_from_kernel"] == 1)
}

fn dump(pid: i32, image: &Path, remote: bool) -> (Metadata, bool) {
    dump_with(pid, image, remote, &[])
}

/// Python sets a handler and an ignored signal, and a second thread; once
/// restored (and told to go on by a file appearing) it signals itself and
/// exits 0 only if its handler ran and the kernel still ignores SIGHUP.
const PYTHON: &str = r#"
import os, signal, sys, threading, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGHUP, signal.SIG_IGN)
threading.Thread(target=lambda: time.sleep(3600), daemon=True).start()
print("READY", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.1)
ignored = next(int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("SigIgn:"))
sys.exit(0 if got == [signal.SIGUSR1] and ignored & (1 << (signal.SIGHUP - 1)) else 3)
"#;

#[test]
fn python_read_the_kernels_way_comes_back_with_its_handlers() {
    let s = scratch();
    let _agent = Agent::start(&s);
    let dir = tempdir();
    let go = dir.path().join("go");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PYTHON]).arg(&go);
    let mut target = Target::spawn_command(cmd, "python3", dir.path());
    let image = dir.path().join("python.img");
    let (meta, from_kernel) = dump_with(target.pid, &image, false, &["--kill"]);
    assert!(from_kernel, "the dump did not read the kernel's structures");
    assert!(
        meta.root.threads.len() >= 2,
        "{:?}",
        meta.root.threads.len()
    );
    target.child.wait().expect("reap the original");
    wait_pid_free(target.pid);
    std::fs::write(&go, "").expect("go file");
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "the restored Python lost a disposition: {stderr}");
}

#[test]
fn the_kernels_structures_say_what_remote_syscalls_say() {
    let s = scratch();
    let agent = Agent::start(&s);
    assert!(
        !agent.log_text().contains("no task iterator"),
        "the agent did not load its task iterator: {}",
        agent.log_text()
    );
    let dir = tempdir();
    let target = Target::spawn("kstate", &[], dir.path());
    let (kernel, took_kernel) = dump(target.pid, &dir.path().join("kernel.img"), false);
    let (remote, took_remote) = dump(target.pid, &dir.path().join("remote.img"), true);
    assert!(took_kernel, "the dump did not read the kernel's structures");
    assert!(
        !took_remote,
        "CHPOX_REMOTE_STATE did not make it ask the process"
    );

    // What the process set is what both recorded.
    for (way, meta) in [("kernel", &kernel), ("remote", &remote)] {
        let p = &meta.root.process;
        assert_eq!(p.pdeath_signal, libc::SIGUSR2, "{way}");
        assert!(p.child_subreaper, "{way}");
        assert_eq!(p.mm.brk, target.ready_hex("brk"), "{way}");
        assert_eq!(p.attrs.dumpable, Some(0), "{way}");
        assert_eq!(p.attrs.thp_disable, 1, "{way}");
        assert_eq!(p.attrs.oom_score_adj, Some(123), "{way}");
        assert_ne!(p.personality & libc::ADDR_NO_RANDOMIZE as u32, 0, "{way}");
        let nofile = &p.rlimits[libc::RLIMIT_NOFILE as usize];
        assert_eq!((nofile.soft, nofile.hard), (1000, 2000), "{way}");
        let action = |signo: i32| {
            *meta
                .root
                .signals
                .actions
                .iter()
                .find(|a| a.signo == signo)
                .expect("action")
        };
        let usr1 = action(libc::SIGUSR1);
        let wanted = (libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK) as u64;
        assert_eq!(usr1.flags & wanted, wanted, "{way}");
        assert_eq!(
            usr1.mask & (1 << (libc::SIGUSR2 - 1) | 1 << (libc::SIGTERM - 1)),
            1 << (libc::SIGUSR2 - 1) | 1 << (libc::SIGTERM - 1),
            "{way}"
        );
        assert_ne!(
            action(libc::SIGCHLD).flags & libc::SA_NOCLDSTOP as u64,
            0,
            "{way}"
        );
        assert_eq!(action(libc::SIGHUP).handler, 1, "{way}");
        let stacks: Vec<_> = meta.root.threads.iter().map(|t| t.sigaltstack).collect();
        assert_eq!(stacks.len(), 3, "{way}");
        assert_eq!(stacks[0].map(|a| a.size), Some(65536), "{way}");
        assert_eq!(stacks.iter().filter(|a| a.is_none()).count(), 1, "{way}");
        assert!(
            stacks
                .iter()
                .flatten()
                .any(|a| a.flags == 1 << 31 && a.size == 32768),
            "{way}: {stacks:?}"
        );
        assert!(
            meta.root
                .threads
                .iter()
                .all(|t| t.clear_child_tid.is_some())
        );
    }

    // And everything else of it alike, field by field.
    let (k, r) = (&kernel.root, &remote.root);
    assert_eq!(k.signals.actions, r.signals.actions);
    assert_eq!(k.process.pdeath_signal, r.process.pdeath_signal);
    assert_eq!(k.process.child_subreaper, r.process.child_subreaper);
    assert_eq!(k.process.mm.brk, r.process.mm.brk);
    assert_eq!(k.process.personality, r.process.personality);
    assert_eq!(k.process.rlimits, r.process.rlimits);
    assert_eq!(k.process.timers, r.process.timers);
    assert_eq!(k.process.attrs, r.process.attrs);
    for (kt, rt) in k.threads.iter().zip(&r.threads) {
        assert_eq!(kt.tid, rt.tid);
        assert_eq!(kt.sigaltstack, rt.sigaltstack, "thread {}", kt.tid);
        assert_eq!(kt.clear_child_tid, rt.clear_child_tid, "thread {}", kt.tid);
        assert_eq!(kt.comm, rt.comm, "thread {}", kt.tid);
    }
}
