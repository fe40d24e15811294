//! `ownuffd <mib>`
//!
//! A process with a userfaultfd of its own: `<mib>` MiB of private
//! anonymous memory filled with [`chpox_tests::pattern_word`] (a VMA of its
//! own), and beside it 2 MiB, filled with the pattern too, that it
//! registers for write-protect with its own userfaultfd (nothing protected
//! yet). Prints `READY addr=0x<hex> len=<bytes> own=0x<hex> own_len=<bytes>`
//! and sleeps until SIGUSR1; then it write-protects its own range through
//! its userfaultfd (which works only while that range is still registered
//! with it), checks both regions and prints `OWN OK` (exit 0), or says what
//! failed (exit 3).

use std::time::Duration;

use chpox_tests::{check, mmap_anon_isolated, pattern_word, say, stop_on_signal, wait_for_stop};

const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

fn fill(base: *mut u8, len: usize) -> &'static [u64] {
    // SAFETY: the mapping is len bytes, page aligned, ours only, and never
    // unmapped.
    let words: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base.cast(), len / 8) };
    for (w, word) in words.iter_mut().enumerate() {
        *word = pattern_word(w as u64 * 8);
    }
    words
}

fn intact(words: &[u64]) -> bool {
    words
        .iter()
        .enumerate()
        .all(|(w, &word)| word == pattern_word(w as u64 * 8))
}

fn main() {
    let mib: usize = chpox_tests::arg_or(1, 8);
    let len = mib << 20;
    let own_len = 2 << 20;
    let base = mmap_anon_isolated(len, 0);
    let own = mmap_anon_isolated(own_len, 0);
    let region = fill(base, len);
    let own_words = fill(own, own_len);

    // SAFETY: plain syscalls and ioctls on a descriptor we own, with
    // argument structs that live across each call.
    let uffd = unsafe {
        let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as libc::c_int;
        check(fd, "userfaultfd");
        let mut api = [UFFD_API, 0u64, 0u64];
        check(libc::ioctl(fd, UFFDIO_API, api.as_mut_ptr()), "UFFDIO_API");
        let mut register = [own as u64, own_len as u64, UFFDIO_REGISTER_MODE_WP, 0u64];
        check(
            libc::ioctl(fd, UFFDIO_REGISTER, register.as_mut_ptr()),
            "UFFDIO_REGISTER",
        );
        fd
    };

    say!(
        "READY addr={:#x} len={len} own={:#x} own_len={own_len}",
        base as usize,
        own as usize
    );
    stop_on_signal(libc::SIGUSR1);
    wait_for_stop(Duration::from_millis(50));

    let mut protect = [own as u64, own_len as u64, UFFDIO_WRITEPROTECT_MODE_WP];
    // SAFETY: an ioctl on our own descriptor with a live argument struct.
    let ret = unsafe { libc::ioctl(uffd, UFFDIO_WRITEPROTECT, protect.as_mut_ptr()) };
    if ret != 0 {
        say!(
            "OWN LOST: UFFDIO_WRITEPROTECT: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(3);
    }
    if !intact(region) || !intact(own_words) {
        say!("OWN CORRUPT");
        std::process::exit(3);
    }
    say!("OWN OK");
}
