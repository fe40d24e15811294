//! Where a restore's time goes: each step logged (debug) with the
//! microseconds since the restore started and since the step before.
//!
//! `chpox restore -v` prints them; `cargo xtask bench-restore` reads them
//! to break `--lazy`'s time to running down.

use std::cell::Cell;
use std::time::Instant;

use tracing::debug;

thread_local! {
    static CLOCK: Cell<Option<(Instant, Instant, u64)>> = const { Cell::new(None) };
}

fn calls() -> u64 {
    crate::remote::REMOTE_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Start the clock of this thread's restore.
pub fn start() {
    let now = Instant::now();
    CLOCK.with(|c| c.set(Some((now, now, calls()))));
}

/// `step` is done.
pub fn mark(step: &'static str) {
    CLOCK.with(|c| {
        if let Some((start, last, calls_before)) = c.get() {
            let now = Instant::now();
            let calls = calls();
            debug!(
                step,
                at_us = (now - start).as_micros() as u64,
                took_us = (now - last).as_micros() as u64,
                remote_calls = calls - calls_before,
                "restore step"
            );
            c.set(Some((start, now, calls)));
        }
    });
}
