//! `resetsig`
//!
//! A program that does, after it was registered, what programs do to the
//! trigger signal and to their descriptors:
//!
//! * SIGUSR1: sets SIGSYS back to `SIG_DFL` (`signal(SIGSYS, SIG_DFL)`)
//!   and prints `RESET`;
//! * SIGUSR2: opens an io_uring instance (a descriptor chpox cannot
//!   restore) and prints `OPENED fd=<n>`;
//! * SIGTERM: prints `DONE ticks=<n>` and exits 0.
//!
//! Prints `READY`, then counts 10 ms ticks until SIGTERM. Requests are
//! taken from flags the handlers set, so all the work runs outside signal
//! context.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{check, install_handler, say, sleep_interruptible};

static RESET: AtomicU32 = AtomicU32::new(0);
static OPEN: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    RESET.store(1, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    OPEN.store(1, Ordering::SeqCst);
}

extern "C" fn on_term(_: libc::c_int) {
    DONE.store(1, Ordering::SeqCst);
}

fn main() {
    install_handler(libc::SIGUSR1, on_usr1, libc::SA_RESTART, &[]);
    install_handler(libc::SIGUSR2, on_usr2, libc::SA_RESTART, &[]);
    install_handler(libc::SIGTERM, on_term, libc::SA_RESTART, &[]);
    say("READY");
    let mut ticks: u64 = 0;
    while DONE.load(Ordering::SeqCst) == 0 {
        if RESET.swap(0, Ordering::SeqCst) != 0 {
            // SAFETY: SIG_DFL installs no handler.
            let old = unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
            assert_ne!(old, libc::SIG_ERR, "signal(SIGSYS, SIG_DFL)");
            say("RESET");
        }
        if OPEN.swap(0, Ordering::SeqCst) != 0 {
            // struct io_uring_params: 120 bytes, zero for the defaults.
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes `params`, which is
            // as large as the kernel's struct.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            let fd = check(fd, "io_uring_setup");
            say!("OPENED fd={fd}");
        }
        sleep_interruptible(Duration::from_millis(10));
        ticks += 1;
    }
    say!("DONE ticks={}", ticks > 0);
}
