//! `memtree [<procs>] [<mib>]`
//!
//! A process tree for `cargo xtask bench`: `<procs>` processes (default 8)
//! with `<mib>` MiB (default 128) of dirty private anonymous memory each.
//!
//! The root maps `<mib>` MiB (a VMA of its own, as in `mempattern`), fills
//! the word at every byte offset `i` with [`chpox_tests::pattern_word`]`(i)`
//! and forks `<procs> - 1` children. Child `n` (1, 2, …) rewrites every
//! word of its copy with `pattern_word(i) ^ n`, so each of its pages is its
//! own (copy-on-write broken), not shared with the root: the tree holds
//! `<procs> * <mib>` MiB. Each child then writes one byte to a pipe and
//! closes it; the root reads the pipe to its end and closes it too, so no
//! descriptor links the processes once the tree is ready.
//!
//! Then the root prints `READY pids=<root>,<child 1>,… len=<bytes>` and
//! every process sleeps in steps of 100 ms forever. A child whose parent is
//! no longer the root (the root was killed) exits at its next step, so
//! a killed root does not leave the children behind for long.

use std::time::Duration;

use chpox_tests::{arg_or, check, mmap_anon_isolated, pattern_word, say};

const STEP: Duration = Duration::from_millis(100);

fn main() {
    let procs: usize = arg_or(0, 8);
    let mib: usize = arg_or(1, 128);
    assert!(procs > 0, "<procs> must be positive");
    assert!(mib > 0, "<mib> must be positive");

    let len = mib << 20;
    let base = mmap_anon_isolated(len, 0);
    // SAFETY: the mapping is len bytes, page aligned, and owned by us only
    // (a forked child has its own copy).
    let region: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base.cast(), len / 8) };
    for (w, word) in region.iter_mut().enumerate() {
        *word = pattern_word(w as u64 * 8);
    }

    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array.
    check(unsafe { libc::pipe(fds.as_mut_ptr()) }, "pipe");
    let [read_end, write_end] = fds;
    // SAFETY: getpid has no preconditions.
    let root = unsafe { libc::getpid() };
    let mut pids = vec![root];
    for n in 1..procs {
        // SAFETY: this program is single-threaded when it forks, so the
        // child may go on running Rust code.
        let pid = check(unsafe { libc::fork() }, "fork");
        if pid == 0 {
            child(n as u64, region, read_end, write_end, root);
        }
        pids.push(pid);
    }
    // SAFETY: closing our own descriptor.
    check(unsafe { libc::close(write_end) }, "close");
    let mut done = 0;
    loop {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live local buffer.
        let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            _ => panic!("read: {}", std::io::Error::last_os_error()),
        }
    }
    // SAFETY: closing our own descriptor.
    check(unsafe { libc::close(read_end) }, "close");
    assert_eq!(done, procs - 1, "not every child finished its memory");

    let list: Vec<String> = pids.iter().map(i32::to_string).collect();
    say!("READY pids={} len={len}", list.join(","));
    loop {
        std::thread::sleep(STEP);
    }
}

fn child(n: u64, region: &mut [u64], read_end: i32, write_end: i32, root: i32) -> ! {
    // SAFETY: closing our own descriptor.
    check(unsafe { libc::close(read_end) }, "close");
    for (w, word) in region.iter_mut().enumerate() {
        *word = pattern_word(w as u64 * 8) ^ n;
    }
    // SAFETY: writes one byte from a live local, then closes our own
    // descriptor.
    unsafe {
        check(libc::write(write_end, [1u8].as_ptr().cast(), 1), "write");
        check(libc::close(write_end), "close");
    }
    loop {
        std::thread::sleep(STEP);
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != root {
            // SAFETY: _exit skips atexit handlers and stdio buffers, which
            // a forked child must not run twice.
            unsafe { libc::_exit(0) };
        }
    }
}
