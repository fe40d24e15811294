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
    /// Pages read before a freeze ([`preread`](HeldPages::preread)), by
    /// process: (address, pages, offset in the buffer), sorted by address,
    /// apart. Laid out from the buffer's start, up to `preread_end`. Kept
    /// from one increment to the next: a page protected when it was read
    /// and reported written by no scan since holds what was read.
    preread: HashMap<i32, Vec<(u64, u64, usize)>>,
    preread_end: usize,
}

/// Bytes `[start, end)` of the buffer, written at once as its pieces
/// (length, checksum).
type Stretch = (usize, usize, Vec<(usize, u32)>);

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
    /// Forget what an earlier (failed) checkpoint held, but not the pages
    /// read before this freeze; the buffer stays.
    pub fn clear(&mut self) {
        self.held.clear();
        self.used = self.preread_end;
    }

    /// Forget the pages read before freezes too (a new base, a checkpoint
    /// that failed).
    pub fn drop_preread(&mut self) {
        self.preread.clear();
        self.preread_end = 0;
        self.clear();
    }

    /// Pages read before freezes, in all.
    pub fn preread_pages(&self) -> u64 {
        self.preread
            .values()
            .flatten()
            .map(|&(_, pages, _)| pages)
            .sum()
    }

    /// Byte ranges of `pid` read before freezes (sorted, apart).
    pub fn preread_ranges(&self, pid: i32) -> Vec<(u64, u64)> {
        self.preread.get(&pid).map_or_else(Vec::new, |entries| {
            entries
                .iter()
                .map(|&(a, n, _)| (a, a + n * PAGE_SIZE))
                .collect()
        })
    }

    /// Read `runs` (sorted, apart) of `pid`, which runs, into the buffer
    /// before the freeze: a page read already is read again into its
    /// place, the others after the pages read so far. False if the buffer
    /// is being grown, or the pages would not fit under
    /// [`MAX_HELD_BYTES`]: nothing more is read then.
    pub fn preread(&mut self, pid: i32, runs: &[(u64, u64)]) -> Result<bool> {
        let Ok(mut buf) = self.buf.try_lock() else {
            return Ok(false);
        };
        let entries = self.preread.entry(pid).or_default();
        let pieces = pieces_of(runs, entries, &[]);
        let new = to_read_now(&pieces);
        let len: usize = new.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
        let end = self.preread_end + len;
        if end > MAX_HELD_BYTES {
            return Ok(false);
        }
        if buf.len() < end {
            // The processes run: the buffer's fresh pages cost them
            // nothing.
            buf.resize(end, 0);
        }
        let again: Vec<(u64, u64, usize)> = pieces
            .iter()
            .filter_map(|&(addr, pages, at)| Some((addr, pages, at?)))
            .collect();
        crate::pagecopy::read_running_to(pid, &again, &mut buf)?;
        crate::pagecopy::read_running(pid, &new, &mut buf[self.preread_end..end])?;
        let mut at = self.preread_end;
        for &(addr, pages) in &new {
            entries.push((addr, pages, at));
            at += (pages * PAGE_SIZE) as usize;
        }
        entries.sort_unstable();
        self.preread_end = end;
        self.used = end;
        Ok(true)
    }

    /// Have room for `bytes` more past the pages read before the freeze,
    /// while the processes still run: what the freeze reads then goes
    /// into memory touched already (fresh pages come at 0.3–1 GB/s here).
    pub fn make_room(&mut self, bytes: usize) {
        let want = (self.preread_end + bytes).min(MAX_HELD_BYTES);
        if let Ok(mut buf) = self.buf.try_lock()
            && buf.len() < want
        {
            buf.resize(want, 0);
        }
    }

    /// Hold `runs` (sorted, apart) of frozen `pid` (process `process` of
    /// the image, its mapping `vma`), to be written by [`write_all`]. Of a
    /// mapping tracked since the base, `fresh` is what its tracker reports
    /// written since its last protect (sorted): the pages read before the
    /// freeze and not in it are held as they were read. Every other page
    /// is read now into the buffer. False if those do not fit under
    /// [`MAX_HELD_BYTES`]: the caller writes the runs now.
    ///
    /// [`write_all`]: HeldPages::write_all
    pub fn hold(
        &mut self,
        pid: i32,
        process: usize,
        vma: usize,
        runs: &[(u64, u64)],
        fresh: Option<&[crate::dirty::Region]>,
    ) -> Result<bool> {
        // A mapping not tracked since the base may be new where a tracked
        // one was read before the freeze: none of that is its.
        let pieces = match (self.preread.get(&pid), fresh) {
            (Some(entries), Some(fresh)) => pieces_of(runs, entries, fresh),
            _ => runs.iter().map(|&(a, n)| (a, n, None)).collect(),
        };
        let to_read = to_read_now(&pieces);
        let len: usize = to_read.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
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
        crate::pagecopy::read_frozen(pid, &to_read, &mut buf[self.used..end])?;
        tracing::debug!(
            pid,
            bytes = len,
            grown,
            from_preread = pieces
                .iter()
                .filter(|p| p.2.is_some())
                .map(|p| p.1)
                .sum::<u64>(),
            us = started.elapsed().as_micros() as u64,
            "pages held"
        );
        // One entry per piece: the pieces read now lie one after the
        // other from `used`, those read before where their reading put
        // them.
        let mut read_at = self.used;
        for (addr, pages, at) in pieces {
            let at = at.unwrap_or_else(|| {
                let here = read_at;
                read_at += (pages * PAGE_SIZE) as usize;
                here
            });
            self.held.push(Held {
                pid,
                process,
                vma,
                runs: crate::pagecopy::split_runs(&[(addr, pages)]),
                at,
            });
        }
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
        // next increment compares with), written a stretch at a time: the
        // runs that lie one after the other in the buffer at once (all of
        // them, when no page was read before the freeze).
        let mut stretches: Vec<Stretch> = Vec::new();
        for h in &held {
            let mut at = h.at;
            if stretches.last().is_none_or(|s| s.1 != at) {
                stretches.push((at, at, Vec::new()));
            }
            let Some((_, stretch_end, pieces)) = stretches.last_mut() else {
                continue;
            };
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
            *stretch_end = at;
        }
        let mut refs = Vec::new();
        for (start, end, pieces) in &stretches {
            let bytes = buf
                .get(*start..*end)
                .ok_or_else(|| Error::Other("internal: held pages past the buffer".into()))?;
            refs.extend(writer.add_consecutive(bytes, pieces)?);
        }
        let mut refs = refs.into_iter();
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
        // The pages read before freezes stay where they are (a shrink
        // keeps twice `used`, which holds them).
        self.used = self.preread_end;
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

/// `runs` (sorted, apart) cut into pieces (address, pages, where in the
/// buffer): `Some` for pages read before the freeze (in `entries`, see
/// [`HeldPages::preread`]) and not written since (not in `fresh`, sorted);
/// `None` for the pages to read now.
fn pieces_of(
    runs: &[(u64, u64)],
    entries: &[(u64, u64, usize)],
    fresh: &[crate::dirty::Region],
) -> Vec<(u64, u64, Option<usize>)> {
    let mut out: Vec<(u64, u64, Option<usize>)> = Vec::new();
    for &(addr, pages) in runs {
        let end = addr + pages * PAGE_SIZE;
        let mut a = addr;
        while a < end {
            // The first fresh region and the first entry not ending at or
            // before `a`.
            let f = fresh.partition_point(|r| r.end <= a);
            let (in_fresh, fresh_until) = match fresh.get(f) {
                Some(r) if r.start <= a => (true, r.end),
                Some(r) => (false, r.start),
                None => (false, end),
            };
            let e = entries.partition_point(|&(s, n, _)| s + n * PAGE_SIZE <= a);
            let (slot, entry_until) = match entries.get(e) {
                Some(&(s, n, at)) if s <= a => (Some(at + (a - s) as usize), s + n * PAGE_SIZE),
                Some(&(s, _, _)) => (None, s),
                None => (None, end),
            };
            let until = end.min(fresh_until).min(entry_until);
            let at = if in_fresh { None } else { slot };
            let n = (until - a) / PAGE_SIZE;
            match out.last_mut() {
                Some((pa, pn, pat))
                    if *pa + *pn * PAGE_SIZE == a
                        && match (*pat, at) {
                            (None, None) => true,
                            (Some(p), Some(q)) => p + (*pn * PAGE_SIZE) as usize == q,
                            _ => false,
                        } =>
                {
                    *pn += n;
                }
                _ => out.push((a, n, at)),
            }
            a = until;
        }
    }
    out
}

/// The pieces of [`pieces_of`] no reading holds, as (address, pages) runs.
fn to_read_now(pieces: &[(u64, u64, Option<usize>)]) -> Vec<(u64, u64)> {
    pieces
        .iter()
        .filter(|p| p.2.is_none())
        .map(|p| (p.0, p.1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::Region;

    const P: u64 = PAGE_SIZE;
    const PB: usize = PAGE_SIZE as usize;

    fn fresh(ranges: &[(u64, u64)]) -> Vec<Region> {
        ranges
            .iter()
            .map(|&(s, e)| Region {
                start: s * P,
                end: e * P,
                categories: crate::dirty::PAGE_IS_WRITTEN,
            })
            .collect()
    }

    #[test]
    fn without_pages_read_before_everything_is_read_now() {
        let runs = [(10 * P, 3), (20 * P, 1)];
        assert_eq!(
            pieces_of(&runs, &[], &fresh(&[(11, 12)])),
            vec![(10 * P, 3, None), (20 * P, 1, None)]
        );
    }

    #[test]
    fn pages_read_before_and_not_written_since_come_from_their_place() {
        // Pages 10..20 read before into the buffer from 0, 30..32 from
        // 10 pages on.
        let entries = [(10 * P, 10, 0), (30 * P, 2, 10 * PB)];
        // Pages 12..14 written since.
        let f = fresh(&[(12, 14)]);
        let runs = [(8 * P, 8), (31 * P, 3)];
        assert_eq!(
            pieces_of(&runs, &entries, &f),
            vec![
                (8 * P, 2, None),
                (10 * P, 2, Some(0)),
                (12 * P, 2, None),
                (14 * P, 2, Some(4 * PB)),
                (31 * P, 1, Some(11 * PB)),
                (32 * P, 2, None),
            ]
        );
    }

    #[test]
    fn adjacent_entries_laid_out_apart_stay_apart() {
        // Two entries side by side in memory, not in the buffer.
        let entries = [(10 * P, 2, 5 * PB), (12 * P, 2, 0)];
        assert_eq!(
            pieces_of(&[(10 * P, 4)], &entries, &[]),
            vec![(10 * P, 2, Some(5 * PB)), (12 * P, 2, Some(0))]
        );
        assert_eq!(
            pieces_of(&[(9 * P, 2), (13 * P, 3)], &entries, &[]),
            vec![
                (9 * P, 1, None),
                (10 * P, 1, Some(5 * PB)),
                (13 * P, 1, Some(PB)),
                (14 * P, 2, None)
            ]
        );
    }
}
