//! Helper programs for the integration tests live in `src/bin/`; the tests
//! themselves in `tests/`.
//!
//! This library is the small API those programs share. Every program
//! announces that its state is set up with a `READY key=value ...` line
//! on stdout (see [`say`]), and most of them then wait for a signal (see
//! [`stop_on_signal`] and [`wait_for_stop`]) before they print their final,
//! deterministic output.
//!
//! The programs are test fixtures: anything unexpected makes them panic
//! with a clear message (or exit with a non-zero code, as documented per
//! program) rather than try to recover.

use std::ffi::CStr;
use std::fmt::Display;
use std::io::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The 64-bit word `mempattern` stores at byte `offset` of its region.
///
/// `offset` is the byte offset of the word from the start of the region
/// (so it is always a multiple of 8): the word at offset `i` is
/// `i * 0x9E3779B97F4A7C15 (wrapping) ^ 0xC0FFEE`. Tests recompute it to
/// check the pages in an image.
pub const fn pattern_word(offset: u64) -> u64 {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0_FFEE
}

/// The wrapping sum of [`pattern_word`] over a region of `len` bytes, as
/// printed by `mempattern` in its `DONE sum=<hex>` line.
pub fn pattern_sum(len: u64) -> u64 {
    (0..len / 8).fold(0u64, |acc, w| acc.wrapping_add(pattern_word(w * 8)))
}

/// Writes `line` and a newline to stdout and flushes at once.
///
/// The tests redirect stdout to a file and poll it, so every line must
/// reach the file as soon as it is printed. Panics if stdout fails.
pub fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

/// Appends `line` and a newline to the report file at `path` (created if
/// missing), for a test that polls it. Panics if it cannot.
pub fn append_line(path: &str, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open report");
    writeln!(f, "{line}").expect("write report");
}

/// [`say`] with `format!` arguments: `say!("READY addr={addr:#x}")`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say(::std::format_args!($($arg)*))
    };
}

/// The calling thread's kernel thread id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The current `errno` as an [`std::io::Error`].
pub fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Panics with `what` and `errno` when a libc call returned -1.
///
/// Returns `ret` otherwise, so calls can be wrapped:
/// `let fd = check(libc::open(..), "open a.txt");`.
pub fn check<T: Copy + PartialEq + From<i8>>(ret: T, what: &str) -> T {
    if ret == T::from(-1) {
        panic!("{what} failed: {}", last_error());
    }
    ret
}

/// Positional argument `idx` (0 = first after the program name), parsed,
/// or `default` when absent. Panics on a value that does not parse.
pub fn arg_or<T: FromStr>(idx: usize, default: T) -> T {
    match std::env::args().nth(idx + 1) {
        None => default,
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("argument {} ({s:?}) does not parse", idx + 1)),
    }
}

/// Maps `len` bytes of private anonymous read-write memory, adding
/// `extra_flags` (e.g. `MAP_NORESERVE`) to `MAP_PRIVATE | MAP_ANONYMOUS`.
/// Panics if mmap fails.
pub fn mmap_anon(len: usize, extra_flags: libc::c_int) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks
    // cannot alias anything.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        panic!("mmap of {len} bytes failed: {}", last_error());
    }
    p.cast()
}

/// Like [`mmap_anon`], but the mapping gets a `PROT_NONE` guard page
/// on each side, so it is a VMA of its own: the kernel never merges it
/// with a neighbouring mapping, and `/proc/PID/maps` shows exactly
/// `[addr, addr + len)`. Returns `addr`.
pub fn mmap_anon_isolated(len: usize, extra_flags: libc::c_int) -> *mut u8 {
    const GUARD: usize = 4096;
    let outer = mmap_anon(len + 2 * GUARD, extra_flags);
    // SAFETY: both guard pages lie inside the mapping just made.
    unsafe {
        check(
            libc::mprotect(outer.cast(), GUARD, libc::PROT_NONE),
            "mprotect guard",
        );
        check(
            libc::mprotect(outer.add(GUARD + len).cast(), GUARD, libc::PROT_NONE),
            "mprotect guard",
        );
        outer.add(GUARD)
    }
}

/// A signal handler as installed by [`install_handler`].
pub type Handler = extern "C" fn(libc::c_int);

/// Installs `handler` for `sig` with `sigaction`.
///
/// `flags` are the `sa_flags` (e.g. `SA_RESTART`, `SA_ONSTACK`); `mask`
/// lists the signals blocked while the handler runs (besides `sig`
/// itself). Panics if sigaction fails.
pub fn install_handler(
    sig: libc::c_int,
    handler: Handler,
    flags: libc::c_int,
    mask: &[libc::c_int],
) {
    // SAFETY: an all-zero sigaction is a valid value; the handler is an
    // extern "C" fn with the signature the kernel calls it with.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        for &s in mask {
            libc::sigaddset(&mut sa.sa_mask, s);
        }
        check(libc::sigaction(sig, &sa, std::ptr::null_mut()), "sigaction");
    }
}

/// Sets the disposition of `sig` to `SIG_IGN`.
pub fn ignore_signal(sig: libc::c_int) {
    // SAFETY: see install_handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_IGN;
        libc::sigemptyset(&mut sa.sa_mask);
        check(
            libc::sigaction(sig, &sa, std::ptr::null_mut()),
            "sigaction(SIG_IGN)",
        );
    }
}

/// Blocks (`how = SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) `sigs` in the
/// calling thread's signal mask.
pub fn mask_signals(how: libc::c_int, sigs: &[libc::c_int]) {
    // SAFETY: plain sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        assert_eq!(rc, 0, "pthread_sigmask failed");
    }
}

/// Set to non-zero by [`set_stop`], the handler [`stop_on_signal`]
/// installs. A `u32` so inline assembly can poll it with
/// `cmp dword ptr [..], 0`.
pub static STOP: AtomicU32 = AtomicU32::new(0);

/// Signal handler that sets [`STOP`] to 1 (async-signal-safe).
pub extern "C" fn set_stop(_sig: libc::c_int) {
    STOP.store(1, Ordering::SeqCst);
}

/// Makes `sig` set [`STOP`] (handler [`set_stop`], `SA_RESTART`).
pub fn stop_on_signal(sig: libc::c_int) {
    install_handler(sig, set_stop, libc::SA_RESTART, &[]);
}

/// Whether the stop signal has arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst) != 0
}

/// Sleeps in steps of `step` (with `nanosleep`, so a signal cuts a step
/// short) until [`STOP`] is set.
pub fn wait_for_stop(step: Duration) {
    while !stop_requested() {
        sleep_interruptible(step);
    }
}

/// One `nanosleep` of `d`; returns early (without error) on `EINTR`.
pub fn sleep_interruptible(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ts is a valid timespec; no remainder is asked for.
    unsafe {
        libc::nanosleep(&ts, std::ptr::null_mut());
    }
}

/// Sets the calling thread's name (`comm`) with `prctl(PR_SET_NAME)`.
/// The kernel keeps at most 15 bytes.
pub fn set_thread_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    check(
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) },
        "prctl(PR_SET_NAME)",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern() {
        assert_eq!(pattern_word(0), 0xC0_FFEE);
        assert_eq!(
            pattern_word(8),
            0x9E37_79B9_7F4A_7C15u64.wrapping_mul(8) ^ 0xC0_FFEE
        );
        assert_eq!(
            pattern_sum(16),
            pattern_word(0).wrapping_add(pattern_word(8))
        );
    }
}
