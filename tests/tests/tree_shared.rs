//! Process trees whose processes share something besides their tree: a
//! pipeline with data in its pipes, a file offset and a shared mapping, a
//! named FIFO with unread bytes, socket pairs with queued data, a
//! filesystem context. As in `tree.rs`, each test dumps a real tree and
//! restores it, and the restored tree must do what an uninterrupted run
//! does; the `fixture_*` tests are that baseline.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::agent::poll;
use common::procs::{Guard, Stat, stat, tree, tree_pids};
use common::tree::{
    Dump, Image, Job, SHARED_OK, TIMEOUT, describe_tree, dump, finish_original, forktree, int,
    job_output, ready_pid, restore_and_wait, restore_detached, restore_job, wait_lines,
};
use common::{path_str, tempdir};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A pipeline, with data in its pipes

/// Three stages and a checksum; awk sleeps 0.3 s every 30000 lines (in a
/// child of its own, `system`), so the run takes about 3 s and `seq` keeps
/// the first pipe full. `$1` is the output file.
const PIPELINE: &str = r#"seq 1 300000 | awk '{print $1*7 % 1000003; if (NR%30000==0) system("sleep 0.3")}' | sort -n | md5sum > "$1""#;

fn start_pipeline(out: &Path, dir: &Path) -> Job {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", PIPELINE, "bash"]).arg(out).current_dir(dir);
    Job::spawn(cmd, "pipeline", dir)
}

/// Checkpointed during awk's third sleep, with bytes in the pipes: the
/// restored pipeline ends with the checksum of an uninterrupted run (run
/// alongside).
fn pipeline_resume(how: Dump) {
    let dir = tempdir();
    let expected_out = dir.path().join("expected.md5");
    let mut baseline = start_pipeline(&expected_out, dir.path());
    let out = dir.path().join("out.md5");
    let mut job = start_pipeline(&out, dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(job.pid);
    let root = job.pid;

    let mut sleeps = BTreeSet::new();
    poll(
        "awk's third sleep",
        TIMEOUT,
        || {
            format!(
                "{}\n--- tree ---\n{}",
                job_output(&job),
                describe_tree(root)
            )
        },
        || {
            let now: Vec<Stat> = tree(root)
                .into_iter()
                .filter(|s| s.comm == "sleep")
                .collect();
            sleeps.extend(now.iter().map(|s| s.pid));
            (sleeps.len() >= 3 && now.iter().any(|s| s.state == 'S')).then_some(())
        },
    );
    assert!(job.running(), "{}", job.describe());

    let image = dir.path().join("pipeline.img");
    let pids = dump(root, &image, how, &[]);
    let img = Image::inspect(&image);
    let comms: Vec<String> = img
        .processes()
        .iter()
        .map(|p| p["process"]["comm"].as_str().unwrap_or("").to_string())
        .collect();
    for want in ["bash", "seq", "sort", "md5sum"] {
        assert!(
            comms.iter().any(|c| c == want),
            "no {want} in the image: {}",
            img.summary()
        );
    }
    assert!(
        comms.iter().any(|c| c.contains("awk")),
        "no awk in the image: {}",
        img.summary()
    );
    let pipes_with_bytes = img
        .processes()
        .iter()
        .flat_map(|p| p["fds"].as_array().into_iter().flatten())
        .filter(|e| {
            let pipe = &e["kind"]["Pipe"];
            pipe["internal"] == Value::Bool(true) && !pipe["data"].is_null()
        })
        .count();
    assert!(
        pipes_with_bytes > 0,
        "no pipe between the stages holds unread bytes in the image: {}",
        img.summary()
    );
    finish_original(&mut job.child, how, &pids);
    if how == Dump::Kill {
        assert_eq!(
            std::fs::read_to_string(&out).unwrap_or_default(),
            "",
            "md5sum wrote before the checkpoint"
        );
    }
    // md5sum writes at offset 0 at the end: what the original may have
    // written after the checkpoint must not count.
    std::fs::write(&out, "").expect("empty the output");

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "chpox stderr: {stderr}\n{}", job_output(&job));
    let status = baseline.wait(TIMEOUT);
    assert!(status.success(), "{}", baseline.describe());
    let expected = std::fs::read_to_string(&expected_out).expect("read expected checksum");
    assert!(
        expected.ends_with("  -\n") && expected.len() == 32 + 4,
        "not an md5sum line: {expected:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("read checksum"),
        expected,
        "{}",
        job_output(&job)
    );
    assert_eq!(job.stderr(), "", "the pipeline's stderr");
}

