//! `mapgrow REPORT`
//!
//! A mapping that grows in place while write tracking follows it. It maps
//! 64 pages, of which the first 32 are read-write and filled, the other
//! 32 a `PROT_NONE` reservation, and appends `READY ADDR` (hex) to
//! REPORT. On
//! SIGUSR1 it unmaps the reservation and grows the mapping over it with
//! `mremap` without moving it, writes the new pages and rewrites page 0,
//! then appends `GROWN` (or `MOVED` and exits 1 should the kernel have
//! refused). On SIGUSR2 it checks every word and appends `VERIFY ok=1`
//! (or `ok=0`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{check, install_handler, mmap_anon_isolated, say};

const PAGE: usize = 4096;
const HALF: usize = 32 * PAGE;

/// Times SIGUSR1 (grow) and SIGUSR2 (verify) arrived.
static ASKED: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];

extern "C" fn on_signal(sig: libc::c_int) {
    ASKED[usize::from(sig == libc::SIGUSR2)].fetch_add(1, Ordering::SeqCst);
}

fn report(path: &str, line: &str) {
    chpox_tests::append_line(path, line);
}

/// The word at `index` of the region, after `grown` or before.
fn word(index: usize, grown: bool) -> u64 {
    let page = index * 8 / PAGE;
    let generation = if grown && (page == 0 || page >= 32) {
        2
    } else {
        1
    };
    (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation
}

fn fill(base: *mut u64, pages: std::ops::Range<usize>, grown: bool) {
    for i in pages.start * PAGE / 8..pages.end * PAGE / 8 {
        // SAFETY: inside the read-write part of our own mapping.
        unsafe { base.add(i).write_volatile(word(i, grown)) };
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: mapgrow REPORT");
    install_handler(libc::SIGUSR1, on_signal, libc::SA_RESTART, &[]);
    install_handler(libc::SIGUSR2, on_signal, libc::SA_RESTART, &[]);
    // Guard pages around: no neighbour merges into the mapping.
    let base = mmap_anon_isolated(2 * HALF, 0);
    // SAFETY: the upper half of the mapping just made.
    check(
        unsafe { libc::mprotect(base.add(HALF).cast(), HALF, libc::PROT_NONE) },
        "mprotect",
    );
    let words = base.cast::<u64>();
    fill(words, 0..32, false);
    let (mut grown, mut verified) = (false, 0);
    report(&path, &format!("READY {:#x}", base as usize));
    say!("READY");
    loop {
        if !grown && ASKED[0].load(Ordering::SeqCst) > 0 {
            // SAFETY: our own reservation, then our own mapping grown over
            // the room it left, in place (no MREMAP_MAYMOVE).
            let got = unsafe {
                check(libc::munmap(base.add(HALF).cast(), HALF), "munmap");
                libc::mremap(base.cast(), HALF, 2 * HALF, 0)
            };
            if got != base.cast() {
                report(&path, "MOVED");
                std::process::exit(1);
            }
            grown = true;
            fill(words, 32..64, true);
            fill(words, 0..1, true);
            report(&path, "GROWN");
        }
        let asked = ASKED[1].load(Ordering::SeqCst);
        if verified < asked {
            verified = asked;
            let pages = if grown { 64 } else { 32 };
            // SAFETY: reads inside the read-write part of our own mapping.
            let ok = (0..pages * PAGE / 8)
                .all(|i| unsafe { words.add(i).read_volatile() } == word(i, grown));
            report(&path, &format!("VERIFY ok={}", u8::from(ok)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
