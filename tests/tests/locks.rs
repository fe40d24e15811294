//! File locks across dump → kill → restore: `flock`, POSIX record locks
//! and open-file-description locks come back held by the restored
//! process; SQLite keeps its write transaction to itself; a lock taken by
//! someone else in between makes the restore fail by name.
//!
//! Needs root (ptrace). Run with `cargo test -p chpox-tests --test locks`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::agent::poll_until;
use common::procs::{exists, restore_detached, signal};
use common::{dump_kill, path_str, python, run_chpox, show, tempdir, wait_pid_free};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Holds one lock of each kind, then idles until SIGTERM.
const HOLDER: &str = r#"import fcntl, os, struct, time
a = open("a", "w")
fcntl.flock(a, fcntl.LOCK_EX)
b = open("b", "w+")
b.write("x" * 100)
b.flush()
fcntl.lockf(b, fcntl.LOCK_SH if False else fcntl.LOCK_EX, 10, 10, 0)
r = open("r", "w+")
fcntl.lockf(r, fcntl.LOCK_SH)
c = os.open("c", os.O_RDWR | os.O_CREAT)
fcntl.fcntl(c, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 100, 0, 0))
print("READY", flush=True)
while True:
    time.sleep(0.1)
"#;

/// Tries, without waiting, the lock `what` on a file in `dir`: prints
/// `got` or `refused ERRNO`.
const PROBE: &str = r#"import fcntl, os, struct, sys
what, name = sys.argv[1], sys.argv[2]
fd = os.open(name, os.O_RDWR)
try:
    if what == "flock-sh":
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    elif what == "posix-rd":
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[3]), 1, 0))
    elif what == "posix-wr":
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, int(sys.argv[3]), 1, 0))
    elif what == "ofd-rd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[3]), 1, 0))
    print("got")
except OSError as e:
    print("refused", e.errno)
"#;

/// What another process gets when it asks for a lock in `dir`.
fn probe(dir: &Path, args: &[&str]) -> String {
    let script = dir.join("probe.py");
    if !script.exists() {
        std::fs::write(&script, PROBE).expect("write probe.py");
    }
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run probe.py");
    assert!(out.status.success(), "probe: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn conflicts(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("flock write on a", probe(dir, &["flock-sh", "a"])),
        (
            "POSIX write on b[10..20)",
            probe(dir, &["posix-rd", "b", "15"]),
        ),
        ("POSIX read on r", probe(dir, &["posix-wr", "r", "0"])),
        (
            "OFD write on c[100..)",
            probe(dir, &["ofd-rd", "c", "4096"]),
        ),
    ]
}

#[test]
fn flock_posix_and_ofd_locks_are_held_again_after_restore() {
    let dir = tempdir();
    let mut t = python(HOLDER, &[], dir.path());
    // Each lock keeps others out while the original runs: the probe is right.
    for (what, got) in conflicts(dir.path()) {
        assert!(got.starts_with("refused"), "{what} before the dump: {got}");
    }
    // Bytes outside the POSIX range are free.
    assert_eq!(probe(dir.path(), &["posix-wr", "b", "50"]), "got");

    let image = dir.path().join("locks.img");
    dump_kill(&mut t, &image, &[]);
    let inspect = common::chpox_ok(&["inspect", path_str(&image)]);
    for expected in [
        "locked: flock write",
        "locked: POSIX write bytes 10-19",
        "locked: POSIX read bytes 0-EOF",
        "locked: OFD write bytes 100-EOF",
    ] {
        assert!(inspect.contains(expected), "no {expected:?}:\n{inspect}");
    }
    // Killed: nobody holds them.
    for (what, got) in conflicts(dir.path()) {
        assert_eq!(got, "got", "{what} while no one runs");
    }

    let pid = restore_detached(&image, &[]);
    assert_eq!(pid, t.pid, "restored with its PID");
    for (what, got) in conflicts(dir.path()) {
        assert!(
            got.starts_with("refused"),
            "{what} after restore: {got}; /proc/locks:\n{}",
            std::fs::read_to_string("/proc/locks").unwrap_or_default()
        );
    }
    assert_eq!(probe(dir.path(), &["posix-wr", "b", "50"]), "got");
    let locks = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
    assert!(
        locks
            .lines()
            .any(|l| l.contains("POSIX") && l.contains(&format!(" {pid} "))),
        "the POSIX locks belong to the restored process:\n{locks}"
    );
    signal(pid, libc::SIGKILL);
    wait_pid_free(pid);
    for (what, got) in conflicts(dir.path()) {
        assert_eq!(got, "got", "{what} once the restored process is gone");
    }
}

