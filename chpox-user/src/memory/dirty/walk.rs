//! `PAGEMAP_SCAN` walks of a tracked process's page tables: one ioctl,
//! a whole range (the kernel stops when our vector is full; we go on from
//! where it stopped), and a long range in parts on two threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use super::{PAGE_IS_WRITTEN, Region};

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) on a mapping not registered for
/// asynchronous write-protect, rather than skip it silently.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub(super) const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Regions per ioctl; a scan continues from where the kernel stopped.
const SCAN_BATCH: usize = 16 * 1024;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
pub(super) struct PmScanArg {
    pub(super) size: u64,
    pub(super) flags: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) walk_end: u64,
    pub(super) vec: u64,
    pub(super) vec_len: u64,
    pub(super) max_pages: u64,
    pub(super) category_inverted: u64,
    pub(super) category_mask: u64,
    pub(super) category_anyof_mask: u64,
    pub(super) return_mask: u64,
}

/// Room for the regions of one `PAGEMAP_SCAN` of `[start, end)`: at most
/// one per page, at most [`SCAN_BATCH`]. Sized to the range, so that the
/// allocation of a small mapping's walk stays small.
fn batch(start: u64, end: u64) -> usize {
    let pages = end.saturating_sub(start).div_ceil(crate::memory::PAGE_SIZE);
    usize::try_from(pages).map_or(SCAN_BATCH, |p| p.clamp(1, SCAN_BATCH))
}

/// Walks of at least this much address space are cut into parts of
/// [`WALK_PART`] that the calling thread and a helper take in turn: a
/// frozen 4 GiB process's scan for written pages took ~2 ms on one thread.
pub(super) const SPLIT_WALK_FROM: u64 = 1 << 30;
pub(super) const WALK_PART: u64 = 256 << 20;

/// Asked once (see [`warm`](super::warm)): `available_parallelism`
/// reads cgroup files, and walks run while the process is frozen.
pub(super) fn two_cores() -> bool {
    static TWO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TWO.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// What one walk does.
#[derive(Debug, Clone, Copy)]
pub(super) struct Walk {
    /// Write-protect again the written pages it passes.
    pub(super) protect: bool,
    /// The categories to report of each written region; None: nothing
    /// reported (the kernel's fast path), only protected.
    pub(super) mask: Option<u64>,
    /// Stop once this many written pages were reported (0: no limit).
    pub(super) max_pages: u64,
    /// Walk a mapping not registered for asynchronous write-protect too
    /// (every present page of it counts as written) rather than fail.
    pub(super) lenient: bool,
    /// Report every page, not only the written ones.
    pub(super) every_page: bool,
    /// Report instead the pages with any of these categories (the second),
    /// after those of the first are inverted (to match their absence).
    pub(super) anyof: Option<(u64, u64)>,
}

/// A failed `PAGEMAP_SCAN` of `[from, end)`.
pub(super) struct ScanFailure {
    pub(super) from: u64,
    pub(super) end: u64,
    pub(super) error: io::Error,
}

/// `walk_range` over `[start, end)` cut into parts of `part` bytes,
/// taken in order by this thread and by one helper. The caller never
/// waits for the helper to start (on a busy machine a new thread may wait
/// milliseconds for a core): it walks every part no one has taken, and
/// then waits only for the part the helper is in, if any.
pub(super) fn walk_in_parts(
    pagemap: &File,
    start: u64,
    end: u64,
    part: u64,
    walk: Walk,
) -> Result<Vec<Region>, ScanFailure> {
    let parts: Arc<Vec<(u64, u64)>> = Arc::new(
        (0..)
            .map(|i| start.saturating_add(i * part))
            .take_while(|&from| from < end)
            .map(|from| (from, from.saturating_add(part).min(end)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    // The helper walks through its own descriptor: it may outlive this
    // call, finding nothing left to take.
    if let Ok(own) = pagemap.try_clone() {
        let (parts, next, done_tx) = (Arc::clone(&parts), Arc::clone(&next), done_tx.clone());
        // Walks run frozen: a Ctrl-C taken by the helper would end chpox
        // mid-freeze.
        let _ = crate::ptrace::spawn_leaving_terminal_signals_to_the_freezer(|| {
            std::thread::Builder::new()
                .name("page-walk".into())
                .spawn(move || take_parts(&own, &parts, &next, walk, &done_tx))
        });
    }
    take_parts(pagemap, &parts, &next, walk, &done_tx);
    drop(done_tx);
    let mut walked: Vec<Option<Result<Vec<Region>, ScanFailure>>> =
        parts.iter().map(|_| None).collect();
    for _ in 0..parts.len() {
        let (index, result) = done_rx.recv().map_err(|_| ScanFailure {
            from: start,
            end,
            error: io::Error::other("a page walk helper stopped"),
        })?;
        if let Some(slot) = walked.get_mut(index) {
            *slot = Some(result);
        }
    }
    let mut out = Vec::new();
    for result in walked.into_iter().flatten() {
        append_joined(&mut out, result?);
    }
    Ok(out)
}

/// Walk the parts of `parts` not taken yet, one at a time, sending each
/// result with its index.
fn take_parts(
    pagemap: &File,
    parts: &[(u64, u64)],
    next: &AtomicUsize,
    walk: Walk,
    done: &mpsc::Sender<(usize, Result<Vec<Region>, ScanFailure>)>,
) {
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(from, end)) = parts.get(index) else {
            return;
        };
        let mut regions = Vec::new();
        let result = walk_range(pagemap, from, end, walk, &mut regions).map(|()| regions);
        if done.send((index, result)).is_err() {
            return;
        }
    }
}

/// `regions` (sorted, after those of `out`) appended to `out`, the first
/// joined to the last of `out` where a cut between walks split one region.
pub(super) fn append_joined(out: &mut Vec<Region>, regions: Vec<Region>) {
    let mut regions = regions.into_iter();
    if let (Some(last), Some(first)) = (out.last_mut(), regions.as_slice().first())
        && last.end == first.start
        && last.categories == first.categories
    {
        last.end = first.end;
        regions.next();
    }
    out.extend(regions);
}

/// One walk over `[start, end)`, continued until the whole range is
/// done (or `walk.max_pages` reported); with `walk.mask`, the written
/// regions (or all, with `walk.every_page`; their categories limited to
/// the mask) are appended to `out`.
pub(super) fn walk_range(
    pagemap: &File,
    start: u64,
    end: u64,
    walk: Walk,
    out: &mut Vec<Region>,
) -> Result<(), ScanFailure> {
    let mut buf: Vec<Region> = Vec::with_capacity(if walk.mask.is_some() {
        batch(start, end)
    } else {
        0
    });
    let mut from = start;
    let mut reported = 0u64;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: if walk.lenient {
                0
            } else {
                PM_SCAN_CHECK_WPASYNC
            } | if walk.protect { PM_SCAN_WP_MATCHING } else { 0 },
            start: from,
            end,
            max_pages: if walk.max_pages == 0 {
                0
            } else {
                walk.max_pages.saturating_sub(reported).max(1)
            },
            category_mask: if walk.every_page || walk.anyof.is_some() {
                0
            } else {
                PAGE_IS_WRITTEN
            },
            category_inverted: walk.anyof.map_or(0, |a| a.0),
            category_anyof_mask: walk.anyof.map_or(0, |a| a.1),
            return_mask: walk.mask.unwrap_or(PAGE_IS_WRITTEN),
            ..PmScanArg::default()
        };
        let n = scan_once(pagemap, &mut arg, &mut buf)?;
        if walk.mask.is_some() {
            out.extend_from_slice(&buf);
            reported += buf.iter().map(Region::pages).sum::<u64>();
        }
        // The kernel walks on by itself while our vector has room, and
        // stops early only when it is full (or has reported `max_pages`);
        // `walk_end` is where, then. After a complete walk it may still
        // hold an earlier stop of the kernel's own loop (6.18), which
        // would report regions twice: the walk is done when the vector
        // was not filled.
        if n < buf.capacity()
            || buf.capacity() == 0
            || (walk.max_pages != 0 && reported >= walk.max_pages)
        {
            return Ok(());
        }
        if arg.walk_end <= from {
            // No progress would loop forever; the kernel always moves.
            return Err(ScanFailure {
                from,
                end,
                error: io::Error::other("the walk did not advance"),
            });
        }
        from = arg.walk_end;
    }
    Ok(())
}

