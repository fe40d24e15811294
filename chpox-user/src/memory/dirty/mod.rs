//! Dirty-page tracking: which pages of a process were written since a
//! moment we chose, on a kernel without soft-dirty bits.
//!
//! A userfaultfd with asynchronous write-protect (`UFFD_FEATURE_WP_ASYNC`,
//! with `WP_UNPOPULATED`) is registered, write-protect mode only, on the
//! process's private mappings, and every page is write-protected. A write
//! to a protected page is not reported to anyone: the kernel makes the
//! page writable at once and drops its protection, so the process runs at
//! full speed after one cheap fault per page. `PAGEMAP_SCAN` on
//! `/proc/PID/pagemap` then tells which pages lost their protection
//! (`PAGE_IS_WRITTEN`) and, in the same walk, protects them again
//! (`PM_SCAN_WP_MATCHING`): the next scan reports writes since this one.
//!
//! A userfaultfd serves the memory of the process that made it, so the
//! descriptor is made inside the frozen target by a remote syscall, taken
//! with `pidfd_getfd` and closed there (`restore::memory::uffd::from_remote`): the
//! process never sees it, and every ioctl we issue acts on its memory.
//! Closing our descriptor ([`Tracker::detach`], or drop) unregisters
//! everything and drops the protection.
//!
//! What a scan's answer means (measured on Linux 6.18):
//! - a page present and not written was not written since the last
//!   protect: its content is what it was then;
//! - a page zapped since (`MADV_DONTNEED`, `munmap` then `mmap` again) is
//!   not present, and reads back as zero; read again it is
//!   present, written and the zero page (`PAGE_IS_PFNZERO`);
//! - so only "present and not written" may be taken from the earlier
//!   state; everything else is taken from the process as it is now.
//!
//! Which mappings are tracked: private anonymous and private file
//! mappings (the ones whose pages a checkpoint stores), not device memory.
//! A mapping the process registered with its own userfaultfd cannot be
//! registered again (EBUSY): it is left untracked, as are mappings that
//! appeared since the last [`Tracker::track`], mappings moved by `mremap`
//! (the kernel drops the registration of a moved mapping, as we ask for
//! no remap events) and shared memory (other processes write it through
//! mappings we do not see). An untracked mapping's pages are all "written".
//!
//! The tracker holds `/proc/PID/pagemap` and the userfaultfd, both bound to
//! the memory of the process when it was attached: after an `execve` (new
//! memory) or the process's exit, a scan fails with [`DirtyError::Lost`],
//! and the caller must treat every page as written.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::memory::{MapEntry, PAGE_SIZE};
use crate::remote::RemoteThread;
use crate::restore::memory::uffd;

mod release;
mod walk;

pub use release::release_elsewhere;

use walk::{
    PmScanArg, SPLIT_WALK_FROM, WALK_PART, Walk, append_joined, pagemap_scan, two_cores,
    walk_in_parts, walk_range,
};

/// Learn, before any freeze, what the walks need to know of this machine.
pub fn warm() {
    two_cores();
}

/// Page categories of `PAGEMAP_SCAN` (`<linux/fs.h>`; the headers of this
/// machine's libc lack them).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// What [`Tracker::scan`] returns of each region.
const RETURN_ALL: u64 =
    PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_FILE;
/// What [`Tracker::scan_all_written`] returns of the written regions of a
/// mapping whose presence it reports (see [`reports_presence`]).
const RETURN_PRESENCE: u64 = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
/// `struct page_region`: `[start, end)` whose pages share `categories`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// `PAGE_IS_*` bits (those of [`Tracker::scan`]'s return mask:
    /// written, present, swapped, zero page, file page).
    pub categories: u64,
}

impl Region {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }

    pub fn written(&self) -> bool {
        self.categories & PAGE_IS_WRITTEN != 0
    }

    pub fn present(&self) -> bool {
        self.categories & PAGE_IS_PRESENT != 0
    }

    pub fn zero_page(&self) -> bool {
        self.categories & PAGE_IS_PFNZERO != 0
    }

    pub fn swapped(&self) -> bool {
        self.categories & PAGE_IS_SWAPPED != 0
    }
}

