//! chpox itself dying in the middle of a dump, while the target is frozen:
//! the target must run on untouched, and no image may appear at the final
//! path. The next dump to the same path cleans up what the dead one left.
//! (A target killed in the middle of its dump: `busy_machine.rs`.)

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::dumps::{seen_frozen, tracer_of};
use common::{Target, chpox_ok};

/// `chpox_killed_at_many_points_of_a_freeze` keeps 200 threads spinning
/// on this machine's two cores: a test beside it got so little CPU that
/// its target's first touch of 512 MiB outlasted 20 s. It runs alone;
/// the others may share the machine with each other.
static SPINNERS: RwLock<()> = RwLock::new(());

fn beside_others() -> RwLockReadGuard<'static, ()> {
    SPINNERS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    SPINNERS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn start_dump(pid: i32, image: &Path) -> Child {
    start_dump_with(pid, image, &["--no-precopy"])
}

/// These tests interrupt a long freeze: without pre-copy (whose freezes
/// are brief), unless `extra` asks for it.
fn start_dump_with(pid: i32, image: &Path, extra: &[&str]) -> Child {
    common::dumps::spawn_dump(pid, image, extra, Stdio::null())
}

/// Wait until `dumper` holds `target` frozen (it is the tracer).
fn wait_until_frozen(target: i32, dumper: &mut Child) {
    assert!(
        seen_frozen(target, dumper),
        "chpox ended without our seeing it hold the target"
    );
}

/// The target is released (not traced, not stopped) within a few seconds.
fn assert_released(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("target alive");
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .map(str::trim)
            .unwrap_or("")
            .to_string();
        if tracer_of(pid) == Some(0) && (state.starts_with('S') || state.starts_with('R')) {
            return;
        }
        assert!(Instant::now() < deadline, "target not released: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn interrupted_dump_leaves_target_running(signal: i32) {
    let _beside_others = beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("mkdir");
    // Its 100 idle threads make the freeze long enough to be hit (the
    // snapshot's fork of 512 MiB alone lasts a few ms).
    let mut target = Target::spawn(
        "mempattern",
        &["512", "--finish-after-rounds", "40", "--threads", "100"],
        dir.path(),
    );
    let image = images.join("img");

    let mut dumper = start_dump(target.pid, &image);
    wait_until_frozen(target.pid, &mut dumper);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dumper.id() as i32),
        nix::sys::signal::Signal::try_from(signal).expect("signal"),
    )
    .expect("signal chpox");
    if signal != libc::SIGKILL {
        // Held back: chpox is still alive and still holds the target a
        // moment later (borrowing 100 threads takes far longer than this).
        // An unheld Ctrl-C would have ended chpox, and its hold, at once.
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(
            tracer_of(target.pid),
            Some(dumper.id() as i32),
            "the signal interrupted chpox while the target was frozen"
        );
    }
    let status = dumper.wait().expect("wait chpox");

    assert_released(target.pid);
    if signal == libc::SIGKILL {
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!image.exists(), "no image after chpox was killed");
    } else {
        // Held back while the target was frozen, the signal ends chpox only
        // once the target is released: there is either no image, or a
        // complete one.
        if image.exists() {
            chpox_ok(&["inspect", image.to_str().expect("utf-8")]);
        }
    }

    // The target's memory is intact: it verifies it as it goes, and sums it.
    target.wait_success(Duration::from_secs(60));
    let out = target.lines_after_ready();
    assert!(
        out.last().is_some_and(|l| l.starts_with("DONE sum=")),
        "{out:?}"
    );

    // A later dump to the same path works and leaves only the image.
    let again = Target::spawn("mempattern", &["4"], dir.path());
    chpox_ok(&[
        "dump",
        &again.pid.to_string(),
        "-o",
        image.to_str().expect("utf-8"),
        "--unsupported-fd",
        "null",
    ]);
    assert_eq!(dir_entries(&images), ["img"]);
}

#[test]
fn chpox_killed_while_the_target_is_frozen() {
    interrupted_dump_leaves_target_running(libc::SIGKILL);
}

#[test]
fn ctrl_c_while_the_target_is_frozen() {
    interrupted_dump_leaves_target_running(libc::SIGINT);
}

/// A Ctrl-C while the target is frozen is held back also when chpox's
/// thread hashing the mapped files is still at work: a Python process
/// maps a 512 MiB file (hashed beside the dump, for a second or more) and
/// has 100 threads (a long freeze). Taken by that thread instead of the
/// freezing one, the signal would end chpox at once, mid-freeze.
#[test]
fn ctrl_c_while_frozen_and_files_still_hashed() {
    let _beside_others = beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"
import mmap, sys, threading, time
path = sys.argv[1]
with open(path, "wb") as f:
    f.truncate(512 << 20)
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
done = threading.Event()
for _ in range(100):
    threading.Thread(target=done.wait, daemon=True).start()
print("READY", flush=True)
time.sleep(3600)
"#;
    let big = dir.path().join("big");
    let mut target = common::python(script, &[big.to_str().expect("utf-8")], dir.path());
    let image = dir.path().join("img");
    let mut dumper = start_dump(target.pid, &image);
    wait_until_frozen(target.pid, &mut dumper);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dumper.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signal chpox");
    std::thread::sleep(Duration::from_millis(3));
    assert_eq!(
        tracer_of(target.pid),
        Some(dumper.id() as i32),
        "the Ctrl-C ended chpox while the target was frozen"
    );
    dumper.wait().expect("wait chpox");
    assert_released(target.pid);
    assert!(
        target.child.try_wait().expect("try_wait").is_none(),
        "the target ended"
    );
}

