//! `steps N MS [EXIT [--hup]]`
//!
//! A batch computation in N steps: prints `READY`, then for each step
//! sleeps MS milliseconds, advances a running value and prints
//! `STEP i value`; at the end prints `DONE value` and exits with EXIT
//! (default 0). The output depends on N only, never on timing, so a run
//! that was checkpointed, killed and resumed must print exactly what an
//! uninterrupted one prints (`steps N 0`).
//!
//! With `--hup` (after EXIT), SIGHUP is handled: the next step prints `HUP` first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chpox_tests::{arg_or, install_handler, say};

static HUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hup(_: libc::c_int) {
    HUP.store(true, Ordering::SeqCst);
}

fn main() {
    let steps: u64 = arg_or(0, 10);
    let ms: u64 = arg_or(1, 100);
    let code: i32 = arg_or(2, 0);
    if std::env::args().any(|a| a == "--hup") {
        install_handler(libc::SIGHUP, on_hup, libc::SA_RESTART, &[]);
    }
    say!("READY steps={steps}");
    let mut value: u64 = 1;
    for i in 1..=steps {
        std::thread::sleep(Duration::from_millis(ms));
        if HUP.swap(false, Ordering::SeqCst) {
            say("HUP");
        }
        value = value
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407 ^ i);
        say!("STEP {i} {value:016x}");
    }
    say!("DONE {value:016x}");
    std::process::exit(code);
}
