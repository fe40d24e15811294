//! Incremental checkpoints of registered processes: after a full image,
//! each generation stores only the pages written since (write tracking
//! with userfaultfd write-protect and PAGEMAP_SCAN), names the full image
//! as its parent, and restores to exactly the memory a full image of the
//! same moment restores to.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chpox::image::ImageReader;
use common::agent::{Agent, STATE_TIMEOUT, Scratch, poll_until, scratch, send};
use common::procs::{become_subreaper, restore_detached, wait_pid};
use common::{Target, path_str, run_chpox};

/// The lines `memchurn` appended to its report.
fn lines(report: &Path) -> Vec<String> {
    fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One more step (number `n`) of `memchurn` `pid` (the original or a
/// restored copy).
fn step(report: &Path, pid: i32, n: u32) {
    send(pid, libc::SIGUSR1);
    let want = format!("STEP {n}");
    poll_until(
        &format!("memchurn {want}"),
        STATE_TIMEOUT,
        || format!("{:?}", lines(report)),
        || lines(report).contains(&want),
    );
}

/// Has `memchurn` `pid` check every word of its memory; its sum.
fn verify(report: &Path, pid: i32) -> String {
    let before = lines(report).len();
    send(pid, libc::SIGUSR2);
    let line = common::agent::poll(
        "memchurn VERIFY",
        STATE_TIMEOUT,
        || format!("{:?}", lines(report)),
        || {
            lines(report)
                .get(before..)?
                .iter()
                .find(|l| l.starts_with("VERIFY"))
                .cloned()
        },
    );
    assert!(
        line.contains("ok=1"),
        "memory differs from what it should be: {line}"
    );
    line.split("sum=").nth(1).expect("sum").to_string()
}

/// Restore `image` (detached), have the copy verify itself, kill it; the
/// sum it reported.
fn restore_and_verify(report: &Path, image: &Path) -> String {
    let pid = restore_detached(image, &[]);
    let sum = verify(report, pid);
    send(pid, libc::SIGKILL);
    wait_pid(pid, Duration::from_secs(30));
    common::wait_pid_free(pid);
    sum
}

/// Starts `memchurn` with MIB of main memory.
fn churn(s: &Scratch, mib: &str) -> (Target, PathBuf) {
    let report = s.path("churn.report");
    let t = Target::spawn("memchurn", &[path_str(&report), mib], &s.logs);
    (t, report)
}

fn metadata(image: &Path) -> chpox::image::model::Metadata {
    let reader = ImageReader::open(image)
        .unwrap_or_else(|e| panic!("image {} does not open: {e}", image.display()));
    reader.verify_all().expect("checksums");
    reader.metadata().clone()
}

fn stored_pages(m: &chpox::image::model::Metadata) -> u64 {
    m.processes()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.pages)
        .map(|r| r.npages)
        .sum()
}

#[test]
fn an_incremental_chain_after_many_generations_restores_like_a_full_image() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("churn.chpox");
    let (mut t, report) = churn(&s, "32");
    let pid = t.pid;
    let pid_s = pid.to_string();
    // Generations 1 and 5 full, the others increments. The second full
    // one is taken from the base: what was written since is read as for
    // an increment, everything is protected again while frozen, and the
    // pages the increment would inherit are copied from the base into it
    // afterwards (no snapshot of the whole memory).
    agent.chpox_ok(&[
        "register",
        &pid_s,
        "-o",
        path_str(&img),
        "--keep",
        "2",
        "--full-every",
        "4",
    ]);

    let generations = 8;
    let mut sums = Vec::new();
    let mut full_pages = 0;
    for g in 1..=generations {
        step(&report, pid, g);
        sums.push(verify(&report, pid));
        agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
        let m = metadata(&img);
        if g % 4 == 1 {
            assert!(m.parent.is_none(), "generation {g} is full");
            assert!(
                m.processes()
                    .flat_map(|p| &p.vmas)
                    .all(|v| v.inherited.is_empty()),
                "generation {g} inherits nothing"
            );
            let stored = stored_pages(&m);
            if g > 1 {
                // All of the first's pages and those added since.
                assert!(
                    stored >= full_pages,
                    "generation {g} stored {stored} pages, the first {full_pages}"
                );
            }
            full_pages = stored;
        } else {
            let parent = m.parent.as_ref().expect("generation {g} is incremental");
            let base = metadata(&dir.join("churn.chpox.base"));
            assert_eq!(Some(&parent.image_id), base.image_id.as_ref());
            assert!(parent.pages_inherited > 0, "{parent:?}");
            // 32 MiB main region, 1 % written per step and new regions:
            // far below the full image.
            let stored = stored_pages(&m);
            assert!(
                stored * 2 < full_pages,
                "generation {g} stored {stored} pages, the full one {full_pages}; its mappings (start, end, pages stored, inherited): {:x?}",
                m.processes()
                    .flat_map(|p| &p.vmas)
                    .map(|v| (
                        v.start,
                        v.end,
                        v.pages.iter().map(|r| r.npages).sum::<u64>(),
                        v.inherited.iter().map(|&(_, n)| n).sum::<u64>()
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }
    let summary = common::chpox_ok(&["inspect", path_str(&img)]);
    assert!(summary.contains("incremental"), "{summary}");
    assert_full_checkpoint_logged(&agent, "the unchanged pages from the base");

    // A full image of the same moment, by a one-shot dump.
    let full = dir.join("full.chpox");
    common::chpox_ok(&["dump", &pid_s, "-o", path_str(&full)]);
    assert!(metadata(&full).parent.is_none());

    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);

    let last = sums.last().cloned().expect("sums");
    assert_eq!(
        restore_and_verify(&report, &img),
        last,
        "the newest increment"
    );
    assert_eq!(restore_and_verify(&report, &full), last, "the full image");
    assert_eq!(
        restore_and_verify(&report, &dir.join("churn.chpox.1")),
        sums[sums.len() - 2],
        "the increment before"
    );
    // The base is generation 5, the full image taken from the first.
    assert_eq!(
        restore_and_verify(&report, &dir.join("churn.chpox.base")),
        sums[4],
        "generation 5, full from the base"
    );

    // The restored copy goes on from there: steps after the restore work
    // on memory that came from two files.
    let pid2 = restore_detached(&img, &[]);
    step(&report, pid2, generations + 1);
    verify(&report, pid2);
    send(pid2, libc::SIGKILL);
    wait_pid(pid2, Duration::from_secs(30));
    common::wait_pid_free(pid2);

    // Parent missing: one line naming it.
    let base = dir.join("churn.chpox.base");
    let aside = s.path("base.aside");
    fs::rename(&base, &aside).expect("move the base away");
    // FILE.1 and FILE.2 share the base too: move them away as well, so
    // nothing beside the image has its id.
    for n in ["churn.chpox.1", "churn.chpox.2"] {
        let _ = fs::rename(dir.join(n), s.path(n));
    }
    let out = run_chpox(&["restore", path_str(&img)]);
    common::agent::assert_refused("restore without its parent", &out, "is missing");
    // Replaced by another image: named as such.
    fs::copy(&full, &base).expect("copy");
    let out = run_chpox(&["restore", path_str(&img)]);
    common::agent::assert_refused("restore with a replaced parent", &out, "was replaced");
    // The parent back under another name beside it: found by its id.
    fs::rename(&aside, dir.join("churn.chpox.7")).expect("put the base back");
    assert_eq!(
        restore_and_verify(&report, &img),
        last,
        "parent found renamed"
    );
}

#[test]
fn periodic_checkpoints_are_incremental_and_restore() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("every.chpox");
    let (mut t, report) = churn(&s, "16");
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img), "--every", "1s"]);
    let mut n = 0;
    let mut sum = String::new();
    poll_until(
        "an incremental periodic checkpoint",
        Duration::from_secs(90),
        || agent.describe(),
        || {
            n += 1;
            step(&report, pid, n);
            sum = verify(&report, pid);
            // No step until the next periodic checkpoint is written: it
            // holds exactly this sum.
            let done = agent
                .entry(pid)
                .and_then(|e| e["checkpoints"].as_u64())
                .unwrap_or(0);
            agent.wait_checkpoints(pid, done + 2);
            ImageReader::open(&img).is_ok_and(|r| r.metadata().parent.is_some())
        },
    );
    assert!(
        dir.join("every.chpox.base").exists(),
        "the full image the increments build on is kept"
    );
    agent.chpox_ok(&["unregister", &pid_s]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    assert_eq!(restore_and_verify(&report, &img), sum);
}

