//! `sharedanon [<mib>]`
//!
//! Maps `<mib>` MiB (default 16) `MAP_SHARED | MAP_ANONYMOUS`, then forks a
//! child that fills the second half and exits; the parent fills the first
//! half itself and never touches the second, whose pages are then in the
//! shared memory object but not in the parent's page tables. Page `p` gets
//! every byte = `(p as u8) ^ 0x5a`, except its first 8 bytes, which hold
//! `p` (`u64`, little-endian).
//!
//! Prints `READY addr=0x<hex> len=<bytes>`, then sleeps until SIGUSR1;
//! then verifies every page and prints `DONE ok` and exits 0, or
//! `BAD page=<p>` and exits 1.

use std::time::Duration;

use chpox_tests::{arg_or, check, say, stop_on_signal, wait_for_stop};

const PAGE: usize = 4096;

fn expected_page(p: usize) -> [u8; PAGE] {
    let mut page = [(p as u8) ^ 0x5a; PAGE];
    page[..8].copy_from_slice(&(p as u64).to_le_bytes());
    page
}

fn fill(base: *mut u8, pages: std::ops::Range<usize>) {
    for p in pages {
        // SAFETY: page p lies inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(expected_page(p).as_ptr(), base.add(p * PAGE), PAGE)
        };
    }
}

fn main() {
    let mib: usize = arg_or(0, 16);
    assert!(mib > 0, "<mib> must be positive");
    let len = mib << 20;
    let pages = len / PAGE;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choice.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        base,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let base = base.cast::<u8>();
    stop_on_signal(libc::SIGUSR1);

    // SAFETY: this program has one thread, so the child may run Rust code.
    let child = check(unsafe { libc::fork() }, "fork");
    if child == 0 {
        fill(base, pages / 2..pages);
        // SAFETY: _exit skips the parent's atexit handlers and buffers.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    check(unsafe { libc::waitpid(child, &mut status, 0) }, "waitpid");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: {status:#x}"
    );
    fill(base, 0..pages / 2);

    say!("READY addr={:#x} len={len}", base as usize);
    wait_for_stop(Duration::from_secs(1));

    for p in 0..pages {
        // SAFETY: page p lies inside the mapping.
        let got = unsafe { std::slice::from_raw_parts(base.add(p * PAGE), PAGE) };
        if got != expected_page(p) {
            say!("BAD page={p}");
            std::process::exit(1);
        }
    }
    say("DONE ok");
}
