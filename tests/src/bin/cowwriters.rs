//! `cowwriters [<threads>] [<mib_per_thread>] [<page_pause_us>]`
//!
//! Every thread (default 4) owns a slice (default 16 MiB) of one private
//! anonymous region and rewrites it, pass after pass, as fast as it can:
//! in pass `g` it writes `tag(t) | g` to each word in order. So at any
//! instant a slice reads `g+1` up to where its thread is and `g` after it:
//! one step down, of one, at most. A copy of the region taken at one
//! instant keeps that shape in every slice; a copy made piece by piece
//! while the threads write does not (a later piece is a later pass).
//!
//! With `page_pause_us`, each thread sleeps that long after every page it
//! writes from its second pass on, so that at any moment some pages were
//! written lately and others not for a while.
//!
//! Prints `READY addr=0x<hex> len=<bytes> threads=<n> slice=<bytes>`, then
//! runs until SIGUSR1: each thread ends the pass it is in, and every word
//! of its slice must then hold that pass (a copy restored from a
//! checkpoint whose pages were not of one instant ends a pass over pages
//! of another): it prints `DONE passes=<n>` and exits 0, or names the
//! first word that does not and exits 3.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chpox_tests::{arg_or, mask_signals, mmap_anon_isolated, say, stop_on_signal, wait_for_stop};

static STOP: AtomicBool = AtomicBool::new(false);
static PASSES: AtomicU64 = AtomicU64::new(0);
/// Threads that have written their whole slice at least once.
static THROUGH_ONCE: AtomicU64 = AtomicU64::new(0);

/// The thread's mark in the top bits of each word it writes.
pub fn tag(t: u64) -> u64 {
    (t + 1) << 48
}

/// Writes thread `t`'s slice until told to stop; the last pass it ended.
fn writer(t: u64, base: usize, words: usize, page_pause: Duration) -> u64 {
    let slice = (base + t as usize * words * 8) as *mut u64;
    let mut pass = 1u64;
    while !STOP.load(Ordering::Relaxed) {
        for w in 0..words {
            // SAFETY: the slice lies within the region mapped in main and
            // is written by this thread only.
            unsafe { slice.add(w).write_volatile(tag(t) | pass) };
            // The first pass flat out: READY comes as soon as every page
            // holds data, however large the region.
            if pass > 1 && !page_pause.is_zero() && (w + 1) % 512 == 0 {
                std::thread::sleep(page_pause);
            }
        }
        PASSES.fetch_add(1, Ordering::Relaxed);
        if pass == 1 {
            THROUGH_ONCE.fetch_add(1, Ordering::Release);
        }
        pass += 1;
    }
    pass - 1
}

fn main() {
    let threads: u64 = arg_or(0, 4);
    let mib: usize = arg_or(1, 16);
    let page_pause = Duration::from_micros(arg_or(2, 0));
    let words = (mib << 20) / 8;
    let len = threads as usize * (mib << 20);
    let base = mmap_anon_isolated(len, 0) as usize;
    stop_on_signal(libc::SIGUSR1);
    mask_signals(libc::SIG_BLOCK, &[libc::SIGUSR1]);
    let handles: Vec<_> = (0..threads)
        .map(|t| std::thread::spawn(move || writer(t, base, words, page_pause)))
        .collect();
    mask_signals(libc::SIG_UNBLOCK, &[libc::SIGUSR1]);
    // Every slice written through at least once before anyone looks (a
    // count of passes would not do: one fast thread can make them all
    // while another has not run yet).
    while THROUGH_ONCE.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_millis(5));
    }
    say!(
        "READY addr={base:#x} len={len} threads={threads} slice={}",
        words * 8
    );
    wait_for_stop(Duration::from_millis(20));
    STOP.store(true, Ordering::Relaxed);
    let ended: Vec<u64> = handles
        .into_iter()
        .map(|h| h.join().expect("writer panicked"))
        .collect();
    for (t, &pass) in ended.iter().enumerate() {
        let slice = (base + t * words * 8) as *const u64;
        for w in 0..words {
            // SAFETY: the slice lies within the region mapped above, and
            // its writer has ended.
            let v = unsafe { slice.add(w).read_volatile() };
            if v != tag(t as u64) | pass {
                say!("DONE BAD thread {t} ended pass {pass} but word {w} holds {v:#x}");
                std::process::exit(3);
            }
        }
    }
    say!("DONE passes={}", PASSES.load(Ordering::Relaxed));
}
