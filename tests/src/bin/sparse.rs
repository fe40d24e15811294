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
//!
//! Each SIGUSR2 is a step `g` (1, 2, …): touched page `p` is rewritten
//! with every byte `(p + 1 + g) as u8` (its address word kept), the page
//! just below it (`p > 0`) with every byte `g`, and `STEP g` is printed;
//! SIGUSR1 then verifies against the last step. The pairs straddle every
//! 64 MiB boundary of the mapping.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{
    arg_or, check, install_handler, mmap_anon_isolated, say, sleep_interruptible, stop_on_signal,
    stop_requested,
};

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

static STEPS_ASKED: AtomicU32 = AtomicU32::new(0);

extern "C" fn ask_step(_: libc::c_int) {
    STEPS_ASKED.fetch_add(1, Ordering::SeqCst);
}

fn expected_page(addr: usize, p: usize, step: u32) -> [u8; PAGE] {
    let mut page = [(p as u8).wrapping_add(1).wrapping_add(step as u8); PAGE];
    page[..8].copy_from_slice(&(addr as u64).to_le_bytes());
    page
}

/// The page just below touched page `p` after step `step` (none before
/// the first step, nor below the first page).
fn expected_below(p: usize, step: u32) -> Option<[u8; PAGE]> {
    (p > 0 && step > 0).then_some([step as u8; PAGE])
}

/// Write every page of step `step` of the `pages` touched pages from `base`.
fn write_step(base: usize, pages: usize, step: u32) {
    for p in 0..pages {
        let addr = base + p * STRIDE;
        let page = expected_page(addr, p, step);
        // SAFETY: addr..addr+PAGE lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), addr as *mut u8, PAGE) };
        if let Some(below) = expected_below(p, step) {
            // SAFETY: p > 0, so addr-PAGE..addr lies inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(below.as_ptr(), (addr - PAGE) as *mut u8, PAGE)
            };
        }
    }
}

fn main() {
    let gib: usize = arg_or(0, 4);
    assert!(gib > 0, "<gib> must be positive");
    let len = gib << 30;
    let base = map(len);
    let untouched = map(UNTOUCHED_LEN);
    stop_on_signal(libc::SIGUSR1);
    install_handler(libc::SIGUSR2, ask_step, libc::SA_RESTART, &[]);

    let pages = len / STRIDE;
    let mut step = 0;
    write_step(base as usize, pages, step);

    say!(
        "READY addr={:#x} len={len} stride={STRIDE} untouched={:#x}",
        base as usize,
        untouched as usize
    );

    while !stop_requested() {
        if step < STEPS_ASKED.load(Ordering::SeqCst) {
            step += 1;
            write_step(base as usize, pages, step);
            say!("STEP {step}");
        }
        sleep_interruptible(Duration::from_millis(100));
    }

    for p in 0..pages {
        let addr = base as usize + p * STRIDE;
        // SAFETY: addr..addr+PAGE lies inside the mapping.
        let got = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
        let below_ok = expected_below(p, step).is_none_or(|want| {
            // SAFETY: p > 0 here, so addr-PAGE..addr lies inside the mapping.
            let below = unsafe { std::slice::from_raw_parts((addr - PAGE) as *const u8, PAGE) };
            below == want
        });
        if got != expected_page(addr, p, step) || !below_ok {
            say!("BAD page={p}");
            std::process::exit(1);
        }
    }
    say("DONE ok");
}
