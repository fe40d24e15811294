//! `timers`
//!
//! Holds timers that are not descriptors and, on SIGUSR1, checks that
//! they are all still there as it left them:
//!
//! * `setitimer`: ITIMER_REAL (300 s left, 7 s interval), ITIMER_VIRTUAL
//!   (300 s, 3 s), ITIMER_PROF (400 s, none).
//! * POSIX timers, made with the raw syscall so their kernel IDs are
//!   known: ID 0 CLOCK_MONOTONIC SIGEV_SIGNAL SIGRTMIN+1 value 0x1111,
//!   300 s left, 5 s interval; ID 1 CLOCK_REALTIME SIGEV_NONE, 500 s; ID 2
//!   deleted again (a gap); ID 3 CLOCK_MONOTONIC SIGEV_THREAD_ID to a
//!   `ticker` thread, SIGRTMIN+2 value 0x4444, every 20 ms; ID 4
//!   CLOCK_PROCESS_CPUTIME_ID, disarmed; ID 5 glibc's SIGEV_THREAD timer
//!   (a helper thread of glibc's calls back), every 20 ms.
//!
//! The ticker counts its signals (checking `si_value` and `si_timerid`).
//! Prints `READY ...`; on SIGUSR1 checks: each itimer has its interval and
//! no more time left than before (but not far less), `/proc/self/timers`
//! lists IDs 0, 1, 3, 4 with their signals and clocks, each POSIX timer's
//! interval and time left, and the ticker gets new ticks. Prints one `OK`
//! line per check, `DONE`, exits 0; a failed check panics (exit 101).

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chpox_tests::{check, gettid, mask_signals, say, stop_on_signal, wait_for_stop};

const SEC: u64 = 1_000_000_000;

static TICKS: AtomicU64 = AtomicU64::new(0);
static CALLBACKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_timer(_value: libc::sigval) {
    CALLBACKS.fetch_add(1, Ordering::SeqCst);
}

/// glibc's `timer_create` with SIGEV_THREAD: a helper thread of glibc's
/// runs `on_timer` (the kernel timer is SIGEV_THREAD_ID to that thread).
/// Armed every 20 ms.
fn glibc_thread_timer() {
    // glibc's struct sigevent: value, signo, notify, then the function
    // and its thread attributes.
    let mut ev = [0u64; 8];
    ev[0] = 0x5555;
    ev[1] = (libc::SIGEV_THREAD as u64) << 32;
    ev[2] = on_timer as extern "C" fn(libc::sigval) as usize as u64;
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: ev is a 64-byte struct sigevent; timer a live timer_t.
    check(
        unsafe {
            libc::timer_create(
                libc::CLOCK_MONOTONIC,
                ev.as_mut_ptr().cast::<libc::sigevent>(),
                &mut timer,
            )
        },
        "timer_create(SIGEV_THREAD)",
    );
    let every = libc::timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    let spec = libc::itimerspec {
        it_interval: every,
        it_value: every,
    };
    // SAFETY: timer is ours; spec is live.
    check(
        unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) },
        "timer_settime(SIGEV_THREAD)",
    );
}
static TICKER_TID: AtomicI32 = AtomicI32::new(0);

fn sigrt(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

fn timer_create(clock: i32, notify: i32, signo: i32, value: u64, tid: i32) -> i32 {
    let mut ev = [0u8; 64];
    ev[..8].copy_from_slice(&value.to_ne_bytes());
    ev[8..12].copy_from_slice(&signo.to_ne_bytes());
    ev[12..16].copy_from_slice(&notify.to_ne_bytes());
    ev[16..20].copy_from_slice(&tid.to_ne_bytes());
    let mut id: i32 = -1;
    // SAFETY: ev is a 64-byte sigevent, id a live int the kernel writes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            ev.as_ptr(),
            &mut id as *mut i32,
        )
    };
    check(ret, "timer_create");
    id
}

fn spec(value_ns: u64, interval_ns: u64) -> [i64; 4] {
    [
        (interval_ns / SEC) as i64,
        (interval_ns % SEC) as i64,
        (value_ns / SEC) as i64,
        (value_ns % SEC) as i64,
    ]
}

