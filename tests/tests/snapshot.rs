//! Dumps that leave the process running write its pages from a
//! copy-on-write snapshot after it runs again: the image must still be the
//! process at one instant, however hard its threads write meanwhile, and a
//! process that dies before its image is written must leave no image.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chpox::image::ImageReader;
use common::{Target, chpox_bin, chpox_ok, tempdir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn dump_json(pid: i32, image: &Path, extra: &[&str]) -> serde_json::Value {
    let pid_str = pid.to_string();
    let mut args = vec![
        "dump",
        &pid_str,
        "-o",
        image.to_str().expect("utf-8 path"),
        "--unsupported-fd",
        "null",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&chpox_ok(&args)).expect("dump --json")
}

/// Four threads rewrite 64 MiB flat out during the dump; the image holds
/// the memory of one instant, plain and compressed.
#[test]
fn snapshot_is_one_instant_under_writes_by_every_thread() {
    let dir = tempdir();
    let mut target = Target::spawn("cowwriters", &["4", "16"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let threads: usize = target.ready_value("threads").parse().expect("threads");
    let slice: usize = target.ready_value("slice").parse().expect("slice");
    for (name, extra) in [("plain.img", &[][..]), ("zstd.img", &["--compress"][..])] {
        let image = dir.path().join(name);
        let report = dump_json(target.pid, &image, extra);
        assert_eq!(report["snapshots"], 1, "{report}");
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        let region = reader
            .read_memory(addr, len as usize)
            .expect("read")
            .expect("every page stored");
        if let Err(e) = common::dumps::point_in_time(&region, threads, slice) {
            panic!("{name}: {e}");
        }
    }
    // It ran on meanwhile, and it has no child left over.
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", target.pid, target.pid))
            .expect("children");
    assert_eq!(children.trim(), "", "snapshot copies left behind");
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
}

/// The target killed while its pages are being written from the snapshot:
/// the dump fails, the previous image stays, no temporary file is left.
#[test]
fn a_process_killed_during_the_write_leaves_the_previous_image() {
    let dir = tempdir();
    let image = dir.path().join("img");
    for attempt in 0..4 {
        // Large enough that the write outlasts our reaction.
        let mib = (512 << attempt).to_string();
        let target = Target::spawn("mempattern", &[&mib], dir.path());
        dump_json(target.pid, &image, &[]);
        let before = std::fs::read(&image).expect("first image");
        let dumper = Command::new(chpox_bin())
            .args(["dump", &target.pid.to_string(), "-o"])
            .arg(&image)
            // The snapshot path: without pre-copy.
            .args(["--unsupported-fd", "null", "--no-precopy"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chpox");
        // The snapshot is the target's child while its pages are written.
        let children = format!("/proc/{0}/task/{0}/children", target.pid);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&children).is_ok_and(|c| c.trim().is_empty()) {
            assert!(Instant::now() < deadline, "no snapshot ever appeared");
            std::thread::sleep(Duration::from_micros(200));
        }
        // The freeze ends right after the snapshot: wait until it runs.
        while std::fs::read_to_string(format!("/proc/{}/status", target.pid))
            .is_ok_and(|s| !s.contains("TracerPid:\t0"))
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        target.signal(libc::SIGKILL);
        let out = dumper.wait_with_output().expect("dump finishes");
        if out.status.success() {
            // The write won the race; try again, bigger.
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("exited"), "{stderr}");
        assert!(
            std::fs::read(&image).expect("image kept") == before,
            "the previous image changed"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "img" && !n.starts_with("mempattern"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        return;
    }
    panic!("the dump finished before the target could be killed, four times");
}

/// Pre-copy: the pages go into the image while the threads write, then
/// only those written since are read while frozen. Threads that pause
/// after every page leave some pages written since the pre-copy and some
/// not: the image is still one instant, and it was made by a pre-copy.
#[test]
fn precopy_is_one_instant_under_writes_by_every_thread() {
    // 4 × 2 MiB: all of it may be written since the pre-copy and still be
    // few enough pages to read while frozen.
    precopy_is_one_instant(&["4", "2", "300"], 3, false);
}

/// The same with 4 × 80 MiB: enough to be scanned and copied in batches,
/// each batch scanned while the one before is copied, and the threads
/// write across the batches' bounds meanwhile. What they write during the
/// copy is copied again before the freeze (over the earlier copy, in
/// place, so the checksums of those blobs are computed anew).
#[test]
fn precopy_in_batches_is_one_instant_under_writes_by_every_thread() {
    // ~2000 pages a second: fewer than the freeze may read even behind a
    // debug build's slower copy, and hundreds written during it.
    precopy_is_one_instant(&["4", "80", "2000"], 2, true);
}

/// `cowwriters` with `args`, dumped `rounds` times with a pre-copy and
/// left stopped: each image holds the memory it was left stopped with.
/// With `copied_again`, each dump must have copied pages again before the
/// freeze.
fn precopy_is_one_instant(args: &[&str], rounds: usize, copied_again: bool) {
    let dir = tempdir();
    let mut target = Target::spawn("cowwriters", args, dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let threads: usize = target.ready_value("threads").parse().expect("threads");
    let slice: usize = target.ready_value("slice").parse().expect("slice");
    for round in 0..rounds {
        let image = dir.path().join(format!("pre{round}.img"));
        // Left stopped, its memory is still that of the freeze: the image
        // must equal it, not merely look like some instant.
        let report = dump_json(target.pid, &image, &["--leave-stopped", "--precopy"]);
        assert_eq!(report["precopied"], 1, "{report}");
        assert_eq!(report["snapshots"], 0, "{report}");
        if copied_again {
            let again = report["precopy_pages_copied_again"].as_u64();
            assert!(again.is_some_and(|n| n > 0), "{report}");
        }
        let mut live = vec![0u8; len as usize];
        std::fs::File::open(format!("/proc/{}/mem", target.pid))
            .and_then(|m| std::os::unix::fs::FileExt::read_exact_at(&m, &mut live, addr))
            .expect("read the stopped process's memory");
        target.signal(libc::SIGCONT);
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        let region = reader
            .read_memory(addr, len as usize)
            .expect("read")
            .expect("every page stored");
        if let Err(e) = common::dumps::point_in_time(&region, threads, slice) {
            panic!("round {round}: {e}");
        }
        if let Some(at) = region.iter().zip(&live).position(|(a, b)| a != b) {
            panic!("round {round}: the image differs from the frozen memory at byte {at}");
        }
    }
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
}

/// `mapchurn` maps, fills, unmaps and zaps pages without pause while it is
/// pre-copied: its table and its regions in the image agree (see the
/// program), so the image is one instant; and it runs on unharmed.
#[test]
fn precopy_of_a_process_mapping_unmapping_and_zapping_is_one_instant() {
    const PAGE: usize = 4096;
    let dir = tempdir();
    let mut target = Target::spawn("mapchurn", &[], dir.path());
    let table_at = target.ready_hex("table");
    let slots: usize = target.ready_value("slots").parse().expect("slots");
    let slot_bytes: usize = target
        .ready_value("slot_bytes")
        .parse()
        .expect("slot_bytes");
    for round in 0..3 {
        let image = dir.path().join(format!("churn{round}.img"));
        let report = dump_json(target.pid, &image, &["--precopy"]);
        assert_eq!(report["precopied"], 1, "{report}");
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        // Absent pages of a mapping read as zeros.
        let read = |at: u64, len: usize| -> Vec<u8> {
            let mut out = Vec::with_capacity(len);
            for page in (at..at + len as u64).step_by(PAGE) {
                match reader.read_memory(page, PAGE).expect("read") {
                    Some(bytes) => out.extend_from_slice(&bytes),
                    None => out.extend(std::iter::repeat_n(0u8, PAGE)),
                }
            }
            out
        };
        let table = read(table_at, slots * slot_bytes);
        let word =
            |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        let mut live = 0;
        for slot in 0..slots {
            let entry = &table[slot * slot_bytes..(slot + 1) * slot_bytes];
            let (region, pages, id) = (word(entry, 0), word(entry, 1) as usize, word(entry, 2));
            if region == 0 {
                continue;
            }
            live += 1;
            let bytes = read(region, pages * PAGE);
            for page in 0..pages {
                let state = entry[24 + page];
                let words: Vec<u64> = (0..PAGE / 8)
                    .map(|w| word(&bytes[page * PAGE..], w))
                    .collect();
                let expect = |w: usize| id << 32 | (page * PAGE / 8 + w) as u64;
                let ok_pattern = words.iter().enumerate().all(|(w, &v)| v == expect(w));
                let ok_zero = words.iter().all(|&v| v == 0);
                let ok_mixed = words
                    .iter()
                    .enumerate()
                    .all(|(w, &v)| v == 0 || v == expect(w));
                let ok = match state {
                    0 => ok_pattern,
                    1 => ok_pattern || ok_zero,
                    2 => ok_zero,
                    _ => ok_mixed,
                };
                assert!(
                    ok,
                    "round {round}: slot {slot} (region {region:#x} id {id}) page {page} in state {state} holds {:#x}…: not one instant",
                    words[0]
                );
            }
        }
        assert!(live > 0, "round {round}: no region in the table");
    }
    // It ran on, unharmed by the tracking.
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
}

/// A pre-copy registers its write tracking from the mappings' lines alone
/// (no smaps): a range the process registered with a userfaultfd of its
/// own must be left to it (the kernel refuses it to us), the rest
/// pre-copied, and every page of both in the image as the freeze saw it.
/// The process's own registration still works afterwards.
#[test]
fn precopy_leaves_a_process_its_own_userfaultfd() {
    let dir = tempdir();
    let mut target = Target::spawn("ownuffd", &["8"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let (own, own_len) = (target.ready_hex("own"), target.ready_u64("own_len"));
    let image = dir.path().join("own.img");
    let report = dump_json(target.pid, &image, &["--leave-stopped", "--precopy"]);
    assert_eq!(report["precopied"], 1, "{report}");
    let reader = ImageReader::open(&image).expect("image opens");
    reader.verify_all().expect("checksums");
    common::check_pattern(&reader, addr, len);
    common::check_pattern(&reader, own, own_len);
    target.signal(libc::SIGCONT);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    assert!(
        target.lines_after_ready().iter().any(|l| l == "OWN OK"),
        "{}",
        target.stdout()
    );
}

/// A pre-copy's write tracking is released by a process of its own once
/// the image is finished, without `chpox dump` waiting for it: dumps
/// following one another with no pause are each whole (one that starts
/// while the tracking of the last is still being released finds the
/// process's mappings still registered), the process runs on unharmed,
/// and no mapping of it stays registered afterwards.
#[test]
fn precopy_tracking_released_after_the_dump_returns_leaves_nothing_behind() {
    let dir = tempdir();
    let target = Target::spawn("mempattern", &["256"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    for round in 0..4 {
        let image = dir.path().join(format!("again{round}.img"));
        let report = dump_json_output_closed_at_exit(target.pid, &image);
        if round == 0 {
            assert_eq!(report["precopied"], 1, "{report}");
        }
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        common::check_pattern(&reader, addr, len);
    }
    let registered = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .expect("smaps")
            .lines()
            .filter_map(|l| l.strip_prefix("VmFlags:"))
            .any(|flags| flags.split_whitespace().any(|f| f == "uw"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while registered(target.pid) {
        assert!(
            Instant::now() < deadline,
            "PID {}'s memory is still registered for write tracking 10 s after the last dump",
            target.pid
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its rolling check goes over the whole region in 1.6 s.
    std::thread::sleep(Duration::from_secs(2));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", target.pid)).unwrap_or_default();
    let state = stat
        .rsplit(") ")
        .next()
        .and_then(|rest| rest.chars().next());
    assert!(
        matches!(state, Some('S' | 'R')),
        "the process is not running on: {stat:?}; {}",
        target.stdout()
    );
    assert!(!target.stdout().contains("CORRUPT"), "{}", target.stdout());
}

/// `chpox dump --precopy --json` of `pid`, its output read through a
/// pipe: the pipe must end when the command exits (a process left behind
/// holding it would keep a shell's `$(chpox dump …)` waiting).
fn dump_json_output_closed_at_exit(pid: i32, image: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut dump = Command::new(chpox_bin())
        .args(["dump", &pid.to_string(), "-o"])
        .arg(image)
        .args(["--unsupported-fd", "null", "--json", "--precopy"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn chpox dump");
    let mut out = dump.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let status = dump.wait().expect("wait for chpox dump");
    assert!(status.success(), "chpox dump failed: {status}");
    let text = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("chpox dump's output still open 10 s after it exited");
    serde_json::from_str(&text).expect("dump --json")
}

/// Shared_Dirty of `pid` in kB (/proc/PID/smaps_rollup): its pages mapped
/// by other processes too.
fn shared_dirty_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .expect("smaps_rollup")
        .lines()
        .find_map(|l| l.strip_prefix("Shared_Dirty:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Shared_Dirty")
}

/// A pre-copy reads the pages a forked Python still shares copy-on-write
/// with its child without pinning them: a pin makes the kernel give the
/// process its own copy of each, and the tree's memory would grow by all
/// it shares. (Its own pages it reads with `process_vm_readv`.)
#[test]
fn precopy_leaves_pages_shared_with_a_forked_child_shared() {
    let dir = tempdir();
    let script = r#"
import os, time
data = bytearray(os.urandom(1 << 20)) * 48
child = os.fork()
if child == 0:
    time.sleep(3600)
    os._exit(0)
print("READY child=%d" % child, flush=True)
time.sleep(3600)
"#;
    let target = common::python(script, &[], dir.path());
    let child = target.ready_u64("child") as i32;
    let before = shared_dirty_kb(target.pid);
    assert!(before >= 40 << 10, "the fork shares only {before} kB");
    let image = dir.path().join("forked.img");
    let report = dump_json(target.pid, &image, &["--precopy"]);
    assert_eq!(report["precopied"], 2, "{report}");
    let after = shared_dirty_kb(target.pid);
    // SAFETY: a plain kill of the test's own grandchild.
    unsafe { libc::kill(child, libc::SIGKILL) };
    assert!(
        after * 10 >= before * 9,
        "the dump unshared the parent's pages: Shared_Dirty {before} kB before, {after} kB after"
    );
    ImageReader::open(&image)
        .expect("image opens")
        .verify_all()
        .expect("checksums");
}

/// A real interpreter writing all the while: Python rewriting entries of
/// a 500 000-entry dict, a few thousand a second (objects made and freed,
/// reference counts: pages written all over its heap) is pre-copied, the
/// pages it wrote meanwhile copied again before the freeze. Killed and
/// restored, it finds its dict whole and equal to the running total it
/// kept beside it (checked between two of its steps).
#[test]
fn a_python_rewriting_its_dict_while_precopied_restores_consistent() {
    let dir = tempdir();
    let stop = dir.path().join("stop");
    let script = r#"
import os, random, sys, time
N = 500000
d = {k: (k, 0) for k in range(N)}
total = 0
step = 0
r = random.Random(7)
stop = sys.argv[1]
print("READY", flush=True)
while True:
    step += 1
    if step % 4096 == 0 and os.path.exists(stop):
        whole = all(v[0] == k for k, v in d.items()) and len(d) == N
        sys.exit(0 if whole and sum(v[1] for v in d.values()) == total else 3)
    # Slower than the copy: flat out it rewrites its whole heap faster
    # than any pass copies it, and is snapshotted.
    if step % 16 == 0:
        time.sleep(0.005)
    k = r.randrange(N)
    total += step - d[k][1]
    d[k] = (k, step)
"#;
    let mut target = common::python(script, &[common::path_str(&stop)], dir.path());
    let image = dir.path().join("python.img");
    let report = dump_json(target.pid, &image, &[]);
    assert_eq!(report["precopied"], 1, "{report}");
    let again = report["precopy_pages_copied_again"].as_u64();
    assert!(again.is_some_and(|n| n > 0), "{report}");
    target.signal(libc::SIGKILL);
    target.wait_exit(Duration::from_secs(10));
    common::wait_pid_free(target.pid);
    std::fs::write(&stop, "").expect("stop file");
    let (code, stderr) = common::restore::restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "the restored Python found its dict torn: {stderr}");
}

/// A small tree (a Python of a few MiB and its forked child, both
/// rewriting a counter array all along) is pre-copied by default, though
/// it is far below the size from which a single process is: each
/// snapshot would be a fork taken while the whole tree is frozen. Killed
/// and restored, each process finds its array consistent with the
/// running total it kept beside it.
#[test]
fn a_small_tree_is_precopied_by_default_and_restores_consistent() {
    let dir = tempdir();
    let stop = dir.path().join("stop");
    let script = r#"
import os, sys, time
stop = sys.argv[1]
child = os.fork()
counts = [0] * 65536
total = 0
step = 0
if child != 0:
    print("READY child=%d" % child, flush=True)
while True:
    step += 1
    if step % 1024 == 0:
        if os.path.exists(stop):
            if child != 0:
                _, status = os.waitpid(child, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    sys.exit(4)
            sys.exit(0 if sum(counts) == total else 3)
        time.sleep(0.002)
    counts[(step * 7919) % len(counts)] += 1
    total += 1
"#;
    let mut target = common::python(script, &[common::path_str(&stop)], dir.path());
    let child = target.ready_u64("child") as i32;
    let image = dir.path().join("tree.img");
    let report = dump_json(target.pid, &image, &[]);
    assert_eq!(report["processes"], 2, "{report}");
    assert_eq!(report["precopied"], 2, "{report}");
    assert_eq!(report["snapshots"], 0, "{report}");
    // SAFETY: a plain kill of the test's own grandchild.
    unsafe { libc::kill(child, libc::SIGKILL) };
    target.signal(libc::SIGKILL);
    target.wait_exit(Duration::from_secs(10));
    common::wait_pid_free(target.pid);
    common::wait_pid_free(child);
    std::fs::write(&stop, "").expect("stop file");
    let (code, stderr) = common::restore::restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "the restored tree found its counts torn: {stderr}");
}

/// A shell whose children live 20–50 ms each (a build's, a script's) is
/// dumped again and again while it runs: a child that exits right after
/// the freeze must not fail the dump (a pre-copied child's flags were
/// checked once it ran again, from a /proc that could be gone by then: 3
/// dumps in 15 of a 20 ms child failed so).
#[test]
fn a_shell_with_short_lived_children_dumps_every_time() {
    let dir = tempdir();
    /// Killed and reaped however the test ends.
    struct Shell(std::process::Child);
    impl Drop for Shell {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let shell = Shell(
        std::process::Command::new("bash")
            .args(["-c", "while :; do sleep 0.02; sleep 0.05; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash"),
    );
    let pid = shell.0.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let image = dir.path().join("shell.img");
    let mut with_child = 0;
    for _ in 0..30 {
        // Fails the test if the dump fails.
        let report = dump_json(pid, &image, &[]);
        if report["processes"] == 2 {
            with_child += 1;
        }
    }
    drop(shell);
    assert!(with_child > 0, "no dump met the shell with a child");
}

/// `chpox dump PID -o IMAGE --unsupported-fd null EXTRA`, started, its
/// stderr piped.
fn spawn_dump(pid: i32, image: &Path, extra: &[&str]) -> std::process::Child {
    common::dumps::spawn_dump(pid, image, extra, Stdio::piped())
}

/// Remove the second temporary file (`.img.chpox-tmp.PID.1`) of the dump
/// running as `dumper` in `dir` as soon as it appears; false if the dump
/// ended first.
fn remove_second_temporary(dir: &Path, dumper: u32) -> bool {
    let second = dir.join(format!(".img.chpox-tmp.{dumper}.1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::fs::remove_file(&second).is_ok() {
            return true;
        }
        if !Path::new(&format!("/proc/{dumper}")).exists() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Names in `dir` that start with `.`: temporary files of a dump.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// A compressed dump pre-copies too (its image is written uncompressed,
/// then compressed once the process runs again): under writes by every
/// thread, the image is still the frozen memory, and every run of it is
/// compressed.
#[test]
fn compressed_precopy_is_the_frozen_memory_under_writes_by_every_thread() {
    let dir = tempdir();
    let mut target = Target::spawn("cowwriters", &["4", "2", "300"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let threads: usize = target.ready_value("threads").parse().expect("threads");
    let slice: usize = target.ready_value("slice").parse().expect("slice");
    for round in 0..2 {
        let image = dir.path().join(format!("zpre{round}.img"));
        let report = dump_json(
            target.pid,
            &image,
            &["--leave-stopped", "--precopy", "--compress"],
        );
        assert_eq!(report["precopied"], 1, "{report}");
        assert_eq!(report["snapshots"], 0, "{report}");
        let mut live = vec![0u8; len as usize];
        std::fs::File::open(format!("/proc/{}/mem", target.pid))
            .and_then(|m| std::os::unix::fs::FileExt::read_exact_at(&m, &mut live, addr))
            .expect("read the stopped process's memory");
        target.signal(libc::SIGCONT);
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        let runs = common::root_page_runs(&reader);
        assert!(!runs.is_empty());
        for run in runs {
            assert_eq!(
                run.data.compression,
                chpox::image::model::Compression::Zstd,
                "round {round}: run at {:#x}",
                run.addr
            );
        }
        let region = reader
            .read_memory(addr, len as usize)
            .expect("read")
            .expect("every page stored");
        if let Err(e) = common::dumps::point_in_time(&region, threads, slice) {
            panic!("round {round}: {e}");
        }
        if let Some(at) = region.iter().zip(&live).position(|(a, b)| a != b) {
            panic!("round {round}: the image differs from the frozen memory at byte {at}");
        }
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    }
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
}

/// A compressed, pre-copied image restores: `mempattern` checks every
/// word of its memory before it says DONE.
#[test]
fn compressed_precopy_restores() {
    common::procs::become_subreaper();
    let dir = tempdir();
    let mut target = Target::spawn(
        "mempattern",
        &["64", "--finish-after-rounds", "30"],
        dir.path(),
    );
    let len = target.ready_u64("len");
    let image = dir.path().join("z.img");
    let report = dump_json(target.pid, &image, &["--precopy", "--compress"]);
    assert_eq!(report["precopied"], 1, "{report}");
    // Smaller than the pages: the ELF and libraries' pages it wrote, and
    // the zeros of the pages around, compress.
    assert!(
        report["image_bytes"].as_u64().expect("bytes")
            < report["pages_stored"].as_u64().expect("pages") * 4096,
        "{report}"
    );
    target.signal(libc::SIGKILL);
    let _ = target.wait_exit(EXIT_TIMEOUT);
    common::wait_pid_free(target.pid);
    let pid = common::procs::restore_detached(&image, &["--pid", "any"]);
    assert_eq!(common::procs::wait_pid(pid, EXIT_TIMEOUT), 0);
    assert_eq!(target.lines_after_ready(), [common::mempattern_done(len)]);
}

/// The compressed image's temporary file removed while the dump
/// compresses: the dump fails by name, the previous image stays, no
/// temporary file is left, and the process runs on.
#[test]
fn a_compressed_dump_that_cannot_publish_leaves_the_previous_image() {
    let dir = tempdir();
    let image = dir.path().join("img");
    let target = Target::spawn("mempattern", &["256"], dir.path());
    dump_json(target.pid, &image, &["--no-precopy"]);
    let before = std::fs::read(&image).expect("first image");
    for _attempt in 0..4 {
        let dumper = spawn_dump(target.pid, &image, &["--precopy", "--compress"]);
        // The second temporary file (counter 1) is the compressed image.
        let removed = remove_second_temporary(dir.path(), dumper.id());
        let out = dumper.wait_with_output().expect("dump finishes");
        if !removed {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        assert!(!out.status.success(), "the dump succeeded without its file");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("img"), "{stderr}");
        // What is gone already is no failure to remove it.
        assert!(!stderr.contains("cannot remove"), "{stderr}");
        assert!(
            std::fs::read(&image).expect("image kept") == before,
            "the previous image changed"
        );
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
        // Running, not stopped, not traced.
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", target.pid)).expect("status");
        assert!(status.contains("TracerPid:\t0"), "{status}");
        assert!(!status.contains("State:\tT"), "{status}");
        return;
    }
    panic!("the compressed file never appeared, four times");
}

/// `--kill --compress`: the image is published uncompressed before the
/// kill and compressed after it. If the compressed copy cannot replace it
/// (its temporary file removed meanwhile), the complete uncompressed image
/// stays, with a warning, and no temporary file is left.
#[test]
fn a_killed_process_keeps_its_uncompressed_image_if_compression_fails() {
    let dir = tempdir();
    let image = dir.path().join("img");
    for _attempt in 0..4 {
        let mut target = Target::spawn("mempattern", &["256"], dir.path());
        let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
        let dumper = spawn_dump(target.pid, &image, &["--kill", "--compress"]);
        // The compressed image's temporary file (counter 1; 0 became the
        // uncompressed image).
        let removed = remove_second_temporary(dir.path(), dumper.id());
        let out = dumper.wait_with_output().expect("dump finishes");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let _ = target.wait_exit(EXIT_TIMEOUT);
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        common::check_pattern(&reader, addr, len);
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
        let compressed = common::root_page_runs(&reader)
            .iter()
            .all(|r| r.data.compression == chpox::image::model::Compression::Zstd);
        if !removed {
            assert!(compressed, "not compressed, yet nothing failed: {stderr}");
            common::wait_pid_free(target.pid);
            continue;
        }
        assert!(!compressed, "compressed without its file");
        assert!(stderr.contains("stays uncompressed"), "{stderr}");
        assert!(!stderr.contains("cannot remove"), "{stderr}");
        return;
    }
    panic!("the compressed file never appeared, four times");
}

/// Pages of the snapshot the process itself may not read (PROT_NONE,
/// write-only) are stored all the same, as the process holds them.
#[test]
fn snapshot_stores_pages_the_process_may_not_read() {
    let dir = tempdir();
    let target = Target::spawn("protpages", &["8"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let (none, wo, small) = (
        target.ready_hex("none"),
        target.ready_hex("wo"),
        target.ready_u64("small"),
    );
    let image = dir.path().join("prot.img");
    let report = dump_json(target.pid, &image, &["--no-precopy"]);
    assert_eq!(report["snapshots"], 1, "{report}");
    let reader = ImageReader::open(&image).expect("image opens");
    reader.verify_all().expect("checksums");
    common::check_pattern(&reader, addr, len);
    common::check_pattern(&reader, none, small);
    common::check_pattern(&reader, wo, small);
    drop(target);
}