/// A tracked mapping grown in place by `mremap` keeps our registration
/// past the range we registered. The next full checkpoint must still take
/// its copy-on-write snapshot (not copy everything while frozen, taking
/// our tracking for the process's own userfaultfd), the mapping must be
/// tracked again after it (not stored whole by every increment), and the
/// increment restores it.
#[test]
fn a_mapping_grown_in_place_stays_tracked() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("grow.chpox");
    let report = s.path("grow.report");
    let mut t = Target::spawn("mapgrow", &[path_str(&report)], &s.logs);
    let pid = t.pid;
    let pid_s = pid.to_string();
    let ready = common::agent::poll(
        "mapgrow READY",
        STATE_TIMEOUT,
        || format!("{:?}", lines(&report)),
        || lines(&report).into_iter().find(|l| l.starts_with("READY ")),
    );
    let addr = u64::from_str_radix(ready.trim_start_matches("READY 0x"), 16).expect("address");
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    let checkpoint = || -> serde_json::Value {
        let out = agent.chpox_ok(&["checkpoint", &pid_s, "--json", "--timeout", "60"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    checkpoint();
    assert!(
        metadata(&img).parent.is_none(),
        "the first checkpoint is full"
    );

    send(pid, libc::SIGUSR1);
    poll_until(
        "mapgrow GROWN",
        STATE_TIMEOUT,
        || format!("{:?}", lines(&report)),
        || lines(&report).iter().any(|l| l == "GROWN"),
    );
    // No base: the next checkpoint is full, with the tracking attached.
    fs::remove_file(dir.join("grow.chpox.base")).expect("remove the base");
    let full = checkpoint();
    assert!(metadata(&img).parent.is_none(), "full again: {full}");
    assert!(
        full["snapshots"].as_u64().unwrap_or(0) >= 1,
        "the full checkpoint took no snapshot: {full}"
    );

    let incr = checkpoint();
    let m = metadata(&img);
    assert!(m.parent.is_some(), "incremental: {incr}");
    let grown = m
        .root
        .vmas
        .iter()
        .find(|v| v.start == addr)
        .unwrap_or_else(|| panic!("no mapping at {addr:#x}"));
    assert_eq!(grown.end - grown.start, 64 * 4096, "{grown:?}");
    let stored: u64 = grown.pages.iter().map(|r| r.npages).sum();
    let inherited: u64 = grown.inherited.iter().map(|r| r.1).sum();
    assert_eq!(
        (stored, inherited),
        (0, 64),
        "an unwritten mapping grown in place is not tracked"
    );

    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    let copy = restore_detached(&img, &[]);
    let before = lines(&report).len();
    send(copy, libc::SIGUSR2);
    let verdict = common::agent::poll(
        "mapgrow VERIFY",
        STATE_TIMEOUT,
        || format!("{:?}", lines(&report)),
        || {
            lines(&report)
                .get(before..)?
                .iter()
                .find(|l| l.starts_with("VERIFY"))
                .cloned()
        },
    );
    send(copy, libc::SIGKILL);
    wait_pid(copy, Duration::from_secs(30));
    common::wait_pid_free(copy);
    assert_eq!(verdict, "VERIFY ok=1", "the restored mapping differs");
}

/// A 4 GiB mapping, sparsely written: the scans of it (walked in parts,
/// on two threads, from 1 GiB up) must see pages written anywhere along
/// it, pairs straddling the cuts between parts included, and the
/// increment restores them.
#[test]
fn written_pages_all_along_a_4_gib_mapping_reach_the_increment() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("sparse.chpox");
    let mut t = Target::spawn("sparse", &["4"], &s.logs);
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_none(),
        "the first checkpoint is full"
    );

    // 64 pages rewritten, one every 64 MiB, and the 63 just below them.
    send(pid, libc::SIGUSR2);
    t.wait_for_line("STEP 1", STATE_TIMEOUT);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    let m = metadata(&img);
    assert!(m.parent.is_some(), "the second checkpoint is incremental");
    let stored = stored_pages(&m);
    assert!(
        (127..1000).contains(&stored),
        "the increment stored {stored} pages; 127 were written along the mapping"
    );

    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    let copy = restore_detached(&img, &[]);
    send(copy, libc::SIGUSR1);
    assert_eq!(
        wait_pid(copy, Duration::from_secs(60)),
        0,
        "{:?}",
        t.lines()
    );
    assert_eq!(t.lines_after_ready(), ["STEP 1", "DONE ok"]);
}