fn timer_settime(id: i32, value_ns: u64, interval_ns: u64) {
    let s = spec(value_ns, interval_ns);
    // SAFETY: s is an itimerspec (4 longs); no old value asked.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            s.as_ptr(),
            std::ptr::null_mut::<i64>(),
        )
    };
    check(ret, "timer_settime");
}

/// (interval, time left) in ns.
fn timer_gettime(id: i32) -> (u64, u64) {
    let mut s = [0i64; 4];
    // SAFETY: s is an itimerspec the kernel fills.
    let ret = unsafe { libc::syscall(libc::SYS_timer_gettime, id, s.as_mut_ptr()) };
    if ret != 0 {
        panic!("timer_gettime({id}): {}", std::io::Error::last_os_error());
    }
    (
        s[0] as u64 * SEC + s[1] as u64,
        s[2] as u64 * SEC + s[3] as u64,
    )
}

fn setitimer(which: i32, value_ns: u64, interval_ns: u64) {
    let v = [
        (interval_ns / SEC) as i64,
        ((interval_ns % SEC) / 1000) as i64,
        (value_ns / SEC) as i64,
        ((value_ns % SEC) / 1000) as i64,
    ];
    // SAFETY: v is an itimerval (4 longs).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_setitimer,
            which,
            v.as_ptr(),
            std::ptr::null_mut::<i64>(),
        )
    };
    check(ret, "setitimer");
}

/// (interval, time left) in ns.
fn getitimer(which: i32) -> (u64, u64) {
    let mut v = [0i64; 4];
    // SAFETY: v is an itimerval the kernel fills.
    let ret = unsafe { libc::syscall(libc::SYS_getitimer, which, v.as_mut_ptr()) };
    check(ret, "getitimer");
    (
        v[0] as u64 * SEC + v[1] as u64 * 1000,
        v[2] as u64 * SEC + v[3] as u64 * 1000,
    )
}

fn ticker() {
    TICKER_TID.store(gettid(), Ordering::SeqCst);
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a sigset_t we own.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sigrt(2));
    }
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: set and info are live.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig != sigrt(2) {
            continue;
        }
        // SAFETY: a timer's siginfo carries si_value.
        let value = unsafe { info.si_value().sival_ptr } as u64;
        assert_eq!(value, 0x4444, "ticker signal with the wrong si_value");
        assert_eq!(
            info.si_code,
            libc::SI_TIMER,
            "ticker signal not from a timer"
        );
        TICKS.fetch_add(1, Ordering::SeqCst);
    }
}

/// `(id, signal line, notify kind, clock)` of each timer in /proc/self/timers.
fn proc_timers() -> Vec<(i32, String, String, i32)> {
    let text = std::fs::read_to_string("/proc/self/timers").expect("read /proc/self/timers");
    let mut out = Vec::new();
    let mut cur: (i32, String, String, i32) = (0, String::new(), String::new(), 0);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        match k {
            "ID" => cur.0 = v.parse().expect("ID"),
            "signal" => cur.1 = v,
            "notify" => cur.2 = v,
            "ClockID" => {
                cur.3 = v.parse().expect("ClockID");
                out.push(cur.clone());
            }
            _ => {}
        }
    }
    out
}

