//! `mempattern [<mib>] [--finish-after-rounds R] [--threads T]`
//!
//! Maps `<mib>` MiB (default 64) of private anonymous memory (a VMA of its
//! own: `PROT_NONE` guard pages on both sides) and fills the
//! word at every byte offset `i` with [`chpox_tests::pattern_word`]`(i)`.
//! Prints `READY addr=0x<hex> len=<bytes>`, then works in rounds: each
//! round sleeps 100 ms and verifies the next 1/16th of the region (rolling
//! round-robin). A mismatch prints `CORRUPT offset=<n>` and exits 3.
//!
//! Without `--finish-after-rounds` it runs forever. With it, after `R`
//! rounds it verifies the whole region, prints
//! `DONE sum=<hex wrapping sum of all words>` and exits 0; the output is
//! the same for every run with the same arguments.
//!
//! With `--threads T`, `T` more threads sleep for good (a dump's freeze
//! then lasts long: it reads and borrows every thread).

use std::time::Duration;

use chpox_tests::{mmap_anon_isolated, pattern_word, say};

/// Verifies words in `[start, end)` byte offsets; returns the first bad
/// offset.
fn verify(region: &[u64], start: usize, end: usize) -> Option<usize> {
    (start / 8..end / 8)
        .find(|&w| region[w] != pattern_word(w as u64 * 8))
        .map(|w| w * 8)
}

fn main() {
    let mut mib: usize = 64;
    let mut rounds: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--finish-after-rounds" {
            let r = args.next().expect("--finish-after-rounds needs a value");
            rounds = Some(r.parse().expect("--finish-after-rounds: not a number"));
        } else if a == "--threads" {
            let t: usize = args
                .next()
                .expect("--threads needs a value")
                .parse()
                .expect("--threads: not a number");
            for _ in 0..t {
                std::thread::spawn(|| {
                    loop {
                        std::thread::park();
                    }
                });
            }
        } else {
            mib = a.parse().expect("<mib>: not a number");
        }
    }
    assert!(mib > 0, "<mib> must be positive");

    let len = mib << 20;
    let base = mmap_anon_isolated(len, 0);
    // SAFETY: the mapping is len bytes, page aligned, and owned by us only.
    let region: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base.cast(), len / 8) };
    for (w, word) in region.iter_mut().enumerate() {
        *word = pattern_word(w as u64 * 8);
    }
    let region: &[u64] = region;

    say!("READY addr={:#x} len={len}", base as usize);

    let slice = len / 16;
    let mut round: u64 = 0;
    loop {
        if rounds.is_some_and(|r| round >= r) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let start = (round % 16) as usize * slice;
        if let Some(off) = verify(region, start, start + slice) {
            say!("CORRUPT offset={off}");
            std::process::exit(3);
        }
        round += 1;
    }

    if let Some(off) = verify(region, 0, len) {
        say!("CORRUPT offset={off}");
        std::process::exit(3);
    }
    let sum = region.iter().fold(0u64, |acc, &w| acc.wrapping_add(w));
    say!("DONE sum={sum:#x}");
}
