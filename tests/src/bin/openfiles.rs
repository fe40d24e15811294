//! `openfiles <dir>`
//!
//! Opens a known set of files on fixed descriptor numbers:
//!
//! | fd | file | flags | offset |
//! |----|------|-------|--------|
//! | 10 | `<dir>/a.txt`, 1000 bytes, byte i = `b'a' + i % 26` | `O_RDWR` | 123 |
//! | 11 | `<dir>/b.log`, 77 bytes, byte i = `b'0' + i % 10` | `O_WRONLY\|O_APPEND` | 77 |
//! | 12 | `<dir>/c.bin`, 10000 bytes, byte i = `i % 251` | `O_RDONLY`, close-on-exec | 4096 |
//! | 13 | `/dev/null` | `O_WRONLY` | 0 |
//! | 14 | `/dev/zero` | `O_RDONLY` | 0 |
//! | 15 | `/dev/urandom` | `O_RDONLY` | 0 |
//! | 16 | `<dir>/deleted.dat`, `"still here\n"` x 100, unlinked | `O_RDWR` | 50 |
//!
//! Prints `READY fds=10,11,12,13,14,15,16`, then sleeps (1 s steps) until
//! SIGUSR1. Then it reads 10 bytes from fd 10 and prints `A=<bytes>` and
//! `POS=<offset of fd 10>` (`A=tuvwxyzabc`, `POS=133`), appends `X` to
//! fd 11 and prints `B_POS=<offset of fd 11>` (`B_POS=78`), prints
//! `C_POS=<offset of fd 12>` (`C_POS=4096`), reads 10 bytes from fd 16
//! and prints `D=<bytes, escaped>` and `D_POS=<offset>`
//! (`D=here\nstill`, `D_POS=60`), and exits 0.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use chpox_tests::{check, say, stop_on_signal, wait_for_stop};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains NUL")
}

/// Opens `path` and moves the descriptor to `target` (keeping `cloexec`).
fn open_at(path: &Path, flags: libc::c_int, target: libc::c_int) {
    let c = cpath(path);
    // SAFETY: c is a valid NUL-terminated path.
    let fd = check(
        unsafe { libc::open(c.as_ptr(), flags, 0o644) },
        &format!("open {}", path.display()),
    );
    let dup_flags = flags & libc::O_CLOEXEC;
    // SAFETY: plain descriptor calls.
    unsafe {
        check(libc::dup3(fd, target, dup_flags), "dup3");
        check(libc::close(fd), "close");
    }
}

fn write_all(fd: libc::c_int, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: writes from a live slice.
        let n = check(
            unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) },
            "write",
        );
        done += n as usize;
    }
}

fn read_exact(fd: libc::c_int, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut done = 0;
    while done < n {
        // SAFETY: reads into a live buffer.
        let got = check(
            unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), n - done) },
            "read",
        );
        assert!(got > 0, "unexpected EOF on fd {fd}");
        done += got as usize;
    }
    buf
}

fn seek(fd: libc::c_int, off: i64, whence: libc::c_int) -> i64 {
    // SAFETY: plain descriptor call.
    check(unsafe { libc::lseek(fd, off, whence) }, "lseek")
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: openfiles <dir>");
    let dir = Path::new(&dir);
    stop_on_signal(libc::SIGUSR1);

    // a.txt: fd 10, O_RDWR, offset 123.
    let a: Vec<u8> = (0..1000).map(|i| b'a' + (i % 26) as u8).collect();
    open_at(
        &dir.join("a.txt"),
        libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
        10,
    );
    write_all(10, &a);
    seek(10, 123, libc::SEEK_SET);

    // b.log: fd 11, O_WRONLY|O_APPEND, 77 bytes written.
    let b: Vec<u8> = (0..77).map(|i| b'0' + (i % 10) as u8).collect();
    open_at(
        &dir.join("b.log"),
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_TRUNC,
        11,
    );
    write_all(11, &b);

    // c.bin: fd 12, O_RDONLY|O_CLOEXEC at offset 4096 of 10000 bytes.
    let c: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("c.bin"), &c).expect("write c.bin");
    open_at(&dir.join("c.bin"), libc::O_RDONLY | libc::O_CLOEXEC, 12);
    seek(12, 4096, libc::SEEK_SET);

    open_at(Path::new("/dev/null"), libc::O_WRONLY, 13);
    open_at(Path::new("/dev/zero"), libc::O_RDONLY, 14);
    open_at(Path::new("/dev/urandom"), libc::O_RDONLY, 15);

    // deleted.dat: fd 16, O_RDWR at offset 50, then unlinked.
    let d = "still here\n".repeat(100);
    let dpath = dir.join("deleted.dat");
    open_at(&dpath, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 16);
    write_all(16, d.as_bytes());
    seek(16, 50, libc::SEEK_SET);
    std::fs::remove_file(&dpath).expect("unlink deleted.dat");

    say("READY fds=10,11,12,13,14,15,16");

    wait_for_stop(Duration::from_secs(1));

    let got = read_exact(10, 10);
    say!("A={}", String::from_utf8_lossy(&got));
    say!("POS={}", seek(10, 0, libc::SEEK_CUR));
    write_all(11, b"X");
    say!("B_POS={}", seek(11, 0, libc::SEEK_CUR));
    say!("C_POS={}", seek(12, 0, libc::SEEK_CUR));
    let got = read_exact(16, 10);
    say!("D={}", got.escape_ascii());
    say!("D_POS={}", seek(16, 0, libc::SEEK_CUR));
}
