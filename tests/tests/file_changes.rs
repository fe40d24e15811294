//! Files change between a checkpoint and its restore (a job left running
//! goes on writing them, someone edits them): the image holds processes,
//! not file contents, so restore reopens them as they are now, and says
//! which changed, except those the process only appends to.
//!
//! Needs root (ptrace). Run with `cargo test -p chpox-tests --test file_changes`.

mod common;

use std::io::Write;

use common::procs::signal;
use common::{chpox_ok, path_str, python, run_chpox, show, tempdir, wait_pid_free};

/// Writes a line to `data` (truncated) and to `log` (appended), then idles.
const WRITER: &str = r#"import time
data = open("data", "w")
data.write("first line\n")
data.flush()
log = open("log", "a")
log.write("started\n")
log.flush()
print("READY", flush=True)
while True:
    time.sleep(0.1)
"#;

#[test]
fn restore_names_an_open_file_that_changed_since_the_checkpoint() {
    let dir = tempdir();
    let mut t = python(WRITER, &[], dir.path());
    let image = dir.path().join("w.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    // After the checkpoint: both files grow.
    for name in ["data", "log"] {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(name))
            .expect("open for appending");
        f.write_all(b"written after the checkpoint\n")
            .expect("append");
    }
    t.child.kill().expect("kill the original");
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);

    let out = run_chpox(&["restore", "--detach", path_str(&image)]);
    assert!(out.status.success(), "restore: {}", show(&out));
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("restore --detach prints the PID");
    let err = String::from_utf8_lossy(&out.stderr);
    let data = format!("{}/data", dir.path().display());
    assert!(
        err.lines()
            .any(|l| l.contains(&data) && l.contains("changed since the checkpoint")),
        "no word about {data}: {err}"
    );
    assert!(
        !err.contains(&format!("{}/log", dir.path().display())),
        "an appended log is not worth a warning: {err}"
    );
    signal(pid, libc::SIGKILL);
    wait_pid_free(pid);
}

