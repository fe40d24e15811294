//! `busythreads [<n_threads>]`
//!
//! Spawns `n` (default 200) threads. Each loops: a run of arithmetic whose
//! result it knows in advance (registers that a tracer left altered would
//! show as a wrong result), then a 1 ms sleep (a system call a freeze may
//! cut). A thread that computes a wrong result prints `BAD <t>` and the
//! process exits 3.
//!
//! Prints `READY`. On SIGUSR1 it stops and joins the workers, prints
//! `DONE rounds=<total>` and exits 0 if every thread made progress.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chpox_tests::{arg_or, mask_signals, say, stop_on_signal, wait_for_stop};

static STOP: AtomicBool = AtomicBool::new(false);

/// A chain of multiply-adds the compiler cannot fold (the seed comes from
/// the thread's index at run time).
fn chain(seed: u64) -> u64 {
    let mut x = seed;
    for i in 0..2000u64 {
        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
    }
    x
}

fn worker(t: u64, rounds: &AtomicU64) {
    let expected = chain(t);
    while !STOP.load(Ordering::SeqCst) {
        if chain(std::hint::black_box(t)) != expected {
            say!("BAD {t}");
            std::process::exit(3);
        }
        rounds.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    let n: u64 = arg_or(0, 200);
    stop_on_signal(libc::SIGUSR1);
    // Workers inherit the mask: only the main thread takes SIGUSR1.
    mask_signals(libc::SIG_BLOCK, &[libc::SIGUSR1]);
    let rounds: &'static [AtomicU64] = Box::leak(
        (0..n)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let r = &rounds[t as usize];
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || worker(t, r))
                .expect("spawn worker")
        })
        .collect();
    mask_signals(libc::SIG_UNBLOCK, &[libc::SIGUSR1]);
    say("READY");
    wait_for_stop(Duration::from_millis(50));
    STOP.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().expect("worker panicked");
    }
    let total: u64 = rounds.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    let all = rounds.iter().all(|r| r.load(Ordering::SeqCst) > 0);
    say!("DONE rounds={total}");
    if !all {
        std::process::exit(1);
    }
}
