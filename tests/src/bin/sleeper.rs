//! `sleeper`
//!
//! Prints `READY`, then sleeps 3 s in a single `nanosleep(2)` call. If the
//! sleep fails with `EINTR` (it must not: nothing here handles signals, so
//! a checkpoint/restore has to restart it transparently) it prints `EINTR`
//! and exits 2. Otherwise it prints `DONE slept` and exits 0.

use chpox_tests::say;

fn main() {
    say("READY");
    let ts = libc::timespec {
        tv_sec: 3,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; no remainder is asked for.
    let rc = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            say("EINTR");
            std::process::exit(2);
        }
        panic!("nanosleep failed: {err}");
    }
    say("DONE slept");
}
