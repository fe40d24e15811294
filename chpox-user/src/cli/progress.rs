//! Progress bars on stderr for dumps and restores that take more than a
//! second: bytes, rate, time left. Nothing when stderr is not a terminal or
//! with `--quiet`. The engine only counts bytes (`crate::progress`); this
//! draws them.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress bars.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar shown after a second (see [`delay`]) until dropped.
pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Work shorter than this shows nothing; `CHPOX_PROGRESS_DELAY_MS`
/// changes it.
fn delay() -> Duration {
    std::env::var("CHPOX_PROGRESS_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
}
const TICK: Duration = Duration::from_millis(100);

impl Bar {
    /// Starts counting `what` (about `total` bytes) from now; draws once
    /// the delay has passed, if stderr is a terminal and not `--quiet`.
    pub fn start(what: &'static str, total: u64) -> Bar {
        Self::start_with(what, || total)
    }

    /// [`Bar::start`] with the total asked for only if a bar can be shown:
    /// estimating it reads /proc (smaps_rollup walks every page table),
    /// which a dump whose stderr is no terminal need not wait for.
    pub fn start_with(what: &'static str, total: impl FnOnce() -> u64) -> Bar {
        let stop = Arc::new(AtomicBool::new(false));
        let shown = !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal();
        let total = if shown { total() } else { 0 };
        let thread = shown
            .then(|| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("progress".into())
                    .spawn(move || draw(what, total, &stop))
                    .ok()
            })
            .flatten();
        Bar { stop, thread }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn draw(what: &'static str, total: u64, stop: &AtomicBool) {
    let base = crate::progress::bytes();
    let started = Instant::now();
    let delay = delay();
    while started.elapsed() < delay {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Woken early by `drop`: a restore that took 10 ms must not
        // wait out a tick.
        std::thread::park_timeout(TICK);
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total.max(1)),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>8} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta} left",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    // The bar's clock starts with the work, not with the delay.
    bar.reset_elapsed();
    loop {
        let done = crate::progress::bytes().saturating_sub(base);
        if done > bar.length().unwrap_or(0) {
            bar.set_length(done);
        }
        bar.set_position(done);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::park_timeout(TICK);
    }
    bar.finish_and_clear();
}

/// Bytes a dump of `pid` (and its descendants unless `alone`) will about
/// write: their anonymous memory.
pub fn dump_total(pid: i32, alone: bool) -> u64 {
    let mut pids = vec![pid];
    let mut i = 0;
    while !alone && i < pids.len() && pids.len() < 100_000 {
        pids.extend(children(pids[i]));
        i += 1;
    }
    pids.iter()
        .map(|&p| crate::memory::estimate_stored_bytes(p))
        .sum()
}

fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Bytes a restore of `image` reads: every blob once to check it, and
/// again to restore it.
pub fn restore_total(image: &Path) -> u64 {
    std::fs::metadata(image).map_or(0, |m| 2 * m.len())
}
