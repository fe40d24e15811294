//! The pre-copy's first half, while the process runs: the attach pause
//! that registers its write tracking, then its pages scanned (protected)
//! and copied into the image, in batches for a large process.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{PreCopied, RestartedSleeps, needed_runs, needs_storing};
use crate::dirty::{Region, Tracker};
use crate::earlymaps::EarlyMaps;
use crate::error::{Error, Result};
use crate::image::crc::Patch;
use crate::image::model::{DataRef, RestartKind, SyscallState, VmaKind};
use crate::image::{AllocateAhead, ImageWriter};
use crate::memory::{MapEntry, PAGE_SIZE};
use crate::ptrace::Frozen;
use crate::remote::RemoteThread;

/// Whether a mapping may be device memory (`VM_IO`/`VM_PFNMAP`), judged
/// from its `maps` line alone: a private mapping of a device node or of a
/// kernel object, not of a file. `/dev/zero` and files in `/dev/shm` are
/// ordinary memory.
pub(super) fn maybe_device(map: &MapEntry) -> bool {
    let path = map.path.as_str();
    map.inode != 0
        && ((path.starts_with("/dev/") && path != "/dev/zero" && !path.starts_with("/dev/shm/"))
            || !path.starts_with('/'))
}

/// A range of `registered` that `early` (smaps of `pid`, read after the
/// registration) shows as device memory, if any.
pub(super) fn registered_device(
    early: &EarlyMaps,
    pid: i32,
    registered: &[(u64, u64)],
) -> Option<(u64, u64)> {
    early
        .maps_of(pid)?
        .iter()
        .filter(|m| m.is_device_memory())
        .find(|m| registered.iter().any(|&(s, e)| s < m.end && m.start < e))
        .map(|m| (m.start, m.end))
}

/// Freeze `pid` alone for a moment and register its tracking. Returns the
/// tracker, the mappings it saw, the ranges it registered, and how long
/// the process was frozen.
#[allow(clippy::type_complexity)]
pub(super) fn attach(
    pid: i32,
) -> Result<(
    Tracker,
    Vec<MapEntry>,
    Vec<(u64, u64)>,
    HashMap<i32, (u64, u64)>,
    Duration,
)> {
    // Not smaps (a page walk, ~25 ms per GiB): the mappings' lines are
    // enough to register, the kernel refuses a range another userfaultfd
    // holds (EBUSY), and device memory, which only the flags tell, is kept
    // out by its path here and checked against the smaps read beside the
    // copy (`PreCopies::run`).
    let early = EarlyMaps::read_code(&[pid]);
    let _boost = crate::dump::Boost::raise();
    let started = Instant::now();
    let frozen = Frozen::freeze(pid)?;
    // Our freeze turns a sleep into `restart_syscall`: remember which.
    let sleeping: HashMap<i32, (u64, u64)> = frozen
        .tids()
        .into_iter()
        .filter_map(|tid| {
            let regs = crate::ptrace::get_regs(tid).ok()?;
            let gp = crate::ptrace::gp_regs_from(&regs);
            match crate::registers::classify_syscall(&gp) {
                SyscallState::Restartable {
                    nr,
                    restart: RestartKind::RestartBlock,
                } => Some((tid, (nr, regs.rip))),
                _ => None,
            }
        })
        .collect();
    let result = (|| {
        let (syscall_ip, gadgets) = early.code(pid)?;
        let mut leader = RemoteThread::borrow_guarded(&frozen, pid, gadgets.as_ref(), syscall_ip)?;
        let tracker = Tracker::attach(&mut leader);
        leader.give_back()?;
        let mut tracker = tracker?;
        let maps = crate::memory::read_maps_lines(pid)?;
        let eligible: Vec<MapEntry> = maps.iter().filter(|m| !maybe_device(m)).cloned().collect();
        let registered = tracker.register(&eligible)?;
        Ok((tracker, maps, registered))
    })();
    frozen.resume();
    let pause = started.elapsed();
    debug!(pid, us = pause.as_micros() as u64, "pre-copy attached");
    result.map(|(t, m, r)| (t, m, r, sleeping, pause))
}

