//! Helpers of the socket tests (`sockets.rs`, `sockets_inet.rs`): `chpox
//! restore` in the background, the image as `chpox inspect --json` shows
//! it. (Their Python programs and `dump_kill` are in `common`.)

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{chpox_bin, chpox_ok, path_str};

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// `chpox restore IMAGE [extra]` running in the background (it waits for
/// the restored root); stdout and stderr to files in `dir`.
pub struct Restore {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Restore {
    pub fn start(image: &Path, extra: &[&str], dir: &Path, setup: Option<i32>) -> Restore {
        let stderr = dir.join("restore.stderr");
        let mut cmd = Command::new(chpox_bin());
        cmd.arg("restore")
            .arg(image)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        if let Some(fd) = setup {
            // Hand our descriptor `fd` in as fd 5 of chpox restore.
            // SAFETY: dup2 and fcntl are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 onto itself would leave it close-on-exec.
                    let r = if fd == 5 {
                        libc::fcntl(5, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 5)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = super::spawn_retrying(&mut cmd);
        Restore { child, stderr }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for chpox restore (and so the restored root) to exit; its
    /// exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            }
            assert!(
                Instant::now() < deadline,
                "restore still runs; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = self.child.id() as i32;
            super::procs::kill_tree(pid);
        }
        let _ = self.child.wait();
    }
}

pub fn inspect(image: &Path) -> Value {
    serde_json::from_str(&chpox_ok(&["inspect", path_str(image), "--json"]))
        .expect("inspect --json prints JSON")
}

/// Every fd entry of every process of the image.
pub fn fd_kinds(img: &Value) -> Vec<Value> {
    std::iter::once(img)
        .chain(img["descendants"].as_array().into_iter().flatten())
        .flat_map(|p| p["fds"].as_array().cloned().unwrap_or_default())
        .map(|e| e["kind"].clone())
        .collect()
}
