//! The test programs on their own, without chpox: each becomes ready, is
//! signalled where it waits for one, and finishes with the expected
//! output. This is the "uninterrupted run" baseline the checkpoint/restore
//! tests compare against.

mod common;

use std::time::Duration;

use common::{Target, parse_hex, tempdir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `Rss:` of the mapping starting at `addr`, in kB, from smaps.
fn rss_kb(pid: i32, addr: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut in_vma = false;
    for line in smaps.lines() {
        if let Some(start) = range_start(line) {
            in_vma = start == addr;
        } else if in_vma && let Some(v) = line.strip_prefix("Rss:") {
            return v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .expect("Rss value");
        }
    }
    panic!("no mapping at {addr:#x} in /proc/{pid}/smaps");
}

/// Asserts `/proc/PID/maps` has a mapping of exactly `[addr, addr + len)`.
fn assert_vma(pid: i32, addr: u64, len: u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let want = format!("{addr:x}-{:x} rw-p ", addr + len);
    assert!(
        maps.lines().any(|l| l.starts_with(&want)),
        "no VMA {want:?} in /proc/{pid}/maps:\n{maps}"
    );
}

/// Start address of a smaps header line (`start-end perms ...`).
fn range_start(line: &str) -> Option<u64> {
    let range = line.split(' ').next()?;
    let (start, end) = range.split_once('-')?;
    u64::from_str_radix(end, 16).ok()?;
    u64::from_str_radix(start, 16).ok()
}

#[test]
fn mempattern_finishes_with_sum() {
    let dir = tempdir();
    let mut t = Target::spawn(
        "mempattern",
        &["8", "--finish-after-rounds", "20"],
        dir.path(),
    );
    let len = t.ready_u64("len");
    assert_eq!(len, 8 << 20);
    let addr = t.ready_hex("addr");
    assert_vma(t.pid, addr, len);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), [common::mempattern_done(len)]);
}

#[test]
fn avxregs_keeps_registers() {
    let dir = tempdir();
    let mut t = Target::spawn("avxregs", &[], dir.path());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let has = |f: &str| cpuinfo.split_whitespace().any(|w| w == f);
    let want = if has("avx512f") && has("avx512bw") {
        "1"
    } else {
        "0"
    };
    assert_eq!(t.ready_value("avx512"), want);
    // Let it reach the spin loop.
    std::thread::sleep(Duration::from_millis(200));
    t.signal(libc::SIGUSR1);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["REGS OK"]);
}

#[test]
fn openfiles_fds_and_offsets() {
    let dir = tempdir();
    let d = dir.path().to_str().expect("utf-8 tempdir");
    let mut t = Target::spawn("openfiles", &[d], dir.path());
    assert_eq!(t.ready_value("fds"), "10,11,12,13,14,15,16");

    let link = |fd: i32| {
        std::fs::read_link(format!("/proc/{}/fd/{fd}", t.pid))
            .expect("readlink fd")
            .to_string_lossy()
            .into_owned()
    };
    let fdinfo = |fd: i32| {
        let s = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", t.pid)).expect("fdinfo");
        let pos: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("pos:"))
            .expect("pos")
            .trim()
            .parse()
            .expect("pos value");
        let flags = s
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .expect("flags")
            .trim();
        let flags = u64::from_str_radix(flags, 8).expect("flags value") as i32;
        (pos, flags)
    };
    assert_eq!(link(10), format!("{d}/a.txt"));
    assert_eq!(link(11), format!("{d}/b.log"));
    assert_eq!(link(12), format!("{d}/c.bin"));
    assert_eq!(link(13), "/dev/null");
    assert_eq!(link(14), "/dev/zero");
    assert_eq!(link(15), "/dev/urandom");
    assert_eq!(link(16), format!("{d}/deleted.dat (deleted)"));

    let (pos, flags) = fdinfo(10);
    assert_eq!((pos, flags & libc::O_ACCMODE), (123, libc::O_RDWR));
    let (pos, flags) = fdinfo(11);
    assert_eq!(pos, 77);
    assert_eq!(flags & libc::O_ACCMODE, libc::O_WRONLY);
    assert_ne!(flags & libc::O_APPEND, 0);
    let (pos, flags) = fdinfo(12);
    assert_eq!((pos, flags & libc::O_ACCMODE), (4096, libc::O_RDONLY));
    assert_ne!(flags & libc::O_CLOEXEC, 0);
    assert_eq!(fdinfo(13).1 & libc::O_CLOEXEC, 0);
    assert_eq!(fdinfo(16).0, 50);

    t.signal(libc::SIGUSR1);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), common::OPENFILES_OUTPUT);
    let b = std::fs::read(dir.path().join("b.log")).expect("read b.log");
    assert_eq!(b.len(), 78);
    assert_eq!(b.last(), Some(&b'X'));
}

