//! `lazytouch [<mib>]`
//!
//! For `chpox restore --lazy`: memory that must come back exactly, however
//! and in whatever order it is touched after the restore.
//!
//! Maps `<mib>` MiB (default 64) of private anonymous memory (a VMA of its
//! own, `MADV_NOHUGEPAGE`) and writes [`chpox_tests::pattern_word`] into
//! every word of every page except each page `p` with `p % 7 == 3`, which
//! is never touched (reads as zero). Prints `READY addr=0x<hex>
//! len=<bytes>` and sleeps until SIGUSR1. Then, at once:
//!
//! 0. if the file named by `$LAZYTOUCH_FIRST` exists (written after the
//!    checkpoint), checks the page of the region it names before anything
//!    else (`CORRUPT first offset=<n>` and exit 3 if wrong);
//! 1. forks; the child checks every page, in an order of its own, and
//!    exits 0, or 3 at the first wrong word;
//! 2. discards its last 16 pages (`MADV_DONTNEED`: they must read as
//!    zero from now on) and moves the 1 MiB at offset `len * 3 / 4`
//!    elsewhere (`mremap`), where it must hold what it held (both near
//!    the end, which a lazy restore fills last);
//! 3. checks every other page with two threads, each in a random order
//!    of its own, every word.
//!
//! Prints `DONE ok` and exits 0, or `CORRUPT <what> offset=<n>` and exits
//! 3.

use std::time::Duration;

use chpox_tests::{
    arg_or, check, mmap_anon_isolated, pattern_word, say, stop_on_signal, wait_for_stop,
};

const PAGE: usize = 4096;
const DISCARDED: usize = 16;
const MOVED_LEN: usize = 1 << 20;

fn touched(page: usize) -> bool {
    page % 7 != 3
}

/// The word at byte `offset` of the region as it was checkpointed.
fn expected(offset: usize) -> u64 {
    if touched(offset / PAGE) {
        pattern_word(offset as u64)
    } else {
        0
    }
}

/// Pages `0..n` in an order given by `seed` (Fisher–Yates, xorshift).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Check page `page` of the region at `base` (region offsets), seen at
/// `at`; the first wrong offset.
fn check_page(at: usize, page: usize, want: impl Fn(usize) -> u64) -> Option<usize> {
    (0..PAGE / 8).find_map(|w| {
        let offset = page * PAGE + w * 8;
        // SAFETY: the page lies inside a live mapping of ours.
        let got = unsafe { std::ptr::read_volatile((at + w * 8) as *const u64) };
        (got != want(offset)).then_some(offset)
    })
}

fn corrupt(what: &str, offset: usize) -> ! {
    say!("CORRUPT {what} offset={offset}");
    std::process::exit(3);
}

fn main() {
    let mib: usize = arg_or(0, 64);
    assert!(mib >= 4, "<mib> must be at least 4");
    let len = mib << 20;
    let pages = len / PAGE;
    let base = mmap_anon_isolated(len, 0) as usize;
    // SAFETY: advice on our own fresh mapping.
    check(
        unsafe { libc::madvise(base as *mut _, len, libc::MADV_NOHUGEPAGE) },
        "madvise",
    );
    for page in (0..pages).filter(|&p| touched(p)) {
        for w in 0..PAGE / 8 {
            let offset = page * PAGE + w * 8;
            // SAFETY: inside the mapping.
            unsafe { ((base + offset) as *mut u64).write(pattern_word(offset as u64)) };
        }
    }
    stop_on_signal(libc::SIGUSR1);
    say!("READY addr={base:#x} len={len}");
    wait_for_stop(Duration::from_millis(50));

    // 0. The page asked for, first.
    let first = std::env::var_os("LAZYTOUCH_FIRST").and_then(|f| std::fs::read_to_string(f).ok());
    let first = first
        .and_then(|p| p.trim().parse::<usize>().ok())
        .filter(|&p| p < pages);
    if let Some(off) = first.and_then(|page| check_page(base + page * PAGE, page, expected)) {
        corrupt("first", off);
    }

    // 1. A child that sees the memory as it was at the fork.
    // SAFETY: single-threaded here; the child only reads memory and exits.
    let child = check(unsafe { libc::fork() }, "fork");
    if child == 0 {
        for page in shuffled(pages, 0x5eed_c41d) {
            if check_page(base + page * PAGE, page, expected).is_some() {
                // SAFETY: exit without running the parent's handlers.
                unsafe { libc::_exit(3) };
            }
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }

    // 2. Discard and move.
    // SAFETY: advice and mremap on our own mapping, on page boundaries.
    check(
        unsafe {
            libc::madvise(
                (base + len - DISCARDED * PAGE) as *mut _,
                DISCARDED * PAGE,
                libc::MADV_DONTNEED,
            )
        },
        "madvise(DONTNEED)",
    );
    let moved_from = len / 4 * 3;
    // SAFETY: a fresh reservation to move into, then the move itself.
    let moved_to = unsafe {
        let dest = libc::mmap(
            std::ptr::null_mut(),
            MOVED_LEN,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(dest, libc::MAP_FAILED, "mmap");
        let to = libc::mremap(
            (base + moved_from) as *mut _,
            MOVED_LEN,
            MOVED_LEN,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest,
        );
        assert_ne!(
            to,
            libc::MAP_FAILED,
            "mremap: {}",
            std::io::Error::last_os_error()
        );
        to as usize
    };
    let moved = |page: usize| (moved_from / PAGE..(moved_from + MOVED_LEN) / PAGE).contains(&page);

    // 3. Everything, in two random orders at once.
    std::thread::scope(|s| {
        for seed in [0x1234_5678u64, 0x9abc_def0] {
            s.spawn(move || {
                for page in shuffled(pages, seed) {
                    let (at, what) = if moved(page) {
                        (moved_to + page * PAGE - moved_from, "moved")
                    } else {
                        (base + page * PAGE, "page")
                    };
                    let want = |off: usize| {
                        if page >= pages - DISCARDED {
                            0
                        } else {
                            expected(off)
                        }
                    };
                    if let Some(off) = check_page(at, page, want) {
                        corrupt(what, off);
                    }
                }
            });
        }
    });

    let mut status = 0;
    // SAFETY: waiting for our own child.
    check(unsafe { libc::waitpid(child, &mut status, 0) }, "waitpid");
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        say!("CORRUPT child status={status}");
        std::process::exit(3);
    }
    say("DONE ok");
}