/// Opens a table, begins an exclusive transaction, writes a row, and
/// commits only once the file `commit` exists.
const SQLITE_WRITER: &str = r#"import os, sqlite3, time
db = sqlite3.connect("data.db", isolation_level=None, timeout=0)
db.execute("create table if not exists t (v text)")
db.execute("begin exclusive")
db.execute("insert into t values ('inside the transaction')")
print("READY", flush=True)
while not os.path.exists("commit"):
    time.sleep(0.05)
db.execute("insert into t values ('committed after restore')")
db.execute("commit")
print("DONE", flush=True)
"#;

/// Another connection's write: `ok`, or SQLite's error.
fn intrude(dir: &Path) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3\n\
             db = sqlite3.connect('data.db', isolation_level=None, timeout=0)\n\
             try:\n    db.execute(\"insert into t values ('intruder')\")\n    print('ok')\n\
             except sqlite3.OperationalError as e:\n    print(e)\n",
        ])
        .current_dir(dir)
        .output()
        .expect("run the intruding connection");
    assert!(out.status.success(), "intruder: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rows(dir: &Path) -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3\nfor (v,) in sqlite3.connect('data.db').execute('select v from t order by rowid'): print(v)",
        ])
        .current_dir(dir)
        .output()
        .expect("read the table");
    assert!(out.status.success(), "select: {}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn sqlite_keeps_its_write_transaction_to_itself_after_restore() {
    let dir = tempdir();
    let mut t = python(SQLITE_WRITER, &[], dir.path());
    assert_eq!(intrude(dir.path()), "database is locked", "before the dump");
    let image = dir.path().join("sqlite.img");
    dump_kill(&mut t, &image, &[]);

    let pid = restore_detached(&image, &[]);
    // Without its locks back, this connection would find a hot journal,
    // roll the transaction back under the restored writer, and write.
    assert_eq!(
        intrude(dir.path()),
        "database is locked",
        "a second connection got in while the restored one holds its transaction"
    );
    std::fs::write(dir.path().join("commit"), b"").expect("create commit");
    // The restored writer goes on writing to the original's output.
    poll_until(
        "the restored writer commits",
        TIMEOUT,
        || format!("{}\n{}", t.stdout(), t.stderr()),
        || t.stdout().contains("DONE"),
    );
    poll_until("the restored writer exits", TIMEOUT, String::new, || {
        !exists(pid)
    });
    assert_eq!(intrude(dir.path()), "ok", "after the commit");
    assert_eq!(
        rows(dir.path()),
        [
            "inside the transaction",
            "committed after restore",
            "intruder"
        ]
    );
}

#[test]
fn a_lock_taken_by_another_process_meanwhile_fails_the_restore_by_name() {
    let dir = tempdir();
    let mut t = python(HOLDER, &[], dir.path());
    let image = dir.path().join("locks.img");
    dump_kill(&mut t, &image, &[]);

    // Someone else takes file a's lock while no one holds it.
    let mut other = Command::new("flock")
        .args(["a", "sleep", "60"])
        .current_dir(dir.path())
        .spawn()
        .expect("run flock(1)");
    poll_until("flock(1) holds a", TIMEOUT, String::new, || {
        probe(dir.path(), &["flock-sh", "a"]).starts_with("refused")
    });
    let out = run_chpox(&["restore", "--detach", path_str(&image)]);
    let _ = other.kill();
    let _ = other.wait();
    assert!(!out.status.success(), "restore succeeded: {}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("flock write lock")
            && last.contains(&format!("{}/a", dir.path().display()))
            && last.contains("another process holds"),
        "error does not name the lock and the file: {err}"
    );
    // Nothing half-restored is left behind.
    wait_pid_free(t.pid);
    assert!(!exists(t.pid), "a restored process remains");
}