/// Four threads rewriting 128 MiB flat out: an increment would read all
/// of it while the process is frozen, where a full checkpoint's snapshot
/// only copies its page tables. The agent takes a full one, says why,
/// and its image is the memory of one instant.
#[test]
fn a_process_that_rewrote_its_memory_since_the_base_gets_a_full_checkpoint() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("cow.chpox");
    let mut t = Target::spawn("cowwriters", &["4", "32"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let pid_s = t.pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_none(),
        "the first checkpoint is full"
    );
    // A pass over 32 MiB takes each thread tens of milliseconds.
    std::thread::sleep(Duration::from_secs(1));
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_none(),
        "the second checkpoint is full\n{}",
        agent.describe()
    );
    assert_full_checkpoint_logged(&agent, "written since the base");
    let reader = ImageReader::open(&img).expect("image opens");
    let region = reader
        .read_memory(addr, len as usize)
        .expect("read")
        .expect("every page stored");
    let threads: usize = t.ready_value("threads").parse().expect("threads");
    let slice: usize = t.ready_value("slice").parse().expect("slice");
    if let Err(e) = common::dumps::point_in_time(&region, threads, slice) {
        panic!("{e}");
    }
    agent.chpox_ok(&["unregister", &pid_s]);
    t.signal(libc::SIGUSR1);
    t.wait_success(Duration::from_secs(60));
}

