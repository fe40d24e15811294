//! TCP and UDP sockets across dump → kill → restore (listening,
//! `--tcp-established`, `--tcp-close`), real servers (`python3 -m
//! http.server`, `redis-server`, a Go program), and a checkpoint through
//! the agent with `--tcp-established`.
//!
//! Needs root (ptrace). Run with `cargo test -p chpox-tests --test
//! sockets_inet`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Command;

use common::agent::poll;
use common::procs::{Guard, exists};
use common::sockets::{Restore, TIMEOUT, fd_kinds, inspect};
use common::{
    Target, chpox_bin, chpox_ok, dump_kill, only_stdio, path_str, python, run_chpox, show, tempdir,
};

// ---------------------------------------------------------------------------
// TCP and UDP

/// One HTTP/1.0 GET of `/` on `port`; the status line and whether the
/// listing names `file`.
fn http_get(port: u16, file: &str) -> (String, bool) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the answer");
    (
        body.lines().next().unwrap_or_default().to_string(),
        body.contains(file),
    )
}

/// A port no socket uses now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn python_http_server_answers_before_and_after_restore() {
    let dir = tempdir();
    std::fs::write(dir.path().join("marker-file.txt"), "x").expect("write");
    let port = free_port();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo READY; exec python3 -m http.server {port} --bind 127.0.0.1"
        ))
        .current_dir(dir.path());
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "http", dir.path());
    let mut guard = Guard::default();
    let pid = t.pid;
    poll(
        "http.server answers",
        TIMEOUT,
        || t.stderr(),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        },
    );
    guard.watch_tree(pid);
    assert_eq!(
        http_get(port, "marker-file.txt"),
        ("HTTP/1.0 200 OK".to_string(), true)
    );
    let image = dir.path().join("http.img");
    dump_kill(&mut t, &image, &[]);
    let kinds = fd_kinds(&inspect(&image));
    assert!(
        kinds
            .iter()
            .any(|k| k["Inet"]["state"] == 10 && k["Inet"]["src_port"] == port),
        "the listening socket is saved: {kinds:?}"
    );
    let _r = Restore::start(&image, &[], dir.path(), None);
    poll("the restored server listens", TIMEOUT, String::new, || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop)
    });
    assert_eq!(
        http_get(port, "marker-file.txt"),
        ("HTTP/1.0 200 OK".to_string(), true),
        "after restore"
    );
    assert!(exists(pid), "the restored server has its PID");
}

/// Server and client in one tree over loopback TCP (IPv4 and IPv6), with
/// bytes in flight both ways at the checkpoint; a UDP pair too. With
/// `--tcp-established` the conversation goes on after the restore.
const TCP_PAIR: &str = r#"import os, socket, sys, time
def wait_for(name):
    while not os.path.exists(name):
        time.sleep(0.02)
out = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0)); srv.listen(4)
    port = srv.getsockname()[1]
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.connect((host, port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a, _ = srv.accept()
    out.append((srv, c, a))
u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u1.bind(("127.0.0.1", 0))
u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u2.bind(("127.0.0.1", 0))
u1.connect(u2.getsockname()); u2.connect(u1.getsockname())
pid = os.fork()
if pid == 0:
    for srv, c, a in out:
        srv.close(); a.close()
        c.sendall(b"x" * 100000)
        assert c.recv(5) == b"hello"
    open("child-ready", "w").close()
    wait_for("go")
    res = []
    for srv, c, a in out:
        c.sendall(b"after")
        data = b""
        while len(data) < 200005:
            data += c.recv(65536)
        res.append(len(data))
    u2.send(b"udp-after")
    print("child", res, flush=True)
    os._exit(0)
for srv, c, a in out:
    c.close()
    a.sendall(b"hello")
    a.sendall(b"y" * 200000)
wait_for("child-ready")
time.sleep(0.3)
print("READY", flush=True)
wait_for("go")
res = []
for srv, c, a in out:
    a.sendall(b"z" * 5)
    data = b""
    while len(data) < 100005:
        data += a.recv(65536)
    res.append((len(data), data.endswith(b"after")))
    c2 = socket.socket(srv.family, socket.SOCK_STREAM)
    c2.connect(srv.getsockname())
    n, _ = srv.accept()
    n.sendall(b"new"); res.append(c2.recv(3))
res.append(u1.recv(100))
_, status = os.waitpid(pid, 0)
print("parent", res, status, flush=True)
"#;

#[test]
fn tcp_connections_inside_the_tree_go_on_with_tcp_established() {
    let dir = tempdir();
    let mut guard = Guard::default();
    let mut t = python(TCP_PAIR, &[], dir.path());
    guard.watch_tree(t.pid);
    let image = dir.path().join("tcp.img");

    let root = t.pid.to_string();
    let out = run_chpox(&["dump", &root, "-o", path_str(&image)]);
    assert!(!out.status.success(), "dumped established connections");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("established") && err.contains("--tcp-established"),
        "the refusal names the connection and what to do: {}",
        show(&out)
    );
    assert!(!image.exists(), "no image after a refusal");

    dump_kill(&mut t, &image, &["--tcp-established"]);
    let kinds = fd_kinds(&inspect(&image));
    let repaired = kinds.iter().filter(|k| !k["Inet"]["tcp"].is_null()).count();
    assert_eq!(repaired, 4, "both ends of both connections: {kinds:?}");
    let mut r = Restore::start(&image, &[], dir.path(), None);
    std::fs::write(dir.path().join("go"), "").expect("create go");
    assert_eq!(r.wait(), 0, "restore: {}\n{}", r.stderr(), t.stderr());
    let mut lines = t.lines_after_ready();
    lines.sort();
    assert_eq!(
        lines,
        [
            "child [200005, 200005]",
            "parent [(100005, True), b'new', (100005, True), b'new', b'udp-after'] 0",
        ],
        "{}",
        t.stderr()
    );
}

/// A server with a client outside the tree (the test): `--tcp-close`
/// brings that connection back reset; the server drops it and serves the
/// next client.
const ECHO_SERVER: &str = r#"import socket, selectors, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4)
sel = selectors.PollSelector()
sel.register(srv, selectors.EVENT_READ)
print("READY port=%d" % srv.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            c, _ = srv.accept()
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = None
            print("reset", flush=True)
        if not data:
            sel.unregister(s); s.close()
            continue
        s.sendall(b"echo:" + data)
"#;

#[test]
fn tcp_close_brings_a_connection_back_reset_and_the_server_serves_the_next() {
    let dir = tempdir();
    let mut guard = Guard::default();
    let mut t = python(ECHO_SERVER, &[], dir.path());
    guard.watch_tree(t.pid);
    let port: u16 = t.ready_value("port").parse().expect("port");
    let mut old = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    old.write_all(b"one").expect("send");
    let mut buf = [0u8; 8];
    old.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"echo:one");
    let image = dir.path().join("echo.img");
    dump_kill(&mut t, &image, &["--tcp-close"]);
    let pid = t.pid;
    let _r = Restore::start(&image, &[], dir.path(), None);
    poll(
        "the server says the old client was reset",
        TIMEOUT,
        || t.stdout(),
        || t.stdout().contains("reset").then_some(()),
    );
    assert!(exists(pid));
    let mut new = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    new.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    new.write_all(b"two").expect("send");
    new.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"echo:two");
}

// ---------------------------------------------------------------------------
// Real servers

/// A Redis client on one connection: RESP commands, one reply each.
struct Redis {
    r: BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl Redis {
    fn connect(port: u16) -> Redis {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        Redis {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        }
    }

    /// The reply to `args`: a status, an integer or a bulk string, as text
    /// (`(nil)` for a missing key).
    fn cmd(&mut self, args: &[&str]) -> String {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.w.write_all(req.as_bytes()).expect("send to redis");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read from redis");
        let line = line.trim_end().to_string();
        match line.strip_prefix('$') {
            Some("-1") => "(nil)".to_string(),
            Some(n) => {
                let n: usize = n.parse().expect("bulk length");
                let mut buf = vec![0u8; n + 2];
                self.r.read_exact(&mut buf).expect("read bulk");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            }
            None => line,
        }
    }
}

#[test]
fn redis_keeps_its_keys_and_its_connected_client_with_tcp_established() {
    let dir = tempdir();
    let port = free_port();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo READY; exec redis-server --save '' --appendonly no --port {port} --bind 127.0.0.1 --daemonize no"
        ))
        .current_dir(dir.path());
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "redis", dir.path());
    let mut guard = Guard::default();
    poll(
        "redis answers",
        TIMEOUT,
        || t.stdout(),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        },
    );
    guard.watch_tree(t.pid);
    let mut old = Redis::connect(port);
    assert_eq!(old.cmd(&["PING"]), "+PONG");
    for i in 0..200 {
        assert_eq!(
            old.cmd(&["SET", &format!("key{i}"), &format!("value{i}")]),
            "+OK"
        );
    }
    let image = dir.path().join("redis.img");
    let root = t.pid.to_string();
    let out = run_chpox(&["dump", &root, "-o", path_str(&image)]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--tcp-established"),
        "without --tcp-established the dump refuses, naming the connection: {}",
        show(&out)
    );
    dump_kill(&mut t, &image, &["--tcp-established"]);
    // The old client is quiet until the restore is done: chpox does not
    // lock the network, and a packet with no socket to go to is answered
    // with a reset.
    let pid = chpox_ok(&["restore", "--detach", path_str(&image)]);
    let pid: i32 = pid.trim().parse().expect("restore --detach prints the PID");
    guard.watch_tree(pid);
    assert_eq!(old.cmd(&["GET", "key7"]), "value7", "the old client");
    assert_eq!(old.cmd(&["SET", "after", "yes"]), "+OK");
    let mut new = Redis::connect(port);
    assert_eq!(new.cmd(&["DBSIZE"]), ":201");
    for i in 0..200 {
        assert_eq!(new.cmd(&["GET", &format!("key{i}")]), format!("value{i}"));
    }
    assert_eq!(new.cmd(&["GET", "after"]), "yes");
    assert_eq!(old.cmd(&["PING"]), "+PONG", "the old client still");
}

