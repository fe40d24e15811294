//! `chpox restore` of real programs nobody wrote for chpox, stopped
//! mid-work: an interpreter mid-script, a compressor mid-file, a process
//! blocked in `read`. Each must finish with the output of an
//! uninterrupted run.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use chpox::image::ImageReader;
use chpox::image::model::FdKind;
use common::agent::poll_until;
use common::restore::{checkpoint, dump_kill, restore_and_wait};
use common::{Target, chpox_bin, path_str, tempdir, wait_pid_free};

// ---------------------------------------------------------------------------
// Real programs nobody wrote for chpox, stopped mid-work

/// A child we spawned ourselves (not a [`Target`]: no `READY` line), killed
/// and reaped when dropped unless already reaped.
struct Spawned(std::process::Child);

impl Spawned {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Panics (with `context`) if the child has already exited.
    fn assert_running(&mut self, context: impl Fn() -> String) {
        if let Some(status) = self.0.try_wait().expect("try_wait") {
            panic!(
                "PID {} exited ({status}) too early\n{}",
                self.pid(),
                context()
            );
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stdin /dev/null and stdout and stderr to `stdout` and
/// `stderr`.
fn spawn_to_files(mut cmd: Command, stdout: &Path, stderr: &Path) -> Spawned {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(stdout).expect("create stdout file"))
        .stderr(File::create(stderr).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Spawned(child)
}

/// Checkpoints our spawned child with `--kill`, reaps it and waits for its
/// PID to be free.
fn checkpoint_spawned(child: &mut Spawned, image: &Path) {
    let pid = child.pid();
    dump_kill(pid, image, &[]);
    let status = child.0.wait().expect("reap the original");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the original was not killed by the dump: {status}"
    );
    wait_pid_free(pid);
}

const PRIMES_SCRIPT: &str = r#"import time

N = 200000
CHUNKS = 20
SIZE = N // CHUNKS


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


total = 0
for c in range(CHUNKS):
    s = sum(n for n in range(c * SIZE, (c + 1) * SIZE) if is_prime(n))
    total += s
    print(f"chunk {c} {s}", flush=True)
    time.sleep(0.1)
print(f"TOTAL {total}", flush=True)
"#;

/// What `PRIMES_SCRIPT` prints, computed here with a sieve.
fn primes_script_output() -> String {
    const N: usize = 200_000;
    const CHUNKS: usize = 20;
    let mut composite = vec![false; N];
    composite[0] = true;
    composite[1] = true;
    for i in 2..N {
        if !composite[i] {
            for j in (i * i..N).step_by(i) {
                composite[j] = true;
            }
        }
    }
    let size = N / CHUNKS;
    let mut out = String::new();
    let mut total = 0u64;
    for c in 0..CHUNKS {
        let sum: u64 = (c * size..(c + 1) * size)
            .filter(|&n| !composite[n])
            .map(|n| n as u64)
            .sum();
        total += sum;
        out.push_str(&format!("chunk {c} {sum}\n"));
    }
    out.push_str(&format!("TOTAL {total}\n"));
    out
}

/// CPython running an ordinary script: interpreter state, heap and the
/// interrupted sleep (or computation) all come back, under a new PID.
#[test]
fn a_real_interpreter_restores_mid_script() {
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "/usr/bin/python3 is missing");
    let dir = tempdir();
    let script = dir.path().join("primes.py");
    std::fs::write(&script, PRIMES_SCRIPT).expect("write script");
    let out = dir.path().join("primes.out");
    let err = dir.path().join("primes.err");
    let mut cmd = Command::new(python);
    cmd.arg(&script).current_dir(dir.path());
    let mut child = spawn_to_files(cmd, &out, &err);
    let show = || {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    // Mid-way: a few chunks done, most still to come.
    poll_until("3 chunk lines", Duration::from_secs(20), show, || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            >= 3
    });
    child.assert_running(show);
    let image = dir.path().join("python.img");
    checkpoint_spawned(&mut child, &image);
    let before = std::fs::read_to_string(&out).expect("read stdout");
    assert!(
        !before.contains("TOTAL"),
        "finished before the dump: {before}"
    );

    let (code, stderr) = restore_and_wait(&image, &["--pid", "any"], dir.path());
    assert_eq!(code, 0, "{stderr}\n{}", show());
    assert_eq!(
        std::fs::read_to_string(&out).expect("read stdout"),
        primes_script_output(),
        "{}",
        show()
    );
    assert_eq!(std::fs::read_to_string(&err).unwrap_or_default(), "");
}

/// Writes `blocks` × 4 MiB of deterministic, compressible data (16 letters
/// and space, xorshift-chosen; each block starts with its number) to `path`.
fn write_compressible(path: &Path, blocks: usize) -> u64 {
    use std::io::Write;
    const BLOCK: usize = 4 << 20;
    const ALPHABET: &[u8; 17] = b"abcdefghijklmnop ";
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; BLOCK];
    for chunk in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ALPHABET[((x >> (i * 8)) % 17) as usize];
        }
    }
    let mut f = std::io::BufWriter::new(File::create(path).expect("create input"));
    for n in 0..blocks {
        block[..8].copy_from_slice(format!("{n:08}").as_bytes());
        f.write_all(&block).expect("write input");
    }
    f.flush().expect("flush input");
    (blocks * BLOCK) as u64
}