/// `memchurn` with 512 MiB: from the third generation on, the pages
/// written since the base are more than an increment reads while frozen,
/// and are read before the freeze; the next increment takes what that
/// reading holds and was not written since, and reads the rest. Each
/// step also discards a page the step before wrote: one read before the
/// freeze must come back a hole. Every increment restores to the memory
/// the process had.
#[test]
fn increments_read_before_the_freeze_restore_like_the_process() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("churn.chpox");
    let (mut t, report) = churn(&s, "512");
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img), "--keep", "2"]);
    let mut sums = Vec::new();
    let mut read_before = Vec::new();
    for g in 1..=6 {
        step(&report, pid, g);
        sums.push(verify(&report, pid));
        let reply: serde_json::Value = serde_json::from_str(&agent.chpox_ok(&[
            "checkpoint",
            &pid_s,
            "--json",
            "--timeout",
            "120",
        ]))
        .expect("checkpoint --json");
        read_before.push(reply["pages_read_before_freeze"].as_u64().expect("field"));
        assert_eq!(
            metadata(&img).parent.is_some(),
            g > 1,
            "generation {g}: only the first is full"
        );
    }
    assert!(
        read_before.iter().filter(|&&p| p > 0).count() >= 2,
        "pages read before the freeze, by generation: {read_before:?}"
    );
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    assert_eq!(
        restore_and_verify(&report, &img),
        sums[5],
        "generation 6 ({read_before:?})"
    );
    assert_eq!(
        restore_and_verify(&report, &dir.join("churn.chpox.1")),
        sums[4],
        "generation 5 ({read_before:?})"
    );
}

