//! What this machine can do, measured beside each dump: memcpy, first
//! touch of fresh memory, `dd` into the image's directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// memcpy over buffers that are already touched: the copy itself.
pub(crate) fn memcpy_gbps() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![2u8; len];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    (4 * len) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Writing to freshly mapped anonymous memory: page faults and zeroing.
pub(crate) fn first_touch_gbps(bytes: usize) -> f64 {
    let t = Instant::now();
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    // SAFETY: capacity is `bytes`; write_bytes initialises all of it before
    // set_len makes it visible.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0x5a, bytes);
        v.set_len(bytes);
    }
    std::hint::black_box(&v);
    let secs = t.elapsed().as_secs_f64();
    drop(v);
    bytes as f64 / secs / 1e9
}

/// A scratch file of this bench run in `dir`: named by our PID, so that
/// two benches at once do not remove each other's files.
pub(crate) fn bench_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("chpox-bench-{}-{name}", std::process::id()))
}

/// `dd` of `bytes` into a new file in `dir`.
pub(crate) fn dd_secs(dir: &Path, bytes: u64) -> Result<f64> {
    let file = bench_file(dir, "dd");
    let _ = std::fs::remove_file(&file);
    let count = bytes.div_ceil(8 << 20);
    let t = Instant::now();
    let status = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=8M",
            &format!("count={count}"),
            "status=none",
        ])
        .status()
        .context("cannot run dd")?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    if !status.success() {
        bail!("dd into {} failed", dir.display());
    }
    Ok(secs)
}