/// Whether [`Tracker::scan_all_written`] tells, of the written pages of a
/// mapping of `kind`, which are present and which swapped (the rest are
/// holes). Of an anonymous mapping, for 1.5 ms more over 4 GiB (3.5
/// against 2 ms with 1 % of its pages written): saves reading the pagemap
/// at each written page, about 1 µs a read, 12 ms for an increment of
/// 11 500 scattered pages, while frozen. Not of a private file mapping:
/// telling its own copies from page-cache pages (`PAGE_IS_FILE`) makes the
/// kernel look up every page of the range, 60 ms over 4 GiB.
/// A swapped page is only a hint, to be read from the pagemap: a guard
/// page (`MADV_GUARD_INSTALL`) is reported as written and swapped too.
pub fn reports_presence(kind: crate::image::model::VmaKind) -> bool {
    kind == crate::image::model::VmaKind::Anonymous
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The process cannot be tracked at all: userfaultfd refused, or
    /// without asynchronous write-protect.
    #[error("PID {pid}: write tracking unavailable: {reason}")]
    Unavailable { pid: i32, reason: String },
    /// The tracker no longer follows the process's memory (it exec'd or
    /// exited): every page must be taken as written.
    #[error("PID {pid}: write tracking lost: {reason}")]
    Lost { pid: i32, reason: String },
    #[error("PID {pid}: {what}: {source}")]
    Io {
        pid: i32,
        what: String,
        source: io::Error,
    },
}

/// Write tracking of one process (see the module documentation).
///
/// Made while the process is frozen ([`attach`](Self::attach), then
/// [`track`](Self::track)); kept while it runs; scanned while it is frozen
/// again. Dropping it stops the tracking.
#[derive(Debug)]
pub struct Tracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    /// Ranges registered by us, sorted, not overlapping. A mapping is
    /// tracked if it lies inside one and still has the kernel's `uw` flag.
    ranges: Vec<(u64, u64)>,
}