/// A job that writes its memory all the while, a page at a time (4
/// threads, ~60 MB/s here): by each checkpoint thousands of pages were
/// written since the base. The agent reads them before the freeze, and
/// while frozen only those written since; every increment is still the
/// memory of one instant, read through its parent, and the last one
/// restores into a process that runs on and exits cleanly.
#[test]
fn a_job_that_keeps_writing_has_its_increments_read_before_the_freeze() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("writing.chpox");
    let mut t = Target::spawn("cowwriters", &["4", "16", "200"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let threads: usize = t.ready_value("threads").parse().expect("threads");
    let slice: usize = t.ready_value("slice").parse().expect("slice");
    let pid_s = t.pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_none(),
        "the first checkpoint is full"
    );
    let mut read_before = Vec::new();
    let mut increments = 0;
    for generation in 2..=5 {
        std::thread::sleep(Duration::from_millis(400));
        let reply: serde_json::Value = serde_json::from_str(&agent.chpox_ok(&[
            "checkpoint",
            &pid_s,
            "--json",
            "--timeout",
            "60",
        ]))
        .expect("checkpoint --json");
        read_before.push(reply["pages_read_before_freeze"].as_u64().expect("field"));
        let meta = metadata(&img);
        increments += usize::from(meta.parent.is_some());
        let reader = ImageReader::open(&img).expect("image opens");
        let region = chpox::incremental::read_memory(&reader, addr, len as usize)
            .expect("read through the parent")
            .expect("every page stored");
        if let Err(e) = common::dumps::point_in_time(&region, threads, slice) {
            panic!(
                "generation {generation} (read before the freeze: {read_before:?}): {e}\n{}",
                agent.describe()
            );
        }
    }
    assert!(
        increments > 0 && read_before.iter().any(|&p| p > 2048),
        "no increment was read before its freeze: {read_before:?}, {increments} increments\n{}",
        agent.describe()
    );
    agent.chpox_ok(&["unregister", &pid_s]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(t.pid);
    let copy = restore_detached(&img, &[]);
    std::thread::sleep(Duration::from_millis(300));
    send(copy, libc::SIGUSR1);
    assert_eq!(
        wait_pid(copy, Duration::from_secs(60)),
        0,
        "the restored job"
    );
}

/// `redis-cli -p PORT ARGS…`, its output trimmed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Redis server in `dir` holding 300 000 keys, and its port.
fn redis_with_keys(s: &Scratch, dir: &Path) -> (Target, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo READY; exec redis-server --save '' --appendonly no --port {port} --bind 127.0.0.1 --daemonize no --enable-debug-command yes"
        ))
        .current_dir(dir);
    common::agent::no_inherited_fds(&mut cmd);
    let t = Target::spawn_command(cmd, "redis", &s.logs);
    poll_until(
        "redis answers",
        STATE_TIMEOUT,
        || t.stdout(),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    assert_eq!(
        redis_cli(port, &["DEBUG", "POPULATE", "300000", "key", "64"]),
        "OK"
    );
    (t, port)
}

/// Generation `g`'s changes to Redis: a few hundred keys set, one big
/// new key, one deleted; Redis's digest of every key and value after.
fn redis_generation(port: u16, g: usize) -> String {
    for i in 0..300 {
        let key = format!("key:{}", (i * 997 + g * 131) % 300_000);
        redis_cli(port, &["SET", &key, &format!("generation {g} value {i}")]);
    }
    redis_cli(port, &["SET", &format!("new:{g}"), &"x".repeat(100_000)]);
    redis_cli(port, &["DEL", &format!("key:{}", 1000 + g)]);
    redis_cli(port, &["DEBUG", "DIGEST"])
}

/// Restore `image` of Redis serving `port`: its digest must be `digest`.
fn restored_redis_digest_is(image: &Path, port: u16, digest: &str, what: &str) {
    let restored = restore_detached(image, &[]);
    assert_eq!(redis_cli(port, &["DEBUG", "DIGEST"]), digest, "{what}");
    assert_eq!(redis_cli(port, &["SET", "after", "restore"]), "OK");
    send(restored, libc::SIGKILL);
    wait_pid(restored, Duration::from_secs(30));
    common::wait_pid_free(restored);
}

