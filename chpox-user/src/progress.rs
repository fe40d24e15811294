//! A count of image bytes moved (written by a dump, read by a restore), for
//! the command line's progress bars. The engine only adds to it; whoever
//! shows progress reads it.

use std::sync::atomic::{AtomicU64, Ordering};

static BYTES: AtomicU64 = AtomicU64::new(0);

/// `n` more bytes of image data written or read.
pub fn add(n: u64) {
    BYTES.fetch_add(n, Ordering::Relaxed);
}

/// Bytes counted since the process started.
pub fn bytes() -> u64 {
    BYTES.load(Ordering::Relaxed)
}