impl Tracker {
    /// Make a tracker for the frozen process whose thread is `thread`:
    /// a userfaultfd made inside it, taken by us, with asynchronous
    /// write-protect enabled. Nothing is tracked until [`track`](Self::track).
    pub fn attach(thread: &mut RemoteThread<'_>) -> crate::Result<Tracker> {
        let pid = thread.pid();
        let unavailable = |reason: String| DirtyError::Unavailable { pid, reason };
        // A process without CAP_SYS_PTRACE may only make a user-mode one
        // where vm.unprivileged_userfaultfd is 0; asynchronous
        // write-protect never involves a handler, so it is the same to us.
        let uffd = match uffd::from_remote(thread, 0)? {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                uffd::from_remote(thread, uffd::USER_MODE_ONLY)?
                    .map_err(|e| unavailable(format!("userfaultfd: {e}")))?
            }
            Err(e) => return Err(unavailable(format!("userfaultfd: {e}")).into()),
        };
        let wanted = uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED;
        let granted = uffd::api_granted(uffd.as_fd(), wanted)
            .map_err(|e| unavailable(format!("userfaultfd API: {e}")))?;
        if granted & wanted != wanted {
            return Err(unavailable(
                "this kernel's userfaultfd lacks asynchronous write-protect".into(),
            )
            .into());
        }
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|source| DirtyError::Io {
            pid,
            what: format!("opening {path}"),
            source,
        })?;
        Ok(Tracker {
            pid,
            uffd,
            pagemap,
            ranges: Vec::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether `map` is a kind of mapping the tracker follows.
    pub fn eligible(map: &MapEntry) -> bool {
        use crate::image::model::VmaKind;
        matches!(map.kind(), VmaKind::Anonymous | VmaKind::PrivateFile)
            && !map.is_device_memory()
            && !map.is_empty()
    }

    /// Whether every write to `map` since the last protect is known: it
    /// lies in a range we registered and the kernel still has it
    /// registered (`uw`). `maps` must be current (read while frozen).
    pub fn tracks(&self, map: &MapEntry) -> bool {
        map.vm_flags.iter().any(|f| f == "uw")
            && self
                .ranges
                .iter()
                .any(|&(s, e)| s <= map.start && map.end <= e)
    }

    /// Register and write-protect every eligible mapping of `maps` (the
    /// process's current mappings, read while it is frozen) that is not
    /// tracked yet; forget ranges no longer mapped. Returns the ranges
    /// newly tracked: their pages count as written until the next scan
    /// (they were not protected before). A mapping the process registered
    /// with a userfaultfd of its own is skipped (left untracked).
    pub fn track(&mut self, maps: &[MapEntry]) -> crate::Result<Vec<(u64, u64)>> {
        self.track_protecting(maps, true)
    }

    fn track_protecting(
        &mut self,
        maps: &[MapEntry],
        protect: bool,
    ) -> crate::Result<Vec<(u64, u64)>> {
        self.check_alive()?;
        let mut kept: Vec<(u64, u64)> = Vec::new();
        let mut added = Vec::new();
        for map in maps.iter().filter(|m| Self::eligible(m)) {
            if self.tracks(map) {
                kept.push((map.start, map.end));
                continue;
            }
            if Self::foreign_modes(map) {
                self.leave_to_the_process(map);
                continue;
            }
            // Registered already (`uw`) but not a range of ours: ours grown
            // in place (`mremap`), or merged from two of ours; registering
            // it again with our userfaultfd succeeds then, and fails with
            // EBUSY where it is the process's own.
            match uffd::register_wp(self.uffd.as_fd(), map.start, map.len()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Self::registered(map) => {
                    self.leave_to_the_process(map);
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINVAL)) => {
                    tracing::debug!(pid = self.pid, start = map.start, end = map.end,
                        error = %e, "mapping cannot be write-tracked: untracked");
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(self.lost("its memory is gone (exec or exit)"));
                }
                Err(source) => {
                    return Err(DirtyError::Io {
                        pid: self.pid,
                        what: format!("registering {:#x}-{:#x}", map.start, map.end),
                        source,
                    }
                    .into());
                }
            }
            // Protect every page, reporting nothing (no output vector: the
            // kernel's fast path).
            if protect {
                self.walk(map.start, map.end, true, None)?;
            }
            kept.push((map.start, map.end));
            added.push((map.start, map.end));
        }
        kept.sort_unstable();
        self.ranges = kept;
        Ok(added)
    }

    /// The written regions of `[start, end)` (inside one tracked mapping,
    /// see [`tracks`](Self::tracks)) since the last protect, with their
    /// present/swapped/zero-page categories; with `protect`, those pages
    /// are protected again in the same walk, so the next scan reports
    /// writes from now on. Call while the process is frozen, or scan
    /// again once it is: a write between the scan and the reading of the
    /// page is reported only by the next scan.
    pub fn scan(&mut self, start: u64, end: u64, protect: bool) -> crate::Result<Vec<Region>> {
        let mut out = Vec::new();
        self.walk(start, end, protect, Some((&mut out, RETURN_ALL)))?;
        Ok(out)
    }

    /// Like [`scan`](Self::scan), but the regions carry only
    /// `PAGE_IS_WRITTEN`: the kernel then checks one bit per page instead
    /// of looking at each page (about 60 times faster over a large,
    /// mostly unwritten mapping). Read the state of the written pages
    /// from the pagemap.
    pub fn scan_written(
        &mut self,
        start: u64,
        end: u64,
        protect: bool,
    ) -> crate::Result<Vec<Region>> {
        let mut out = Vec::new();
        self.walk(start, end, protect, Some((&mut out, PAGE_IS_WRITTEN)))?;
        Ok(out)
    }

    /// [`scan_written`](Self::scan_written) of every tracked mapping of
    /// `maps`, by index in `maps`; of a mapping that
    /// [`reports_presence`], with the written pages' presence.
    pub fn scan_all_written(
        &mut self,
        maps: &[MapEntry],
        protect: bool,
    ) -> crate::Result<Vec<(usize, Vec<Region>)>> {
        let mut out = Vec::new();
        for (i, map) in maps.iter().enumerate() {
            if self.tracks(map) {
                let mask = if reports_presence(map.kind()) {
                    RETURN_PRESENCE
                } else {
                    PAGE_IS_WRITTEN
                };
                let mut regions = Vec::new();
                self.walk(map.start, map.end, protect, Some((&mut regions, mask)))?;
                out.push((i, regions));
            }
        }
        Ok(out)
    }

    /// Write-protect every page of every tracked mapping of `maps` again,
    /// reporting nothing: writes are counted from now on. Call while the
    /// process is frozen.
    pub fn protect_all(&mut self, maps: &[MapEntry]) -> crate::Result<()> {
        for map in maps {
            if self.tracks(map) {
                self.walk(map.start, map.end, true, None)?;
            }
        }
        Ok(())
    }

    /// `maps` without the `uw` flag on the mappings this tracker follows:
    /// what the process's own use of userfaultfd looks like (e.g. for
    /// `snapshot::may_fork`, which must not mistake our tracking for it).
    ///
    /// A mapping registered but not in a range of ours (ours grown in
    /// place by `mremap` since the last [`track`](Self::track)) is ours
    /// if our userfaultfd may register it: a mapping registered with
    /// another is refused (EBUSY), and one registered with ours already
    /// stays as it is. Taken for the process's own, it made a full
    /// checkpoint copy a 4 GiB process while frozen, for 2 s.
    pub fn hide_own(&self, maps: &[MapEntry]) -> Vec<MapEntry> {
        maps.iter()
            .map(|m| {
                let mut m = m.clone();
                let ours = self.tracks(&m)
                    || (Self::registered(&m)
                        && !Self::foreign_modes(&m)
                        && uffd::register_wp(self.uffd.as_fd(), m.start, m.len()).is_ok());
                if ours {
                    m.vm_flags.retain(|f| f != "uw");
                }
                m
            })
            .collect()
    }

    /// A mapping registered with the process's own userfaultfd stays
    /// untracked (its pages count as written at every checkpoint).
    fn leave_to_the_process(&self, map: &MapEntry) {
        tracing::debug!(
            pid = self.pid,
            start = map.start,
            end = map.end,
            "mapping registered by the process's own userfaultfd: untracked"
        );
    }

    /// Registered for write-protect faults, by us or by the process.
    fn registered(map: &MapEntry) -> bool {
        map.vm_flags.iter().any(|f| f == "uw")
    }

    /// Registered for missing or minor faults: the process's own
    /// userfaultfd (ours asks for write-protect alone).
    fn foreign_modes(map: &MapEntry) -> bool {
        map.vm_flags.iter().any(|f| f == "um" || f == "ui")
    }

    /// Fails with [`DirtyError::Lost`] once the tracker no longer follows
    /// the process's memory (exec, exit).
    pub fn check_alive(&self) -> crate::Result<()> {
        // An empty walk still takes a reference on the memory the pagemap
        // was opened for; it fails once that memory is gone.
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: 0,
            end: PAGE_SIZE,
            ..PmScanArg::default()
        };
        match pagemap_scan(&self.pagemap, &mut arg) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.lost(&format!("its memory is gone ({e})"))),
        }
    }

    /// Stop tracking: unregister every range (dropping the protection) and
    /// close the userfaultfd. Errors are of no consequence (the process
    /// may be gone) and only logged.
    pub fn detach(self) {
        for &(s, e) in &self.ranges {
            if let Err(err) = uffd::unregister(self.uffd.as_fd(), s, e - s) {
                tracing::debug!(pid = self.pid, start = s, end = e, error = %err,
                    "unregistering a tracked range");
            }
        }
    }

    fn lost(&self, reason: &str) -> crate::Error {
        DirtyError::Lost {
            pid: self.pid,
            reason: reason.to_string(),
        }
        .into()
    }

    /// What a failed `PAGEMAP_SCAN` of `[from, end)` means: the process
    /// gone or exec'd, the range no longer registered, or an I/O error.
    fn scan_error(&self, from: u64, end: u64, e: std::io::Error) -> crate::Error {
        match e.raw_os_error() {
            Some(libc::ESRCH) => self.lost("its memory is gone (exec or exit)"),
            Some(libc::EPERM) => self.lost(&format!(
                "{from:#x}-{end:#x} is no longer registered for write tracking"
            )),
            _ => DirtyError::Io {
                pid: self.pid,
                what: format!("PAGEMAP_SCAN of {from:#x}-{end:#x}"),
                source: e,
            }
            .into(),
        }
    }

    /// One `PAGEMAP_SCAN` walk over `[start, end)`, continued until the
    /// whole range is done; written regions appended to `out` (None: only
    /// protect).
    fn walk(
        &mut self,
        start: u64,
        end: u64,
        protect: bool,
        out: Option<(&mut Vec<Region>, u64)>,
    ) -> crate::Result<()> {
        let (out, mask) = match out {
            Some((out, mask)) => (Some(out), Some(mask)),
            None => (None, None),
        };
        let walk = Walk {
            protect,
            mask,
            max_pages: 0,
            lenient: false,
            every_page: false,
            anyof: None,
        };
        let regions = self.walk_regions(start, end, walk)?;
        if let Some(out) = out {
            append_joined(out, regions);
        }
        Ok(())
    }

    /// The regions `walk` reports of `[start, end)`: a long range is
    /// walked in parts on two threads (see [`walk_in_parts`]).
    fn walk_regions(&self, start: u64, end: u64, walk: Walk) -> crate::Result<Vec<Region>> {
        if end.saturating_sub(start) >= SPLIT_WALK_FROM && two_cores() {
            walk_in_parts(&self.pagemap, start, end, WALK_PART, walk)
        } else {
            let mut regions = Vec::new();
            walk_range(&self.pagemap, start, end, walk, &mut regions).map(|()| regions)
        }
        .map_err(|f| self.scan_error(f.from, f.end, f.error))
    }

    /// The pages of `[start, end)` (inside one tracked mapping), written
    /// or not, that are not present (swapped, or gone) or are the zero
    /// page, with those categories: every other page is present. One
    /// walk that reports only those: the state of many scattered pages
    /// for ~4 ns a page of the range (a walk that reports every page took
    /// ~12).
    pub fn absent_or_zero(&self, start: u64, end: u64) -> crate::Result<Vec<Region>> {
        let walk = Walk {
            protect: false,
            mask: Some(PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO),
            max_pages: 0,
            lenient: false,
            every_page: false,
            anyof: Some((PAGE_IS_PRESENT, PAGE_IS_PRESENT | PAGE_IS_PFNZERO)),
        };
        self.walk_regions(start, end, walk)
    }

    /// The written regions (`PAGE_IS_WRITTEN` alone) since the last
    /// protect in every range this tracker registered, protecting them
    /// again in the same walk: for a process that runs (no maps read). A
    /// mapping no longer registered in such a range is skipped (the
    /// kernel's own leniency with `PM_SCAN_WP_MATCHING`): the freeze finds
    /// it untracked and stores it whole.
    pub fn scan_registered_written(&self) -> crate::Result<Vec<Region>> {
        let mut out = Vec::new();
        for &(start, end) in &self.ranges {
            let walk = Walk {
                protect: true,
                mask: Some(PAGE_IS_WRITTEN),
                max_pages: 0,
                lenient: true,
                every_page: false,
                anyof: None,
            };
            append_joined(&mut out, self.walk_regions(start, end, walk)?);
        }
        Ok(out)
    }

    /// Pages written since the last protect in the mappings still
    /// registered in the ranges of this tracker, counted up to about
    /// `limit`, in one walk: what [`scan_registered_written`] would
    /// report, for the price of a look (unlike [`written_pages`], a
    /// mapping mapped again since does not count).
    ///
    /// [`scan_registered_written`]: Self::scan_registered_written
    /// [`written_pages`]: Self::written_pages
    pub fn written_pages_registered(&self, limit: u64) -> crate::Result<u64> {
        let (Some(first), Some(last)) = (self.ranges.first(), self.ranges.last()) else {
            return Ok(0);
        };
        walk::count_written_in_tracked(&self.pagemap, first.0, last.1, limit.max(1))
            .map_err(|f| self.scan_error(f.from, f.end, f.error))
    }

    /// Pages written since the last protect in the ranges this tracker
    /// registered, counted up to about `limit` (the walks stop once they
    /// have seen that many): what an increment would read while the
    /// process is frozen. A mapping in a range that is not registered any
    /// more (unmapped and mapped again since) counts all its present
    /// pages, as an increment stores it whole.
    pub fn written_pages(&self, limit: u64) -> crate::Result<u64> {
        let mut seen = 0u64;
        for &(start, end) in &self.ranges {
            if seen >= limit {
                break;
            }
            let walk = Walk {
                protect: false,
                mask: Some(PAGE_IS_WRITTEN),
                max_pages: limit - seen,
                lenient: true,
                every_page: false,
                anyof: None,
            };
            seen += self
                .walk_regions(start, end, walk)?
                .iter()
                .map(Region::pages)
                .sum::<u64>();
        }
        Ok(seen)
    }
}

