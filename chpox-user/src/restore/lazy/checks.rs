//! The page runs a lazy restore serves, each verified against its
//! checksum before any byte of it reaches a process.
//!
//! `--lazy` exists so that the process runs before its memory is read:
//! verifying every run first would read it all. So a run is verified the
//! first time any part of it is to be copied (a fault, or the background
//! copy), and a thread of the page server verifies the others meanwhile,
//! in file order, so that most are known good before they are needed. A
//! bad run is never copied: the processes are killed before they can read
//! it (see `lazy`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::error::{Error, Result};
use crate::image::model::{Compression, DataRef};
use crate::restore::memory::fill::ImageMap;

const UNKNOWN: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

struct Run {
    /// Where its bytes lie in the image.
    off: u64,
    len: u64,
    crc: u32,
    /// Where it goes in the process that had it (for messages).
    addr: u64,
    state: AtomicU8,
}

/// A run whose bytes do not match its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRun {
    pub addr: u64,
    pub off: u64,
    pub len: u64,
    /// A run of an incremental image's parent (`off` in that file).
    pub in_parent: bool,
}

impl std::fmt::Display for BadRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checksum mismatch in the page run for {:#x} ({} bytes at {} offset {}): the image is corrupt",
            self.addr,
            self.len,
            if self.in_parent {
                "the parent image's"
            } else {
                "image"
            },
            self.off
        )
    }
}

/// Every run served lazily, by image offset.
#[derive(Default)]
pub struct RunChecks {
    runs: Vec<Run>,
    /// Offsets from here on are the parent's (see `lazy::parent`).
    parent_base: Option<u64>,
}

impl RunChecks {
    /// Add the uncompressed runs of `runs` (address, data); the others are
    /// never served lazily.
    pub fn add(&mut self, runs: impl IntoIterator<Item = (u64, DataRef)>) {
        for (addr, d) in runs {
            if d.compression == Compression::None && d.raw_len > 0 {
                self.runs.push(Run {
                    off: d.offset,
                    len: d.raw_len,
                    crc: d.crc32c,
                    addr,
                    state: AtomicU8::new(UNKNOWN),
                });
            }
        }
        self.runs.sort_by_key(|r| r.off);
    }

    /// Runs added at offsets from `base` on are an incremental image's
    /// parent's, shifted by `base` (for messages).
    pub fn set_parent_base(&mut self, base: u64) {
        self.parent_base = Some(base);
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Verify `run` unless known; whether it is good.
    fn verify(run: &Run, image: &ImageMap) -> Result<bool> {
        match run.state.load(Ordering::Acquire) {
            GOOD => return Ok(true),
            BAD => return Ok(false),
            _ => {}
        }
        let bytes = image
            .bytes(run.off, run.len)
            .ok_or_else(|| Error::Other("internal: a page run lies outside the image".into()))?;
        // Both threads may verify the same run at once: the same answer.
        let good = crc32c::crc32c(bytes) == run.crc;
        run.state
            .store(if good { GOOD } else { BAD }, Ordering::Release);
        Ok(good)
    }

    fn bad(&self, run: &Run) -> BadRun {
        let (off, in_parent) = match self.parent_base {
            Some(base) if run.off >= base => (run.off - base, true),
            _ => (run.off, false),
        };
        BadRun {
            addr: run.addr,
            off,
            len: run.len,
            in_parent,
        }
    }

    /// Verify every run that holds some of the image's bytes
    /// `[off, off + len)`; the first bad one. Bytes of no run are an
    /// internal error: everything served must have been checked.
    pub fn check(&self, image: &ImageMap, off: u64, len: u64) -> Result<Option<BadRun>> {
        let end = off + len;
        let first = self.runs.partition_point(|r| r.off + r.len <= off);
        let mut covered = off;
        for run in self.runs[first..].iter().take_while(|r| r.off < end) {
            if run.off > covered {
                break;
            }
            if !Self::verify(run, image)? {
                return Ok(Some(self.bad(run)));
            }
            covered = covered.max(run.off + run.len);
        }
        if covered < end {
            return Err(Error::Other(format!(
                "internal: image bytes {covered}..{end} to serve belong to no page run"
            )));
        }
        Ok(None)
    }

    /// Whether every run holding some of `[off, off + len)` is known good
    /// already (verified, and not by this call).
    pub fn known_good(&self, off: u64, len: u64) -> bool {
        let end = off + len;
        let first = self.runs.partition_point(|r| r.off + r.len <= off);
        let mut covered = off;
        for run in self.runs[first..].iter().take_while(|r| r.off < end) {
            if run.off > covered || run.state.load(Ordering::Acquire) != GOOD {
                return false;
            }
            covered = covered.max(run.off + run.len);
        }
        covered >= end
    }

    /// Verify every run not verified yet, in file order, until `stop`; the
    /// first bad one.
    pub fn check_all(&self, image: &ImageMap, stop: &AtomicBool) -> Result<Option<BadRun>> {
        for run in &self.runs {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if !Self::verify(run, image)? {
                return Ok(Some(self.bad(run)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn data(off: u64, bytes: &[u8]) -> DataRef {
        DataRef {
            offset: off,
            stored_len: bytes.len() as u64,
            raw_len: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
            compression: Compression::None,
        }
    }

    #[test]
    fn a_piece_is_checked_against_every_run_it_touches() {
        let page = 4096usize;
        let content: Vec<u8> = (0..4 * page).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(&content).expect("write");
        let image = ImageMap::new(file.as_fd(), 0, content.len() as u64).expect("map");
        let mut checks = RunChecks::default();
        // Three runs; the last one's checksum is of other bytes.
        let mut third = data(3 * page as u64, &content[3 * page..]);
        third.crc32c ^= 1;
        checks.add([
            (0x10000, data(0, &content[..page])),
            (0x20000, data(page as u64, &content[page..3 * page])),
            (0x40000, third),
        ]);
        assert_eq!(checks.len(), 3);
        // Across the first two: good.
        assert_eq!(checks.check(&image, 100, page as u64).expect("check"), None);
        // Reaching into the third: bad, named.
        let bad = checks
            .check(&image, 2 * page as u64, 2 * page as u64)
            .expect("check")
            .expect("the third run is bad");
        assert_eq!(bad.addr, 0x40000);
        assert!(bad.to_string().contains("checksum mismatch"));
        assert!(checks.known_good(0, 3 * page as u64));
        assert!(!checks.known_good(0, 4 * page as u64));
        // Known bad from now on, by the other path too.
        assert_eq!(
            checks
                .check_all(&image, &AtomicBool::new(false))
                .expect("check_all"),
            Some(bad)
        );
        // Bytes outside every run are never served unchecked.
        assert!(checks.check(&image, 4 * page as u64, 1).is_err());
    }
}
