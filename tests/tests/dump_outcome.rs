//! What `chpox dump` promises about the image file and the target, on real
//! processes:
//!
//! - an image appears atomically (a failed dump keeps the old one intact,
//!   leaves no temporary files), with mode 0600, owned by the process owner;
//! - `--kill`, `--leave-stopped`, and an already stopped target end in the
//!   state they promise.
//!
//! Refused dumps and their messages are in `dump_errors.rs`.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use chpox::image::model::AfterDump;
use common::dumps::{
    EXIT_TIMEOUT, NOBODY, SLEEPER_SLEEP, assert_dump_error, assert_mempattern_finishes,
    assert_piped_sleeper_finishes, assert_running_untraced, assert_sleeper_finishes,
    assert_stopped_untraced, check_pattern, dump, dump_args, dump_ok, entries, open_image,
    run_chpox_as_nobody, scratch, scratch_for_nobody, sleeper_with_pipe, spawn_as_nobody,
};
use common::{Target, path_str, show};

// ---------------------------------------------------------------------------
// The image file

#[test]
fn failed_dump_keeps_previous_image_and_leaves_no_temporary_file() {
    let s = scratch();
    let (child, stdout, pipe, _extra) = sleeper_with_pipe();
    let pid = child.0.id() as i32;
    let image = s.out.join("img");

    dump_ok(pid, &image, &[]);
    let first = fs::read(&image).expect("read first image");
    let first_meta = open_image(&image);

    // Without --unsupported-fd null the pipe fails the dump, after chpox has
    // started writing the new image.
    let out = dump(pid, &image, &[]);
    assert_dump_error(&out, pid, &[&format!("fd 3 ({pipe}")]);
    assert_eq!(
        fs::read(&image).expect("read image"),
        first,
        "a failed dump changed the existing image"
    );
    assert_eq!(entries(&s.out), ["img"]);
    assert_running_untraced(pid);

    dump_ok(pid, &image, &[]);
    assert_eq!(entries(&s.out), ["img"]);
    let second_meta = open_image(&image);
    assert!(
        second_meta.created_unix_ns > first_meta.created_unix_ns,
        "image not replaced: created {} then {}",
        first_meta.created_unix_ns,
        second_meta.created_unix_ns
    );
    assert_ne!(fs::read(&image).expect("read image"), first);
    assert_running_untraced(pid);

    assert_piped_sleeper_finishes(child, stdout);
}

fn assert_image_file(image: &Path, uid: u32, gid: u32) {
    let m = fs::symlink_metadata(image).expect("stat image");
    assert!(m.file_type().is_file());
    assert_eq!(m.mode() & 0o7777, 0o600, "mode {:o}", m.mode() & 0o7777);
    assert_eq!(
        (m.uid(), m.gid()),
        (uid, gid),
        "owner of {}",
        image.display()
    );
}