fn main() {
    // Timer signals go to the ticker alone, or stay pending.
    mask_signals(
        libc::SIG_BLOCK,
        &[
            sigrt(1),
            sigrt(2),
            libc::SIGALRM,
            libc::SIGVTALRM,
            libc::SIGPROF,
        ],
    );
    stop_on_signal(libc::SIGUSR1);
    std::thread::spawn(ticker);
    while TICKER_TID.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let ticker_tid = TICKER_TID.load(Ordering::SeqCst);

    setitimer(libc::ITIMER_REAL, 300 * SEC, 7 * SEC);
    setitimer(libc::ITIMER_VIRTUAL, 300 * SEC, 3 * SEC);
    setitimer(libc::ITIMER_PROF, 400 * SEC, 0);

    let t0 = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_SIGNAL,
        sigrt(1),
        0x1111,
        0,
    );
    let t1 = timer_create(libc::CLOCK_REALTIME, libc::SIGEV_NONE, 0, 0, 0);
    let t2 = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_SIGNAL,
        libc::SIGALRM,
        0,
        0,
    );
    let t3 = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_THREAD_ID,
        sigrt(2),
        0x4444,
        ticker_tid,
    );
    let t4 = timer_create(
        libc::CLOCK_PROCESS_CPUTIME_ID,
        libc::SIGEV_SIGNAL,
        libc::SIGPROF,
        0,
        0,
    );
    assert_eq!(
        [t0, t1, t2, t3, t4],
        [0, 1, 2, 3, 4],
        "the kernel's first timer IDs"
    );
    // SAFETY: plain syscall on our own timer.
    check(
        unsafe { libc::syscall(libc::SYS_timer_delete, t2) },
        "timer_delete",
    );
    timer_settime(t0, 300 * SEC, 5 * SEC);
    timer_settime(t1, 500 * SEC, 0);
    timer_settime(t3, SEC / 50, SEC / 50);
    glibc_thread_timer();

    let real = getitimer(libc::ITIMER_REAL).1;
    let t0_left = timer_gettime(t0).1;
    let listed = proc_timers();
    say!(
        "READY timers={} ticker={ticker_tid} real_left={real} t0_left={t0_left}",
        listed.len()
    );

    wait_for_stop(Duration::from_millis(100));

    // Checks, after the restore.
    let (iv, left) = getitimer(libc::ITIMER_REAL);
    assert_eq!(iv, 7 * SEC, "ITIMER_REAL interval");
    assert!(
        left <= real && left > real - 200 * SEC,
        "ITIMER_REAL left {left} of {real}"
    );
    say!("OK itimer real");
    // CPU-time itimers are kept in ticks: a few ms either way.
    let (iv, left) = getitimer(libc::ITIMER_VIRTUAL);
    assert!(
        iv.abs_diff(3 * SEC) < SEC / 100,
        "ITIMER_VIRTUAL interval {iv}"
    );
    assert!(
        left > 290 * SEC && left <= 300 * SEC + SEC / 20,
        "ITIMER_VIRTUAL left {left}"
    );
    say!("OK itimer virtual");
    let (iv, left) = getitimer(libc::ITIMER_PROF);
    assert_eq!(iv, 0, "ITIMER_PROF interval");
    assert!(
        left > 390 * SEC && left <= 400 * SEC + SEC / 20,
        "ITIMER_PROF left {left}"
    );
    say!("OK itimer prof");

    let ids: Vec<i32> = proc_timers().iter().map(|t| t.0).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1, 3, 4, 5], "timer IDs in /proc/self/timers");
    for t in proc_timers() {
        let want = listed
            .iter()
            .find(|l| l.0 == t.0)
            .unwrap_or_else(|| panic!("timer {} was not there before", t.0));
        assert_eq!(t.1, want.1, "timer {} signal", t.0);
        assert_eq!(t.3, want.3, "timer {} clock", t.0);
        let kind = |n: &str| n.split('.').next().unwrap_or("").to_string();
        assert_eq!(kind(&t.2), kind(&want.2), "timer {} notify", t.0);
    }
    say!("OK posix ids");

    let (iv, left) = timer_gettime(0);
    assert_eq!(iv, 5 * SEC, "timer 0 interval");
    assert!(
        left <= t0_left && left > t0_left - 200 * SEC,
        "timer 0 left {left} of {t0_left}"
    );
    let (iv, left) = timer_gettime(1);
    assert_eq!(iv, 0, "timer 1 interval");
    assert!(left > 300 * SEC && left <= 500 * SEC, "timer 1 left {left}");
    let (iv, _) = timer_gettime(3);
    assert_eq!(iv, SEC / 50, "timer 3 interval");
    assert_eq!(timer_gettime(4), (0, 0), "timer 4 stays disarmed");
    say!("OK posix times");

    let before = TICKS.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TICKS.load(Ordering::SeqCst) < before + 5 {
        assert!(Instant::now() < deadline, "the ticker gets no more ticks");
        std::thread::sleep(Duration::from_millis(10));
    }
    say!("OK ticker");
    let before = CALLBACKS.load(Ordering::SeqCst);
    while CALLBACKS.load(Ordering::SeqCst) < before + 5 {
        assert!(
            Instant::now() < deadline,
            "glibc's SIGEV_THREAD timer calls back no more"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    say!("OK glibc thread timer");
    say!("DONE");
}
