//! The heap of a process that makes one dump and exits (the `chpox`
//! command), made ready before the freeze.
//!
//! A fresh process's heap grows as the dump allocates, and each page of it
//! first touched is a fault, ~2 us on a VM like ours: a tree of 8 took
//! ~150 of them while frozen (malloc splitting fresh memory, buffers
//! zeroed), a tenth of its frozen time. Touched here once, before the
//! freeze, and kept, that memory serves the frozen part without a fault.

/// Room touched ahead, for the dump's own thread: about twice what it
/// allocates while a tree of 8 is frozen, for ~0.5 ms here.
const WARM_BYTES: usize = 1 << 20;

/// Make this process's heap ready for one dump: freed memory kept rather
/// than given back, allocations of up to 8 MiB served from it rather than
/// from fresh mappings, and [`WARM_BYTES`] of it touched now. For a
/// process that exits after its dump: a daemon would keep that memory for
/// good. The heap is the calling thread's; the dump's helper threads warm
/// their own (see `asfrozen`). One heap for all threads would do without
/// that, but its lock, taken by three threads at once while frozen, cost
/// more than the faults.
pub fn warm_heap_for_one_dump() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets glibc's malloc parameters; no memory
        // of ours is touched.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        }
    }
    touch_and_free(WARM_BYTES);
}

/// Allocate `bytes` in this thread's heap, write them (memory merely
/// allocated stays untouched) and free them, to be reused.
pub(super) fn touch_and_free(bytes: usize) {
    let touched = vec![1u8; bytes];
    std::hint::black_box(&touched);
}
