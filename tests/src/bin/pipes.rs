//! `pipes`
//!
//! Makes two pipes of its own. `kept`: capacity raised to 128 KiB
//! (`F_SETPIPE_SZ`), read end `O_NONBLOCK`, holding 100000 unread bytes
//! (byte `i` = `(i % 251) as u8`), more than a default 64 KiB pipe holds.
//! `spare`: empty.
//!
//! Prints `READY`, then reads one line from stdin (blocking) and prints, a
//! line each:
//! - `STDIN <the line>`;
//! - `KEPT ok`: all 100000 bytes read back from `kept` in order, and then
//!   `EAGAIN` (still non-blocking, nothing more); else `KEPT bad <why>`;
//! - `CAPACITY <F_GETPIPE_SZ of kept>`;
//! - `ROUNDTRIP ok`: `ping` written to `spare` reads back; else `ROUNDTRIP bad`;
//! - `EOF ok`: after closing `spare`'s write end, a read returns 0; else
//!   `EOF bad`.
//!
//! Exits 0.

use std::io::BufRead;

use chpox_tests::{check, say};

const KEPT_BYTES: usize = 100_000;
const KEPT_CAPACITY: libc::c_int = 128 * 1024;

fn pipe() -> (libc::c_int, libc::c_int) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into fds.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    );
    (fds[0], fds[1])
}

fn write_all(fd: libc::c_int, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: the slice is valid for its length.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        done += check(n, "write") as usize;
    }
}

/// One read of up to `len` bytes: the bytes, or the errno.
fn read_some(fd: libc::c_int, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is valid for len bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), len) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn check_kept(fd: libc::c_int) -> String {
    let mut got = Vec::with_capacity(KEPT_BYTES);
    while got.len() < KEPT_BYTES {
        match read_some(fd, KEPT_BYTES - got.len()) {
            Ok(b) if b.is_empty() => return format!("bad EOF after {} bytes", got.len()),
            Ok(b) => got.extend_from_slice(&b),
            Err(e) => return format!("bad errno {e} after {} bytes", got.len()),
        }
    }
    if let Some(i) = (0..KEPT_BYTES).find(|&i| got[i] != (i % 251) as u8) {
        return format!("bad byte {i}");
    }
    match read_some(fd, 1) {
        Err(libc::EAGAIN) => "ok".into(),
        other => format!("bad after the bytes: {other:?}"),
    }
}

fn main() {
    let (kept_r, kept_w) = pipe();
    // SAFETY: fcntl on our own descriptors.
    unsafe {
        check(
            libc::fcntl(kept_w, libc::F_SETPIPE_SZ, KEPT_CAPACITY),
            "F_SETPIPE_SZ",
        );
        check(
            libc::fcntl(kept_r, libc::F_SETFL, libc::O_NONBLOCK),
            "F_SETFL",
        );
    }
    let bytes: Vec<u8> = (0..KEPT_BYTES).map(|i| (i % 251) as u8).collect();
    write_all(kept_w, &bytes);
    let (spare_r, spare_w) = pipe();

    say("READY");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .expect("read stdin");
    say!("STDIN {}", line.trim_end());
    say!("KEPT {}", check_kept(kept_r));
    // SAFETY: fcntl on our own descriptor.
    say!("CAPACITY {}", unsafe {
        libc::fcntl(kept_w, libc::F_GETPIPE_SZ)
    });
    write_all(spare_w, b"ping");
    let ok = read_some(spare_r, 16).is_ok_and(|b| b == b"ping");
    say!("ROUNDTRIP {}", if ok { "ok" } else { "bad" });
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(spare_w) };
    let ok = read_some(spare_r, 16).is_ok_and(|b| b.is_empty());
    say!("EOF {}", if ok { "ok" } else { "bad" });
}