#[test]
fn image_is_private_and_owned_by_the_process_owner() {
    let s = scratch_for_nobody();

    // root's process, dumped by root.
    let root_target = Target::spawn("mempattern", &["4"], &s.logs);
    let root_image = s.out.join("root.img");
    dump_ok(root_target.pid, &root_image, &[]);
    assert_image_file(&root_image, 0, 0);
    drop(root_target);

    // nobody's process, dumped by root: the image goes to nobody.
    let t = spawn_as_nobody("mempattern", &["4"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let by_root = s.out.join("by-root.img");
    dump_ok(t.pid, &by_root, &[]);
    assert_image_file(&by_root, NOBODY, NOBODY);
    let meta = open_image(&by_root);
    assert_eq!(meta.root.process.creds.uid, [NOBODY; 4]);
    assert_eq!(meta.root.process.creds.gid, [NOBODY; 4]);
    check_pattern(&by_root, addr, len);
    assert_running_untraced(t.pid);

    // nobody dumps its own process.
    let by_nobody = s.out.join("by-nobody.img");
    let out = run_chpox_as_nobody(
        &dump_args(t.pid, &by_nobody, &["--unsupported-fd", "null"]),
        &s.logs,
    );
    assert!(out.status.success(), "nobody's dump failed {}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
    assert_image_file(&by_nobody, NOBODY, NOBODY);
    open_image(&by_nobody);
    check_pattern(&by_nobody, addr, len);
    assert_running_untraced(t.pid);

    // Compressed after a pre-copy, through a second temporary file: the
    // same owner and rights, by root and by nobody.
    let z_by_root = s.out.join("z-by-root.img");
    dump_ok(t.pid, &z_by_root, &["--compress", "--precopy"]);
    assert_image_file(&z_by_root, NOBODY, NOBODY);
    check_pattern(&z_by_root, addr, len);
    let z_by_nobody = s.out.join("z-by-nobody.img");
    let out = run_chpox_as_nobody(
        &dump_args(
            t.pid,
            &z_by_nobody,
            &["--unsupported-fd", "null", "--compress", "--precopy"],
        ),
        &s.logs,
    );
    assert!(out.status.success(), "nobody's dump failed {}", show(&out));
    assert_image_file(&z_by_nobody, NOBODY, NOBODY);
    check_pattern(&z_by_nobody, addr, len);
    for z in [&z_by_root, &z_by_nobody] {
        let meta = open_image(z);
        let mut runs = meta
            .processes()
            .flat_map(|p| &p.vmas)
            .flat_map(|v| &v.pages);
        assert!(
            runs.all(|r| r.data.compression == chpox::image::model::Compression::Zstd),
            "{}: uncompressed runs",
            z.display()
        );
    }
    assert_running_untraced(t.pid);

    assert_eq!(
        entries(&s.out),
        [
            "by-nobody.img",
            "by-root.img",
            "root.img",
            "z-by-nobody.img",
            "z-by-root.img"
        ]
    );
}

// ---------------------------------------------------------------------------
// What becomes of the process

#[test]
fn dump_kill_writes_a_valid_image_then_kills() {
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["4"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let image = s.out.join("img");
    dump_ok(t.pid, &image, &["--kill"]);
    let status = t.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "expected death by SIGKILL, got {status}"
    );
    let meta = open_image(&image);
    assert_eq!(meta.after_dump, AfterDump::Kill);
    assert_eq!(meta.root.process.pid, t.pid);
    check_pattern(&image, addr, len);
    assert!(t.lines_after_ready().is_empty(), "{:?}", t.lines());
    assert_eq!(entries(&s.out), ["img"]);
}

/// Asserts the stopped `sleeper` makes no progress: once its sleep has
/// surely run out it is still stopped and has printed nothing more.
fn assert_sleeper_stays_stopped(t: &Target, ready_at: Instant) {
    let sleep_over = ready_at + SLEEPER_SLEEP + Duration::from_millis(500);
    if let Some(rest) = sleep_over.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    assert_stopped_untraced(t.pid);
    assert!(
        t.lines_after_ready().is_empty(),
        "a stopped sleeper printed {:?}",
        t.lines()
    );
}

#[test]
fn dump_leave_stopped_leaves_the_process_stopped() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let ready_at = Instant::now();
    let image = s.out.join("img");
    dump_ok(t.pid, &image, &["--leave-stopped"]);
    assert_stopped_untraced(t.pid);
    assert_eq!(open_image(&image).after_dump, AfterDump::LeaveStopped);
    assert_sleeper_stays_stopped(&t, ready_at);

    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_of_stopped_process_leaves_it_stopped() {
    let s = scratch();
    let mut t = Target::spawn("sleeper", &[], &s.logs);
    let ready_at = Instant::now();
    t.signal(libc::SIGSTOP);
    assert_stopped_untraced(t.pid);

    let image = s.out.join("img");
    dump_ok(t.pid, &image, &[]);
    assert_stopped_untraced(t.pid);
    assert_eq!(open_image(&image).after_dump, AfterDump::LeaveRunning);
    assert_sleeper_stays_stopped(&t, ready_at);

    t.signal(libc::SIGCONT);
    assert_sleeper_finishes(&mut t);
}

#[test]
fn dump_twice_in_a_row() {
    let s = scratch();
    let mut t = Target::spawn("mempattern", &["4", "--finish-after-rounds", "30"], &s.logs);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let first = s.out.join("first.img");
    let second = s.out.join("second.img");

    dump_ok(t.pid, &first, &[]);
    assert_running_untraced(t.pid);
    let report: serde_json::Value =
        serde_json::from_str(&dump_ok(t.pid, &second, &["--json"])).expect("dump --json is JSON");
    assert_eq!(report["pid"], t.pid, "{report}");
    assert_eq!(report["image"], path_str(&second), "{report}");
    assert_running_untraced(t.pid);

    let (m1, m2) = (open_image(&first), open_image(&second));
    assert_eq!(m1.root.process.pid, t.pid);
    assert_eq!(m2.root.process.pid, t.pid);
    assert_eq!(
        m1.root.process.start_time_ticks,
        m2.root.process.start_time_ticks
    );
    assert!(m2.created_unix_ns > m1.created_unix_ns);
    check_pattern(&first, addr, len);
    check_pattern(&second, addr, len);
    assert_eq!(entries(&s.out), ["first.img", "second.img"]);

    assert_mempattern_finishes(&mut t);
}
