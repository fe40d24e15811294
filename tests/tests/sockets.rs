//! UNIX sockets across dump → kill → restore: a server and its client in
//! one tree, a connection to the outside handed in with `--inherit-fd`,
//! sockets in rarer states, descriptors in flight. TCP, UDP and real
//! servers are in `sockets_inet.rs`.
//!
//! Needs root (ptrace). Run with `cargo test -p chpox-tests --test sockets`.

mod common;

use std::io::{BufRead, BufReader};

use common::procs::Guard;
use common::sockets::{Restore, TIMEOUT, fd_kinds, inspect};
use common::{chpox_ok, dump_kill, path_str, python, run_chpox, show, tempdir};
use serde_json::Value;

// ---------------------------------------------------------------------------
// UNIX sockets

/// A server (parent) and its client (child): a stream connection accepted
/// and talked over, a seqpacket connection to an abstract name not
/// accepted yet, a datagram socket bound to a path holding a message,
/// options set. After the restore both talk on.
const UNIX_SERVER: &str = r#"import os, socket, sys, time
path = os.path.join(os.getcwd(), "srv.sock")
abstract = "\0chpox-test-%d" % os.getpid()
dgpath = os.path.join(os.getcwd(), "dg.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path); srv.listen(8)
os.chmod(path, 0o600)
asrv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
asrv.bind(abstract); asrv.listen(4)
dg = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
dg.bind(dgpath)
dg.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
def wait_for(name):
    while not os.path.exists(name):
        time.sleep(0.02)
pid = os.fork()
if pid == 0:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    q = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    q.connect(abstract)
    c.sendall(b"hello-1")
    got = c.recv(100)
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.sendto(b"dgram-before", dgpath)
    c.sendall(b"unread-at-checkpoint")
    open("connected", "w").close()
    wait_for("go")
    c.sendall(b"hello-2")
    got2 = c.recv(100)
    q.send(b"packet")
    got3 = q.recv(100)
    print("client", got, got2, got3, c.getpeername() == path, flush=True)
    os._exit(0)
conn, _ = srv.accept()
conn.sendall(b"echo:" + conn.recv(100))
wait_for("connected")
time.sleep(0.2)
print("READY", flush=True)
wait_for("go")
first = conn.recv(100)
while len(first) < len(b"unread-at-checkpointhello-2"):
    first += conn.recv(100)
conn.sendall(b"echo:" + first)
qc, _ = asrv.accept()
qc.send(b"ack:" + qc.recv(100))
msg = dg.recv(100)
creds = dg.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)
_, status = os.waitpid(pid, 0)
print("server", first, msg, creds, conn.getsockname() == path, oct(os.stat(path).st_mode & 0o777), status, flush=True)
"#;

#[test]
fn a_unix_socket_server_and_its_client_talk_on_after_restore() {
    let dir = tempdir();
    let mut guard = Guard::default();
    let mut t = python(UNIX_SERVER, &[], dir.path());
    guard.watch_tree(t.pid);
    let image = dir.path().join("unix.img");
    dump_kill(&mut t, &image, &[]);
    let img = inspect(&image);
    let kinds = fd_kinds(&img);
    let unix: Vec<&Value> = kinds.iter().filter(|k| !k["Unix"].is_null()).collect();
    assert!(
        unix.iter().any(|k| k["Unix"]["listening"] == true
            && k["Unix"]["pending"]
                .as_array()
                .is_some_and(|p| p.len() == 1)),
        "a listener with one connection not accepted yet: {unix:?}"
    );
    assert!(
        unix.iter().any(|k| !k["Unix"]["queued"].is_null()),
        "unread data saved: {unix:?}"
    );
    let mut r = Restore::start(&image, &[], dir.path(), None);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    let code = r.wait();
    assert_eq!(code, 0, "restore: {}\n{}", r.stderr(), t.stderr());
    let mut lines: Vec<String> = t.lines_after_ready();
    lines.sort();
    assert_eq!(
        lines,
        [
            "client b'echo:hello-1' b'echo:unread-at-checkpointhello-2' b'ack:packet' True",
            "server b'unread-at-checkpointhello-2' b'dgram-before' 1 True 0o600 0",
        ],
        "{}",
        t.stderr()
    );
}

