//! Dumps that leave the process running write its pages from a
//! copy-on-write snapshot after it runs again: the image must still be the
//! process at one instant, however hard its threads write meanwhile, and a
//! process that dies before its image is written must leave no image.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chpox::image::ImageReader;
use common::{Target, chpox_bin, chpox_ok, tempdir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn dump_json(pid: i32, image: &Path, extra: &[&str]) -> serde_json::Value {
    let pid_str = pid.to_string();
    let mut args = vec![
        "dump",
        &pid_str,
        "-o",
        image.to_str().expect("utf-8 path"),
        "--unsupported-fd",
        "null",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&chpox_ok(&args)).expect("dump --json")
}

/// Every slice of `cowwriters` reads `g+1` up to one point and `g` after
/// it (see the program). Returns the first violation.
fn point_in_time(region: &[u8], threads: usize, slice: usize) -> Result<(), String> {
    for t in 0..threads {
        let tag = (t as u64 + 1) << 48;
        let words: Vec<u64> = region[t * slice..(t + 1) * slice]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let pass = |w: usize| -> Result<u64, String> {
            let v = words[w];
            if v >> 48 != tag >> 48 {
                return Err(format!(
                    "thread {t} word {w}: {v:#x} lacks the thread's tag"
                ));
            }
            Ok(v & ((1 << 48) - 1))
        };
        let first = pass(0)?;
        let mut step_at = None;
        for w in 1..words.len() {
            let p = pass(w)?;
            let before = pass(w - 1)?;
            if p == before {
                continue;
            }
            if p + 1 != before || step_at.is_some() {
                return Err(format!(
                    "thread {t}: pass {before} then {p} at word {w} (first {first}, earlier step at {step_at:?}): not one instant"
                ));
            }
            step_at = Some(w);
        }
    }
    Ok(())
}

/// Four threads rewrite 64 MiB flat out during the dump; the image holds
/// the memory of one instant, plain and compressed.
#[test]
fn snapshot_is_one_instant_under_writes_by_every_thread() {
    let dir = tempdir();
    let mut target = Target::spawn("cowwriters", &["4", "16"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    let threads: usize = target.ready_value("threads").parse().expect("threads");
    let slice: usize = target.ready_value("slice").parse().expect("slice");
    for (name, extra) in [("plain.img", &[][..]), ("zstd.img", &["--compress"][..])] {
        let image = dir.path().join(name);
        let report = dump_json(target.pid, &image, extra);
        assert_eq!(report["snapshots"], 1, "{report}");
        let reader = ImageReader::open(&image).expect("image opens");
        reader.verify_all().expect("checksums");
        let region = reader
            .read_memory(addr, len as usize)
            .expect("read")
            .expect("every page stored");
        if let Err(e) = point_in_time(&region, threads, slice) {
            panic!("{name}: {e}");
        }
    }
    // It ran on meanwhile, and it has no child left over.
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", target.pid, target.pid))
            .expect("children");
    assert_eq!(children.trim(), "", "snapshot copies left behind");
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
}

/// The target killed while its pages are being written from the snapshot:
/// the dump fails, the previous image stays, no temporary file is left.
#[test]
fn a_process_killed_during_the_write_leaves_the_previous_image() {
    let dir = tempdir();
    let image = dir.path().join("img");
    for attempt in 0..4 {
        // Large enough that the write outlasts our reaction.
        let mib = (512 << attempt).to_string();
        let target = Target::spawn("mempattern", &[&mib], dir.path());
        dump_json(target.pid, &image, &[]);
        let before = std::fs::read(&image).expect("first image");
        let dumper = Command::new(chpox_bin())
            .args(["dump", &target.pid.to_string(), "-o"])
            .arg(&image)
            .args(["--unsupported-fd", "null"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chpox");
        // The snapshot is the target's child while its pages are written.
        let children = format!("/proc/{0}/task/{0}/children", target.pid);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&children).is_ok_and(|c| c.trim().is_empty()) {
            assert!(Instant::now() < deadline, "no snapshot ever appeared");
            std::thread::sleep(Duration::from_micros(200));
        }
        // The freeze ends right after the snapshot: wait until it runs.
        while std::fs::read_to_string(format!("/proc/{}/status", target.pid))
            .is_ok_and(|s| !s.contains("TracerPid:\t0"))
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        target.signal(libc::SIGKILL);
        let out = dumper.wait_with_output().expect("dump finishes");
        if out.status.success() {
            // The write won the race; try again, bigger.
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("exited"), "{stderr}");
        assert!(
            std::fs::read(&image).expect("image kept") == before,
            "the previous image changed"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "img" && !n.starts_with("mempattern"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        return;
    }
    panic!("the dump finished before the target could be killed, four times");
}
