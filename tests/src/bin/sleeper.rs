//! `sleeper [--report-left SECS]`
//!
//! Prints `READY`, then sleeps 3 s in a single `nanosleep(2)` call. If the
//! sleep fails with `EINTR` (it must not: nothing here handles signals, so
//! a checkpoint/restore has to restart it transparently) it prints `EINTR`
//! and exits 2. Otherwise it prints `DONE slept` and exits 0.
//!
//! With `--report-left SECS` it sleeps SECS seconds instead, the way
//! glibc's `sleep()` and Rust's `thread::sleep` do (`nanosleep(&ts, &ts)`:
//! the kernel leaves the time still to sleep in `ts` when interrupted), and
//! SIGUSR1 (handled, without `SA_RESTART`) cuts the sleep short: it prints
//! `LEFT secs=<whole seconds the kernel said remained>` and exits 0.

use chpox_tests::{arg_or, install_handler, say};

extern "C" fn on_usr1(_: libc::c_int) {}

fn main() {
    let report_left = std::env::args().nth(1).as_deref() == Some("--report-left");
    if report_left {
        install_handler(libc::SIGUSR1, on_usr1, 0, &[]);
    }
    let secs: i64 = if report_left { arg_or(1, 30) } else { 3 };
    say("READY");
    let mut ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let left: *mut libc::timespec = if report_left {
        &mut ts
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: ts is a valid timespec; `left` is null or points to it, which
    // the kernel may write (req and rem may alias).
    let rc = unsafe { libc::nanosleep(&ts, left) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            if report_left {
                say!("LEFT secs={}", ts.tv_sec);
                return;
            }
            say("EINTR");
            std::process::exit(2);
        }
        panic!("nanosleep failed: {err}");
    }
    say("DONE slept");
}
