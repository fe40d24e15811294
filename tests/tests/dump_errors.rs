//! `chpox dump` on bad input, on real processes:
//!
//! - a refused dump says why in one line on stderr, exits 1, writes nothing
//!   at the output path, and leaves the target running and untraced;
//! - `chpox inspect` rejects a corrupt image with a one-line reason.
//!
//! What a dump promises about the image file and the target's state is in
//! `dump_outcome.rs`.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use chpox::image::model::FdKind;
use chpox::image::{ImageError, ImageReader};
use common::dumps::{
    Reaped, assert_absent, assert_dump_error, assert_inspect_error, assert_piped_sleeper_finishes,
    assert_running_untraced, assert_sleeper_finishes, assert_stopped_untraced, assert_untraced,
    dump, dump_args, dump_ok, entries, open_image, run_chpox_as_nobody, scratch,
    scratch_for_nobody, sleeper_with_pipe, spawn_as_nobody, stat_state, wait_for_state,
};
use common::{Target, chmod, chpox_bin, chpox_ok, free_pid, path_str, run_chpox, show};

// ---------------------------------------------------------------------------
// Refused dumps

#[test]
fn dump_of_missing_pid_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    for pid in [free_pid(), pid_max + 1, 0] {
        let out = dump(pid, &image, &["--unsupported-fd", "null"]);
        assert_dump_error(&out, pid, &[&format!("no process with PID {pid}")]);
        assert_absent(&image);
        assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    }
}

