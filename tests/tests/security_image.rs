//! Images made by a hostile user, read by `chpox inspect` run as an
//! unprivileged user (`nobody`), the way anyone may inspect any image
//! handed to them:
//!
//! - a tiny image whose zstd-compressed metadata holds a cmdline of tens of
//!   millions of empty strings is refused in one line, within bounded
//!   memory (under an address-space limit that the decoded cmdline alone
//!   would exceed), whether it claims more decompressed metadata than the
//!   limit or stays under it;
//! - an image of a setuid process (uids 1001/0/0/0) shows all four ids, not
//!   "uid 1001".
//!
//! Images are made from a real dump of `sleeper`, with the metadata
//! rewritten by hand (CBOR and a zstd frame of raw and RLE blocks, both
//! simple enough to write here): no encoder in between that could refuse
//! to make what an attacker makes.

mod common;

use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use chpox::image::Header;
use chpox::image::format::{HEADER_SIZE, MAX_META_DECODED, MAX_META_RAW_LEN};
use chpox::image::model::Compression;
use common::{Target, chmod, chpox_bin, chpox_ok, path_str};

/// uid and gid of `nobody`, the unprivileged user of these tests.
const NOBODY: u32 = 65534;
/// The address-space limit `inspect` runs under: a binary, its libraries
/// and what the decoder may use fit; a cmdline of tens of millions of
/// strings (some 58 bytes each once decoded) does not.
const ADDRESS_SPACE: u64 = 512 << 20;

// ---------------------------------------------------------------------------
// A real image to start from

/// A test's directory, traversable by `nobody`.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    dir
}

/// The bytes of an image of a real `sleeper` (uncompressed metadata).
fn real_image(dir: &Path) -> Vec<u8> {
    let mut t = Target::spawn("sleeper", &["--report-left", "60"], dir);
    let path = dir.join("real.img");
    let pid = t.pid.to_string();
    chpox_ok(&[
        "dump",
        &pid,
        "-o",
        path_str(&path),
        "--unsupported-fd",
        "null",
    ]);
    t.child.kill().expect("kill sleeper");
    t.child.wait().expect("reap sleeper");
    let bytes = fs::read(&path).expect("read the image");
    assert_eq!(header(&bytes).meta_compression, Compression::None);
    bytes
}

fn header(image: &[u8]) -> Header {
    Header::decode(&image[..HEADER_SIZE]).expect("a valid header")
}

/// The metadata CBOR of an image with uncompressed metadata.
fn metadata(image: &[u8]) -> &[u8] {
    let h = header(image);
    &image[h.meta_offset as usize..(h.meta_offset + h.meta_len) as usize]
}

// ---------------------------------------------------------------------------
// CBOR and zstd by hand

/// The end of the CBOR item starting at `at` (definite lengths, as chpox
/// writes).
fn skip(b: &[u8], at: usize) -> usize {
    let first = b[at];
    let (major, info) = (first >> 5, first & 31);
    let (n, mut pos) = match info {
        0..=23 => (u64::from(info), at + 1),
        24..=27 => {
            let len = 1usize << (info - 24);
            let n = b[at + 1..at + 1 + len]
                .iter()
                .fold(0u64, |n, &x| n << 8 | u64::from(x));
            (n, at + 1 + len)
        }
        _ => panic!("indefinite or reserved CBOR at {at}"),
    };
    match major {
        0 | 1 | 7 => pos,
        2 | 3 => pos + n as usize,
        4 | 5 => {
            for _ in 0..n * if major == 5 { 2 } else { 1 } {
                pos = skip(b, pos);
            }
            pos
        }
        _ => skip(b, pos),
    }
}

