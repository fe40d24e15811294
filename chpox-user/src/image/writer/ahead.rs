//! File space allocated ahead of the writer while it has nothing to write.
//!
//! On tmpfs, writing new bytes is two thirds allocating pages and one
//! third copying into them (64 MiB here: `fallocate` 16 ms, `write` into
//! the allocated pages 7 ms, `write` alone 22 ms). Both take the inode
//! lock, so allocating beside the writer gains nothing once it writes; but
//! a pre-copy spends its first milliseconds freezing the process and
//! scanning its page tables before the first page is ready to write, and
//! the allocation fills that wait.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::ImageWriter;

/// Bytes per `fallocate`: stopping waits for at most one.
const STEP: u64 = 1 << 20;

/// An allocation going on ahead of the writer; [`stop`](Self::stop) it
/// before the next write.
pub struct AllocateAhead {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ImageWriter {
    /// Allocate up to `most` bytes from the end of what is written, on
    /// another thread, until stopped. What the image does not use is cut
    /// off when it is finished; a filesystem that cannot preallocate just
    /// stops.
    pub fn allocate_ahead(&mut self, most: u64) -> AllocateAhead {
        let stop = Arc::new(AtomicBool::new(false));
        if most == 0 || self.compress || !matches!(self.state, super::State::Idle) {
            return AllocateAhead { stop, thread: None };
        }
        self.preallocated = true;
        AllocateAhead::start(Arc::clone(&self.file), self.pos, most)
    }
}

fn allocate(file: &File, from: u64, most: u64, stop: &AtomicBool) {
    let mut done = 0;
    while done < most && !stop.load(Ordering::Relaxed) {
        let len = STEP.min(most - done);
        let (Ok(offset), Ok(len)) = (i64::try_from(from + done), i64::try_from(len)) else {
            return;
        };
        if nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), offset, len).is_err() {
            return;
        }
        done += len as u64;
    }
}

impl AllocateAhead {
    /// Allocate `most` bytes of `file` from offset `from` on a thread of
    /// its own, until done or stopped.
    pub(super) fn start(file: Arc<File>, from: u64, most: u64) -> AllocateAhead {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("allocate-ahead".into())
            .spawn(move || allocate(&file, from, most, &flag))
            .ok();
        AllocateAhead { stop, thread }
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
