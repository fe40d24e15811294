//! `reader <fifo-or-file>`
//!
//! Opens the path, prints `READY fd=<n>` and blocks in one `read(2)` of up
//! to 4096 bytes. A FIFO is opened `O_RDWR` (Linux allows that), so
//! neither the open nor the read sees "no writer": the read blocks until
//! someone writes. Anything else is opened `O_RDONLY`.
//!
//! Then it prints `GOT <bytes>` (the bytes with `escape_ascii`, so
//! `"hi\n"` prints as `GOT hi\n` with a literal backslash-n) and exits 0.
//! A read failing with `EINTR` prints `EINTR` and exits 2.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;

use chpox_tests::{check, say};

fn main() {
    let path = std::env::args_os()
        .nth(1)
        .expect("usage: reader <fifo-or-file>");
    let is_fifo = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {path:?}: {e}"))
        .file_type()
        .is_fifo();
    let flags = if is_fifo {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    let c = CString::new(path.as_bytes()).expect("path contains NUL");
    // SAFETY: c is a valid NUL-terminated path.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags) }, "open");
    say!("READY fd={fd}");

    let mut buf = [0u8; 4096];
    // SAFETY: reads into a live buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            say("EINTR");
            std::process::exit(2);
        }
        panic!("read failed: {err}");
    }
    say!("GOT {}", buf[..n as usize].escape_ascii());
}