/// Connected to a listener outside the checkpoint (the test's): the dump
/// names it; the restore refuses without a replacement, and with
/// `--inherit-fd 3=5` the program writes on the connection it is given.
const UNIX_CLIENT: &str = r#"import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
print("READY fd=%d" % s.fileno(), flush=True)
while not os.path.exists("go"):
    time.sleep(0.02)
s.sendall(b"after restore\n")
print("sent", flush=True)
"#;

#[test]
fn a_unix_socket_to_the_outside_is_named_and_handed_in_with_inherit_fd() {
    let dir = tempdir();
    let sock_path = dir.path().join("daemon.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path).expect("bind");
    let mut guard = Guard::default();
    let mut t = python(UNIX_CLIENT, &[path_str(&sock_path)], dir.path());
    guard.watch_tree(t.pid);
    assert_eq!(t.ready_value("fd"), "3");
    let (_first, _) = listener.accept().expect("accept the first connection");
    let image = dir.path().join("client.img");
    dump_kill(&mut t, &image, &[]);
    let kinds = fd_kinds(&inspect(&image));
    assert!(
        kinds.iter().any(|k| k["External"]["was"]
            .as_str()
            .is_some_and(|w| w.contains("daemon.sock"))),
        "fd 3 is named as connected to the outside: {kinds:?}"
    );
    let summary = chpox_ok(&["inspect", path_str(&image)]);
    assert!(
        summary.contains("--inherit-fd FD=N"),
        "inspect says what to do: {summary}"
    );

    let out = run_chpox(&["restore", path_str(&image)]);
    assert!(!out.status.success(), "restored without a replacement");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fd 3") && err.contains("--inherit-fd"),
        "the refusal names the descriptor: {}",
        show(&out)
    );

    let replacement = std::os::unix::net::UnixStream::connect(&sock_path).expect("connect");
    let (mut second, _) = listener.accept().expect("accept the replacement");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&replacement);
    let mut r = Restore::start(&image, &["--inherit-fd", "3=5"], dir.path(), Some(fd));
    drop(replacement);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    second
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut line = String::new();
    BufReader::new(&mut second)
        .read_line(&mut line)
        .expect("read from the restored program");
    assert_eq!(line, "after restore\n", "restore: {}", r.stderr());
    assert_eq!(r.wait(), 0, "restore: {}", r.stderr());
    assert!(t.stdout().ends_with("sent\n"), "{}", t.stdout());
}

/// The rarer states: a socket bound to a relative path, a stream whose
/// peer closed with data left to read (then end of file), a shut down
/// end, a datagram socket connected to a named socket outside the
/// checkpoint (as syslog's to /dev/log), which is connected to it again.
const UNIX_STATES: &str = r#"import os, socket, sys, time
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.connect(sys.argv[1])
rel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
rel.bind("rel.sock"); rel.listen(1)
a, b = socket.socketpair()
b.sendall(b"last words"); b.close()
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
c.shutdown(socket.SHUT_WR)
d.setblocking(False)
print("READY", flush=True)
while not os.path.exists("go"):
    time.sleep(0.02)
log.send(b"to the log")
x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
x.connect("rel.sock")
y, _ = rel.accept()
x.sendall(b"rel"); got = y.recv(10)
print(a.recv(100), a.recv(100), d.recv(10), got, rel.getsockname(), d.getblocking(), flush=True)
"#;