/// A 200-thread process whose dump is killed at many points of the freeze,
/// in particular while chpox runs system calls inside its threads: the
/// process must run on as if nothing happened (its threads check their own
/// arithmetic), never crash.
#[test]
fn chpox_killed_at_many_points_of_a_freeze() {
    let _alone = alone();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = Target::spawn("busythreads", &["200"], dir.path());
    let image = dir.path().join("img");
    for round in 0..40u64 {
        let mut dumper = start_dump(target.pid, &image);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tracer_of(target.pid) != Some(dumper.id() as i32) {
            if let Some(status) = target.child.try_wait().expect("try_wait") {
                panic!(
                    "the target ended ({status}) before round {round}: {:?}",
                    target.lines()
                );
            }
            assert!(Instant::now() < deadline, "chpox never seized the target");
            std::thread::sleep(Duration::from_micros(200));
        }
        // From at once to well into the remote system calls of the
        // threads (a few hundred microseconds per thread in a debug build).
        std::thread::sleep(Duration::from_micros(round * round * 100));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(dumper.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        dumper.wait().expect("wait chpox");
        assert!(
            target.child.try_wait().expect("try_wait").is_none(),
            "the target died when chpox was killed {}µs into round {round}: {:?}",
            round * round * 100,
            target.lines()
        );
        assert_released(target.pid);
    }
    target.signal(libc::SIGUSR1);
    target.wait_success(Duration::from_secs(30));
    let out = target.lines_after_ready();
    assert!(
        out.last().is_some_and(|l| l.starts_with("DONE rounds=")),
        "{out:?}"
    );
}

/// The same for a thread holding known values in its vector registers
/// (AVX, AVX-512 where the CPU has it) while chpox runs system calls in
/// it: a dump killed at any point leaves every register as it was.
#[test]
fn chpox_killed_mid_freeze_leaves_vector_registers_intact() {
    let _beside_others = beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = Target::spawn("avxregs", &[], dir.path());
    // Let it load its registers (it prints READY before).
    std::thread::sleep(Duration::from_millis(50));
    let image = dir.path().join("img");
    for round in 0..60u64 {
        let mut dumper = start_dump(target.pid, &image);
        let deadline = Instant::now() + Duration::from_secs(30);
        // A small process may be dumped whole between two looks: then the
        // round kills nothing, which is fine.
        while tracer_of(target.pid) != Some(dumper.id() as i32)
            && dumper.try_wait().expect("try_wait chpox").is_none()
        {
            assert!(
                target.child.try_wait().expect("try_wait").is_none(),
                "the target ended before round {round}: {:?}",
                target.lines()
            );
            assert!(Instant::now() < deadline, "chpox never seized the target");
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_micros(round * 50));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(dumper.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        dumper.wait().expect("wait chpox");
        assert_released(target.pid);
    }
    target.signal(libc::SIGUSR1);
    target.wait_success(Duration::from_secs(30));
    assert_eq!(target.lines_after_ready(), ["REGS OK"]);
}

/// chpox killed at many points of a pre-copy (the attach pause, the copy
/// while the target runs with its writes tracked, the freeze, the write
/// after it): the target runs on with its memory intact, its tracking gone
/// with chpox, and an image, if any, is whole.
#[test]
fn chpox_killed_during_a_precopy_leaves_the_target_intact() {
    let _beside_others = beside_others();
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("mkdir");
    let mut target = Target::spawn(
        "mempattern",
        &["128", "--finish-after-rounds", "60"],
        dir.path(),
    );
    let image = images.join("img");
    for delay_ms in [0u64, 1, 3, 10, 30, 100, 300] {
        let mut dumper = start_dump_with(target.pid, &image, &["--precopy"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(dumper.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        dumper.wait().expect("wait chpox");
        assert!(
            target.child.try_wait().expect("try_wait").is_none(),
            "the target died when chpox was killed {delay_ms} ms into a pre-copy"
        );
        assert_released(target.pid);
        let flags = std::fs::read_to_string(format!("/proc/{}/smaps", target.pid)).expect("smaps");
        assert!(
            !flags
                .lines()
                .any(|l| l.starts_with("VmFlags:") && l.contains(" uw")),
            "write tracking left on the target {delay_ms} ms in"
        );
        if image.exists() {
            chpox_ok(&["inspect", image.to_str().expect("utf-8")]);
        }
    }
    // A dump that is let finish works, and (as after any killed dump)
    // removes what a killed one left: only the image remains.
    let report = chpox_ok(&[
        "dump",
        &target.pid.to_string(),
        "-o",
        image.to_str().expect("utf-8"),
        "--unsupported-fd",
        "null",
        "--precopy",
        "--json",
    ]);
    assert!(report.contains("\"precopied\": 1"), "{report}");
    assert_eq!(dir_entries(&images), ["img"]);
    // Its 60 rounds of 100 ms each verify 8 MiB: 6 s alone, once more than
    // 60 s on a loaded machine.
    target.wait_success(Duration::from_secs(300));
    let out = target.lines_after_ready();
    assert!(
        out.last().is_some_and(|l| l.starts_with("DONE sum=")),
        "{out:?}"
    );
}
