//! SysV shared memory (`shmget`/`shmat`) comes back as segments: same
//! key, same id (a program keeps it in a variable and calls `shmctl` with
//! it), same size and mode, attached where they were with each piece's
//! protection, shared by the processes of the tree, a segment marked for
//! removal marked again. What a restore could not bring back as it was is
//! refused by name: a segment also attached outside the tree at the dump,
//! a segment of the same key still in use at the restore.
//!
//! The program is a Python interpreter calling libc through ctypes.

mod common;

use std::time::Duration;

use common::agent::{poll_until, send};
use common::procs::restore_detached;
use common::{Target, chpox_ok, path_str, python, run_chpox};

const SCRIPT: &str = r#"
import ctypes, os, signal, sys, time, zlib
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
IPC_CREAT, IPC_RMID, IPC_STAT = 0o1000, 0, 2
key = int(sys.argv[1], 16)
size = 3 * 4096 + 100
keyed = libc.shmget(key, size, IPC_CREAT | 0o640)
private = libc.shmget(0, 8192, IPC_CREAT | 0o600)
assert keyed >= 0 and private >= 0, ctypes.get_errno()
a = libc.shmat(keyed, None, 0)
b = libc.shmat(private, None, 0)
# Marked for removal while attached: it lives while attached.
libc.shmctl(private, IPC_RMID, None)
ctypes.memmove(a, bytes((i * 7) % 251 for i in range(size)), size)
ctypes.memset(b, 0x5A, 4096)
# One attachment, three pieces: the middle page read-only.
libc.mprotect(a + 4096, 4096, 1)
counter = ctypes.c_uint32.from_address(b + 4096)
if os.fork() == 0:
    # The child shares both through fork and counts in the removed one;
    # it goes with its parent (a failed test leaves nothing behind).
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    while True:
        counter.value += 1
        time.sleep(0.01)

class IpcPerm(ctypes.Structure):
    _fields_ = [("key", ctypes.c_int), ("uid", ctypes.c_uint), ("gid", ctypes.c_uint),
                ("cuid", ctypes.c_uint), ("cgid", ctypes.c_uint), ("mode", ctypes.c_ushort),
                ("pad1", ctypes.c_ushort), ("seq", ctypes.c_ushort), ("pad2", ctypes.c_ushort),
                ("pad3", ctypes.c_uint), ("unused1", ctypes.c_ulong), ("unused2", ctypes.c_ulong)]
class ShmidDs(ctypes.Structure):
    _fields_ = [("perm", IpcPerm), ("segsz", ctypes.c_size_t), ("atime", ctypes.c_long),
                ("dtime", ctypes.c_long), ("ctime", ctypes.c_long), ("cpid", ctypes.c_int),
                ("lpid", ctypes.c_int), ("nattch", ctypes.c_ulong),
                ("unused4", ctypes.c_ulong), ("unused5", ctypes.c_ulong)]

def report(*_):
    out = []
    for name, sid, addr, length in (("keyed", keyed, a, size), ("removed", private, b, 4096)):
        d = ShmidDs()
        ok = libc.shmctl(sid, IPC_STAT, ctypes.byref(d)) == 0
        out.append(f"{name}={sid}:{ok}:{d.perm.key:#x}:{d.segsz}:{d.perm.mode:o}:{d.nattch}"
                   f":{zlib.crc32(ctypes.string_at(addr, length)):x}")
    first = counter.value
    time.sleep(0.1)
    print(f"REPORT {' '.join(out)} shared={counter.value > first}", flush=True)
signal.signal(signal.SIGUSR1, report)
print("READY", flush=True)
while True:
    time.sleep(3600)
"#;

/// Held by each test of this file: the first counts the machine's
/// segments around a refused restore, which the others' making and
/// removing theirs at the same time would change.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed holding it poisoned it; the next still runs.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A key of this test run's own.
fn key() -> String {
    format!("{:x}", 0x5e00_0000 | (std::process::id() & 0xff_ffff))
}

/// The segment of `key` (hex) still in the system, if any: its id.
fn segment_of(key_hex: &str) -> Option<i32> {
    let key = i64::from_str_radix(key_hex, 16).expect("hex key") as i32;
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first()?.parse::<i32>().ok()? == key).then(|| f.get(1)?.parse().ok())?
        })
}

/// Removes the test's segment whatever happens.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(id) = segment_of(&self.0) {
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

fn reports(t: &Target) -> Vec<String> {
    t.stdout()
        .lines()
        .filter(|l| l.starts_with("REPORT"))
        .map(str::to_string)
        .collect()
}

fn report(t: &Target, pid: i32) -> String {
    let before = reports(t).len();
    send(pid, libc::SIGUSR1);
    poll_until(
        "a REPORT line",
        Duration::from_secs(20),
        || t.stdout(),
        || reports(t).len() > before,
    );
    reports(t).pop().expect("a report")
}

fn kill_tree(root: i32) {
    for pid in common::procs::tree_pids(root) {
        send(pid, libc::SIGKILL);
    }
}

/// Kill a restored tree and wait until its PIDs are free again.
fn end_tree(root: i32) {
    let pids = common::procs::tree_pids(root);
    kill_tree(root);
    for pid in pids {
        common::wait_pid_free(pid);
    }
}

