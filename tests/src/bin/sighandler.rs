//! `sighandler`
//!
//! Sets up signal state for a dump to capture:
//!
//! * SIGUSR1: handler `on_usr1` counts deliveries in an `AtomicU32`;
//!   flags `SA_RESTART|SA_ONSTACK`, `sa_mask` = {SIGUSR2} (so a SIGUSR2
//!   sent right after a SIGUSR1 cannot report the count before the
//!   SIGUSR1 handler has incremented it).
//! * SIGUSR2: handler `on_usr2` writes `COUNT=<n>` to stdout and `_exit(0)`s;
//!   flags `SA_ONSTACK`, empty `sa_mask`.
//! * SIGPIPE: `SIG_IGN`.
//! * SIGHUP: blocked in the signal mask.
//! * an alternate signal stack of 64 KiB (`sigaltstack`), a private
//!   anonymous mapping of its own (`PROT_NONE` guard pages on both sides).
//!
//! Prints `READY altstack=0x<hex> altsize=65536 handler=0x<on_usr1>
//! usr2handler=0x<on_usr2>`, then sleeps (1 s steps) forever. Send SIGUSR1
//! `n` times (waiting until each one is no longer pending before the
//! next, since standard signals do not queue) and then SIGUSR2: the final
//! output is `COUNT=<n>`, exit 0.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{
    check, ignore_signal, install_handler, mask_signals, mmap_anon_isolated, say,
    sleep_interruptible,
};

const ALTSTACK_SIZE: usize = 64 << 10;

static COUNT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr1(_sig: libc::c_int) {
    COUNT.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr2(_sig: libc::c_int) {
    // Async-signal-safe: format into a stack buffer, write(2), _exit(2).
    let mut buf = [0u8; 32];
    let prefix = b"COUNT=";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 10];
    let mut n = COUNT.load(Ordering::SeqCst);
    let mut nd = 0;
    loop {
        digits[nd] = b'0' + (n % 10) as u8;
        nd += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in (0..nd).rev() {
        buf[len] = digits[i];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write and _exit are async-signal-safe; buf is live.
    unsafe {
        libc::write(1, buf.as_ptr().cast(), len);
        libc::_exit(0);
    }
}

fn main() {
    let stack = mmap_anon_isolated(ALTSTACK_SIZE, 0);
    let ss = libc::stack_t {
        ss_sp: stack.cast(),
        ss_flags: 0,
        ss_size: ALTSTACK_SIZE,
    };
    // SAFETY: the stack is a live mapping of ss_size bytes, never freed.
    check(
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) },
        "sigaltstack",
    );

    install_handler(
        libc::SIGUSR1,
        on_usr1,
        libc::SA_RESTART | libc::SA_ONSTACK,
        &[libc::SIGUSR2],
    );
    install_handler(libc::SIGUSR2, on_usr2, libc::SA_ONSTACK, &[]);
    ignore_signal(libc::SIGPIPE);
    mask_signals(libc::SIG_BLOCK, &[libc::SIGHUP]);

    say!(
        "READY altstack={:#x} altsize={ALTSTACK_SIZE} handler={:#x} usr2handler={:#x}",
        stack as usize,
        on_usr1 as extern "C" fn(libc::c_int) as usize,
        on_usr2 as extern "C" fn(libc::c_int) as usize,
    );

    loop {
        sleep_interruptible(Duration::from_secs(1));
    }
}
