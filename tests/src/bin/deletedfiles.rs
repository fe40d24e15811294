//! `deletedfiles DIR`
//!
//! Opens `DIR/scratch` twice (read-write and read-only, two open file
//! descriptions), writes `hello` through the first, makes it mode 0640 and
//! deletes it. Prints `READY ...`; on SIGUSR1 checks that both descriptors
//! still show one file: the mode is 0640, both read `hello`, and what is
//! written through the first is read through the second. Prints `OK`
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
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let b = File::open(&path).expect("open scratch again");
    std::fs::remove_file(&path).expect("unlink scratch");
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
    say!("OK one file");
    say!("DONE");
}
