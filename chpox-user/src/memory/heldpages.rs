//! The pages an increment stores, read while frozen into memory and
//! written to the image once the processes run again.
//!
//! An incremental checkpoint has no snapshot to write from later (a fork
//! would copy the page tables of the whole process, 50 ms per GiB), so its
//! few written pages are read while the tree is frozen. Writing them
//! straight into the image makes the file grow while frozen, and a new
//! file's pages come slowly (0.3–1 GB/s on tmpfs here, the disk's speed on
//! a durable filesystem). Reading them into a buffer instead costs a
//! memory copy, and the buffer is kept with the registration's tracking
//! from one checkpoint to the next. An increment holds every page written
//! since the base, so each one is usually larger than the one before:
//! after writing, the buffer is grown on a thread of its own, while the
//! processes run, by as much as the last increment grew, so that the next
//! one finds pages already there. At most [`MAX_HELD_BYTES`] per
//! checkpoint: the rest (and everything, if the buffer is still being
//! grown) is written while frozen, as without it.
//!
//! Each held page's checksum is kept until the next increment, which
//! counts the pages it stores again unchanged ([`HeldPages::unchanged_pages`]):
//! the cost of storing every page written since the base, which tells
//! `incremental` when a new base would cost less.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{Metadata, PageRun};
use crate::memory::PAGE_SIZE;

/// The most bytes of pages held for one checkpoint (and kept between
/// checkpoints).
pub const MAX_HELD_BYTES: usize = 512 << 20;

#[derive(Debug, Default)]
pub struct HeldPages {
    /// Shared only with the thread that grows it between checkpoints.
    buf: Arc<Mutex<Vec<u8>>>,
    held: Vec<Held>,
    used: usize,
    /// Bytes the previous checkpoint held.
    last_used: usize,
    /// Checksum of each page (by process and address) the last write held.
    page_sums: HashMap<(i32, u64), u32>,
    /// Pages of the last write whose content equals the write before's.
    unchanged: u64,
}

#[derive(Debug)]
struct Held {
    pid: i32,
    /// Index of the process in the image, and of the mapping in it.
    process: usize,
    vma: usize,
    /// Runs, each at most `pagecopy::CHUNK_PAGES`, laid out from `at`.
    runs: Vec<(u64, u64)>,
    at: usize,
}

impl HeldPages {
    /// Forget what an earlier (failed) checkpoint held; the buffer stays.
    pub fn clear(&mut self) {
        self.held.clear();
        self.used = 0;
    }

    /// Read `runs` of frozen `pid` (process `process` of the image, its
    /// mapping `vma`) into the buffer, to be written by [`write_all`].
    /// False if they do not fit under [`MAX_HELD_BYTES`]: the caller
    /// writes them now.
    ///
    /// [`write_all`]: HeldPages::write_all
    pub fn hold(
        &mut self,
        pid: i32,
        process: usize,
        vma: usize,
        runs: &[(u64, u64)],
    ) -> Result<bool> {
        let len: usize = runs.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
        let end = self.used + len;
        if end > MAX_HELD_BYTES {
            return Ok(false);
        }
        // Still being grown: nothing is held this time.
        let Ok(mut buf) = self.buf.try_lock() else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let grown = end.saturating_sub(buf.len());
        if grown > 0 {
            buf.resize(end, 0);
        }
        crate::pagecopy::read_frozen(pid, runs, &mut buf[self.used..end])?;
        tracing::debug!(
            pid,
            bytes = len,
            grown,
            us = started.elapsed().as_micros() as u64,
            "pages held"
        );
        self.held.push(Held {
            pid,
            process,
            vma,
            runs: crate::pagecopy::split_runs(runs),
            at: self.used,
        });
        self.used = end;
        Ok(true)
    }