/// Asserts `gzip -dc gz` succeeds (CRC and length check) and yields exactly
/// the bytes of `original`.
fn assert_gunzips_to(gz: &Path, original: &Path) {
    use std::io::Read;
    let mut gunzip = Command::new("gzip")
        .arg("-dc")
        .arg(gz)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gzip -dc");
    let mut decoded = gunzip.stdout.take().expect("stdout");
    let mut want = std::io::BufReader::new(File::open(original).expect("open input"));
    let mut got_buf = vec![0u8; 1 << 20];
    let mut want_buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = decoded.read(&mut got_buf).expect("read gzip -dc");
        if n == 0 {
            break;
        }
        let m = want.read(&mut want_buf[..n]).expect("read input");
        want.read_exact(&mut want_buf[m..n]).unwrap_or_else(|_| {
            panic!("decompressed output is longer than the input (> {offset} bytes)")
        });
        if got_buf[..n] != want_buf[..n] {
            let i = (0..n).find(|&i| got_buf[i] != want_buf[i]).unwrap_or(0);
            panic!("decompressed output differs at byte {}", offset + i as u64);
        }
        offset += n as u64;
    }
    drop(decoded);
    let out = gunzip.wait_with_output().expect("wait gzip -dc");
    assert!(
        out.status.success(),
        "gzip -dc failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rest = Vec::new();
    want.read_to_end(&mut rest).expect("read input");
    assert!(
        rest.is_empty(),
        "decompressed output stops at {offset} of {} bytes",
        offset + rest.len() as u64
    );
}

/// gzip compressing a file into its stdout (a regular file), stopped after
/// a few MB: the input's read offset, the output's write offset and the
/// deflate state all come back, and the result decompresses to the input.
#[test]
fn a_compressor_restores_mid_file() {
    let dir = tempdir();
    let input = dir.path().join("input.dat");
    write_compressible(&input, 32);
    let gz = dir.path().join("input.dat.gz");
    let err = dir.path().join("gzip.err");
    let mut cmd = Command::new("gzip");
    cmd.args(["-c", "-1"]).arg(&input).current_dir(dir.path());
    let mut child = spawn_to_files(cmd, &gz, &err);
    let size = || std::fs::metadata(&gz).map(|m| m.len()).unwrap_or(0);
    let show = || {
        format!(
            "output {} bytes; stderr: {}",
            size(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    poll_until("4 MB of gzip output", Duration::from_secs(20), show, || {
        size() >= 4 << 20
    });
    child.assert_running(show);
    let image = dir.path().join("gzip.img");
    checkpoint_spawned(&mut child, &image);
    let partial = size();

    let (code, stderr) = restore_and_wait(&image, &[], dir.path());
    assert_eq!(code, 0, "{stderr}\n{}", show());
    assert!(
        size() > partial,
        "no output after the restore ({partial} bytes)"
    );
    assert_eq!(std::fs::read_to_string(&err).unwrap_or_default(), "");
    assert_gunzips_to(&gz, &input);
}

/// The system call `pid` is blocked in (first field of /proc/PID/syscall),
/// if it is blocked in one.
fn blocked_syscall(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// `reader` blocked in read(2) on a FIFO it opened read-write. The restored
/// process must re-issue its read rather than see it fail with EINTR
/// (`reader` would print `EINTR` and exit 2), on the FIFO reopened by
/// path: what we write into the FIFO after the restore is what it reads.
#[test]
fn a_process_blocked_in_read_restores_and_reads_on() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut t = Target::spawn("reader", &[path_str(&fifo)], dir.path());
    let fd: i32 = t.ready_value("fd").parse().expect("fd number");
    poll_until(
        "reader to block in read(2)",
        Duration::from_secs(10),
        || std::fs::read_to_string(format!("/proc/{}/syscall", t.pid)).unwrap_or_default(),
        || blocked_syscall(t.pid) == Some(libc::SYS_read),
    );
    let image = dir.path().join("reader.img");
    checkpoint(&mut t, &image, &[]);
    let meta = ImageReader::open(&image)
        .expect("open image")
        .metadata()
        .clone();
    let entry = meta
        .root
        .fds
        .iter()
        .find(|e| e.fd == fd)
        .unwrap_or_else(|| panic!("fd {fd} not in the image: {:?}", meta.root.fds));
    assert!(
        matches!(&entry.kind, FdKind::Fifo { path, .. } if Path::new(path) == fifo),
        "fd {fd} saved as {:?}",
        entry.kind
    );

    let mut restore = Command::new(chpox_bin())
        .args(["restore", path_str(&image)])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chpox restore");
    poll_until(
        "the restored reader to block in read(2) again",
        Duration::from_secs(20),
        || std::fs::read_to_string(format!("/proc/{}/syscall", t.pid)).unwrap_or_default(),
        || blocked_syscall(t.pid) == Some(libc::SYS_read),
    );
    // The restored process holds the FIFO read-write: opening it to write
    // does not wait.
    std::fs::write(&fifo, "hi\n").expect("write into the FIFO");
    let status = restore.wait().expect("wait for chpox restore");
    assert!(status.success(), "restore: {status}; {:?}", t.lines());
    assert_eq!(t.lines_after_ready(), ["GOT hi\\n"]);
}