/// Pages of `[start, end)` that are "as before" — not in a written region
/// of `written` (sorted, from [`Tracker::scan`]) — and present according
/// to `present` (one flag per page from `start`, e.g. from the pagemap):
/// the pages whose content a checkpoint may take from its parent. As
/// (address, page count) runs.
pub fn unchanged_runs(start: u64, written: &[Region], present: &[bool]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut w = written.iter().peekable();
    for (i, &p) in present.iter().enumerate() {
        let addr = start + i as u64 * PAGE_SIZE;
        while w.peek().is_some_and(|r| r.end <= addr) {
            w.next();
        }
        let is_written = w.peek().is_some_and(|r| r.start <= addr);
        if p && !is_written {
            match runs.last_mut() {
                Some((a, n)) if *a + *n * PAGE_SIZE == addr => *n += 1,
                _ => runs.push((addr, 1)),
            }
        }
    }
    runs
}

/// For a pre-copy dump (`precopy`): register while frozen, protect while
/// the process runs, and see every page's state at the freeze.
impl Tracker {
    /// Like [`track`](Self::track), but only register: no page is
    /// protected yet, so every page counts as written until a scan with
    /// `protect` (which may run while the process runs: a page written
    /// after the walk passed it is reported by the next scan).
    pub fn register(&mut self, maps: &[MapEntry]) -> crate::Result<Vec<(u64, u64)>> {
        self.track_protecting(maps, false)
    }

