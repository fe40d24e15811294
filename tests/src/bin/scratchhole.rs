//! `scratchhole [locked]`
//!
//! Leaves a one-page hole between two pieces of one anonymous read-write
//! mapping, exactly where the next one-page `mmap(NULL, …)` goes: the
//! scratch page a dump maps in the process for its remote calls lands in
//! it, merging the three into one mapping until the dump unmaps it again.
//! A dump maps that page only in a process with locked memory (to tell
//! `mlockall(MCL_FUTURE)`): with `locked`, one page of a mapping of its
//! own, made first, is `mlock`ed.
//!
//! Maps three pages, writes all of them (so both pieces share one
//! anon_vma and may merge again), unmaps the middle one, and checks that a
//! one-page `mmap(NULL, …)` returns the hole (then unmaps it). Prints
//! `READY low=0x<hex> hole=0x<hex> lands=<0|1>` (`lands=1`: the next page
//! goes into the hole), then sleeps until SIGUSR1, checks both pieces
//! still hold what it wrote and prints `DONE ok` (exit 0) or `BAD` (exit 1).

use chpox_tests::{check, say, stop_on_signal, wait_for_stop};

const PAGE: usize = 4096;

/// `len` bytes of fresh private anonymous read-write memory wherever the
/// kernel puts the next mapping of that size.
fn map_anywhere(len: usize) -> *mut libc::c_void {
    // SAFETY: a new mapping, overlapping nothing of ours; checked.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(at, libc::MAP_FAILED, "mmap");
    at
}

fn main() {
    stop_on_signal(libc::SIGUSR1);
    if std::env::args().nth(1).as_deref() == Some("locked") {
        let page = map_anywhere(PAGE);
        // SAFETY: a page of our own, just mapped.
        check(unsafe { libc::mlock(page, PAGE) }, "mlock");
    }
    let base = map_anywhere(3 * PAGE).cast::<u8>();
    // SAFETY: the three pages are ours.
    unsafe { std::ptr::write_bytes(base, 0x5a, 3 * PAGE) };
    // SAFETY: the middle page of our own mapping.
    let hole = unsafe { base.add(PAGE) };
    check(unsafe { libc::munmap(hole.cast(), PAGE) }, "munmap");
    // Unmapped again at once.
    let probe = map_anywhere(PAGE);
    let lands = probe.cast::<u8>() == hole;
    check(unsafe { libc::munmap(probe, PAGE) }, "munmap");
    say!(
        "READY low={:#x} hole={:#x} lands={}",
        base as usize,
        hole as usize,
        u8::from(lands)
    );
    wait_for_stop(std::time::Duration::from_millis(50));
    // SAFETY: the first and last page of the mapping are still ours.
    let intact = unsafe {
        std::slice::from_raw_parts(base, PAGE)
            .iter()
            .chain(std::slice::from_raw_parts(base.add(2 * PAGE), PAGE))
            .all(|&b| b == 0x5a)
    };
    if intact {
        say!("DONE ok");
    } else {
        say!("BAD");
        std::process::exit(1);
    }
}
