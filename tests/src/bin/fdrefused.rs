//! `fdrefused MODE DIR`
//!
//! Holds something chpox must refuse to checkpoint, prints `READY`, and
//! waits until `DIR/go` exists, then prints `ALIVE` and exits 0:
//! - `uring`: an io_uring instance (`io_uring_setup`, rings mapped);
//! - `aio`: an AIO context (`io_setup`), a ring mapped and no descriptor;
//! - `inotify-gone`: an inotify watch on `DIR/gone`, a file then unlinked
//!   while still open (the watch stays, the path is gone);
//! - `inotify-proc`: an inotify watch on /proc/sys/kernel (procfs file
//!   handles cannot be opened again).

use std::ffi::CString;
use std::time::Duration;

use chpox_tests::{check, say};

fn main() {
    let mode = std::env::args().nth(1).expect("usage: fdrefused MODE DIR");
    let dir = std::env::args().nth(2).expect("usage: fdrefused MODE DIR");
    match mode.as_str() {
        "uring" => {
            // struct io_uring_params: 120 bytes, zeroed asks for defaults.
            let mut params = [0u8; 120];
            // SAFETY: the kernel fills params.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            check(fd, "io_uring_setup");
            // SAFETY: maps the submission ring of our own instance.
            let ring = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd as i32,
                    0,
                )
            };
            assert_ne!(ring, libc::MAP_FAILED, "mmap io_uring ring");
        }
        "aio" => {
            let mut ctx: libc::c_ulong = 0;
            // SAFETY: the kernel writes the context id into ctx.
            check(
                unsafe { libc::syscall(libc::SYS_io_setup, 8, &raw mut ctx) },
                "io_setup",
            );
        }
        "inotify-gone" => {
            let path = format!("{dir}/gone");
            std::fs::write(&path, b"x").expect("write gone");
            let held = std::fs::File::open(&path).expect("open gone");
            // SAFETY: inotify_init1 takes flags.
            let ino = check(unsafe { libc::inotify_init1(0) }, "inotify_init1");
            let c = CString::new(path.as_str()).expect("path");
            // SAFETY: c is NUL-terminated.
            check(
                unsafe { libc::inotify_add_watch(ino, c.as_ptr(), libc::IN_MODIFY) },
                "inotify_add_watch",
            );
            std::fs::remove_file(&path).expect("unlink gone");
            std::mem::forget(held);
        }
        "inotify-proc" => {
            // SAFETY: inotify_init1 takes flags.
            let ino = check(unsafe { libc::inotify_init1(0) }, "inotify_init1");
            let c = CString::new("/proc/sys/kernel").expect("path");
            // SAFETY: c is NUL-terminated.
            check(
                unsafe { libc::inotify_add_watch(ino, c.as_ptr(), libc::IN_CREATE) },
                "inotify_add_watch",
            );
        }
        other => panic!("unknown mode {other}"),
    }
    say!("READY");
    while !std::path::Path::new(&format!("{dir}/go")).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    say!("ALIVE");
}