#[test]
fn pipeline_ends_with_the_same_checksum_after_dump_kill() {
    pipeline_resume(Dump::Kill);
}

#[test]
fn pipeline_ends_with_the_same_checksum_after_dump_leaving_it_running() {
    pipeline_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// A file offset and a shared mapping that parent and child share

const SHARED_LOG: &str = "parent-before\nchild-before\nparent-after\nchild-after\n";

#[test]
fn fixture_forktree_shared_shares_offset_and_memory() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["shared", &d], dir.path());
    let child = ready_pid(&t, "child");
    assert_eq!(stat(child).map(|s| s.ppid), Some(t.pid));
    std::fs::write(dir.path().join("go"), "").expect("create go");
    t.wait_success(TIMEOUT);
    assert_eq!(t.lines_after_ready(), SHARED_OK);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("shared.log")).expect("read shared.log"),
        SHARED_LOG
    );
}

fn shared_resume(how: Dump) {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["shared", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");
    let fd: i32 = t.ready_value("fd").parse().expect("fd number");
    assert_eq!(stat(child).map(|s| s.ppid), Some(root));

    let image = dir.path().join("shared.img");
    let pids = dump(root, &image, how, &[]);
    assert_eq!(pids, BTreeSet::from([root, child]));
    let img = Image::inspect(&image);
    assert_eq!(img.all_pids(), pids, "{}", img.summary());
    assert_eq!(int(&img.process(child)["process"]["ppid"]), root);
    for pid in [root, child] {
        let path = img.fd(pid, fd)["kind"]["RegularFile"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("fd {fd} of {pid}: {}", img.fd(pid, fd)))
            .to_string();
        assert!(path.ends_with("/shared.log"), "fd {fd} of {pid}: {path}");
    }
    finish_original(&mut t.child, how, &pids);

    let mut restore = restore_job(&image, &[], dir.path());
    std::fs::write(dir.path().join("go"), "").expect("create go");
    let status = restore.wait(TIMEOUT);
    assert!(
        status.success(),
        "restored root: {status}; {}\n--- program output ---\n{}",
        restore.describe(),
        t.stdout()
    );
    assert_eq!(t.lines_after_ready(), SHARED_OK, "{}", t.stderr());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("shared.log")).expect("read shared.log"),
        SHARED_LOG
    );
}

#[test]
fn parent_and_child_share_offset_and_memory_after_dump_kill() {
    shared_resume(Dump::Kill);
}

