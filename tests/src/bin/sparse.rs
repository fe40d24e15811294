//! `sparse [<gib>]`
//!
//! Maps `<gib>` GiB (default 4) `PROT_READ|PROT_WRITE`,
//! `MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE`, with `MADV_NOHUGEPAGE` so a
//! touch faults in exactly one 4 KiB page, and touches the first 4 KiB
//! page of every 64 MiB: touched page `p` (at `addr + p * stride`) gets
//! every byte = `(p as u8).wrapping_add(1)`, except its first 8 bytes,
//! which hold the page's own address (`u64`, little-endian). A second
//! 1 GiB region, mapped the same way, is never touched. Each region is a
//! VMA of its own (`PROT_NONE` guard pages on both sides).
//!
//! Prints `READY addr=0x<hex> len=<bytes> stride=<bytes> untouched=0x<hex>`
//! (untouched region's length is 1 GiB), then sleeps until SIGUSR1;
//! then verifies the touched pages and prints `DONE ok` and exits 0, or
//! `BAD page=<p>` and exits 1.

use std::time::Duration;

use chpox_tests::{arg_or, check, mmap_anon_isolated, say, stop_on_signal, wait_for_stop};

const PAGE: usize = 4096;
const STRIDE: usize = 64 << 20;
const UNTOUCHED_LEN: usize = 1 << 30;

fn map(len: usize) -> *mut u8 {
    let p = mmap_anon_isolated(len, libc::MAP_NORESERVE);
    // SAFETY: advice on our own fresh mapping.
    check(
        unsafe { libc::madvise(p.cast(), len, libc::MADV_NOHUGEPAGE) },
        "madvise(MADV_NOHUGEPAGE)",
    );
    p
}

fn expected_page(addr: usize, p: usize) -> [u8; PAGE] {
    let mut page = [(p as u8).wrapping_add(1); PAGE];
    page[..8].copy_from_slice(&(addr as u64).to_le_bytes());
    page
}

fn main() {
    let gib: usize = arg_or(0, 4);
    assert!(gib > 0, "<gib> must be positive");
    let len = gib << 30;
    let base = map(len);
    let untouched = map(UNTOUCHED_LEN);
    stop_on_signal(libc::SIGUSR1);

    let pages = len / STRIDE;
    for p in 0..pages {
        let addr = base as usize + p * STRIDE;
        let page = expected_page(addr, p);
        // SAFETY: addr..addr+PAGE lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), addr as *mut u8, PAGE) };
    }

    say!(
        "READY addr={:#x} len={len} stride={STRIDE} untouched={:#x}",
        base as usize,
        untouched as usize
    );

    wait_for_stop(Duration::from_secs(1));

    for p in 0..pages {
        let addr = base as usize + p * STRIDE;
        // SAFETY: addr..addr+PAGE lies inside the mapping.
        let got = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
        if got != expected_page(addr, p) {
            say!("BAD page={p}");
            std::process::exit(1);
        }
    }
    say("DONE ok");
}
