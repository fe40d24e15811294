//! `fdkinds DIR`
//!
//! Holds one descriptor of each kind chpox saves beyond files and pipes,
//! each in a state of its own, prints `READY`, then waits until the file
//! `DIR/go` exists (polling) and checks that every descriptor is still in
//! that state, a line each: `<NAME> ok`, or `<NAME> bad <why>`. Then
//! `DONE` and exit 0. Run it, checkpoint it, kill it, restore it, create
//! `DIR/go`.
//!
//! - `EVENTFD`: an eventfd, EFD_SEMAPHORE, O_NONBLOCK, count 5: five reads
//!   of 1, then EAGAIN. `EVENTFD64`: a blocking eventfd holding 2^40 + 7.
//! - `TIMER_REL`: a relative one-shot timerfd (CLOCK_MONOTONIC) 1000 s
//!   away: between 900 and 1000 s left. `TIMER_ABS`: a TFD_TIMER_ABSTIME
//!   CLOCK_REALTIME timer, every 7 s: its deadline the same within 2 s,
//!   its interval 7 s. `TIMER_TICKS`: a 1 ms one-shot that has fired: one
//!   expiration to read, then disarmed.
//! - `SIGNALFD`: a signalfd for SIGUSR1 and SIGTERM (SIGUSR1 blocked): the
//!   same mask in fdinfo, and a SIGUSR1 sent to itself is read from it.
//! - `EPOLL`: an epoll watching the eventfd (EPOLLIN|EPOLLET, data 0x1234)
//!   and a pipe's read end (EPOLLIN|EPOLLONESHOT, data 0x55), a second
//!   epoll watching the first (EPOLLIN, data 7), a third watching an
//!   eventfd with EPOLLEXCLUSIVE: the same interest lists in fdinfo (fd,
//!   events, data); the second reports data 7, the first 0x1234; writing
//!   the pipe wakes the one-shot entry once; a fourth, shared with the
//!   child, watches an eventfd only the child holds (added by the child):
//!   it reports data 0x77.
//! - `INOTIFY`: watches on `DIR/a` (removed again, so numbers are not
//!   1, 2…), `DIR/f` (IN_MODIFY) and `DIR/b` (IN_CREATE|IN_ONESHOT): the
//!   same watches in fdinfo; creating `DIR/b/new` reads IN_CREATE "new"
//!   on the watch of `DIR/b`.
//! - `MEMFD`: memfd `chpox-test`, "hello memfd", mode 0640, owner
//!   4321:4322, sealed
//!   F_SEAL_SHRINK|F_SEAL_GROW, offset 3; a second description of it,
//!   read-only, at offset 1: name, content, mode, seals, offsets; a write
//!   through one is read through the other.
//! - `PIDFD_SELF`: a pidfd of itself, O_NONBLOCK: fdinfo names its PID.
//!   `PIDFD_CHILD`: a pidfd of a child that waits forever: killing it
//!   through the pidfd is seen by waitpid.
//! - `PIPE_FLAGS`: a pipe's read end, blocking, and a second open of it
//!   (through /proc/self/fd) with O_NONBLOCK: each keeps its own flag.

use std::ffi::CString;
use std::time::Duration;

use chpox_tests::{check, mask_signals, say};

fn arg_dir() -> String {
    std::env::args().nth(1).expect("usage: fdkinds DIR")
}

fn fdinfo(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("read fdinfo")
}