#[test]
fn restore_says_nothing_when_the_files_are_as_they_were() {
    let dir = tempdir();
    let mut t = python(WRITER, &[], dir.path());
    let image = dir.path().join("w.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
    let out = run_chpox(&["restore", "--detach", path_str(&image)]);
    assert!(out.status.success(), "restore: {}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("changed since"), "{err}");
    kill_restored(&out);
}

/// Maps `data` (its whole content) and idles.
const MAPPER: &str = r#"import mmap, time
f = open("data", "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("READY", flush=True)
while True:
    time.sleep(0.1)
"#;

/// `chpox dump` of `pid` to `image` with the file hash cache in `cache`;
/// returns the hash recorded for `file`.
fn dumped_hash(
    pid: i32,
    image: &std::path::Path,
    cache: &std::path::Path,
    file: &std::path::Path,
) -> String {
    let out = std::process::Command::new(common::chpox_bin())
        .args(["dump", &pid.to_string(), "-o", path_str(image)])
        .env("CHPOX_CACHE_DIR", cache)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chpox");
    assert!(out.status.success(), "{}", show(&out));
    let meta = common::dumps::open_image(image);
    let wanted = std::fs::canonicalize(file).expect("canonical path");
    meta.files
        .iter()
        .find(|f| std::path::Path::new(&f.path) == wanted)
        .unwrap_or_else(|| panic!("{} not among the image's files", wanted.display()))
        .blake3
        .clone()
}

/// Dumps keep the hashes of the files they recorded for the next dump
/// (`chpox dump` is a new process each time): a file rewritten since, with
/// its size and even its modification time as they were, is hashed
/// again (its change time tells), and a cache file that others may write
/// is not believed.
#[test]
fn the_file_hash_cache_keeps_hashes_only_for_unchanged_files() {
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::write(&data, [b'a'; 8192]).expect("write data");
    let t = python(MAPPER, &[], dir.path());
    let cache = dir.path().join("cache");
    let image = dir.path().join("m.img");
    let hash_of = |bytes: &[u8]| chpox::files::hash_bytes(bytes);

    assert_eq!(
        dumped_hash(t.pid, &image, &cache, &data),
        hash_of(&[b'a'; 8192])
    );
    let kept = std::fs::read_to_string(cache.join("file-hashes")).expect("cache written");
    assert!(kept.contains(&hash_of(&[b'a'; 8192])), "{kept}");

    // Rewritten in place, same size, mtime set back: a new content.
    rewrite_keeping_mtime(&data, b'b');
    assert_eq!(
        dumped_hash(t.pid, &image, &cache, &data),
        hash_of(&[b'b'; 8192])
    );

    // A planted hash in a cache file anyone may write is not used.
    let planted = cache_line(&data, &"0".repeat(64));
    let file = cache.join("file-hashes");
    std::fs::write(&file, &planted).expect("plant");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    assert_eq!(
        dumped_hash(t.pid, &image, &cache, &data),
        hash_of(&[b'b'; 8192])
    );
    // Ours alone again, the planted line is believed: the key is right.
    std::fs::write(&file, &planted).expect("plant");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(dumped_hash(t.pid, &image, &cache, &data), "0".repeat(64));
}

/// Rewrite `file` in place with `byte`s, keeping its size and putting its
/// modification time back: only its change time tells.
fn rewrite_keeping_mtime(file: &std::path::Path, byte: u8) {
    let mtime = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .expect("mtime");
    let len = std::fs::metadata(file).expect("metadata").len() as usize;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    f.write_all(&vec![byte; len]).expect("rewrite");
    f.set_modified(mtime).expect("set mtime back");
}

/// A line of the file hash cache saying that `file`, as it is now, has
/// the content hash `hash`.
fn cache_line(file: &std::path::Path, hash: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).expect("metadata");
    format!(
        "{} {} {} {} {} {hash}\n",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec()
    )
}

/// Kill the process `chpox restore --detach` printed the PID of.
fn kill_restored(out: &std::process::Output) {
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("restore --detach prints the PID");
    signal(pid, libc::SIGKILL);
    wait_pid_free(pid);
}

/// `chpox restore --detach IMAGE` with the file hash cache in `cache`.
fn restore_with_cache(image: &std::path::Path, cache: &std::path::Path) -> std::process::Output {
    std::process::Command::new(common::chpox_bin())
        .args(["restore", "--detach", path_str(image)])
        .env("CHPOX_CACHE_DIR", cache)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chpox")
}

/// Restores compare the files the memory maps with the image through the
/// same cache: a file unchanged since it was hashed is not read again (a
/// restore right after its dump, or of the same image again), one hashed
/// by the restore is remembered, and one rewritten since (same size, mtime
/// set back) is hashed again and refused.
#[test]
fn restores_use_the_file_hash_cache_and_still_refuse_a_changed_file() {
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::write(&data, [b'a'; 8192]).expect("write data");
    let mut t = python(MAPPER, &[], dir.path());
    let image = dir.path().join("m.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap the original");
    wait_pid_free(t.pid);
    let hash = chpox::files::hash_bytes(&[b'a'; 8192]);

    // A cache of its own: the restore hashes the files and keeps them.
    let cache = dir.path().join("restore-cache");
    let out = restore_with_cache(&image, &cache);
    assert!(out.status.success(), "restore: {}", show(&out));
    kill_restored(&out);
    let kept = std::fs::read_to_string(cache.join("file-hashes")).expect("cache written");
    assert!(
        kept.contains(&hash),
        "the restore kept no hash of data: {kept}"
    );

    // Rewritten in place, same size, mtime set back: read again, refused.
    rewrite_keeping_mtime(&data, b'b');
    let out = restore_with_cache(&image, &cache);
    assert!(!out.status.success(), "a changed file was not noticed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("same size, different content"),
        "refused for another reason: {err}"
    );

    // What the cache says of this very identity is what the restore goes
    // by, without reading the file: the proof that it skips the reading.
    std::fs::write(cache.join("file-hashes"), cache_line(&data, &hash)).expect("write the cache");
    let out = restore_with_cache(&image, &cache);
    assert!(out.status.success(), "restore: {}", show(&out));
    kill_restored(&out);
}