/// Address span scanned before the copy starts. Each later batch, four
/// times the span of the one before, is scanned beside the copy of the
/// one before: a whole GiB's scan (~25 ms here) kept the copy waiting.
pub(super) const FIRST_SCAN_SPAN: u64 = 16 << 20;

/// Private memory from which a process is scanned and copied in batches.
/// Below, its scan takes a few milliseconds, which the allocation ahead
/// fills, and each batch's start and drain cost more than that (64 MiB,
/// alternating dumps, medians of 12: 38.5 ms in one batch, 43 ms in
/// three; 1 GiB, medians of 10: 427 ms in one, 419 ms in four).
const BATCHED_FROM: u64 = 256 << 20;

/// One stretch of a registered mapping to scan: (index in `maps`, start,
/// end).
pub(super) type ScanPart = (usize, u64, u64);

/// The registered mappings of `maps`, in address order, cut into batches
/// whose address spans grow from `first_span` fourfold: a dozen batches at
/// most for any address space from [`FIRST_SCAN_SPAN`], the first one
/// scanned quickly.
pub(super) fn scan_batches(
    maps: &[MapEntry],
    registered: &[(u64, u64)],
    first_span: u64,
) -> Vec<Vec<ScanPart>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let (mut span, mut filled) = (first_span, 0u64);
    for (i, map) in maps.iter().enumerate() {
        if !registered.contains(&(map.start, map.end)) {
            continue;
        }
        let mut from = map.start;
        while from < map.end {
            let take = (map.end - from).min(span - filled);
            batch.push((i, from, from + take));
            (from, filled) = (from + take, filled + take);
            if filled == span {
                batches.push(std::mem::take(&mut batch));
                (span, filled) = (span.saturating_mul(4), 0);
            }
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Protect every page of `batch` and say which need storing, as runs;
/// the mappings (index in `maps`) whose scan failed are added to `failed`.
fn scan_batch(
    tracker: &mut Tracker,
    maps: &[MapEntry],
    batch: &[ScanPart],
    failed: &mut Vec<usize>,
) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    for &(i, start, end) in batch {
        let Some(map) = maps.get(i) else { continue };
        let file = map.kind() == VmaKind::PrivateFile;
        match tracker.scan_every(start, end, true, file) {
            Ok(regions) => runs.extend(needed_runs(map.kind(), &regions)),
            // Unmapped or changed meanwhile: not planned from the copy (what
            // was copied of it is left unused); if it is still tracked at
            // the freeze, its pages are read then.
            Err(e) => {
                debug!(pid = tracker.pid(), start, error = %e, "pre-copy scan of a mapping failed");
                failed.push(i);
            }
        }
    }
    runs
}

/// Protect and copy every page of the mappings of `maps` registered as
/// `registered`, of a process with `private` bytes of private memory: all
/// at once, or from [`BATCHED_FROM`] in batches, each scanned on another
/// thread while the one before is copied.
pub(super) fn copy_while_running(
    mut tracker: Tracker,
    maps: &[MapEntry],
    registered: &[(u64, u64)],
    writer: &mut ImageWriter,
    ahead: AllocateAhead,
    private: u64,
) -> Result<PreCopied> {
    let pid = tracker.pid();
    let started = Instant::now();
    let first_span = if private >= BATCHED_FROM {
        FIRST_SCAN_SPAN
    } else {
        u64::MAX
    };
    let batches = scan_batches(maps, registered, first_span);
    let mut failed = Vec::new();
    let mut next_runs = match batches.first() {
        Some(first) => scan_batch(&mut tracker, maps, first, &mut failed),
        None => Vec::new(),
    };
    let mut scanned = started.elapsed();
    ahead.stop();
    let mut copied: Vec<(u64, u64, DataRef)> = Vec::new();
    for k in 0..batches.len() {
        let runs = std::mem::take(&mut next_runs);
        let refs = std::thread::scope(|scope| {
            let scanner = batches.get(k + 1).map(|batch| {
                let tracker = &mut tracker;
                scope.spawn(move || {
                    let t = Instant::now();
                    let mut failed = Vec::new();
                    let runs = scan_batch(tracker, maps, batch, &mut failed);
                    (runs, failed, t.elapsed())
                })
            });
            let refs =
                crate::pagecopy::copy_runs(pid, crate::pagecopy::Source::Running, &runs, writer);
            if let Some(scanner) = scanner {
                let (runs, more_failed, took) = scanner
                    .join()
                    .map_err(|_| Error::Other("internal: a pre-copy scan panicked".into()))?;
                (next_runs, scanned) = (runs, scanned + took);
                failed.extend(more_failed);
            }
            refs
        })?;
        copied.extend(runs.iter().zip(refs).map(|(&(a, n), r)| (a, n, r)));
    }
    let pages = copied.iter().map(|c| c.1).sum::<u64>();
    let first_copy = started.elapsed();
    // Opened again while frozen if it cannot be now.
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok();
    let again = match &mem {
        Some(mem) => copy_written_again(
            &mut tracker,
            maps,
            registered,
            &mut failed,
            &mut copied,
            writer,
            mem,
        )?,
        None => CopiedAgain::default(),
    };
    let covered = maps
        .iter()
        .enumerate()
        .filter(|(i, m)| registered.contains(&(m.start, m.end)) && !failed.contains(i))
        .map(|(_, m)| (m.start, m.end))
        .collect();
    debug!(
        pid,
        pages,
        batches = batches.len(),
        scan_us = scanned.as_micros() as u64,
        first_copy_us = first_copy.as_micros() as u64,
        copied_again = again.pages,
        passes = again.passes,
        us = started.elapsed().as_micros() as u64,
        "pre-copied"
    );
    Ok(PreCopied {
        pid,
        tracker,
        copied,
        covered,
        sleeping: RestartedSleeps::default(),
        mem,
        again,
    })
}

/// Most passes over the pages written while the pages before were copied.
const MOST_PASSES_AGAIN: usize = 3;

/// A pass over written pages that found fewer than this is the last: what
/// is written after it is read while frozen, in a fraction of a
/// millisecond.
const AGAIN_UNTIL_PAGES: u64 = 256;

/// What the passes over written pages did before the freeze.
#[derive(Default)]
pub(super) struct CopiedAgain {
    /// What writing over earlier copies did to their blobs' checksums.
    pub(super) patches: Vec<Patch>,
    /// Pages copied again, or for the first time, by the passes.
    pub(super) pages: u64,
    pub(super) passes: usize,
}

/// Copy again, while the process still runs, the pages it wrote while
/// its pages were copied, so that the freeze reads only what is written
/// after the last pass: without it a process writing all along had every
/// page it wrote during the whole copy read while frozen (1 GiB, a few
/// thousand random pages written a second: frozen 8 ms).
///
/// Each pass protects the written pages again in the walk that reports
/// them (anonymous mappings only: private file mappings are left to the
/// freeze, which looks at their every page) and then reads them: a page
/// written after the walk is reported written at the freeze, whatever its
/// copy holds, as after the first copy. Since a page that is
/// protected and not written later is taken from its copy at the freeze
/// (or, with no copy, taken for one that never held data), every page a
/// pass protects gets a copy that is current: written over its earlier
/// copy (zeros for a page zapped since), or, if it had none and holds
/// data, copied as a new blob. A mapping whose walk fails is left to the
/// freeze whole (`failed`).
fn copy_written_again(
    tracker: &mut Tracker,
    maps: &[MapEntry],
    registered: &[(u64, u64)],
    failed: &mut Vec<usize>,
    copied: &mut Vec<(u64, u64, DataRef)>,
    writer: &mut ImageWriter,
    mem: &std::fs::File,
) -> Result<CopiedAgain> {
    let pid = tracker.pid();
    let mut again = CopiedAgain::default();
    // Pages the pass before found written.
    let mut previous = u64::MAX;
    for _ in 0..MOST_PASSES_AGAIN {
        let mut found = 0u64;
        // (address, pages, earlier copy's offset) to write over, and the
        // mapping's index in `maps`.
        let mut over: Vec<(usize, (u64, u64, u64))> = Vec::new();
        let mut new_runs: Vec<(u64, u64)> = Vec::new();
        for (i, map) in maps.iter().enumerate() {
            if map.kind() != VmaKind::Anonymous
                || !registered.contains(&(map.start, map.end))
                || failed.contains(&i)
            {
                continue;
            }
            // The written stretches first (the kernel's fast walk), then
            // each one's pages with their categories, protected in that
            // same walk: what it reports is exactly what it protected. A
            // page written between the two walks and outside the
            // stretches stays written, for the next pass or the freeze.
            let regions = tracker
                .scan_written(map.start, map.end, false)
                .and_then(|written| {
                    let mut regions = Vec::new();
                    for w in written {
                        regions.extend(tracker.scan(w.start, w.end, true)?);
                    }
                    Ok(regions)
                });
            let regions = match regions {
                Ok(regions) => regions,
                Err(e) => {
                    debug!(pid, start = map.start, error = %e, "pre-copy: a pass over written pages failed for a mapping");
                    failed.push(i);
                    continue;
                }
            };
            let mut pieces = Vec::new();
            for r in regions {
                found += r.pages();
                split_by_copies(copied, &r, &mut pieces, &mut new_runs);
            }
            over.extend(pieces.into_iter().map(|p| (i, p)));
        }
        for &(i, (addr, npages, offset)) in &over {
            if failed.contains(&i) {
                continue;
            }
            // Unmapped meanwhile: the mapping is left to the freeze, where
            // it is no longer what was tracked, or read whole.
            let bytes = match super::read_pages(mem, pid, addr, npages) {
                Ok(bytes) => bytes,
                Err(e) => {
                    debug!(pid, addr, error = %e, "pre-copy: a page written meanwhile is gone");
                    failed.push(i);
                    continue;
                }
            };
            again.patches.push(writer.rewrite(offset, &bytes)?);
            again.pages += npages;
        }
        if !new_runs.is_empty() {
            let runs = crate::pagecopy::split_runs(&new_runs);
            let refs =
                crate::pagecopy::copy_runs(pid, crate::pagecopy::Source::Running, &runs, writer)?;
            again.pages += runs.iter().map(|r| r.1).sum::<u64>();
            copied.extend(runs.iter().zip(refs).map(|(&(a, n), r)| (a, n, r)));
            copied.sort_unstable_by_key(|c| c.0);
        }
        again.passes += 1;
        // Few enough for the freeze, or a process writing about as fast
        // as the passes copy (another would gain little).
        if found < AGAIN_UNTIL_PAGES || found > previous / 2 {
            break;
        }
        previous = found;
    }
    Ok(again)
}

/// Sort region `r` (from a pass over written pages) into the pieces that
/// have an earlier copy in `copied` (sorted by address), to be written
/// over it, and the runs that have none and hold data, to be copied anew.
fn split_by_copies(
    copied: &[(u64, u64, DataRef)],
    r: &Region,
    over: &mut Vec<(u64, u64, u64)>,
    new_runs: &mut Vec<(u64, u64)>,
) {
    let mut addr = r.start;
    while addr < r.end {
        let (n, offset) = super::copied_stretch(copied, addr, r.end);
        match offset {
            Some(offset) => over.push((addr, n, offset)),
            None if needs_storing(VmaKind::Anonymous, r.categories) => match new_runs.last_mut() {
                Some((a, m)) if *a + *m * PAGE_SIZE == addr => *m += n,
                _ => new_runs.push((addr, n)),
            },
            None => {}
        }
        addr += n * PAGE_SIZE;
    }
}
