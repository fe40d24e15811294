//! An increment's pages read before the freeze, when there are too many to
//! read while the processes are frozen.
//!
//! An increment stores every page written since the base, read while the
//! tree is frozen (`heldpages`). For a job that keeps writing its memory,
//! such as a simulation rewriting its arrays, that is tens or hundreds of
//! megabytes by the next checkpoint: reading them held a 1 GiB job
//! writing 60–80 MB/s frozen for 34–148 ms (median 52) at one checkpoint a
//! second here, half of them snapshots taken because the reading would
//! have been longer. Past [`PREREAD_FROM_PAGES`], they are read first,
//! while the processes run, as a pre-copy does (`precopy`):
//!
//! 1. One walk per tracked range protects again the pages written since
//!    the tracker's last protect and reports them; they join the ranges
//!    written since the base that the tracker no longer reports
//!    (`Tracked::written_before`). They are read into the held pages'
//!    buffer, with any page of those ranges that no earlier reading
//!    holds.
//! 2. While many were written during that reading, the pages written since
//!    are protected and read again into their places, a few times.
//! 3. Frozen, the scan reports only what was written after the last walk:
//!    those pages are read then; every other page the increment stores
//!    comes from the buffer as read before, and its state (present,
//!    swapped, gone) from a walk of its page tables.
//!
//! A page written after a walk protected it is reported by the next scan,
//! whatever its reading got, so the image is the freeze's instant. What a
//! reading holds stays valid until the page is written again, so it is
//! kept from one increment to the next until a new base: the next reading
//! reads only what was written since. The price: the freeze comes later
//! after the trigger, by as long as the reading takes (logged, and in the
//! time from trigger to frozen): 40–60 ms for ~60 MB written since the
//! last checkpoint here.

use tracing::debug;

use super::{Tracking, minus, range_pages, union};
use crate::error::Result;
use crate::memory::PAGE_SIZE;

/// Below this many pages to read while frozen (8 MiB, 1–4 ms here), the
/// increment reads them then: a reading before would delay the freeze
/// for no gain.
pub const PREREAD_FROM_PAGES: u64 = 2048;

/// Readings again of the pages written during the one before, at most.
const PASSES_AGAIN: usize = 3;

/// What [`Tracking::read_before_freeze`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreRead {
    /// Pages read in the first reading.
    pub pages: u64,
    /// Pages read again, in the readings after it.
    pub pages_again: u64,
}

impl Tracking {
    /// Before the freeze of a checkpoint of processes that run: if the
    /// next increment would read many pages while frozen, read them now
    /// (see the module documentation). Without a base, or with a full
    /// checkpoint due, nothing is done: its snapshot reads nothing
    /// frozen. A failure is only logged: the increment then reads what
    /// it needs while frozen, as without this.
    pub fn read_before_freeze(&mut self) -> PreRead {
        self.held.clear();
        if self.base.is_none() || self.full_reason.is_some() {
            return PreRead::default();
        }
        // What the freeze would read: the pages written since the last
        // protect, and those written before it that no reading holds.
        let mut expected = 0;
        for (&pid, t) in &self.procs {
            expected += range_pages(&self.unread_before(pid, &t.written_before));
            expected += t
                .tracker
                .written_pages_registered(PREREAD_FROM_PAGES.saturating_sub(expected))
                .unwrap_or(0);
            if expected >= PREREAD_FROM_PAGES {
                break;
            }
        }
        if expected < PREREAD_FROM_PAGES {
            return PreRead::default();
        }
        match self.preread_passes() {
            Ok(done) => done,
            Err(e) => {
                debug!(error = %e, "pages not read before the freeze: read while frozen");
                self.held.drop_preread();
                PreRead::default()
            }
        }
    }

    /// The ranges of `written_before` of `pid` that no reading before a
    /// freeze holds.
    fn unread_before(&self, pid: i32, written_before: &[(u64, u64)]) -> Vec<(u64, u64)> {
        minus(written_before, self.held.preread_ranges(pid).into_iter())
    }

    fn preread_passes(&mut self) -> Result<PreRead> {
        let mut done = PreRead::default();
        let pids: Vec<i32> = self.procs.keys().copied().collect();
        // First, the pages written since the last protect (read again
        // where an earlier reading holds them), and those written before
        // it that no reading holds.
        for &pid in &pids {
            let Some(t) = self.procs.get(&pid) else {
                continue;
            };
            let written = t.tracker.scan_registered_written()?;
            let unread = self.unread_before(pid, &t.written_before);
            let ranges = union(&unread, written.iter().map(|r| (r.start, r.end)));
            if let Some(t) = self.procs.get_mut(&pid) {
                t.written_before = union(&t.written_before, ranges.iter().copied());
            }
            self.hold_before_freeze(pid, &ranges)?;
            done.pages += range_pages(&ranges);
        }
        // Again, for the pages written meanwhile, while that makes the
        // freeze's share smaller: a process that rewrites its memory faster
        // than it is read is left to the freeze (and there to a snapshot).
        let mut last = done.pages;
        for _ in 0..PASSES_AGAIN {
            let mut again = 0;
            for &pid in &pids {
                let Some(t) = self.procs.get_mut(&pid) else {
                    continue;
                };
                let written = t.tracker.scan_registered_written()?;
                let ranges: Vec<(u64, u64)> = written.iter().map(|r| (r.start, r.end)).collect();
                t.written_before = union(&t.written_before, ranges.iter().copied());
                again += range_pages(&ranges);
                self.hold_before_freeze(pid, &ranges)?;
            }
            done.pages_again += again;
            let converging = again * 2 <= last;
            last = again;
            if again < PREREAD_FROM_PAGES / 4 || !converging {
                break;
            }
        }
        // The freeze reads about as much as the last reading found.
        self.held
            .make_room(2 * (last * PAGE_SIZE) as usize + (1 << 20));
        debug!(
            pages = done.pages,
            pages_again = done.pages_again,
            held = self.held.preread_pages(),
            "pages read before the freeze"
        );
        Ok(done)
    }

    fn hold_before_freeze(&mut self, pid: i32, ranges: &[(u64, u64)]) -> Result<()> {
        if self.held.preread(pid, &page_runs(ranges))? {
            return Ok(());
        }
        // The buffer is full or being grown: what is not held is read
        // frozen (and counted so, should it be too much).
        Err(crate::error::Error::Other(
            "no room to hold the pages before the freeze".into(),
        ))
    }
}

/// Byte ranges as (address, pages) runs.
fn page_runs(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(s, e)| (s, (e - s) / PAGE_SIZE))
        .collect()
}