#[test]
fn unix_sockets_in_rarer_states_come_back_as_they_were() {
    let dir = tempdir();
    let log_path = dir.path().join("log.sock");
    let log = std::os::unix::net::UnixDatagram::bind(&log_path).expect("bind the log");
    log.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut guard = Guard::default();
    let mut t = python(UNIX_STATES, &[path_str(&log_path)], dir.path());
    guard.watch_tree(t.pid);
    let image = dir.path().join("states.img");
    dump_kill(&mut t, &image, &[]);
    let mut r = Restore::start(&image, &[], dir.path(), None);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    let mut buf = [0u8; 64];
    let n = log.recv(&mut buf).expect("the restored program logs");
    assert_eq!(&buf[..n], b"to the log");
    assert_eq!(r.wait(), 0, "restore: {}\n{}", r.stderr(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        ["b'last words' b'' b'' b'rel' rel.sock False"],
        "{}",
        t.stderr()
    );
}

/// A descriptor the checkpoint does not keep (a netlink socket), replaced
/// by /dev/null on request: `inspect` says so, and the restore warns once
/// for it, naming it.
#[test]
fn a_descriptor_replaced_by_dev_null_is_shown_and_warned_about() {
    let dir = tempdir();
    let mut guard = Guard::default();
    let mut t = python(
        "import socket, os, time\n\
         n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n\
         print('READY fd=%d' % n.fileno(), flush=True)\n\
         while not os.path.exists('go'):\n    time.sleep(0.02)\n\
         print(os.readlink('/proc/self/fd/%d' % n.fileno()), flush=True)\n",
        &[],
        dir.path(),
    );
    guard.watch_tree(t.pid);
    let fd = t.ready_value("fd").to_string();
    let image = dir.path().join("null.img");
    dump_kill(&mut t, &image, &["--unsupported-fd=null"]);
    let summary = chpox_ok(&["inspect", path_str(&image)]);
    assert!(
        summary
            .lines()
            .any(|l| l.trim_start().starts_with(&fd) && l.contains("restored as /dev/null")),
        "inspect says fd {fd} is /dev/null: {summary}"
    );
    let mut r = Restore::start(&image, &[], dir.path(), None);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(r.wait(), 0, "restore: {}", r.stderr());
    let stderr = common::agent::strip_ansi(&r.stderr());
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("/dev/null")).collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    assert!(warnings[0].contains(&format!("fd {fd}")), "{stderr}");
    assert_eq!(t.lines_after_ready(), ["/dev/null"]);
}

/// Descriptors in flight (SCM_RIGHTS): a file at an offset and a
/// directory sent to the child with a message, received after the
/// restore; a pipe in flight fails the dump by name.
const IN_FLIGHT: &str = r#"import os, socket, sys, time
with open("data.txt", "w") as f:
    f.write("0123456789")
a, b = socket.socketpair()
f = open("data.txt", "rb"); f.seek(3)
d = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
socket.send_fds(a, [b"first"], [f.fileno(), d])
a.sendall(b"|plain")
if sys.argv[1] == "pipe":
    r, w = os.pipe()
    socket.send_fds(a, [b"pipe"], [r])
pid = os.fork()
if pid == 0:
    a.close()
    while not os.path.exists("go"):
        time.sleep(0.02)
    msg, fds, _, _ = socket.recv_fds(b, 100, 4)
    rest = b.recv(100)
    print(msg, rest, os.read(fds[0], 100), sorted(os.listdir(fds[1]))[:1], flush=True)
    os._exit(0)
f.close(); os.close(d)
print("READY", flush=True)
os.waitpid(pid, 0)
"#;

#[test]
fn descriptors_in_flight_over_a_unix_socket_arrive_after_restore() {
    let dir = tempdir();
    let mut guard = Guard::default();
    let mut t = python(IN_FLIGHT, &["files"], dir.path());
    guard.watch_tree(t.pid);
    let image = dir.path().join("flight.img");
    dump_kill(&mut t, &image, &[]);
    let mut r = Restore::start(&image, &[], dir.path(), None);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(r.wait(), 0, "restore: {}\n{}", r.stderr(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        ["b'first' b'|plain' b'3456789' ['data.txt']"],
        "{}",
        t.stderr()
    );

    let dir = tempdir();
    let t = python(IN_FLIGHT, &["pipe"], dir.path());
    guard.watch_tree(t.pid);
    let out = run_chpox(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&dir.path().join("p.img")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("in flight") && err.contains("pipe:["),
        "a pipe in flight is refused by name: {}",
        show(&out)
    );
}