/// The byte ranges of the values of every map key `key` in `cbor`.
fn values_of(cbor: &[u8], key: &str) -> Vec<(usize, usize)> {
    let mut pat = vec![0x60 | key.len() as u8];
    pat.extend_from_slice(key.as_bytes());
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = cbor[at..].windows(pat.len()).position(|w| w == pat) {
        let start = at + i + pat.len();
        let end = skip(cbor, start);
        out.push((start, end));
        at = end;
    }
    assert!(!out.is_empty(), "no {key:?} in the metadata");
    out
}

/// Metadata as pieces: bytes as they are, or one byte repeated.
enum Piece {
    Bytes(Vec<u8>),
    Repeat(u8, u64),
}

/// A zstd frame of raw and RLE blocks holding `pieces`, its content size
/// recorded (single segment).
fn zstd_frame(pieces: &[Piece]) -> (Vec<u8>, u64) {
    const MAX_BLOCK: u64 = 128 << 10;
    let mut blocks: Vec<(u32, Vec<u8>, u64)> = Vec::new();
    let mut total = 0;
    for p in pieces {
        match p {
            Piece::Bytes(b) => {
                for chunk in b.chunks(MAX_BLOCK as usize) {
                    blocks.push((0, chunk.to_vec(), chunk.len() as u64));
                }
                total += b.len() as u64;
            }
            Piece::Repeat(byte, n) => {
                let mut left = *n;
                while left > 0 {
                    let size = left.min(MAX_BLOCK);
                    blocks.push((1, vec![*byte], size));
                    left -= size;
                }
                total += n;
            }
        }
    }
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
    f.extend_from_slice(&total.to_le_bytes());
    let last = blocks.len() - 1;
    for (i, (kind, body, size)) in blocks.into_iter().enumerate() {
        let head = (size as u32) << 3 | kind << 1 | u32::from(i == last);
        f.extend_from_slice(&head.to_le_bytes()[..3]);
        f.extend_from_slice(&body);
    }
    (f, total)
}

/// `image` with its metadata replaced by `stored` (`raw_len` bytes once
/// decompressed), header and checksum redone: what anyone can do to an
/// image, which is checksummed, not signed.
fn reseal(image: &[u8], stored: &[u8], raw_len: u64, compression: Compression) -> Vec<u8> {
    let mut h = header(image);
    h.meta_len = stored.len() as u64;
    h.meta_raw_len = raw_len;
    h.meta_crc32c = crc32c(stored);
    h.meta_compression = compression;
    let mut out = image[..h.meta_offset as usize].to_vec();
    out[..HEADER_SIZE].copy_from_slice(&h.encode());
    out.extend_from_slice(stored);
    out
}

/// CRC-32C (Castagnoli), bit by bit: the tests have no crate for it.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                crc >> 1 ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------
// inspect as nobody

struct Inspected {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Peak resident memory, bytes.
    max_rss: u64,
}

/// `chpox inspect PATH` as `nobody`, under [`ADDRESS_SPACE`].
fn inspect_as_nobody(path: &Path) -> Inspected {
    let dir = path.parent().expect("a directory");
    let out = |name: &str| {
        let p: PathBuf = dir.join(name);
        fs::File::create(&p).expect("create output file");
        chmod(&p, 0o666);
        p
    };
    let (stdout_path, stderr_path) = (out("inspect.out"), out("inspect.err"));
    let mut cmd = Command::new(chpox_bin());
    cmd.arg("inspect")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .uid(NOBODY)
        .gid(NOBODY);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Reaped by wait4 below, which gives this child's own peak memory.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("spawn chpox inspect");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    Inspected {
        status: ExitStatus::from_raw(status),
        stdout: fs::read_to_string(&stdout_path).expect("read stdout"),
        stderr: fs::read_to_string(&stderr_path).expect("read stderr"),
        max_rss: usage.ru_maxrss as u64 * 1024,
    }
}

fn write_for_nobody(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write the crafted image");
    chmod(path, 0o644);
}

// ---------------------------------------------------------------------------
// Tests