    /// Every page of `[start, end)` (inside one tracked mapping), as
    /// regions of pages with the same written/present/swapped/zero-page
    /// categories, and with `file` page-cache (which costs a page lookup
    /// per present page: ask only for file mappings); with `protect`,
    /// every page is protected again in the same walk.
    pub fn scan_every(
        &mut self,
        start: u64,
        end: u64,
        protect: bool,
        file: bool,
    ) -> crate::Result<Vec<Region>> {
        let walk = Walk {
            protect,
            mask: Some(RETURN_ALL & !if file { 0 } else { PAGE_IS_FILE }),
            max_pages: 0,
            lenient: false,
            every_page: true,
            anyof: None,
        };
        let mut regions = Vec::new();
        walk_range(&self.pagemap, start, end, walk, &mut regions)
            .map_err(|f| self.scan_error(f.from, f.end, f.error))?;
        Ok(regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_struct_sizes() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<Region>(), 24);
        assert_eq!(walk::PAGEMAP_SCAN >> 16 & 0x3fff, 96);
    }

    #[test]
    fn unchanged_is_present_and_not_written() {
        let p = PAGE_SIZE;
        let written = [
            Region {
                start: 0x10000 + p,
                end: 0x10000 + 3 * p,
                categories: PAGE_IS_WRITTEN,
            },
            Region {
                start: 0x10000 + 5 * p,
                end: 0x10000 + 6 * p,
                categories: PAGE_IS_WRITTEN,
            },
        ];
        let present = [true, true, true, true, false, true, true];
        assert_eq!(
            unchanged_runs(0x10000, &written, &present),
            vec![(0x10000, 1), (0x10000 + 3 * p, 1), (0x10000 + 6 * p, 1)]
        );
    }