/// A real program nobody wrote for chpox: Redis holding 300 000 keys, a
/// few hundred of which change between checkpoints. The increments are a
/// small part of the full image, and the newest restores the very
/// dataset (Redis's own digest of every key and value).
#[test]
fn redis_restored_from_an_increment_has_the_same_dataset() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("redis.chpox");
    let (mut t, port) = redis_with_keys(&s, &dir);
    let pid = t.pid;
    let pid_s = pid.to_string();
    // Connections that come and go between checkpoints come back reset.
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img), "--tcp-close"]);
    let mut digest = String::new();
    let mut full_bytes = 0;
    for g in 0..5 {
        digest = redis_generation(port, g);
        agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
        let bytes = fs::metadata(&img).expect("image").len();
        let m = metadata(&img);
        if g == 0 {
            assert!(m.parent.is_none());
            full_bytes = bytes;
        } else {
            assert!(m.parent.is_some(), "generation {g} is incremental");
            assert!(
                bytes * 3 < full_bytes,
                "increment {g}: {bytes} bytes, the full image {full_bytes}\n{}",
                common::chpox_ok(&["inspect", path_str(&img)])
            );
        }
    }
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    let restored = restore_detached(&img, &[]);
    assert_eq!(redis_cli(port, &["DEBUG", "DIGEST"]), digest);
    assert_eq!(redis_cli(port, &["DBSIZE"]), (300_000 - 5 + 5).to_string());
    assert_eq!(redis_cli(port, &["SET", "after", "restore"]), "OK");
    send(restored, libc::SIGKILL);
    wait_pid(restored, Duration::from_secs(30));
}

/// Redis again, every third checkpoint full (`--full-every 3`): the
/// third is taken from the base (the unchanged pages copied from it once
/// Redis runs again), holds no parent, restores Redis's very dataset of
/// that moment, and the increment after it, built on it, does too.
#[test]
fn redis_full_checkpoint_from_the_base_has_the_same_dataset() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("redis.chpox");
    let (mut t, port) = redis_with_keys(&s, &dir);
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&[
        "register",
        &pid_s,
        "-o",
        path_str(&img),
        "--tcp-close",
        "--full-every",
        "3",
    ]);
    let mut digests = Vec::new();
    for g in 0..5 {
        digests.push(redis_generation(port, g));
        agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
        let m = metadata(&img);
        assert_eq!(
            m.parent.is_none(),
            g % 3 == 0,
            "generation {g}: {:?}",
            m.parent
        );
    }
    assert_full_checkpoint_logged(&agent, "the unchanged pages from the base");
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    // The base is generation 3, the full checkpoint from the first.
    restored_redis_digest_is(
        &dir.join("redis.chpox.base"),
        port,
        &digests[3],
        "generation 3",
    );
    restored_redis_digest_is(&img, port, &digests[4], "generation 4, on it");
}

/// A registered tree (root and two children, each with its own 16 MiB):
/// every process of it is tracked, the second checkpoint inherits from
/// the first for each, and the restored tree holds every word of each
/// process's memory.
#[test]
fn a_tree_is_tracked_process_by_process() {
    use std::os::unix::fs::FileExt;
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("tree.chpox");
    let mut t = Target::spawn("memtree", &["3", "16"], &s.logs);
    let pids: Vec<i32> = t
        .ready_value("pids")
        .split(',')
        .map(|p| p.parse().expect("pid"))
        .collect();
    let len = t.ready_u64("len");
    let mut guard = common::procs::Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid.to_string();
    agent.chpox_ok(&["register", &root, "-o", path_str(&img)]);
    agent.chpox_ok(&["checkpoint", &root, "--timeout", "60"]);
    agent.chpox_ok(&["checkpoint", &root, "--timeout", "60"]);
    let m = metadata(&img);
    assert!(m.parent.is_some(), "the second checkpoint is incremental");
    for p in m.processes() {
        let inherited: u64 = p
            .vmas
            .iter()
            .flat_map(|v| &v.inherited)
            .map(|&(_, n)| n)
            .sum();
        assert!(
            inherited * 4096 >= len,
            "PID {} inherits {inherited} pages",
            p.process.pid
        );
    }
    common::procs::kill_tree(t.pid);
    let _ = t.child.wait();
    // The children are orphans of ours now (we are a subreaper): reap them.
    poll_until(
        "the original tree to be gone",
        STATE_TIMEOUT,
        || format!("{pids:?}"),
        || {
            for &pid in &pids[1..] {
                // SAFETY: reaping a child of ours, if it is one; no memory.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
            pids.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        },
    );
    let restored = restore_detached(&img, &[]);
    guard.watch_tree(restored);
    assert_eq!(restored, pids[0]);
    for (n, &pid) in pids.iter().enumerate() {
        // The process's own region: the anonymous mapping of `len` bytes.
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let start = maps
            .lines()
            .filter_map(|l| {
                let (range, _) = l.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                let (a, b) = (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                );
                (b - a == len).then_some(a)
            })
            .next()
            .unwrap_or_else(|| panic!("PID {pid} has no {len}-byte mapping:\n{maps}"));
        let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
        let mut buf = vec![0u8; len as usize];
        mem.read_exact_at(&mut buf, start).expect("read memory");
        for (w, word) in buf.chunks_exact(8).enumerate() {
            let got = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
            let want = chpox_tests::pattern_word(w as u64 * 8) ^ n as u64;
            assert_eq!(got, want, "PID {pid} word {w}");
        }
    }
}

/// A tracked process that execs has new memory: the next checkpoint is a
/// full one (the log says why), and tracking starts again on the new
/// program.
#[test]
fn after_an_exec_the_next_checkpoint_is_full() {
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("exec.chpox");
    let flag = s.path("go");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo READY; while [ ! -e {} ]; do sleep 0.05; done; exec sleep 100",
        path_str(&flag),
    ));
    common::agent::no_inherited_fds(&mut cmd);
    let mut t = Target::spawn_command(cmd, "exec", &s.logs);
    let pid = t.pid;
    let pid_s = pid.to_string();
    // The shell alone: its short-lived `sleep` children are not the point.
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img), "--no-children"]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_some(),
        "an increment before the exec"
    );
    fs::write(&flag, "").expect("flag");
    poll_until(
        "the exec",
        STATE_TIMEOUT,
        || format!("{:?}", common::procs::cmdline(pid)),
        || {
            common::procs::cmdline(pid)
                .first()
                .is_some_and(|c| c == "sleep")
        },
    );
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_none(),
        "the checkpoint after the exec is full"
    );
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    assert!(
        metadata(&img).parent.is_some(),
        "and the one after it incremental"
    );
    let _ = t.child.kill();
    let _ = t.child.wait();
}