#[test]
fn parent_and_child_share_offset_and_memory_after_dump_leaving_them_running() {
    shared_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// A named FIFO between two processes of the tree, with unread bytes

const FIFO_SCRIPT: &str = r#"fifo="$1"
(sleep 2; wc -c < "$fifo") &
exec 3<>"$fifo"
seq 1 1000 >&3
echo written
sleep 3
exec 3>&-
wait
"#;

fn fifo_resume(how: Dump) {
    let dir = tempdir();
    let fifo = dir.path().join("f");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let script = dir.path().join("fifo.sh");
    std::fs::write(&script, FIFO_SCRIPT).expect("write the script");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&fifo).current_dir(dir.path());
    let mut job = Job::spawn(cmd, "fifo", dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(job.pid);
    let root = job.pid;
    // The writer is done, the reader still asleep: the bytes are in the FIFO.
    poll(
        "bytes written into the FIFO",
        TIMEOUT,
        || job.describe(),
        || job.stdout().contains("written").then_some(()),
    );
    let image = dir.path().join("fifo.img");
    let pids = dump(root, &image, how, &[]);
    let img = Image::inspect(&image);
    let stored = img
        .processes()
        .iter()
        .flat_map(|p| p["fds"].as_array().into_iter().flatten())
        .filter(|e| !e["kind"]["Fifo"]["data"].is_null())
        .count();
    assert_eq!(
        stored,
        1,
        "the FIFO's bytes, stored once: {}",
        img.summary()
    );
    finish_original(&mut job.child, how, &pids);

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "chpox stderr: {stderr}\n{}", job.describe());
    // The job's stdout is its file, reopened at the saved offset.
    let expected = (1..=1000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .len();
    assert_eq!(
        job.stdout(),
        format!("written\n{expected}\n"),
        "the reader got every byte"
    );
}

#[test]
fn fifo_bytes_reach_the_reader_after_dump_kill() {
    fifo_resume(Dump::Kill);
}

#[test]
fn fifo_bytes_reach_the_reader_after_dump_leaving_it_running() {
    fifo_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// UNIX socket pairs between a parent and its child, with queued data

/// Python: stream, datagram and seqpacket pairs; each side sends before
/// the checkpoint, the child reads after it.
const SOCKETPAIR_SCRIPT: &str = r#"import os, socket, time
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    s1.close(); d1.close(); q1.close()
    s2.sendall(b"child-to-parent " * 100)
    while not os.path.exists("go"):
        time.sleep(0.02)
    s2.setblocking(False)
    data = b""
    try:
        while True:
            chunk = s2.recv(65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    msgs = [d2.recv(100) for _ in range(3)]
    packets = [q2.recv(100) for _ in range(2)]
    print("child", len(data), data == bytes(range(256)) * 20, msgs, packets, flush=True)
    os._exit(0)
s2.close(); d2.close(); q2.close()
s1.sendall(bytes(range(256)) * 20)
for m in (b"one", b"two", b"three"):
    d1.send(m)
for m in (b"p1", b"p2-longer"):
    q1.send(m)
print("sent", flush=True)
_, status = os.waitpid(pid, 0)
s1.setblocking(False)
got = s1.recv(100000)
print("parent", len(got), got == b"child-to-parent " * 100, status, flush=True)
"#;

fn socketpair_resume(how: Dump) {
    let dir = tempdir();
    let script = dir.path().join("pairs.py");
    std::fs::write(&script, SOCKETPAIR_SCRIPT).expect("write the script");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).current_dir(dir.path());
    let mut job = Job::spawn(cmd, "pairs", dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(job.pid);
    let root = job.pid;
    poll(
        "both sides sent",
        TIMEOUT,
        || format!("{}\n{}", job.describe(), describe_tree(root)),
        || (job.stdout().contains("sent") && tree_pids(root).len() == 2).then_some(()),
    );
    // Let the child's send land too.
    std::thread::sleep(Duration::from_millis(200));
    let image = dir.path().join("pairs.img");
    let pids = dump(root, &image, how, &[]);
    let img = Image::inspect(&image);
    let queued = img
        .processes()
        .iter()
        .flat_map(|p| p["fds"].as_array().into_iter().flatten())
        .filter(|e| !e["kind"]["Unix"]["queued"].is_null())
        .count();
    assert_eq!(queued, 4, "ends holding unread data: {}", img.summary());
    finish_original(&mut job.child, how, &pids);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "chpox stderr: {stderr}\n{}", job.describe());
    assert_eq!(
        job.stdout(),
        "sent\nchild 5120 True [b'one', b'two', b'three'] [b'p1', b'p2-longer']\nparent 1600 True 0\n",
        "{}",
        job.stderr()
    );
}

#[test]
fn socket_pairs_keep_their_queued_data_after_dump_kill() {
    socketpair_resume(Dump::Kill);
}

#[test]
fn socket_pairs_keep_their_queued_data_after_dump_leaving_them_running() {
    socketpair_resume(Dump::LeaveRunning);
}

// ---------------------------------------------------------------------------
// A filesystem context shared by parent and child (clone with CLONE_FS)

/// The child changes directory and umask after the restore; the parent
/// sees both: the context came back shared, not copied.
#[test]
fn a_filesystem_context_shared_through_clone_fs_comes_back_shared() {
    let dir = tempdir();
    let d = path_str(dir.path()).to_string();
    let mut t = forktree(&["sharedfs", &d], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let root = t.pid;
    let child = ready_pid(&t, "child");
    let image = dir.path().join("sharedfs.img");
    let pids = dump(root, &image, Dump::Kill, &[]);
    assert_eq!(pids, BTreeSet::from([root, child]));
    let img = Image::inspect(&image);
    assert_eq!(
        img.process(child)["process"]["shares_fs_with_parent"],
        Value::Bool(true),
        "{}",
        img.summary()
    );
    finish_original(&mut t.child, Dump::Kill, &pids);
    let restored = restore_detached(&image, &[], dir.path());
    guard.watch_tree(restored);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(
        wait_lines(&t, 2, root),
        ["CWD sub", "UMASK 77"],
        "{}",
        t.stderr()
    );
}
