//! The scratch page a dump maps in a frozen process for its remote calls
//! (only where memory is locked; elsewhere the results go to the borrowed
//! thread's stack) leaves no trace in the image, even where it merges
//! with the process's own mappings: a dump reads /proc/PID/maps once,
//! before the remote calls, and records those mappings (the calls unmap
//! the page again, which splits the merged mapping back into the same
//! pieces).

mod common;

use std::time::Duration;

use common::dumps::open_image;
use common::{Target, chpox_ok, tempdir};

const PAGE: u64 = 4096;

/// (start, end, permissions) of every line of /proc/PID/maps.
fn maps_lines(pid: i32) -> Vec<(u64, u64, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .map(|line| {
            let mut cols = line.split_whitespace();
            let range = cols.next().expect("range");
            let perms = cols.next().expect("perms").to_string();
            let (s, e) = range.split_once('-').expect("a-b");
            (
                u64::from_str_radix(s, 16).expect("hex"),
                u64::from_str_radix(e, 16).expect("hex"),
                perms,
            )
        })
        .collect()
}

#[test]
fn a_mapping_the_scratch_page_merges_with_is_recorded_as_the_process_has_it() {
    // Locked: the dump maps the scratch page into the hole. Not locked:
    // it maps nothing, and the mappings are recorded all the same.
    for args in [&["locked"][..], &[]] {
        mappings_recorded_as_the_process_has_them(args);
    }
}

fn mappings_recorded_as_the_process_has_them(args: &[&str]) {
    let dir = tempdir();
    let mut t = Target::spawn("scratchhole", args, dir.path());
    let (low, hole) = (t.ready_hex("low"), t.ready_hex("hole"));
    assert_eq!(
        t.ready_u64("lands"),
        1,
        "the next one-page mapping does not go into the hole: the test proves nothing"
    );
    let before = maps_lines(t.pid);
    for round in 0..3 {
        let image = dir.path().join(format!("img{round}"));
        chpox_ok(&[
            "dump",
            &t.pid.to_string(),
            "-o",
            image.to_str().expect("utf-8"),
            "--unsupported-fd",
            "null",
        ]);
        let meta = open_image(&image);
        let vmas: Vec<(u64, u64)> = meta.root.vmas.iter().map(|v| (v.start, v.end)).collect();
        assert!(
            vmas.contains(&(low, low + PAGE)) && vmas.contains(&(hole + PAGE, hole + 2 * PAGE)),
            "round {round}: the two pieces around the hole are not recorded as two mappings: {vmas:x?}"
        );
        assert!(
            !vmas.iter().any(|&(s, e)| s <= hole && hole < e),
            "round {round}: a mapping covers the hole {hole:#x}: {vmas:x?}"
        );
        // Every mapping of the image is one of the process's, and the
        // process has the same mappings as before the dump.
        let after = maps_lines(t.pid);
        assert_eq!(
            after, before,
            "round {round}: the dump changed the mappings"
        );
        for v in &meta.root.vmas {
            assert!(
                after.iter().any(|&(s, e, _)| (s, e) == (v.start, v.end)),
                "round {round}: the image's mapping {:#x}-{:#x} is not the process's: {after:x?}",
                v.start,
                v.end
            );
        }
        assert_eq!(
            meta.root.vmas.len(),
            after.len(),
            "round {round}: the image has {} mappings, the process {}",
            meta.root.vmas.len(),
            after.len()
        );
    }
    t.signal(libc::SIGUSR1);
    t.wait_for_line("DONE ok", Duration::from_secs(30));
    t.wait_success(Duration::from_secs(30));
}