#[test]
fn dump_of_kernel_thread_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // PID 2 is kthreadd.
    let out = dump(2, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(&out, 2, &["PID 2 is a kernel thread"]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_untraced(2);
    let state = stat_state(2).expect("PID 2 exists");
    assert!(!matches!(state, 't' | 'T'), "kthreadd is in state {state}");
}

#[test]
fn dump_of_chpox_itself_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // After exec, chpox has the shell's PID, which `$$` named.
    let child = Command::new("sh")
        .args([
            "-c",
            r#"exec "$0" dump "$$" -o "$1" --unsupported-fd null"#,
            path_str(&chpox_bin()),
            path_str(&image),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let pid = child.id() as i32;
    let out = child.wait_with_output().expect("wait chpox");
    assert_dump_error(&out, pid, &["this chpox process itself"]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
}

#[test]
fn dump_of_zombie_is_refused() {
    let s = scratch();
    let image = s.out.join("img");
    // Not waited for until the end: a zombie meanwhile.
    let mut child = Reaped(Command::new("true").spawn().expect("spawn true"));
    let pid = child.0.id() as i32;
    wait_for_state(pid, 'Z');
    let out = dump(pid, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(&out, pid, &[&format!("PID {pid} is a zombie")]);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    // Still a zombie for us, its parent, to reap.
    assert_eq!(stat_state(pid), Some('Z'));
    let status = child.0.wait().expect("reap");
    assert!(status.success(), "{status}");
}

#[test]
fn dump_of_other_users_process_is_permission_denied() {
    let s = scratch_for_nobody();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let image = s.out.join("img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &image, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert_dump_error(
        &out,
        t.pid,
        &[
            &format!("permission denied for PID {}", t.pid),
            "run as root",
        ],
    );
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_into_missing_directory_fails() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let missing = s.out.join("missing");
    let image = missing.join("img");
    let out = dump(t.pid, &image, &["--unsupported-fd", "null"]);
    assert_dump_error(
        &out,
        t.pid,
        &[&format!("directory {} does not exist", missing.display())],
    );
    assert_absent(&missing);
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_onto_symlink_is_refused() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let real = s.out.join("real");
    let content = b"precious data, not an image\n";
    fs::write(&real, content).expect("write real");
    let link = s.out.join("img");
    std::os::unix::fs::symlink("real", &link).expect("symlink");
    // A dangling link must not create its target either.
    let dangling = s.out.join("dangling");
    std::os::unix::fs::symlink("nowhere", &dangling).expect("symlink");

    for l in [&link, &dangling] {
        let out = dump(t.pid, l, &["--unsupported-fd", "null"]);
        assert_dump_error(&out, t.pid, &["symbolic link"]);
    }

    assert_eq!(fs::read(&real).expect("read real"), content);
    for (l, to) in [(&link, "real"), (&dangling, "nowhere")] {
        let m = fs::symlink_metadata(l).expect("lstat link");
        assert!(
            m.file_type().is_symlink(),
            "{} is no longer a link",
            l.display()
        );
        assert_eq!(fs::read_link(l).expect("readlink"), Path::new(to));
    }
    assert_eq!(entries(&s.out), ["dangling", "img", "real"]);
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_into_unwritable_directory_fails() {
    let s = scratch_for_nobody();
    // nobody dumps its own process into root's 0755 directory.
    let mut t = spawn_as_nobody("sleeper", &[], &s.logs);
    let root_dir = s.out.join("root-only");
    fs::create_dir(&root_dir).expect("mkdir");
    chmod(&root_dir, 0o755);
    let image = root_dir.join("img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &image, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert_dump_error(
        &out,
        t.pid,
        &[
            &format!("permission denied writing {}", image.display()),
            "choose a writable directory with -o",
        ],
    );
    assert!(entries(&root_dir).is_empty(), "{:?}", entries(&root_dir));
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_with_pipe_fd_fails_naming_it_unless_replaced_by_null() {
    let s = scratch();
    let (child, stdout, pipe, _extra) = sleeper_with_pipe();
    let pid = child.0.id() as i32;
    let image = s.out.join("img");

    let out = dump(pid, &image, &[]);
    assert_dump_error(
        &out,
        pid,
        &[
            "cannot checkpoint file descriptors of kinds chpox does not support",
            &format!("fd 3 ({pipe}, whose other end a process outside the checkpoint holds)"),
            "--unsupported-fd=null",
        ],
    );
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
    assert_running_untraced(pid);

    dump_ok(pid, &image, &[]);
    assert_running_untraced(pid);
    let json: serde_json::Value =
        serde_json::from_str(&chpox_ok(&["inspect", path_str(&image), "--json"]))
            .expect("inspect --json is JSON");
    assert_eq!(json["checksums"]["ok"], true, "{json}");
    let fd3 = json["fds"]
        .as_array()
        .expect("fds array")
        .iter()
        .find(|f| f["fd"] == 3)
        .unwrap_or_else(|| panic!("no fd 3 in {}", json["fds"]));
    assert_eq!(
        fd3["kind"],
        serde_json::json!({ "ReplacedByNull": { "was": pipe } }),
        "{fd3}"
    );
    let meta = open_image(&image);
    let entry = meta
        .root
        .fds
        .iter()
        .find(|f| f.fd == 3)
        .expect("fd 3 in image");
    assert!(
        matches!(&entry.kind, FdKind::ReplacedByNull { was } if *was == pipe),
        "{:?}",
        entry.kind
    );

    assert_piped_sleeper_finishes(child, stdout);
}

// ---------------------------------------------------------------------------
// chpox inspect on bad images

#[test]
fn inspect_rejects_corrupt_images() {
    let s = scratch();
    let t = Target::spawn("mempattern", &["4"], &s.logs);
    let addr = t.ready_hex("addr");
    let good = s.out.join("good.img");
    dump_ok(t.pid, &good, &[]);
    drop(t);
    let bytes = fs::read(&good).expect("read image");
    let reader = ImageReader::open(&good).expect("good image opens");
    let meta_offset = reader.header().meta_offset as usize;
    let data_end = (reader.header().data_offset + reader.header().data_len) as usize;
    // The middle of the stored pattern: a byte some checksum covers.
    let pattern_run = reader
        .metadata()
        .root
        .vmas
        .iter()
        .find(|v| v.start == addr)
        .and_then(|v| v.pages.first())
        .expect("the pattern region has stored pages")
        .data;
    let in_pattern = (pattern_run.offset + pattern_run.stored_len / 2) as usize;
    drop(reader);
    assert!(data_end > 4 << 20, "data area of {data_end} bytes");

    let write = |name: &str, content: &[u8]| {
        let p = s.out.join(name);
        fs::write(&p, content).expect("write test file");
        p
    };

    // Cut in the middle of the page data.
    let cut = write("cut-data.img", &bytes[..data_end / 2]);
    assert_inspect_error(&cut, &["image is truncated: data area is incomplete"]);
    assert!(matches!(
        ImageReader::open(&cut),
        Err(ImageError::Truncated { section }) if section == "data area"
    ));

    // Cut in the metadata at the end.
    let cut = write("cut-meta.img", &bytes[..bytes.len() - 1]);
    assert!(bytes.len() - 1 > meta_offset);
    assert_inspect_error(&cut, &["image is truncated: metadata is incomplete"]);

    // Cut in the header.
    let cut = write("cut-header.img", &bytes[..100]);
    assert_inspect_error(&cut, &["image is truncated: header is incomplete"]);

    // Magic overwritten.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"NOTCHPOX");
    let bad = write("bad-magic.img", &bad);
    assert_inspect_error(&bad, &["not a chpox image"]);
    assert!(matches!(ImageReader::open(&bad), Err(ImageError::BadMagic)));

    // Not an image at all: 64 KiB of noise.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let noise = write("noise", &noise);
    assert_inspect_error(&noise, &["not a chpox image"]);

    // No such file.
    let missing = s.out.join("missing.img");
    assert_inspect_error(&missing, &["does not exist"]);

    // A flipped byte in the page data: the image opens, but its checksums
    // fail, and inspect says so.
    let mut flipped = bytes.clone();
    flipped[in_pattern] ^= 0xff;
    let flipped = write("flipped.img", &flipped);
    let reader = ImageReader::open(&flipped).expect("metadata is intact");
    assert!(
        matches!(reader.verify_all(), Err(ImageError::Checksum { .. })),
        "verify_all of a corrupt image"
    );
    let out = run_chpox(&["inspect", path_str(&flipped)]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("checksums: FAILED: checksum mismatch in"),
        "{}",
        show(&out)
    );
    // Scripts tell a damaged image by the exit status.
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    let out = run_chpox(&["inspect", path_str(&flipped), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["checksums"]["ok"], false, "{json}");
    assert_eq!(out.status.code(), Some(1));

    // The original is untouched by all this.
    open_image(&good);
}

// ---------------------------------------------------------------------------
// Message wording: kept separate so that the tests above check behaviour,
// these the wording.

/// The reason in an error line must appear once: errors that wrap another
/// one (an image error, an I/O error) must not print the inner message
/// both in their own text and again as the cause.
#[test]
fn dump_error_reasons_are_not_repeated() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let link = s.out.join("link");
    std::os::unix::fs::symlink("elsewhere", &link).expect("symlink");
    let missing_lib = s.out.join("no-such-lib.so");
    let missing_dir_image = s.out.join("missing").join("img");

    let cases: [(Output, &str); 3] = [
        (
            dump(t.pid, &missing_dir_image, &["--unsupported-fd", "null"]),
            "does not exist",
        ),
        (
            dump(t.pid, &link, &["--unsupported-fd", "null"]),
            "symbolic link",
        ),
        (
            dump(
                t.pid,
                &s.out.join("img"),
                &[
                    "--unsupported-fd",
                    "null",
                    "--embed-lib",
                    path_str(&missing_lib),
                ],
            ),
            "No such file or directory",
        ),
    ];
    let mut repeated = Vec::new();
    for (out, phrase) in &cases {
        let line = assert_dump_error(out, t.pid, &[phrase]);
        if line.matches(phrase).count() != 1 {
            repeated.push(line);
        }
    }
    assert!(
        repeated.is_empty(),
        "error reasons printed twice:\n{}",
        repeated.join("\n")
    );
    assert_eq!(entries(&s.out), ["link"]);
    assert_running_untraced(t.pid);
    assert_sleeper_finishes(&mut t);
}

/// A short file that does not start with the magic is "not a chpox image",
/// not a truncated one.
#[test]
fn inspect_of_short_non_image_file_says_not_an_image() {
    let s = scratch();
    let text = s.out.join("notes.txt");
    fs::write(&text, "just some text\n").expect("write");
    assert_inspect_error(&text, &["not a chpox image"]);
}

/// Released, a process that was stopped goes back into its stop by itself
/// (the group stop is still in effect): no SIGSTOP of ours may be left
/// pending, or the next checkpoint meets it in a remote syscall and fails.
#[test]
fn a_stopped_process_dumped_twice_keeps_no_sigstop_pending() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    t.signal(libc::SIGSTOP);
    assert_stopped_untraced(t.pid);
    for n in 0..2 {
        dump_ok(t.pid, &s.out.join(format!("img{n}")), &[]);
        assert_stopped_untraced(t.pid);
        let pending = t.pending_mask().expect("the sleeper is alive");
        assert_eq!(
            pending & (1 << (libc::SIGSTOP - 1)),
            0,
            "SIGSTOP left pending after dump {n} ({pending:#x})"
        );
    }
    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}