#[test]
fn segments_come_back_with_their_key_id_pieces_and_sharing() {
    let _one = one_at_a_time();
    let s = common::agent::scratch();
    let key = key();
    let _cleanup = Cleanup(key.clone());
    let mut t = python(SCRIPT, &[&key], &s.logs);
    let before = report(&t, t.pid);
    assert!(before.ends_with("shared=True"), "{before}");
    assert!(
        before.contains(":6:"),
        "three pieces in two processes: {before}"
    );
    let image = s.path("shm.chpox");

    // Restored while the original still runs: the keyed segment is in
    // use, which is named, and nothing is left made.
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    let summary = chpox_ok(&["inspect", path_str(&image)]);
    assert!(
        summary.contains(&format!(
            "key {:#x}",
            i64::from_str_radix(&key, 16).unwrap_or(0)
        )) && summary.contains("(removed)"),
        "{summary}"
    );
    let segments_before = std::fs::read_to_string("/proc/sysvipc/shm").expect("table");
    let out = run_chpox(&["restore", path_str(&image), "--pid", "any"]);
    common::agent::assert_refused("a restore beside the original", &out, "is attached by");
    assert_eq!(
        std::fs::read_to_string("/proc/sysvipc/shm")
            .expect("table")
            .lines()
            .count(),
        segments_before.lines().count(),
        "a refused restore leaves no segment behind"
    );

    // Killed: the keyed segment stays (nobody removed it) and is taken
    // over; the removed one goes and is made again under its id.
    common::dump_kill(&mut t, &image, &[]);
    let restored = restore_detached(&image, &[]);
    let after = report(&t, restored);
    assert_eq!(after, before, "the segments as the program sees them");

    end_tree(restored);
}

#[test]
fn a_segment_attached_outside_the_tree_is_refused_and_the_tree_runs_on() {
    let _one = one_at_a_time();
    let s = common::agent::scratch();
    let key = key().replace("5e", "5f");
    let _cleanup = Cleanup(key.clone());
    let mut t = python(SCRIPT, &[&key], &s.logs);
    let id = segment_of(&key).expect("the segment");
    let mut outsider = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import ctypes, time\n\
                 libc = ctypes.CDLL(None); libc.shmat.restype = ctypes.c_void_p\n\
                 assert libc.shmat({id}, None, 0) not in (None, 2**64 - 1)\n\
                 print('ATTACHED', flush=True); time.sleep(60)"
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the outsider");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(outsider.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "ATTACHED");
    let children = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default()
    };
    let children_before = children(t.pid);
    let image = s.path("shm.chpox");
    let pid_s = t.pid.to_string();
    for extra in [None, Some("--kill")] {
        let mut args = vec!["dump", pid_s.as_str(), "-o", path_str(&image)];
        args.extend(extra);
        let out = run_chpox(&args);
        common::agent::assert_refused(
            "a segment shared with a process outside the tree",
            &out,
            "outside the checkpointed tree",
        );
        assert!(!image.exists(), "no image");
        // Running on, and the failed dump's copy of it reaped.
        assert_eq!(children(t.pid), children_before);
        let r = report(&t, t.pid);
        assert!(r.ends_with("shared=True"), "{r}");
    }
    let _ = outsider.kill();
    let _ = outsider.wait();
    kill_tree(t.pid);
    let _ = t.child.wait();
}

/// Through the agent, an increment (which stores shared memory whole)
/// brings the segments back like a full image.
#[test]
fn an_increment_through_the_agent_keeps_the_segments() {
    let _one = one_at_a_time();
    let s = common::agent::scratch();
    let agent = common::agent::Agent::start(&s);
    let key = key().replace("5e", "5d");
    let _cleanup = Cleanup(key.clone());
    let mut t = python(SCRIPT, &[&key], &s.logs);
    let pid_s = t.pid.to_string();
    let dir = s.dir("out", 0o755);
    let image = dir.join("shm.chpox");
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&image)]);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    let before = report(&t, t.pid);
    agent.chpox_ok(&["checkpoint", &pid_s, "--timeout", "60"]);
    let reader = chpox::image::ImageReader::open(&image).expect("image");
    assert!(reader.metadata().parent.is_some(), "an increment");
    agent.chpox_ok(&["unregister", &pid_s]);
    let pids = common::procs::tree_pids(t.pid);
    kill_tree(t.pid);
    let _ = t.child.wait();
    for pid in pids {
        common::wait_pid_free(pid);
    }
    let restored = restore_detached(&image, &[]);
    assert_eq!(report(&t, restored), before);
    end_tree(restored);
}

/// An attachment a piece of which was unmapped cannot be made by `shmat`:
/// refused by name, the process running on.
#[test]
fn a_segment_attached_in_part_is_refused_by_name() {
    let _one = one_at_a_time();
    let s = common::agent::scratch();
    let key = key().replace("5e", "5c");
    let _cleanup = Cleanup(key.clone());
    let script = format!(
        r#"
import ctypes, time
libc = ctypes.CDLL(None)
libc.shmat.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
sid = libc.shmget(0x{key}, 3 * 4096, 0o1600)
a = libc.shmat(sid, None, 0)
assert libc.munmap(a + 2 * 4096, 4096) == 0
print("READY", flush=True)
time.sleep(3600)
"#
    );
    let mut t = python(&script, &[], &s.logs);
    let image = s.path("part.chpox");
    let out = run_chpox(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    common::agent::assert_refused("a partial attachment", &out, "only in part");
    assert!(!image.exists());
    let state = common::procs::stat(t.pid).map(|s| s.state);
    assert_eq!(state, Some('S'), "running on, not left stopped");
    let _ = t.child.kill();
    let _ = t.child.wait();
}
