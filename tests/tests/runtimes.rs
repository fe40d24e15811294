//! Event-loop runtimes nobody wrote for chpox, checkpointed mid-run,
//! killed and restored: each must finish with the output of an
//! uninterrupted run. Their event loops hold epoll instances, eventfds,
//! self-pipes or socket pairs and a thread pool.
//!
//! - Python asyncio: a thread-pool executor doing work, `asyncio.sleep`
//!   and a `call_later` timer that falls due after the restore.
//! - Node.js: libuv's thread pool (`crypto.pbkdf2`, `fs.stat`) and
//!   `setTimeout` timers, one falling due after the restore.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Target, chpox_ok, path_str, run_chpox, tempdir, wait_pid_free};

const TIMEOUT: Duration = Duration::from_secs(60);

const PYTHON: &str = r#"
import asyncio, concurrent.futures, time
def work(n):
    time.sleep(0.02)
    return n * n
async def main():
    loop = asyncio.get_running_loop()
    ex = concurrent.futures.ThreadPoolExecutor(4)
    total = 0
    fired = []
    loop.call_later(1.5, fired.append, "late")
    print("READY", flush=True)
    for i in range(60):
        r = await asyncio.gather(*(loop.run_in_executor(ex, work, i * 4 + k) for k in range(4)))
        total += sum(r)
        await asyncio.sleep(0.03)
        print("STEP", i, total, flush=True)
    print("DONE", total, fired, flush=True)
asyncio.run(main())
"#;

const NODE: &str = r#"
const crypto = require('crypto');
const fs = require('fs');
let total = 0;
let step = 0;
const late = [];
setTimeout(() => late.push('late'), 1500);
console.log('READY');
function next() {
  if (step === 60) {
    console.log('DONE', total, JSON.stringify(late));
    return;
  }
  const i = step++;
  let left = 4;
  for (let k = 0; k < 4; k++) {
    crypto.pbkdf2(`pw${i}-${k}`, 'salt', 2000, 8, 'sha256', (err, key) => {
      if (err) throw err;
      total = (total + key.readUInt32BE(0)) % 1000000007;
      if (--left === 0) {
        fs.stat('/', (err2) => {
          if (err2) throw err2;
          console.log('STEP', i, total);
          setTimeout(next, 30);
        });
      }
    });
  }
}
next();
"#;

/// `program script` with only fds 0-2 (the test runner's other
/// descriptors would be pipes to a process outside the checkpoint).
fn spawn(program: &str, script: &Path, dir: &Path) -> Target {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.arg(script);
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Target::spawn_command(cmd, program, dir)
}

/// Run `script` with `program` uninterrupted, then again checkpointed after
/// a few steps, killed and restored: the same lines after `READY`.
fn same_output_across_restore(program: &str, ext: &str, script: &str) {
    let dir = tempdir();
    let path = dir.path().join(format!("script.{ext}"));
    std::fs::write(&path, script).expect("write script");

    let mut plain = spawn(program, &path, dir.path());
    plain.wait_success(TIMEOUT);
    let want = plain.lines_after_ready();
    assert_eq!(want.len(), 61, "uninterrupted run: {want:?}");

    let mut t = spawn(program, &path, dir.path());
    t.wait_for_line("STEP 3 ", TIMEOUT);
    let image = dir.path().join("img");
    // No --unsupported-fd: the runtime's descriptors are all saved.
    chpox_ok(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    t.child.wait().expect("reap");
    wait_pid_free(t.pid);
    let out = run_chpox(&["restore", path_str(&image)]);
    let got = t.lines_after_ready();
    assert!(
        out.status.success(),
        "restore: {}\noutput so far: {got:?}\nstderr: {}",
        common::show(&out),
        t.stderr()
    );
    assert_eq!(got, want, "stderr: {}", t.stderr());
}

#[test]
fn python_asyncio_with_a_thread_pool_and_timers() {
    same_output_across_restore("python3", "py", PYTHON);
}

#[test]
fn node_with_its_thread_pool_and_timers() {
    same_output_across_restore("node", "js", NODE);
}