const WRITE_ONCE_SCRIPT: &str = r#"
import hashlib, signal, time
base = bytearray(b"\x01") * (24 << 20)
hot = bytearray(64 * 4096)
tail = None
steps = 0
def step(*_):
    global tail, steps
    steps += 1
    # Written once, after the first (full) checkpoint, never again.
    if tail is None:
        tail = bytearray(b"\x02") * (12 << 20)
    for i in range(0, len(hot), 4096):
        hot[i] = steps & 0xFF
    print(f"STEP {steps}", flush=True)
def total(*_):
    h = hashlib.sha256()
    for part in (base, hot, tail or b""):
        h.update(part)
    print(f"SUM {h.hexdigest()}", flush=True)
signal.signal(signal.SIGUSR1, step)
signal.signal(signal.SIGUSR2, total)
print("READY", flush=True)
while True:
    time.sleep(3600)
"#;

/// Memory written once after the base (the end of a fill, a buffer
/// allocated later) is stored by every increment, since each holds all
/// that changed since the base. Once those unchanged pages, stored again,
/// add up to half of the base, a new base is taken; increments after it
/// are small again, and restore to the process's memory (a Python
/// interpreter).
#[test]
fn pages_stored_again_unchanged_bring_a_new_base() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("once.chpox");
    let mut t = common::python(WRITE_ONCE_SCRIPT, &[], &s.logs);
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    let mut steps = 0;
    let mut next = |t: &mut Target| {
        steps += 1;
        send(pid, libc::SIGUSR1);
        t.wait_for_line(&format!("STEP {steps}"), STATE_TIMEOUT);
        agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
        metadata(&img)
    };
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    let base = metadata(&img);
    assert!(base.parent.is_none(), "the first checkpoint is full");
    let base_pages = stored_pages(&base);
    let tail_pages = (12 << 20) / 4096;
    // Each increment stores the tail: less than half of the base, so the
    // rule on one increment's size never fires; the second and third
    // store it again unchanged, which adds up to more than half.
    for g in 2..=4 {
        let m = next(&mut t);
        assert!(m.parent.is_some(), "checkpoint {g} is an increment");
        let stored = stored_pages(&m);
        assert!(
            stored >= tail_pages && stored * 2 < base_pages,
            "checkpoint {g} stored {stored} pages, the tail is {tail_pages}, the base {base_pages}"
        );
    }
    // Pages are compared only when the buffer that holds them was ready
    // at the checkpoint: on a loaded machine its growth after the first
    // increment can be still under way at the next, which then counts
    // nothing; the new base comes one or two checkpoints later.
    let mut m = next(&mut t);
    for _ in 0..2 {
        if m.parent.is_none() {
            break;
        }
        m = next(&mut t);
    }
    assert!(
        m.parent.is_none(),
        "a new base after the tail was stored three to five times\n{}",
        agent.describe()
    );
    assert_full_checkpoint_logged(&agent, "unchanged pages again");
    let m = next(&mut t);
    assert!(m.parent.is_some(), "and increments after it");
    let stored = stored_pages(&m);
    assert!(
        stored < tail_pages / 2,
        "the increment after the new base stored {stored} pages"
    );
    send(pid, libc::SIGUSR2);
    let sum = t.wait_for_line("SUM ", STATE_TIMEOUT);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    agent.chpox_ok(&["unregister", &pid_s]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    let restored = restore_detached(&img, &[]);
    send(restored, libc::SIGUSR2);
    poll_until(
        "the restored interpreter's sum",
        STATE_TIMEOUT,
        || t.stdout(),
        || t.stdout().matches(sum.trim()).count() == 2,
    );
    send(restored, libc::SIGKILL);
    wait_pid(restored, Duration::from_secs(30));
}

