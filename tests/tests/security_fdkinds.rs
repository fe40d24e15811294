//! Root restoring a user's image that was edited to claim descriptors the
//! user could not have had: a memfd owned by root with the set-user-ID
//! bit, a timerfd on an alarm clock (CAP_WAKE_ALARM), an inotify watch on
//! a file only root may read. None of it may reach the process, unless
//! root says `--trust-image`.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use chpox::image::model::{FdEntry, FdKind, InotifyWatch};
use common::images::reseal;
use common::{Target, bin, chmod, chpox_bin, chpox_ok, path_str, tempdir, wait_pid_free};

const NOBODY: u32 = 65534;
const ADDED_FD: i32 = 100;

/// A dump (by root) of `mempattern 1` running as nobody,
/// in `dir` (mode 0711), its image owned by nobody.
fn nobodys_image(dir: &Path) -> std::path::PathBuf {
    let mut cmd = Command::new(bin("mempattern"));
    cmd.arg("1").uid(NOBODY).gid(NOBODY).current_dir(dir);
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut t = Target::spawn_command(cmd, "mempattern", dir);
    for p in [&t.stdout_path, &t.stderr_path] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).expect("chown output");
    }
    let image = dir.join("nobody.img");
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap");
    wait_pid_free(t.pid);
    assert_eq!(fs::metadata(&image).expect("image").uid(), NOBODY);
    image
}

fn add(meta: &mut chpox::image::model::Metadata, kind: FdKind) {
    meta.root.fds.push(FdEntry {
        fd: ADDED_FD,
        flags: libc::O_RDWR as u32,
        cloexec: false,
        kind,
        description: 0xADDED,
        locks: Vec::new(),
    });
}

/// Root's `chpox restore --detach IMAGE`: the PID, or the refusal.
fn restore(image: &Path) -> Result<i32, String> {
    let out = Command::new(chpox_bin())
        .args(["restore", "--detach", path_str(image)])
        .stdin(Stdio::null())
        .output()
        .expect("run chpox restore");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    Ok(stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("restore printed {stdout:?} ({e}); {stderr}")))
}

fn kill(pid: i32) {
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn a_users_image_gets_no_root_memfd_alarm_timer_or_watch_on_roots_files() {
    let dir = tempdir();
    chmod(dir.path(), 0o711);
    let secret = dir.path().join("secret");
    fs::write(&secret, "root only").expect("write secret");
    chmod(&secret, 0o600);
    let image = nobodys_image(dir.path());

    // A memfd claiming root and set-user-ID: it comes back nobody's,
    // without the bit.
    let edited = dir.path().join("memfd.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        add(
            m,
            FdKind::Memfd {
                name: "evil".into(),
                inode: 0xE71,
                pos: 0,
                mode: 0o4755,
                seals: libc::F_SEAL_SEAL as u32,
                size: 0,
                content: None,
                uid: 0,
                gid: 0,
            },
        );
    });
    match restore(&edited) {
        Ok(pid) => {
            let md = fs::metadata(format!("/proc/{pid}/fd/{ADDED_FD}"));
            kill(pid);
            let md = md.expect("the memfd is there");
            assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
            assert_eq!(md.mode() & 0o6000, 0, "mode {:o}", md.mode());
        }
        Err(e) => panic!("a memfd of nobody's own was refused: {e}"),
    }

    // An alarm-clock timerfd: refused, naming --trust-image.
    let edited = dir.path().join("alarm.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        add(
            m,
            FdKind::TimerFd {
                clockid: libc::CLOCK_BOOTTIME_ALARM,
                settime_flags: 0,
                value_ns: 1_000_000_000_000,
                interval_ns: 0,
                deadline_ns: 0,
                ticks: 0,
            },
        );
    });
    match restore(&edited) {
        Ok(pid) => {
            kill(pid);
            panic!("a user's image got an alarm-clock timerfd");
        }
        Err(e) => assert!(e.contains("--trust-image") && e.contains("alarm"), "{e}"),
    }

    // A watch on root's file: refused.
    let edited = dir.path().join("watch.img");
    reseal(&image, &edited, Some((NOBODY, NOBODY)), |m| {
        add(
            m,
            FdKind::Inotify {
                watches: vec![InotifyWatch {
                    wd: 1,
                    mask: libc::IN_ACCESS,
                    path: path_str(&secret).to_string(),
                }],
            },
        );
    });
    match restore(&edited) {
        Ok(pid) => {
            kill(pid);
            panic!("a user's image got a watch on a root-only file");
        }
        Err(e) => assert!(e.contains(path_str(&secret)), "{e}"),
    }
}
