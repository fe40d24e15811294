//! `deletedfiles DIR`
//!
//! Opens `DIR/scratch` twice (read-write and read-only, two open file
//! descriptions), writes `hello` through the first, makes it mode 0640 and
//! deletes it. Prints `READY ...`; on SIGUSR1 checks that both descriptors
//! still show one file: the mode is 0640, both read `hello`, and what is
//! written through the first is read through the second, and what is
//! written into a shared mapping of it too. Also maps
//! `DIR/mapped` (mode 0604) and deletes it: it keeps its mode and content.
//! Prints `OK`
//! lines and `DONE`, exit 0; a failed check panics (exit 101).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::Duration;

use chpox_tests::{say, stop_on_signal, wait_for_stop};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: deletedfiles DIR");
    let path = std::path::Path::new(&dir).join("scratch");
    stop_on_signal(libc::SIGUSR1);
    let mut a = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create scratch");
    a.write_all(b"hello").expect("write hello");
    a.set_len(4096).expect("grow scratch");
    // SAFETY: a shared read-write mapping of the 4096 bytes of scratch.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&a),
            0,
        )
    };
    assert_ne!(shared, libc::MAP_FAILED, "mmap scratch shared");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let b = File::open(&path).expect("open scratch again");
    std::fs::remove_file(&path).expect("unlink scratch");

    // A deleted file only mapped, mode 0604.
    let mapped_path = std::path::Path::new(&dir).join("mapped");
    std::fs::write(&mapped_path, [7u8; 4096]).expect("write mapped");
    std::fs::set_permissions(&mapped_path, std::fs::Permissions::from_mode(0o604))
        .expect("chmod mapped");
    let f = File::open(&mapped_path).expect("open mapped");
    // SAFETY: a private read-only mapping of a 4096-byte file we opened.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap");
    drop(f);
    std::fs::remove_file(&mapped_path).expect("unlink mapped");
    say!("READY");

    wait_for_stop(Duration::from_millis(100));

    for (name, f) in [("a", &a), ("b", &b)] {
        let md = f.metadata().expect("fstat");
        assert_eq!(
            md.mode() & 0o7777,
            0o640,
            "the mode of the file behind {name}"
        );
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 0).expect("pread");
        assert_eq!(&buf, b"hello", "the content behind {name}");
    }
    say!("OK mode and content");
    assert_eq!(
        a.metadata().expect("fstat a").ino(),
        b.metadata().expect("fstat b").ino(),
        "one inode"
    );
    a.write_all_at(b"shared", 100).expect("pwrite through a");
    let mut buf = [0u8; 6];
    b.read_exact_at(&mut buf, 100).expect("pread through b");
    assert_eq!(&buf, b"shared", "b sees what a wrote");
    // SAFETY: the shared mapping is live and 4096 bytes long.
    unsafe { std::ptr::copy_nonoverlapping(b"viamap".as_ptr(), shared.cast::<u8>().add(200), 6) };
    b.read_exact_at(&mut buf, 200).expect("pread through b");
    assert_eq!(
        &buf, b"viamap",
        "b sees what was written to the shared mapping"
    );
    say!("OK one file");
    let start = map as usize;
    let link = format!("/proc/self/map_files/{:x}-{:x}", start, start + 4096);
    let md = std::fs::metadata(&link).expect("stat the mapped file");
    assert_eq!(
        md.mode() & 0o7777,
        0o604,
        "the mode of the mapped deleted file"
    );
    // SAFETY: the mapping is live and 4096 bytes long.
    let bytes = unsafe { std::slice::from_raw_parts(map as *const u8, 4096) };
    assert!(bytes.iter().all(|&b| b == 7), "the mapped content");
    say!("OK mapped");
    say!("DONE");
}