/// Goroutines, a ticker and a loopback TCP server and client in one Go
/// program: it talks to itself every 20 ms for 150 rounds, while four
/// goroutines count; checkpointed in the middle, it ends as if nothing
/// happened.
const GO_PROGRAM: &str = r#"package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

func serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func(c net.Conn) {
			r := bufio.NewReader(c)
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					c.Close()
					return
				}
				fmt.Fprintf(c, "echo %s", l)
			}
		}(c)
	}
}

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go serve(ln)
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	r := bufio.NewReader(conn)
	var mu sync.Mutex
	counts := make([]int, 4)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			t := time.NewTicker(5 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					mu.Lock()
					counts[i]++
					mu.Unlock()
				}
			}
		}(i)
	}
	ticker := time.NewTicker(20 * time.Millisecond)
	bad := 0
	for round := 0; round < 150; round++ {
		<-ticker.C
		fmt.Fprintf(conn, "msg %d\n", round)
		l, err := r.ReadString('\n')
		if err != nil || l != fmt.Sprintf("echo msg %d\n", round) {
			bad++
			fmt.Fprintln(os.Stderr, "round", round, l, err)
		}
		if round == 10 {
			fmt.Println("READY")
		}
	}
	close(stop)
	wg.Wait()
	c2, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(c2, "second\n")
	l, _ := bufio.NewReader(c2).ReadString('\n')
	ok := true
	for _, c := range counts {
		ok = ok && c > 0
	}
	fmt.Printf("done bad=%d counted=%v second=%q\n", bad, ok, l)
}
"#;

#[test]
fn a_go_program_with_goroutines_a_timer_and_loopback_tcp_finishes_after_restore() {
    let dir = tempdir();
    let src = dir.path().join("prog.go");
    std::fs::write(&src, GO_PROGRAM).expect("write the Go program");
    let bin = dir.path().join("goprog");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .current_dir(dir.path())
        .env("GOCACHE", dir.path().join("gocache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("GO111MODULE", "off")
        .output()
        .expect("run go build (Debian package golang-go)");
    assert!(out.status.success(), "go build: {}", show(&out));
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir.path());
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "goprog", dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let image = dir.path().join("go.img");
    dump_kill(&mut t, &image, &["--tcp-established"]);
    let mut r = Restore::start(&image, &[], dir.path(), None);
    assert_eq!(r.wait(), 0, "restore: {}\n{}", r.stderr(), t.stderr());
    assert_eq!(
        t.lines_after_ready(),
        ["done bad=0 counted=true second=\"echo second\\n\""],
        "{}",
        t.stderr()
    );
}

// ---------------------------------------------------------------------------
// Through the agent

/// `chpox run --tcp-established`: the agent's checkpoint saves the
/// server's connection in repair mode and gives it back, working, to the
/// server that runs on.
#[test]
fn an_agent_checkpoint_with_tcp_established_leaves_the_connection_working() {
    let s = common::agent::scratch_with_out();
    let agent = common::agent::Agent::start(&s);
    let script = s.logs.join("echo.py");
    std::fs::write(&script, ECHO_SERVER).expect("write the script");
    let img = s.out.join("echo.chpox");
    let mut cmd = agent.client(chpox_bin());
    cmd.args(["run", "--tcp-established", "-o", path_str(&img), "--"])
        .args(["python3", "-u"])
        .arg(&script);
    let t = Target::spawn_command(cmd, "echo", &s.logs);
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    let port: u16 = t.ready_value("port").parse().expect("port");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 8];
    c.write_all(b"one").expect("send");
    c.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"echo:one");
    let printed = agent.chpox_ok(&["checkpoint", &t.pid.to_string(), "--timeout", "60"]);
    assert_eq!(printed.trim(), path_str(&img));
    let kinds = fd_kinds(&inspect(&img));
    assert_eq!(
        kinds.iter().filter(|k| !k["Inet"]["tcp"].is_null()).count(),
        1,
        "the connection saved in repair mode: {kinds:?}"
    );
    c.write_all(b"two").expect("send");
    c.read_exact(&mut buf).expect("echo after the checkpoint");
    assert_eq!(&buf, b"echo:two");
}