#[test]
fn threads_named_and_counting() {
    let dir = tempdir();
    let mut t = Target::spawn("threads", &["3"], dir.path());
    let tids: Vec<i32> = t
        .ready_value("tids")
        .split(',')
        .map(|s| s.parse().expect("tid"))
        .collect();
    assert_eq!(tids.len(), 3);
    for (i, tid) in tids.iter().enumerate() {
        let comm =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", t.pid)).expect("comm");
        assert_eq!(comm.trim_end(), format!("worker-{i}"));
    }
    assert_ne!(t.ready_hex("counters"), 0);
    t.signal(libc::SIGUSR1);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE", "T0=ok", "T1=ok", "T2=ok"]);
}

#[test]
fn sparse_touches_one_page_per_stride() {
    let dir = tempdir();
    let mut t = Target::spawn("sparse", &["1"], dir.path());
    let len = t.ready_u64("len");
    let stride = t.ready_u64("stride");
    assert_eq!(len, 1 << 30);
    assert_eq!(stride, 64 << 20);
    let addr = t.ready_hex("addr");
    let untouched = t.ready_hex("untouched");
    assert_vma(t.pid, addr, len);
    assert_vma(t.pid, untouched, 1 << 30);
    // One 4 KiB page per stride is resident, nothing else.
    assert_eq!(rss_kb(t.pid, addr), len / stride * 4);
    assert_eq!(rss_kb(t.pid, untouched), 0);
    t.signal(libc::SIGUSR1);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE ok"]);
}

#[test]
fn sleeper_sleeps() {
    let dir = tempdir();
    let mut t = Target::spawn("sleeper", &[], dir.path());
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["DONE slept"]);
}

#[test]
fn reader_reads_fifo() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("cstring");
    // SAFETY: c is a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let mut t = Target::spawn("reader", &[fifo.to_str().expect("utf-8")], dir.path());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        t.child.try_wait().expect("try_wait").is_none(),
        "reader did not block"
    );
    std::fs::write(&fifo, b"hello\n").expect("write fifo");
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["GOT hello\\n"]);
}

#[test]
fn sighandler_counts() {
    let dir = tempdir();
    let mut t = Target::spawn("sighandler", &[], dir.path());
    assert_eq!(t.ready_u64("altsize"), 65536);
    assert_vma(t.pid, t.ready_hex("altstack"), 65536);
    assert_ne!(t.ready_hex("handler"), 0);
    assert_ne!(t.ready_hex("usr2handler"), 0);

    let status = std::fs::read_to_string(format!("/proc/{}/status", t.pid)).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| parse_hex(v.trim()))
            .expect("status field")
    };
    let bit = |sig: i32| 1u64 << (sig - 1);
    assert_ne!(field("SigBlk:") & bit(libc::SIGHUP), 0);
    assert_ne!(field("SigIgn:") & bit(libc::SIGPIPE), 0);
    assert_eq!(
        field("SigCgt:") & (bit(libc::SIGUSR1) | bit(libc::SIGUSR2)),
        bit(libc::SIGUSR1) | bit(libc::SIGUSR2)
    );

    for _ in 0..3 {
        t.signal(libc::SIGUSR1);
        t.wait_not_pending(libc::SIGUSR1, Duration::from_secs(5));
    }
    t.signal(libc::SIGUSR2);
    t.wait_success(EXIT_TIMEOUT);
    assert_eq!(t.lines_after_ready(), ["COUNT=3"]);
}