    /// Write every held run as a blob of the image and give it to its
    /// mapping in `meta`. Returns the pages written.
    pub fn write_all(&mut self, meta: &mut Metadata, writer: &mut ImageWriter) -> Result<u64> {
        let mut pages = 0;
        let buf = self
            .buf
            .lock()
            .map_err(|_| Error::Other("internal: held pages lost".into()))?;
        let mut sums = HashMap::with_capacity(self.used / PAGE_SIZE as usize);
        let mut unchanged = 0;
        // Nothing held (the buffer was still being grown): the sums of the
        // last write that held pages stay, to compare the next one with.
        let held_any = !self.held.is_empty();
        let held = std::mem::take(&mut self.held);
        // Each run a blob, its checksum made of its pages' (which the
        // next increment compares with), all written at once: the runs
        // lie in the buffer in order.
        let mut pieces = Vec::new();
        for h in &held {
            let mut at = h.at;
            for &(addr, npages) in &h.runs {
                let len = (npages * PAGE_SIZE) as usize;
                let raw = buf
                    .get(at..at + len)
                    .ok_or_else(|| Error::Other("internal: held pages past the buffer".into()))?;
                at += len;
                let mut run_sum = 0;
                for (i, page) in raw.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let key = (h.pid, addr + i as u64 * PAGE_SIZE);
                    let sum = crc32c::crc32c(page);
                    unchanged += u64::from(self.page_sums.get(&key) == Some(&sum));
                    sums.insert(key, sum);
                    run_sum = if i == 0 {
                        sum
                    } else {
                        crate::image::crc::combine(run_sum, sum, PAGE_SIZE)
                    };
                }
                pieces.push((len, run_sum));
            }
        }
        let bytes = buf
            .get(..self.used)
            .ok_or_else(|| Error::Other("internal: held pages past the buffer".into()))?;
        let mut refs = writer.add_consecutive(bytes, &pieces)?.into_iter();
        drop(buf);
        for h in held {
            let vma = meta
                .processes_mut()
                .nth(h.process)
                .and_then(|p| p.vmas.get_mut(h.vma))
                .ok_or_else(|| Error::Other("internal: pages held for no mapping".into()))?;
            for (addr, npages) in h.runs {
                let data = refs
                    .next()
                    .ok_or_else(|| Error::Other("internal: a held run was not written".into()))?;
                vma.pages.push(PageRun { addr, npages, data });
                pages += npages;
            }
        }
        if held_any {
            self.page_sums = sums;
        }
        self.unchanged = unchanged;
        self.prepare_next();
        Ok(pages)
    }

    /// Pages the last [`write_all`](HeldPages::write_all) stored with the
    /// same content as the one before it (a checksum match: a rare false
    /// match only brings a new base sooner).
    pub fn unchanged_pages(&self) -> u64 {
        self.unchanged
    }

    /// Bytes of pages the last increment that held any held (0 before
    /// any).
    pub fn last_held_bytes(&self) -> usize {
        self.last_used
    }

    /// A new base: the next increment's pages are new to it.
    pub fn forget_sums(&mut self) {
        self.page_sums = HashMap::new();
        self.unchanged = 0;
    }

    /// After a checkpoint: shrink a buffer far larger than it needed (a
    /// burst of writes should not hold memory for ever), or grow it, on
    /// its own thread, by what this checkpoint held beyond the previous.
    fn prepare_next(&mut self) {
        // Nothing held, because the buffer was still being grown: nothing
        // learned. (Taken as a checkpoint that needed nothing, it made the
        // next one grow the buffer again, and the one after find it busy:
        // every other increment held nothing.)
        if self.used == 0 {
            return;
        }
        let (used, last) = (self.used, self.last_used);
        self.last_used = used;
        self.used = 0;
        let want = (used + used.saturating_sub(last)).min(MAX_HELD_BYTES);
        let shrink = move |len: usize| len > 64 << 20 && len > 4 * used;
        // Most checkpoints need neither: no thread then.
        if let Ok(buf) = self.buf.try_lock()
            && buf.len() >= want
            && !shrink(buf.len())
        {
            return;
        }
        let buf = Arc::clone(&self.buf);
        let spawned = std::thread::Builder::new()
            .name("chpox-held-pages".into())
            .spawn(move || {
                let Ok(mut buf) = buf.lock() else {
                    return;
                };
                if shrink(buf.len()) {
                    buf.truncate(used * 2);
                    buf.shrink_to_fit();
                } else if buf.len() < want {
                    buf.resize(want, 0);
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "held-pages buffer not prepared");
        }
    }
}
