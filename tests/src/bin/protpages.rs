//! `protpages <mib>`
//!
//! Pages a debugger can read but the process itself may not: `<mib>` MiB of
//! private anonymous memory filled with [`chpox_tests::pattern_word`] (a
//! VMA of its own), and beside it two 1 MiB regions filled the same way and
//! then made `PROT_NONE` and `PROT_WRITE` (write-only). Prints
//! `READY addr=0x<hex> len=<bytes> none=0x<hex> wo=0x<hex> small=<bytes>`
//! and sleeps until killed.

use chpox_tests::{check, mmap_anon_isolated, pattern_word, say};

fn fill(base: *mut u8, len: usize) {
    // SAFETY: the mapping is len bytes, page aligned and ours only.
    let words: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base.cast(), len / 8) };
    for (w, word) in words.iter_mut().enumerate() {
        *word = pattern_word(w as u64 * 8);
    }
}

fn main() {
    let mib: usize = chpox_tests::arg_or(1, 8);
    let len = mib << 20;
    let small = 1 << 20;
    let base = mmap_anon_isolated(len, 0);
    let none = mmap_anon_isolated(small, 0);
    let wo = mmap_anon_isolated(small, 0);
    fill(base, len);
    fill(none, small);
    fill(wo, small);
    // SAFETY: mprotect of mappings made above.
    unsafe {
        check(
            libc::mprotect(none.cast(), small, libc::PROT_NONE),
            "mprotect none",
        );
        check(
            libc::mprotect(wo.cast(), small, libc::PROT_WRITE),
            "mprotect wo",
        );
    }
    say!(
        "READY addr={:#x} len={len} none={:#x} wo={:#x} small={small}",
        base as usize,
        none as usize,
        wo as usize
    );
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