/// `chpox restore --lazy` of an increment: the pages it stores and those
/// it inherits from its parent are both brought in on demand (the server
/// maps the two files), to the memory the process had; a damaged run of
/// the parent kills the restored process before it can read it, and the
/// message names the parent.
#[test]
fn a_lazy_restore_of_an_increment_serves_both_files_and_verifies_the_parent() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("churn.chpox");
    let (mut t, report) = churn(&s, "32");
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    step(&report, pid, 1);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    step(&report, pid, 2);
    let sum = verify(&report, pid);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    let m = metadata(&img);
    let parent = m
        .parent
        .as_ref()
        .expect("the second checkpoint is incremental");
    assert!(parent.pages_inherited > 0, "{parent:?}");
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);

    let restored = restore_detached(&img, &["--lazy"]);
    assert_eq!(verify(&report, restored), sum, "the lazily restored copy");
    // And it goes on, on memory that came from two files.
    step(&report, restored, 3);
    verify(&report, restored);
    send(restored, libc::SIGKILL);
    wait_pid(restored, Duration::from_secs(30));
    common::wait_pid_free(restored);

    // A byte of an inherited page damaged in the parent.
    let base = dir.join("churn.chpox.base");
    let offset = {
        let parent = metadata(&base);
        let vma = m
            .root
            .vmas
            .iter()
            .max_by_key(|v| v.inherited.iter().map(|&(_, n)| n).sum::<u64>())
            .expect("a mapping");
        let &(addr, _) = vma.inherited.first().expect("inherited pages");
        let run = parent
            .root
            .vmas
            .iter()
            .flat_map(|v| &v.pages)
            .find(|r| r.addr <= addr && addr < r.addr + r.npages * 4096)
            .expect("the parent's run of an inherited page");
        run.data.offset + (addr - run.addr) + 100
    };
    let mut bytes = fs::read(&base).expect("read the parent");
    bytes[offset as usize] ^= 0xff;
    fs::write(&base, &bytes).expect("write the parent");
    // Output waits for the page server's stderr to close: it has ended.
    let out = run_chpox(&["restore", "--detach", "--lazy", path_str(&img)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("checksum mismatch") && stderr.contains("parent"),
        "{out:?}"
    );
    if out.status.success() {
        // Started before the server reached the run: killed, never served.
        let pid: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a PID");
        assert_eq!(
            wait_pid(pid, Duration::from_secs(30)),
            128 + libc::SIGKILL,
            "{stderr}"
        );
        common::wait_pid_free(pid);
    }
}

/// The agent's log gives `reason` for a full checkpoint.
fn assert_full_checkpoint_logged(agent: &Agent, reason: &str) {
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("full checkpoint") && l.contains(reason)),
        "the reason is logged:\n{log}"
    );
}