/// Written pages of `[start, end)` in mappings registered for
/// asynchronous write-protect (by anyone), counted up to about `limit`:
/// one walk over the whole span, whatever lies between the mappings, in
/// a small vector. For a process that runs: a walk per mapping took
/// ~70 us for a small process's twenty, before its freeze.
pub(super) fn count_written_in_tracked(
    pagemap: &File,
    start: u64,
    end: u64,
    limit: u64,
) -> Result<u64, ScanFailure> {
    let mut buf: Vec<Region> = Vec::with_capacity(64);
    let mut from = start;
    let mut counted = 0u64;
    while from < end && counted < limit {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: from,
            end,
            max_pages: limit - counted,
            category_mask: PAGE_IS_WRITTEN | super::PAGE_IS_WPALLOWED,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        let n = scan_once(pagemap, &mut arg, &mut buf)?;
        counted += buf.iter().map(Region::pages).sum::<u64>();
        if n < buf.capacity() || arg.walk_end <= from {
            break;
        }
        from = arg.walk_end;
    }
    Ok(counted)
}

/// One `PAGEMAP_SCAN` of `arg`'s range into `buf`'s capacity (none: no
/// regions asked for); `buf` then holds what the kernel reported, and the
/// count is returned. The room is never initialised by us: a walk usually
/// reports a few regions, and writing a whole batch first (384 KiB, fresh
/// pages on a thread's first walk) cost a frozen process ~30 us per large
/// mapping and ~200 us on a thread's first.
fn scan_once(
    pagemap: &File,
    arg: &mut PmScanArg,
    buf: &mut Vec<Region>,
) -> Result<usize, ScanFailure> {
    buf.clear();
    let room = buf.capacity();
    arg.vec = if room == 0 {
        0
    } else {
        buf.as_mut_ptr() as u64
    };
    arg.vec_len = room as u64;
    let (from, end) = (arg.start, arg.end);
    let failure = |error| ScanFailure { from, end, error };
    let n = pagemap_scan(pagemap, arg).map_err(failure)?;
    if n > room {
        return Err(failure(io::Error::other(
            "the kernel reported more regions than it had room for",
        )));
    }
    // SAFETY: the kernel wrote `n` (at most the capacity, checked) whole
    // `struct page_region`s from the start of the buffer, and `Region` is
    // that struct: plain u64s, any bits valid.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// One `PAGEMAP_SCAN` ioctl; the number of regions written to `arg.vec`.
pub(super) fn pagemap_scan(pagemap: &File, arg: &mut PmScanArg) -> io::Result<usize> {
    // SAFETY: `arg` is a `struct pm_scan_arg` with its own size, alive and
    // ours for the call; `arg.vec` is null with length 0, or points to
    // `arg.vec_len` writable `struct page_region`s owned by the caller.
    let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg as *mut PmScanArg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