/// fdinfo lines starting with `prefix`, without the `pos:`/`ino:` tails
/// that do not describe the entry itself, sorted (an epoll lists its
/// entries in the order of the files' kernel addresses).
fn lines_of(fd: i32, prefix: &str) -> Vec<String> {
    let mut v = fdinfo(fd)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            l.split_whitespace()
                .filter(|w| {
                    !w.starts_with("pos:") && !w.starts_with("ino:") && !w.starts_with("sdev:")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>();
    v.sort();
    v
}

fn read_u64(fd: i32) -> Result<u64, i32> {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into v.
    let n = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
    if n == 8 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn write_u64(fd: i32, v: u64) {
    // SAFETY: writes 8 bytes from v.
    check(
        unsafe { libc::write(fd, (&raw const v).cast(), 8) },
        "write",
    );
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on our descriptor.
    check(unsafe { libc::fcntl(fd, libc::F_GETFL) }, "F_GETFL")
}

fn verdict(name: &str, problems: Vec<String>) {
    if problems.is_empty() {
        say!("{name} ok");
    } else {
        say!("{name} bad {}", problems.join("; "));
    }
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn gettime(fd: i32) -> libc::itimerspec {
    let mut cur = libc::itimerspec {
        it_interval: ts(0, 0),
        it_value: ts(0, 0),
    };
    // SAFETY: the kernel writes cur.
    check(
        unsafe { libc::timerfd_gettime(fd, &mut cur) },
        "timerfd_gettime",
    );
    cur
}

fn now_realtime() -> f64 {
    let mut t = ts(0, 0);
    // SAFETY: the kernel writes t.
    check(
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) },
        "clock_gettime",
    );
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn secs(t: &libc::timespec) -> f64 {
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn epoll_add(ep: i32, fd: i32, events: u32, data: u64) {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: the kernel reads ev.
    check(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
        "epoll_ctl",
    );
}

fn epoll_wait_one(ep: i32) -> Option<(u32, u64)> {
    let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
    // SAFETY: the kernel writes at most one event.
    let n = unsafe { libc::epoll_wait(ep, ev.as_mut_ptr(), 1, 0) };
    (n == 1).then(|| (ev[0].events, ev[0].u64))
}

fn add_watch(fd: i32, path: &str, mask: u32) -> i32 {
    let c = CString::new(path).expect("path");
    // SAFETY: c is NUL-terminated.
    check(
        unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) },
        "inotify_add_watch",
    )
}

fn main() {
    let dir = arg_dir();

    // eventfds
    // SAFETY: eventfd takes integers.
    let efd = check(
        unsafe { libc::eventfd(5, libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK) },
        "eventfd",
    );
    // SAFETY: as above.
    let efd64 = check(unsafe { libc::eventfd(0, 0) }, "eventfd");
    write_u64(efd64, (1 << 40) + 7);

    // timerfds
    // SAFETY: timerfd_create takes integers.
    let t_rel = check(
        unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) },
        "timerfd_create",
    );
    let spec = libc::itimerspec {
        it_interval: ts(0, 0),
        it_value: ts(1000, 0),
    };
    // SAFETY: the kernel reads spec.
    check(
        unsafe { libc::timerfd_settime(t_rel, 0, &spec, std::ptr::null_mut()) },
        "timerfd_settime",
    );
    // SAFETY: as above.
    let t_abs = check(
        unsafe { libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK) },
        "timerfd_create",
    );
    let deadline = now_realtime().floor() + 500.0;
    let spec = libc::itimerspec {
        it_interval: ts(7, 0),
        it_value: ts(deadline as i64, 0),
    };
    // SAFETY: the kernel reads spec.
    check(
        unsafe {
            libc::timerfd_settime(t_abs, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        },
        "timerfd_settime",
    );
    // SAFETY: as above.
    let t_ticks = check(
        unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK) },
        "timerfd_create",
    );
    let spec = libc::itimerspec {
        it_interval: ts(0, 0),
        it_value: ts(0, 1_000_000),
    };
    // SAFETY: the kernel reads spec.
    check(
        unsafe { libc::timerfd_settime(t_ticks, 0, &spec, std::ptr::null_mut()) },
        "timerfd_settime",
    );
    std::thread::sleep(Duration::from_millis(20));

    // signalfd
    mask_signals(libc::SIG_BLOCK, &[libc::SIGUSR1]);
    // SAFETY: a zeroed sigset_t is valid; filled by sigaddset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: the kernel reads set.
    let sfd = check(
        unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK) },
        "signalfd",
    );
    let sfd_mask = lines_of(sfd, "sigmask:");

    // epoll
    let mut p = [0; 2];
    // SAFETY: pipe writes two descriptors.
    check(unsafe { libc::pipe(p.as_mut_ptr()) }, "pipe");
    // SAFETY: epoll_create1 takes a flag.
    let ep1 = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    // SAFETY: as above.
    let ep2 = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    // SAFETY: as above.
    let ep3 = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    // SAFETY: eventfd takes integers.
    let efd_x = check(unsafe { libc::eventfd(0, 0) }, "eventfd");
    epoll_add(ep1, efd, (libc::EPOLLIN | libc::EPOLLET) as u32, 0x1234);
    epoll_add(ep1, p[0], (libc::EPOLLIN | libc::EPOLLONESHOT) as u32, 0x55);
    epoll_add(ep2, ep1, libc::EPOLLIN as u32, 7);
    epoll_add(
        ep3,
        efd_x,
        (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        0xdead_beef_0000_0001,
    );
    let ep_lines: Vec<Vec<String>> = [ep1, ep2, ep3]
        .iter()
        .map(|&e| lines_of(e, "tfd:"))
        .collect();

    // inotify
    for sub in ["a", "b"] {
        std::fs::create_dir_all(format!("{dir}/{sub}")).expect("mkdir");
    }
    std::fs::write(format!("{dir}/f"), b"x").expect("write f");
    // SAFETY: inotify_init1 takes flags.
    let ino = check(
        unsafe { libc::inotify_init1(libc::IN_NONBLOCK) },
        "inotify_init1",
    );
    let wd_a = add_watch(ino, &format!("{dir}/a"), libc::IN_CREATE);
    let wd_f = add_watch(ino, &format!("{dir}/f"), libc::IN_MODIFY);
    // SAFETY: removes our own watch.
    check(
        unsafe { libc::inotify_rm_watch(ino, wd_a) },
        "inotify_rm_watch",
    );
    let wd_b = add_watch(ino, &format!("{dir}/b"), libc::IN_CREATE | libc::IN_ONESHOT);
    // Drain the IN_IGNORED of the removed watch.
    let mut buf = [0u8; 4096];
    // SAFETY: reads into buf.
    unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
    let ino_lines = lines_of(ino, "inotify");

    // memfd
    let name = CString::new("chpox-test").expect("name");
    // SAFETY: name is NUL-terminated.
    let mfd = check(
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) },
        "memfd_create",
    );
    // SAFETY: writes from a valid slice.
    check(
        unsafe { libc::write(mfd, b"hello memfd".as_ptr().cast(), 11) },
        "write",
    );
    // SAFETY: plain calls on our descriptor.
    unsafe {
        check(libc::fchmod(mfd, 0o640), "fchmod");
        check(libc::fchown(mfd, 4321, 4322), "fchown");
        check(
            libc::fcntl(
                mfd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            ),
            "F_ADD_SEALS",
        );
        check(libc::lseek(mfd, 3, libc::SEEK_SET), "lseek");
    }
    let again = CString::new(format!("/proc/self/fd/{mfd}")).expect("path");
    // SAFETY: again is NUL-terminated.
    let mfd_ro = check(
        unsafe { libc::open(again.as_ptr(), libc::O_RDONLY) },
        "open",
    );
    // SAFETY: plain call on our descriptor.
    check(unsafe { libc::lseek(mfd_ro, 1, libc::SEEK_SET) }, "lseek");

    // pidfds
    // SAFETY: plain syscall.
    let pidfd_self = check(
        unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), libc::O_NONBLOCK) } as i32,
        "pidfd_open",
    );
    // An epoll shared with the child, watching an eventfd only the child
    // holds (added by the child, under the child's number).
    // SAFETY: epoll_create1 takes a flag.
    let ep4 = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    let mut sync = [0; 2];
    // SAFETY: pipe writes two descriptors.
    check(unsafe { libc::pipe(sync.as_mut_ptr()) }, "pipe");
    // SAFETY: the child only makes syscalls.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: eventfd takes integers.
        let own = unsafe { libc::eventfd(1, 0) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0x77,
        };
        // SAFETY: the kernel reads ev; write sends one byte.
        unsafe {
            libc::epoll_ctl(ep4, libc::EPOLL_CTL_ADD, own, &mut ev);
            libc::write(sync[1], b"x".as_ptr().cast(), 1);
        }
        loop {
            // SAFETY: no preconditions.
            unsafe { libc::pause() };
        }
    }
    check(child, "fork");
    let mut byte = [0u8; 1];
    // SAFETY: reads one byte.
    check(
        unsafe { libc::read(sync[0], byte.as_mut_ptr().cast(), 1) },
        "read sync",
    );
    // SAFETY: plain syscall.
    let pidfd_child = check(
        unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) } as i32,
        "pidfd_open",
    );

    // one pipe, two descriptions
    let mut q = [0; 2];
    // SAFETY: pipe writes two descriptors.
    check(unsafe { libc::pipe(q.as_mut_ptr()) }, "pipe");
    let reopen = CString::new(format!("/proc/self/fd/{}", q[0])).expect("path");
    // SAFETY: reopen is NUL-terminated.
    let q_nb = check(
        unsafe { libc::open(reopen.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) },
        "reopen pipe",
    );

    say!("READY pid={} child={child}", std::process::id());
    let go = format!("{dir}/go");
    while !std::path::Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }

    // EVENTFD
    let mut bad = Vec::new();
    if getfl(efd) & libc::O_NONBLOCK == 0 {
        bad.push("not O_NONBLOCK".to_string());
    }
    // The epoll checks below need the count; check it here and put it back.
    for i in 0..5 {
        if read_u64(efd) != Ok(1) {
            bad.push(format!("read {i} not 1"));
        }
    }
    if read_u64(efd) != Err(libc::EAGAIN) {
        bad.push("sixth read not EAGAIN".into());
    }
    write_u64(efd, 5);
    verdict("EVENTFD", bad);
    let mut bad = Vec::new();
    if getfl(efd64) & libc::O_NONBLOCK != 0 {
        bad.push("O_NONBLOCK".to_string());
    }
    match read_u64(efd64) {
        Ok(v) if v == (1 << 40) + 7 => {}
        other => bad.push(format!("read {other:?}")),
    }
    verdict("EVENTFD64", bad);

    // TIMERS
    let cur = gettime(t_rel);
    let left = secs(&cur.it_value);
    verdict(
        "TIMER_REL",
        if (900.0..=1000.0).contains(&left) && secs(&cur.it_interval) == 0.0 {
            vec![]
        } else {
            vec![format!("{left} s left")]
        },
    );
    let cur = gettime(t_abs);
    let got_deadline = now_realtime() + secs(&cur.it_value);
    let mut bad = Vec::new();
    if (got_deadline - deadline).abs() > 2.0 {
        bad.push(format!("deadline {got_deadline}, was {deadline}"));
    }
    if secs(&cur.it_interval) != 7.0 {
        bad.push(format!("interval {}", secs(&cur.it_interval)));
    }
    if getfl(t_abs) & libc::O_NONBLOCK == 0 {
        bad.push("not O_NONBLOCK".into());
    }
    if !fdinfo(t_abs).contains("settime flags: 01") {
        bad.push("not TFD_TIMER_ABSTIME".into());
    }
    verdict("TIMER_ABS", bad);
    let mut bad = Vec::new();
    if read_u64(t_ticks) != Ok(1) {
        bad.push("no expiration to read".to_string());
    }
    if read_u64(t_ticks) != Err(libc::EAGAIN) {
        bad.push("a second expiration".into());
    }
    if secs(&gettime(t_ticks).it_value) != 0.0 {
        bad.push("armed".into());
    }
    verdict("TIMER_TICKS", bad);

    // SIGNALFD
    let mut bad = Vec::new();
    if lines_of(sfd, "sigmask:") != sfd_mask {
        bad.push(format!(
            "mask {:?}, was {sfd_mask:?}",
            lines_of(sfd, "sigmask:")
        ));
    }
    // SAFETY: signals ourselves.
    unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    // SAFETY: a zeroed siginfo is valid; the kernel fills it.
    let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let want = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads one siginfo into si.
    let n = unsafe { libc::read(sfd, (&raw mut si).cast(), want) };
    if n != want as isize || si.ssi_signo != libc::SIGUSR1 as u32 {
        bad.push(format!("read {n}, signal {}", si.ssi_signo));
    }
    verdict("SIGNALFD", bad);

    // EPOLL
    let mut bad = Vec::new();
    for (i, &e) in [ep1, ep2, ep3].iter().enumerate() {
        let now = lines_of(e, "tfd:");
        if now != ep_lines[i] {
            bad.push(format!("epoll {i}: {now:?}, was {:?}", ep_lines[i]));
        }
    }
    match epoll_wait_one(ep2) {
        Some((_, 7)) => {}
        other => bad.push(format!("outer epoll: {other:?}")),
    }
    match epoll_wait_one(ep1) {
        Some((ev, 0x1234)) if ev & libc::EPOLLIN as u32 != 0 => {}
        other => bad.push(format!("inner epoll: {other:?}")),
    }
    // Edge-triggered: reported once.
    if let Some(ev) = epoll_wait_one(ep1) {
        bad.push(format!("edge-triggered entry again: {ev:?}"));
    }
    // SAFETY: writes one byte.
    check(
        unsafe { libc::write(p[1], b"x".as_ptr().cast(), 1) },
        "write",
    );
    match epoll_wait_one(ep1) {
        Some((_, 0x55)) => {}
        other => bad.push(format!("one-shot pipe entry: {other:?}")),
    }
    if let Some(ev) = epoll_wait_one(ep1) {
        bad.push(format!("one-shot entry again: {ev:?}"));
    }
    write_u64(efd_x, 1);
    match epoll_wait_one(ep3) {
        Some((_, 0xdead_beef_0000_0001)) => {}
        other => bad.push(format!("exclusive entry: {other:?}")),
    }
    match epoll_wait_one(ep4) {
        Some((_, 0x77)) => {}
        other => bad.push(format!("entry the child added: {other:?}")),
    }
    verdict("EPOLL", bad);

    // INOTIFY
    let mut bad = Vec::new();
    if lines_of(ino, "inotify") != ino_lines {
        bad.push(format!("{:?}, was {ino_lines:?}", lines_of(ino, "inotify")));
    }
    if wd_f == 1 || wd_b <= wd_f {
        bad.push(format!("watch numbers {wd_f} {wd_b}"));
    }
    std::fs::create_dir(format!("{dir}/b/new")).expect("mkdir b/new");
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: reads into buf.
    let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 16 {
        bad.push(format!("no event ({n})"));
    } else {
        let wd = i32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes"));
        let mask = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
        let len = u32::from_ne_bytes(buf[12..16].try_into().expect("4 bytes")) as usize;
        let name = String::from_utf8_lossy(&buf[16..16 + len]);
        let name = name.trim_end_matches('\0');
        if wd != wd_b || mask & libc::IN_CREATE == 0 || name != "new" {
            bad.push(format!("event wd {wd} mask {mask:#x} name {name:?}"));
        }
    }
    verdict("INOTIFY", bad);

    // MEMFD
    let mut bad = Vec::new();
    let link = std::fs::read_link(format!("/proc/self/fd/{mfd}")).expect("readlink");
    if link.to_string_lossy() != "/memfd:chpox-test (deleted)" {
        bad.push(format!("name {link:?}"));
    }
    // SAFETY: plain calls on our descriptors.
    let (pos, pos_ro, seals) = unsafe {
        (
            libc::lseek(mfd, 0, libc::SEEK_CUR),
            libc::lseek(mfd_ro, 0, libc::SEEK_CUR),
            libc::fcntl(mfd, libc::F_GET_SEALS),
        )
    };
    if (pos, pos_ro) != (3, 1) {
        bad.push(format!("offsets {pos} {pos_ro}"));
    }
    if seals != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
        bad.push(format!("seals {seals:#x}"));
    }
    // SAFETY: a zeroed stat is valid; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::fstat(mfd, &mut st) }, "fstat");
    let owner = (st.st_uid, st.st_gid);
    if st.st_mode & 0o7777 != 0o640 || st.st_size != 11 || owner != (4321, 4322) {
        bad.push(format!(
            "mode {:o} size {} owner {owner:?}",
            st.st_mode & 0o7777,
            st.st_size
        ));
    }
    if getfl(mfd_ro) & libc::O_ACCMODE != libc::O_RDONLY {
        bad.push("second description not read-only".into());
    }
    // SAFETY: writes from a valid slice at offset 3.
    check(
        unsafe { libc::write(mfd, b"LO".as_ptr().cast(), 2) },
        "write",
    );
    let mut got = [0u8; 10];
    // SAFETY: reads 10 bytes into got.
    let n = unsafe { libc::read(mfd_ro, got.as_mut_ptr().cast(), 10) };
    if n != 10 || &got != b"elLO memfd" {
        bad.push(format!("read {:?}", String::from_utf8_lossy(&got)));
    }
    verdict("MEMFD", bad);

    // PIDFDS
    let mut bad = Vec::new();
    let pid_line = format!("Pid:\t{}", std::process::id());
    if !fdinfo(pidfd_self).contains(&pid_line) {
        bad.push(format!("fdinfo {:?}", fdinfo(pidfd_self)));
    }
    if getfl(pidfd_self) & libc::O_NONBLOCK == 0 {
        bad.push("not O_NONBLOCK".into());
    }
    verdict("PIDFD_SELF", bad);
    let mut bad = Vec::new();
    // SAFETY: plain syscall.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd_child,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        bad.push(format!(
            "pidfd_send_signal: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut status = 0;
    // SAFETY: waits for our child.
    let w = unsafe { libc::waitpid(child, &mut status, 0) };
    if w != child || !libc::WIFSIGNALED(status) || libc::WTERMSIG(status) != libc::SIGKILL {
        bad.push(format!("waitpid {w} status {status:#x}"));
    }
    verdict("PIDFD_CHILD", bad);

    // PIPE_FLAGS
    let mut bad = Vec::new();
    if getfl(q[0]) & libc::O_NONBLOCK != 0 {
        bad.push("first open O_NONBLOCK".to_string());
    }
    if getfl(q_nb) & libc::O_NONBLOCK == 0 {
        bad.push("second open not O_NONBLOCK".into());
    }
    let mut one = [0u8; 1];
    // SAFETY: reads into one.
    let n = unsafe { libc::read(q_nb, one.as_mut_ptr().cast(), 1) };
    if n != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
        bad.push(format!("empty non-blocking read gave {n}"));
    }
    verdict("PIPE_FLAGS", bad);
    say!("DONE");
}