/// The image: a real image whose metadata, compressed with zstd,
/// holds a cmdline of 50 million empty strings (50 MB of CBOR in a few
/// KiB), which took `chpox inspect` to 2.9 GB and, under an address-space
/// limit, to an abort. And the same with 15 million, under the limit on
/// decompressed metadata, which only the decoder's memory budget stops.
/// Both are refused in one line, exit 1, within bounded memory.
#[test]
fn tiny_image_with_huge_metadata_is_refused_in_bounded_memory() {
    let dir = scratch();
    let real = real_image(dir.path());
    let meta = metadata(&real);
    let (start, end) = values_of(meta, "cmdline")[0];

    for entries in [50_000_000u32, 15_000_000] {
        let mut head = meta[..start].to_vec();
        head.push(0x9a);
        head.extend_from_slice(&entries.to_be_bytes());
        let (frame, raw_len) = zstd_frame(&[
            Piece::Bytes(head),
            Piece::Repeat(0x60, u64::from(entries)),
            Piece::Bytes(meta[end..].to_vec()),
        ]);
        let image = reseal(&real, &frame, raw_len, Compression::Zstd);
        let meta_part = image.len() - header(&real).meta_offset as usize;
        assert!(meta_part < 64 << 10, "metadata of {meta_part} bytes");
        let path = dir.path().join(format!("cmdline-{entries}.img"));
        write_for_nobody(&path, &image);

        let out = inspect_as_nobody(&path);
        let what = format!(
            "inspect of an image of {} bytes whose metadata holds a cmdline of {entries} \
             entries ({raw_len} bytes decompressed): {:?}, peak {} MiB\n\
             --- stdout ---\n{}--- stderr ---\n{}",
            image.len(),
            out.status,
            out.max_rss >> 20,
            out.stdout,
            out.stderr
        );
        assert_eq!(out.status.signal(), None, "{what}");
        assert_eq!(out.status.code(), Some(1), "{what}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}");
        let expected = if raw_len > MAX_META_RAW_LEN {
            format!("is over the {} MiB limit", MAX_META_RAW_LEN >> 20)
        } else {
            format!(
                "more than the {} MiB of memory allowed",
                MAX_META_DECODED >> 20
            )
        };
        assert!(
            lines[0].contains("cannot decode metadata: ") && lines[0].contains(&expected),
            "{what}"
        );
        assert!(out.stdout.is_empty(), "{what}");
        // The decompressed bytes, the budget and a binary: far below what
        // the cmdline would take, and below the fuzzer's 256 MB.
        assert!(out.max_rss < 256 << 20, "{what}");
    }
}

/// A setuid-root program run by uid 1001 has uids 1001/0/0/0: `inspect`
/// shows all four (and the gids, which stay equal, as one), so the image
/// of a root-powered process does not pass for the user's.
#[test]
fn inspect_shows_every_uid_when_they_differ() {
    let dir = scratch();
    let real = real_image(dir.path());
    let meta = metadata(&real);
    let mut crafted = Vec::new();
    let mut at = 0;
    for (start, end) in values_of(meta, "uid") {
        assert_eq!(meta[start], 0x84, "uid is not an array of four");
        crafted.extend_from_slice(&meta[at..start]);
        // [1001, 0, 0, 0]
        crafted.extend_from_slice(&[0x84, 0x19, 0x03, 0xe9, 0x00, 0x00, 0x00]);
        at = end;
    }
    crafted.extend_from_slice(&meta[at..]);
    let image = reseal(&real, &crafted, crafted.len() as u64, Compression::None);
    let path = dir.path().join("setuid.img");
    write_for_nobody(&path, &image);

    let out = inspect_as_nobody(&path);
    assert!(out.status.success(), "{:?}: {}", out.status, out.stderr);
    let process: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("process: "))
        .collect();
    assert_eq!(process.len(), 1, "{}", out.stdout);
    assert!(
        process[0].contains(" uids real 1001 effective 0 saved 0 fs 0 gid 0,"),
        "{}",
        out.stdout
    );
}