    /// Our own memory, tracked from our own side: writes show up, the
    /// rest does not, and a re-protect starts over.
    #[test]
    fn own_writes_are_seen() {
        // SAFETY: plain syscalls on our own fresh mapping and descriptors.
        unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK);
            if fd < 0 {
                eprintln!("no userfaultfd here; skipped");
                return;
            }
            let uffd = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32);
            let wanted = uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED;
            if uffd::api_granted(uffd.as_fd(), wanted)
                .map(|g| g & wanted)
                .ok()
                != Some(wanted)
            {
                eprintln!("no asynchronous write-protect here; skipped");
                return;
            }
            let len = 2048 * PAGE_SIZE as usize;
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert_ne!(base, libc::MAP_FAILED as *mut u8);
            for i in 0..2048 {
                *base.add(i * PAGE_SIZE as usize) = 1;
            }
            let start = base as u64;
            uffd::register_wp(uffd.as_fd(), start, len as u64).expect("register");
            let mut t = Tracker {
                pid: std::process::id() as i32,
                uffd,
                pagemap: File::open("/proc/self/pagemap").expect("pagemap"),
                ranges: vec![(start, start + len as u64)],
            };
            t.walk(start, start + len as u64, true, None)
                .expect("protect");
            assert!(
                t.scan(start, start + len as u64, true)
                    .expect("scan")
                    .is_empty()
            );
            *base.add(5 * PAGE_SIZE as usize) = 2;
            *base.add(6 * PAGE_SIZE as usize) = 2;
            libc::madvise(
                base.add(10 * PAGE_SIZE as usize).cast(),
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            );
            let got = t.scan(start, start + len as u64, true).expect("scan");
            let written: Vec<(u64, u64)> = got
                .iter()
                .map(|r| ((r.start - start) / PAGE_SIZE, r.pages()))
                .collect();
            assert_eq!(written[0], (5, 2), "{got:?}");
            // The zapped page counts as written (its old content is gone),
            // and is not present.
            let zapped = start + 10 * PAGE_SIZE;
            assert!(
                got.iter()
                    .any(|r| r.start <= zapped && zapped < r.end && !r.present()),
                "{got:?}"
            );
            assert!(
                t.scan(start, start + len as u64, false)
                    .expect("scan")
                    .is_empty()
            );
            // More regions than the kernel's own buffer holds (512): each
            // once, in order.
            for i in (0..2048).step_by(2) {
                *base.add(i * PAGE_SIZE as usize) = 3;
            }
            // Walked in parts on two threads (parts of 7 pages cut
            // regions), the same regions as in one walk.
            for i in 100..140 {
                *base.add(i * PAGE_SIZE as usize) = 4;
            }
            let end = start + len as u64;
            let mut whole = Vec::new();
            let walk = Walk {
                protect: false,
                mask: Some(RETURN_ALL),
                max_pages: 0,
                lenient: false,
                every_page: false,
                anyof: None,
            };
            assert!(walk_range(&t.pagemap, start, end, walk, &mut whole).is_ok());
            let parts = walk_in_parts(&t.pagemap, start, end, 7 * PAGE_SIZE, walk);
            assert!(parts.as_ref().is_ok_and(|p| *p == whole), "{whole:?}");
            // Counted: the 1024 pages written twice above and the 20 odd
            // ones between 100 and 140, or, limited, at least the limit.
            assert_eq!(t.written_pages(u64::MAX).ok(), Some(1044));
            assert!(t.written_pages(300).is_ok_and(|n| (300..1044).contains(&n)));
            assert!(whole.iter().any(|r| r.pages() > 7), "{whole:?}");
            let got = t.scan(start, start + len as u64, true).expect("scan");
            assert_eq!(got.len(), 50 + 1 + 953);
            assert!(got.windows(2).all(|w| w[0].end < w[1].start));
            t.check_alive().expect("alive");
            t.detach();
            libc::munmap(base.cast(), len);
        }
    }
}
