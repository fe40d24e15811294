//! File space allocated ahead of the writer while it has nothing to write.
//!
//! On tmpfs, writing new bytes is two thirds allocating pages and one
//! third copying into them (64 MiB here: `fallocate` 16 ms, `write` into
//! the allocated pages 7 ms, `write` alone 22 ms). Both take the inode
//! lock, so allocating beside the writer gains nothing once it writes; but
//! a writer often waits:
//! - a pre-copy spends its first milliseconds scanning the process's page
//!   tables before the first page is ready to write: a thread allocates
//!   meanwhile ([`ImageWriter::allocate_ahead`]; not during the attach
//!   pause before, where it took a core from the paused process);
//! - once writing into allocated pages, the writer outruns the workers
//!   that copy the pages out of the process (`pagecopy`): it allocates the
//!   next step itself whenever none is ready
//!   ([`ImageWriter::allocate_while_waiting`]). Alternating dumps of one
//!   running process here, medians of 8–10: 64 MiB 48 → 37 ms, 1 GiB
//!   447 → 431 ms (`dd` 27 and 367 ms).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use super::ImageWriter;

/// Bytes per `fallocate`: stopping waits for at most one.
const STEP: u64 = 1 << 20;

/// An allocation going on ahead of the writer; [`stop`](Self::stop) it
/// before the next write.
pub struct AllocateAhead {
    stop: Arc<AtomicBool>,
    /// The end of the space allocated so far (a file offset).
    reached: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl ImageWriter {
    /// Allocate up to `most` bytes from the end of what is written, on
    /// another thread, until stopped. What the image does not use is cut
    /// off when it is finished; a filesystem that cannot preallocate just
    /// stops.
    pub fn allocate_ahead(&mut self, most: u64) -> AllocateAhead {
        if most == 0 || self.compress || !matches!(self.state, super::State::Idle) {
            return AllocateAhead {
                stop: Arc::new(AtomicBool::new(false)),
                reached: Arc::clone(&self.allocated_to),
                thread: None,
            };
        }
        self.preallocated = true;
        AllocateAhead::start_reporting(
            Arc::clone(&self.file),
            self.pos,
            most,
            Arc::clone(&self.allocated_to),
        )
    }

    /// Allocate the next step of file space past what is written and past
    /// what was allocated before, up to offset `until`: for a writer
    /// waiting for its next bytes (the copy's workers are behind), so that
    /// the writes after the wait only copy. Each step holds the inode lock
    /// for a fraction of a millisecond, which is all a write that becomes
    /// ready meanwhile waits. False when there is nothing left to allocate
    /// below `until`, for a compressed image (its size is not known), and
    /// from the first failure on (a filesystem that cannot preallocate).
    pub fn allocate_while_waiting(&mut self, until: u64) -> bool {
        if self.compress || !self.allocate_when_waiting {
            return false;
        }
        let from = self.pos.max(self.allocated_to.load(Ordering::Relaxed));
        if from >= until {
            return false;
        }
        let len = STEP.min(until - from);
        match allocate_step(&self.file, from, len) {
            Ok(()) => {
                self.preallocated = true;
                self.allocated_to.store(from + len, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "no allocation while waiting");
                self.allocate_when_waiting = false;
                false
            }
        }
    }
}

/// Allocate `len` bytes of `file` from offset `from`.
fn allocate_step(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    let too_far = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let (offset, len) = (
        i64::try_from(from).map_err(too_far)?,
        i64::try_from(len).map_err(too_far)?,
    );
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), offset, len)?;
    Ok(())
}

fn allocate(file: &File, from: u64, most: u64, stop: &AtomicBool, reached: &AtomicU64) {
    let mut done = 0;
    while done < most && !stop.load(Ordering::Relaxed) {
        let len = STEP.min(most - done);
        if allocate_step(file, from + done, len).is_err() {
            return;
        }
        done += len;
        reached.fetch_max(from + done, Ordering::Relaxed);
    }
}

impl AllocateAhead {
    /// Allocate `most` bytes of `file` from offset `from` on a thread of
    /// its own, until done or stopped.
    pub(super) fn start(file: Arc<File>, from: u64, most: u64) -> AllocateAhead {
        Self::start_reporting(file, from, most, Arc::new(AtomicU64::new(0)))
    }

    /// [`start`](Self::start), storing in `reached` how far the
    /// allocation got, step by step.
    fn start_reporting(
        file: Arc<File>,
        from: u64,
        most: u64,
        reached: Arc<AtomicU64>,
    ) -> AllocateAhead {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let to = Arc::clone(&reached);
        let thread = std::thread::Builder::new()
            .name("allocate-ahead".into())
            .spawn(move || allocate(&file, from, most, &flag, &to))
            .ok();
        AllocateAhead {
            stop,
            reached,
            thread,
        }
    }

    /// How far the allocation got (a file offset), once stopped.
    pub(super) fn stop_at(mut self) -> u64 {
        self.stop_now();
        self.reached.load(Ordering::Relaxed)
    }

    /// Stop allocating; returns once the allocation in progress is over,
    /// so that the writer's next write does not wait behind it.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AllocateAhead {
    fn drop(&mut self) {
        self.stop_now();
    }
}
