//! Pre-copy: a process's pages go into the image while it runs; while it is
//! frozen only the pages written since are copied.
//!
//! 1. Attach (a pause of a few remote syscalls per process, not of the
//!    tree): write tracking (`dirty::Tracker`) is registered on the
//!    process's private mappings, nothing protected yet.
//! 2. While it runs: one `PAGEMAP_SCAN` per mapping write-protects every
//!    page and says which hold data; those pages are copied into the image
//!    (uncompressed blobs). A page written after the walk protected it is
//!    reported written at the freeze, whatever its copy holds. The pages
//!    written meanwhile are then protected and copied again, a few passes
//!    while they keep coming (`running::copy_written_again`), so that the
//!    freeze reads only what is written after the last pass.
//! 3. Frozen (with the tree, as any dump): a second scan per mapping, no
//!    page walk beyond the page tables. A page present and not written
//!    since the first scan holds what was copied; every other page that
//!    must be stored ("fresh") is read from the frozen process into memory.
//!    Mappings not tracked (new since the attach, moved, shared) go the
//!    ordinary way. If the fresh pages are too many to copy in a few
//!    milliseconds, the pre-copy is dropped for that process and it is
//!    snapshotted (`snapshot`) as without pre-copy.
//! 4. After it runs again: fresh pages that were copied before are
//!    written over their earlier copy in place, others as new blobs; the
//!    mapping's runs are cut from the blobs. A run that is a whole
//!    pre-copy blob keeps its checksum, patched for what was written over
//!    it (`image::crc::patched`); any other run is checksummed again from
//!    the file. The image format is the ordinary one: one instant, the
//!    freeze.
//!
//! So the checkpoint's instant is the freeze after the pre-copy, not the
//! moment the dump was asked for: a pre-copy is for dumps that leave the
//! process running (a compressed one is written uncompressed first and
//! compressed at its end, see `image::writer::deferred`).

mod running;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::dirty::{
    PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, Region,
    Tracker,
};
use crate::earlymaps::EarlyMaps;
use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::crc::Patch;
use crate::image::model::{
    DataRef, Metadata, PageRun, RestartKind, SyscallState, ThreadState, VmaKind,
};
use crate::memory::vmflags::KernelVmaFlags;
use crate::memory::{MapEntry, PAGE_SIZE};
use running::{CopiedAgain, attach, copy_while_running, registered_device};

/// Most fresh pages copied while frozen (16 MiB, a few milliseconds);
/// beyond, the process is snapshotted instead.
pub const FROZEN_COPY_LIMIT_PAGES: u64 = 4096;

/// Below this much private memory in a single process, a pre-copy's fixed
/// costs (an attach pause, write tracking set up and released) outweigh
/// what it saves: no pre-copy, the snapshot alone. Measured here, quiet,
/// 21 alternating rounds: at 16, 32 and 64 MiB the pre-copied dump took
/// as long as the snapshotted one (13.3/13.9, 21.3/20.6, 35.3/35.8 ms) and
/// froze 1.5–1.9 ms against 2.2–3.9 ms. A tree is pre-copied whatever its
/// size (see [`worth_precopying`]).
pub const MIN_PRECOPY_BYTES: u64 = 32 << 20;

/// Whether the processes `pids` (a tree, root first) are worth a
/// pre-copy when the user did not say. A tree of more than one process
/// is, whatever its size: each process's snapshot is a fork taken while
/// the whole tree is frozen (~0.8 ms here even for a process of 2 MiB),
/// where a pre-copied one only has its written pages found (~0.15 ms),
/// its attach pause being its own, not the tree's. 8 processes of 2 MiB,
/// 15 alternating dumps with an agent running: frozen 6.8 ms (p90 10.0)
/// snapshotted against 3.0 ms (p90 4.2) pre-copied, the dump 32.8
/// against 37.7 ms; without an agent, and with the flags of processes
/// that small read while frozen (`dump::capture`), 9.5 against 7.2 ms.
pub fn worth_precopying(pids: &[i32]) -> bool {
    pids.len() > 1 || private_bytes(pids) >= MIN_PRECOPY_BYTES
}

/// Private memory (resident anonymous and swapped) of `pids`, from the
/// kernel's counters in /proc/PID/status (no page walk).
pub fn private_bytes(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| {
            let kb = |key: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0)
            };
            (kb("RssAnon:") + kb("VmSwap:")) * 1024
        })
        .sum()
}

/// Whether a page with scan categories `c` in a mapping of `kind` holds data
/// the image must store: anonymous data present or swapped (the zero page
/// restores as untouched memory), and for a private file mapping only its
/// own copies (not page-cache pages).
fn needs_storing(kind: VmaKind, c: u64) -> bool {
    let present = c & PAGE_IS_PRESENT != 0 && c & PAGE_IS_PFNZERO == 0;
    let swapped = c & PAGE_IS_SWAPPED != 0;
    match kind {
        VmaKind::Anonymous => present || swapped,
        VmaKind::PrivateFile => (present && c & PAGE_IS_FILE == 0) || swapped,
        _ => false,
    }
}

/// `[start, end)` of `regions` needing storing, as (address, pages) runs,
/// merged and cut to chunk size.
fn needed_runs(kind: VmaKind, regions: &[Region]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in regions.iter().filter(|r| needs_storing(kind, r.categories)) {
        match runs.last_mut() {
            Some((a, n)) if *a + *n * PAGE_SIZE == r.start => *n += r.pages(),
            _ => runs.push((r.start, r.pages())),
        }
    }
    crate::pagecopy::split_runs(&runs)
}

/// One process's pre-copy: its tracker and where its pages went.
pub struct PreCopied {
    pid: i32,
    tracker: Tracker,
    /// (address, pages, blob) copied while it ran, sorted by address.
    copied: Vec<(u64, u64, DataRef)>,
    /// Mappings whose every page was protected and those with data copied:
    /// only these may be planned from the copy.
    covered: Vec<(u64, u64)>,
    /// Threads the attach pause found in a sleep the kernel continues
    /// through `restart_syscall`.
    sleeping: RestartedSleeps,
    /// Its /proc/PID/mem, opened while it ran (the pages written since its
    /// copy are read through it while frozen): of the memory the tracker
    /// watches, as the tracker's pagemap is (an exec since would leave
    /// nothing tracked to read).
    mem: Option<std::fs::File>,
    /// What was copied again before the freeze, written while the copy
    /// went on.
    again: CopiedAgain,
}

/// Threads a pre-copy's attach pause found in a sleep the kernel continues
/// through `restart_syscall`: tid → (syscall, instruction pointer). Apart
/// from its [`PreCopied`], whose plan may be made on another thread while
/// the threads are read.
#[derive(Default)]
pub struct RestartedSleeps(HashMap<i32, (u64, u64)>);

/// The pre-copies of a tree, by PID.
#[derive(Default)]
pub struct PreCopies {
    by_pid: HashMap<i32, PreCopied>,
    /// The longest attach pause.
    pub longest_pause: Duration,
    /// Trackers no longer needed, dropped (unregistered) after the freeze.
    done: Vec<Tracker>,
    /// `smaps` of each pre-copied process, read while its pages were
    /// copied (see [`take_early`](Self::take_early)).
    early: EarlyMaps,
}

/// Seccomp filter mode and job-control state from /proc/PID/status: a
/// process under a filter (which might kill it for `userfaultfd`) or
/// stopped is not pre-copied.
fn may_precopy(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
    };
    field("Seccomp:") == Some("0") && !field("State:").is_some_and(|s| s.starts_with('T'))
}

impl PreCopies {
    /// Pre-copy every process of `pids` (running) into `writer`. A process
    /// that cannot be pre-copied is left out (and dumped the ordinary way).
    /// `kernel`: the raw flags read beside each smaps read (see
    /// [`EarlyMaps::read`]).
    pub fn run(
        pids: &[i32],
        writer: &mut ImageWriter,
        kernel: Option<&KernelVmaFlags>,
    ) -> PreCopies {
        let mut all = PreCopies::default();
        for &pid in pids {
            if !may_precopy(pid) {
                continue;
            }
            let private = private_bytes(&[pid]);
            match attach(pid) {
                Ok((tracker, maps, registered, sleeping, pause)) => {
                    // The image file's space while the first scan keeps the
                    // writer waiting (see `image::writer::ahead`). Not
                    // during the attach: on two cores that thread beside
                    // the tracer's kept the process from running its remote
                    // syscalls (64 MiB, 12 alternating dumps: attach pause
                    // median 3.2 ms, max 7.9, against 0.35 and 1.5 ms, the
                    // dump as long).
                    let ahead = writer.allocate_ahead(private);
                    all.longest_pause = all.longest_pause.max(pause);
                    // The smaps the freeze after the pre-copy needs (with
                    // our registrations in it, see `Tracker::tracks`): a
                    // page walk of tens of ms per GiB, done on another
                    // thread beside the copy instead of after it.
                    let (copied, early) = std::thread::scope(|scope| {
                        let early = scope.spawn(move || EarlyMaps::read(&[pid], kernel));
                        let copied =
                            copy_while_running(tracker, &maps, &registered, writer, ahead, private);
                        (copied, early.join().unwrap_or_default())
                    });
                    // Registered without flags (see `attach`): device
                    // memory must not be among what is tracked.
                    let copied =
                        copied.and_then(|p| match registered_device(&early, pid, &registered) {
                            Some((start, end)) => Err(Error::Other(format!(
                                "device memory at {start:#x}-{end:#x} was registered"
                            ))),
                            None => Ok(p),
                        });
                    all.early.absorb(early);
                    match copied {
                        Ok(mut p) => {
                            p.sleeping = RestartedSleeps(sleeping);
                            all.by_pid.insert(pid, p);
                        }
                        Err(e) => debug!(pid, error = %e, "pre-copy failed; dumped without"),
                    }
                }
                Err(e) => debug!(pid, error = %e, "no pre-copy"),
            }
        }
        all
    }

    /// The pre-copy of frozen `pid`, if it has one.
    pub fn take(&mut self, pid: i32) -> Option<PreCopied> {
        self.by_pid.remove(&pid)
    }

    /// Keep `p`'s tracker until [`release`](Self::release).
    pub fn keep(&mut self, p: PreCopied) {
        self.done.push(p.tracker);
    }

    /// The `smaps` read during each pre-copy, for the freeze after it:
    /// [`EarlyMaps::refresh`] reads again only those whose mappings changed
    /// since.
    pub fn take_early(&mut self) -> EarlyMaps {
        std::mem::take(&mut self.early)
    }

    /// Nothing tracked: nothing to release.
    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty() && self.done.is_empty()
    }

    /// Stop every tracking (the processes run again meanwhile).
    pub fn release(&mut self) {
        self.by_pid.clear();
        self.done.clear();
    }

    /// [`release`](Self::release) in a process of its own, not waited
    /// for (see [`crate::dirty::release_elsewhere`]).
    pub fn release_elsewhere(&mut self) {
        let mut trackers = std::mem::take(&mut self.done);
        trackers.extend(self.by_pid.drain().map(|(_, p)| p.tracker));
        crate::dirty::release_elsewhere(trackers);
    }
}

/// Where the bytes of a stretch of a mapping's pages come from.
enum Source {
    /// Copied while the process ran, unchanged since: at this file offset.
    Copied(u64),
    /// Read while frozen; written over the earlier copy at this offset.
    Rewrite(u64, Vec<u8>),
    /// Read while frozen, never copied before: a new blob.
    New(Vec<u8>),
}

/// The pages of one mapping of the image, planned while frozen.
pub struct PlannedVma {
    vma_index: usize,
    /// (address, pages, source), in address order.
    pieces: Vec<(u64, u64, Source)>,
}

/// What the freeze found for one pre-copied process, to be written after
/// it runs again.
pub struct Planned {
    /// Which process of the image (image order).
    process: usize,
    /// Its pages present in the planned mappings.
    pub resident: u64,
    vmas: Vec<PlannedVma>,
    /// The pre-copy blobs, sorted by file offset, to reuse untouched ones.
    blobs: Vec<DataRef>,
    /// What writing over earlier copies before the freeze did to their
    /// blobs' checksums (see `running::copy_written_again`).
    patches_before: Vec<Patch>,
    /// Pages copied again before the freeze, and read while frozen.
    pub pages_copied_again: u64,
    pub pages_read_frozen: u64,
}

/// The index of the blob of `blobs` (sorted by offset) that starts at
/// `offset`.
fn blob_starting_at(blobs: &[DataRef], offset: u64) -> Option<usize> {
    blobs.binary_search_by_key(&offset, |b| b.offset).ok()
}

/// The written regions `written` of `[start, end)` (sorted), and between
/// them, as present and not written, the pages of `copied` runs.
fn with_unchanged(
    copied: &[(u64, u64, DataRef)],
    start: u64,
    end: u64,
    written: Vec<Region>,
) -> Vec<Region> {
    let mut out = Vec::with_capacity(written.len() * 2 + 1);
    let first = copied.partition_point(|c| c.0 + c.1 * PAGE_SIZE <= start);
    let mut w = written.into_iter().peekable();
    // Where the written regions taken so far end.
    let mut covered = start;
    for &(a, n, _) in copied[first..].iter().take_while(|c| c.0 < end) {
        let mut from = a.max(covered);
        let to = (a + n * PAGE_SIZE).min(end);
        while from < to {
            // Written regions before or at `from` go first.
            while let Some(r) = w.next_if(|r| r.start <= from) {
                covered = covered.max(r.end);
                from = from.max(r.end);
                out.push(r);
            }
            if from >= to {
                break;
            }
            let stop = w.peek().map_or(to, |r| r.start.min(to));
            out.push(Region {
                start: from,
                end: stop,
                categories: PAGE_IS_PRESENT,
            });
            from = stop;
        }
    }
    out.extend(w);
    out.sort_by_key(|r| r.start);
    out
}

/// The pages from `addr` up to `end` that lie in one copied run of
/// `copied` (sorted by address), with the file offset of `addr`'s copy;
/// or, when no run holds `addr`, the pages up to the next run (or `end`),
/// with no offset.
fn copied_stretch(copied: &[(u64, u64, DataRef)], addr: u64, end: u64) -> (u64, Option<u64>) {
    let i = copied.partition_point(|c| c.0 + c.1 * PAGE_SIZE <= addr);
    match copied.get(i) {
        Some(&(a, n, ref d)) if a <= addr => {
            let stop = (a + n * PAGE_SIZE).min(end);
            ((stop - addr) / PAGE_SIZE, Some(d.offset + (addr - a)))
        }
        Some(&(a, _, _)) => ((a.min(end) - addr) / PAGE_SIZE, None),
        None => ((end - addr) / PAGE_SIZE, None),
    }
}

/// Read `npages` pages at `addr` of `pid` (frozen, or running for a pass
/// over written pages) through its `mem` (which reads `PROT_NONE` memory
/// too, and pins nothing).
fn read_pages(mem: &std::fs::File, pid: i32, addr: u64, npages: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (npages * PAGE_SIZE) as usize];
    mem.read_exact_at(&mut buf, addr).map_err(|e| {
        Error::Other(format!(
            "reading {npages} pages of PID {pid} at {addr:#x}: {e}"
        ))
    })?;
    Ok(buf)
}

/// The parts of `regions` (sorted, not overlapping) between `start` and
/// `end`.
fn within(regions: &[Region], start: u64, end: u64) -> Vec<Region> {
    let from = regions.partition_point(|r| r.end <= start);
    regions[from..]
        .iter()
        .take_while(|r| r.start < end)
        .map(|r| Region {
            start: r.start.max(start),
            end: r.end.min(end),
            categories: r.categories,
        })
        .collect()
}

impl RestartedSleeps {
    /// A thread the attach pause interrupted in a sleep, and that is still
    /// in it at the freeze, sits in `restart_syscall` now, which a restored
    /// process could not continue (it has no restart block): it is
    /// recorded in the syscall it was in, which a restore runs again with
    /// the time left, as for any interrupted sleep.
    pub fn fix(&self, tids: &[i32], states: &mut [ThreadState]) {
        for (tid, state) in tids.iter().zip(states) {
            let Some(&(nr, rip)) = self.0.get(tid) else {
                continue;
            };
            if state.regs.rip == rip
                && state.syscall
                    == (SyscallState::Restartable {
                        nr: crate::registers::NR_RESTART_SYSCALL,
                        restart: RestartKind::RestartBlock,
                    })
            {
                state.syscall = SyscallState::Restartable {
                    nr,
                    restart: RestartKind::RestartBlock,
                };
            }
        }
    }
}

impl PreCopied {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its [`RestartedSleeps`], to be fixed once its threads are read.
    pub fn take_restarted_sleeps(&mut self) -> RestartedSleeps {
        std::mem::take(&mut self.sleeping)
    }

    /// Whether mapping `map` of the frozen process is tracked and was
    /// wholly pre-copied, so that its pages are planned by
    /// [`plan`](Self::plan). Our own registration (`uw`) is not the
    /// process's: taken out of its flags.
    pub fn claim(&self, map: &mut MapEntry) -> bool {
        if !self.tracker.tracks(map) {
            return false;
        }
        // Registered by us, whatever becomes of it below.
        map.vm_flags.retain(|f| f != "uw");
        crate::dirty::Tracker::eligible(map)
            && self
                .covered
                .iter()
                .any(|&(s, e)| s <= map.start && map.end <= e)
    }

    /// While frozen: the pages of the tracked mappings `maps` (index in the
    /// image, mapping), each from its earlier copy or read now. None if
    /// more than [`FROZEN_COPY_LIMIT_PAGES`] would have to be read now.
    pub fn plan(&mut self, process: usize, maps: &[(usize, &MapEntry)]) -> Result<Option<Planned>> {
        let started = Instant::now();
        // (vma index, address, pages, categories) of every stretch.
        let mut scanned = Vec::new();
        let mut fresh = 0u64;
        // Present pages with data (not counting the zero page).
        let mut resident = 0u64;
        // Mappings side by side (a library's, a heap's neighbours) are
        // scanned together, one walk each run: a tree of 8 small
        // processes made ~30 scans each, ~3 us apiece, while frozen.
        let mut per_vma: Vec<(usize, VmaKind, Vec<Region>)> = Vec::with_capacity(maps.len());
        let mut first = 0;
        while let Some(&(_, map)) = maps.get(first) {
            let file = map.kind() == VmaKind::PrivateFile;
            let mut last = first;
            while let Some(&(_, next)) = maps.get(last + 1) {
                if (next.kind() == VmaKind::PrivateFile) != file || next.start != maps[last].1.end {
                    break;
                }
                last += 1;
            }
            let run = &maps[first..=last];
            let (start, end) = (map.start, maps[last].1.end);
            let regions = if file {
                // Whether a page is the process's own copy or the file's
                // takes a page lookup per page: only here, where mappings
                // are small (a library's data).
                self.tracker.scan_every(start, end, false, true)?
            } else {
                // Written pages only: the kernel's fast walk. A page zapped
                // since is written and not present; every page not written
                // is as the first scan left it: its copy, if it has one,
                // is current, or it never held data (a protection marker
                // where no page was: "swapped"). One exception, allowed by
                // `MADV_FREE`'s contract: a page the process freed that
                // way and the kernel discarded since keeps its old content
                // in the image rather than zeros.
                // Asking for more than "written" over the whole mapping
                // takes the kernel's slow path (~14 ms/GiB): find the
                // written stretches first, then their categories.
                let mut written = Vec::new();
                for w in self.tracker.scan_written(start, end, false)? {
                    written.extend(self.tracker.scan(w.start, w.end, false)?);
                }
                written
            };
            for &(vma_index, map) in run {
                // The kernel joins like stretches across mappings.
                let own = within(&regions, map.start, map.end);
                let own = if file {
                    own
                } else {
                    with_unchanged(&self.copied, map.start, map.end, own)
                };
                per_vma.push((vma_index, map.kind(), own));
            }
            first = last + 1;
        }
        for (vma_index, kind, regions) in per_vma {
            for r in regions {
                if r.present() {
                    resident += r.pages();
                }
                if !needs_storing(kind, r.categories) {
                    continue;
                }
                if r.categories & PAGE_IS_WRITTEN != 0 {
                    fresh += r.pages();
                }
                scanned.push((vma_index, r));
            }
        }
        // Only a page present and not written holds what was copied. A
        // "swapped" page not written is either really swapped out, or a
        // protection marker left where no page is: a page never populated
        // (not copied: nothing to store; it reads as zero, or from its
        // file), or one zapped (`MADV_DONTNEED`) since its copy (read
        // again: the copy is stale). Pages not written and not copied
        // either (none expected: the first scan protected every page it
        // reported) are read now too.
        // (vma index, [(address, pages, earlier copy's offset, read now)]).
        #[allow(clippy::type_complexity)]
        let mut pieces_of: Vec<(usize, Vec<(u64, u64, Option<u64>, bool)>)> = Vec::new();
        for (vma_index, r) in scanned {
            let written = r.categories & PAGE_IS_WRITTEN != 0;
            let present = r.categories & PAGE_IS_PRESENT != 0;
            let mut addr = r.start;
            while addr < r.end {
                let (n, offset) = copied_stretch(&self.copied, addr, r.end);
                if !written && !present && offset.is_none() {
                    // A marker where no page ever was: nothing to store.
                    addr += n * PAGE_SIZE;
                    continue;
                }
                // Read now rather than taken from the copy.
                let stale = written || !present || offset.is_none();
                if stale && !written {
                    fresh += n;
                }
                let piece = (addr, n, offset, stale);
                match pieces_of.last_mut() {
                    Some((v, p)) if *v == vma_index => p.push(piece),
                    _ => pieces_of.push((vma_index, vec![piece])),
                }
                addr += n * PAGE_SIZE;
            }
        }
        if fresh > FROZEN_COPY_LIMIT_PAGES {
            debug!(
                pid = self.pid,
                fresh, "too much written since the pre-copy: snapshot"
            );
            return Ok(None);
        }
        let mem = match self.mem.take() {
            Some(mem) => mem,
            None => {
                let path = format!("/proc/{}/mem", self.pid);
                std::fs::File::open(&path).map_err(|source| Error::Proc { path, source })?
            }
        };
        let mut vmas = Vec::with_capacity(pieces_of.len());
        for (vma_index, pieces) in pieces_of {
            let mut planned = Vec::with_capacity(pieces.len());
            for (addr, n, offset, stale) in pieces {
                let source = match offset {
                    Some(o) if !stale => Source::Copied(o),
                    Some(o) => Source::Rewrite(o, read_pages(&mem, self.pid, addr, n)?),
                    None => Source::New(read_pages(&mem, self.pid, addr, n)?),
                };
                planned.push((addr, n, source));
            }
            vmas.push(PlannedVma {
                vma_index,
                pieces: planned,
            });
        }
        debug!(
            pid = self.pid,
            fresh,
            us = started.elapsed().as_micros() as u64,
            "pre-copy: written pages read while frozen"
        );
        Ok(Some(Planned {
            process,
            resident,
            vmas,
            patches_before: std::mem::take(&mut self.again.patches),
            pages_copied_again: self.again.pages,
            pages_read_frozen: fresh,
            blobs: {
                // Copied in address order, which is file order: sorted
                // already, and checked cheaply.
                let mut blobs: Vec<DataRef> = self.copied.iter().map(|c| c.2).collect();
                if !blobs.is_sorted_by_key(|b| b.offset) {
                    blobs.sort_unstable_by_key(|b| b.offset);
                }
                blobs
            },
        }))
    }
}

/// After the processes run again: write what each plan read while frozen,
/// and give each planned mapping its runs in `meta`. Returns the pages
/// stored.
pub fn write_all(
    plans: Vec<Planned>,
    meta: &mut Metadata,
    writer: &mut ImageWriter,
) -> Result<u64> {
    let mut stored = 0u64;
    for plan in plans {
        let mut patches = plan.patches_before;
        let mut per_vma = Vec::with_capacity(plan.vmas.len());
        for vma in plan.vmas {
            // (address, pages, file offset) of each piece once written.
            let mut placed = Vec::with_capacity(vma.pieces.len());
            for (addr, n, source) in vma.pieces {
                let offset = match source {
                    Source::Copied(o) => o,
                    Source::Rewrite(o, bytes) => {
                        patches.push(writer.rewrite(o, &bytes)?);
                        o
                    }
                    Source::New(bytes) => {
                        // Plain, as the rest: runs are cut from it (and
                        // checksummed from the file, being no pre-copy
                        // blob).
                        writer.add_plain(&bytes)?.offset
                    }
                };
                stored += n;
                placed.push((addr, n, offset));
            }
            per_vma.push((vma.vma_index, placed));
        }
        let patched = patches_by_blob(&plan.blobs, patches);
        let proc_image = meta
            .processes_mut()
            .nth(plan.process)
            .ok_or_else(|| Error::Other("internal: a pre-copy of no process".into()))?;
        for (vma_index, placed) in per_vma {
            let vma = proc_image
                .vmas
                .get_mut(vma_index)
                .ok_or_else(|| Error::Other("internal: a pre-copy of no mapping".into()))?;
            for (addr, npages, offset) in runs_of_pieces(&placed, &plan.blobs) {
                let len = npages * PAGE_SIZE;
                // A whole pre-copy blob keeps its checksum, patched if
                // pages of it were written over; any other run is
                // checksummed from the file.
                let whole = blob_starting_at(&plan.blobs, offset)
                    .filter(|&i| plan.blobs[i].stored_len == len);
                let crc = whole.and_then(|i| match patched.get(&i) {
                    None => Some(plan.blobs[i].crc32c),
                    Some(p) => p.as_deref().and_then(|p| {
                        crate::image::crc::patched(plan.blobs[i].crc32c, offset, len, p)
                    }),
                });
                let data = match (whole, crc) {
                    (Some(i), Some(crc32c)) => DataRef {
                        crc32c,
                        ..plan.blobs[i]
                    },
                    _ => writer.blob_at(offset, len)?,
                };
                vma.pages.push(PageRun { addr, npages, data });
            }
        }
    }
    Ok(stored)
}

/// The patches of each blob of `blobs` (sorted by offset, not
/// overlapping) that they touch, by index; `None` for a blob that a patch
/// overlaps without lying wholly inside it (checksummed from the file).
fn patches_by_blob(blobs: &[DataRef], patches: Vec<Patch>) -> HashMap<usize, Option<Vec<Patch>>> {
    let mut by_blob: HashMap<usize, Option<Vec<Patch>>> = HashMap::new();
    for p in patches {
        let start = p.end - p.len;
        // The first blob that ends past the patch's start.
        let first = blobs.partition_point(|b| b.offset + b.stored_len <= start);
        for (i, b) in blobs.iter().enumerate().skip(first) {
            if b.offset >= p.end {
                break;
            }
            let inside = b.offset <= start && p.end <= b.offset + b.stored_len;
            let entry = by_blob.entry(i).or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), inside) {
                (Some(list), true) => list.push(p),
                _ => *entry = None,
            }
        }
    }
    by_blob
}

/// Runs of pages contiguous both in memory and in the file, cut where a
/// pre-copy blob starts (so untouched blobs are reused whole) and at chunk
/// size. `blobs` sorted by offset. Steps from one cut to the next, not
/// page by page (262 144 pages a GiB).
fn runs_of_pieces(placed: &[(u64, u64, u64)], blobs: &[DataRef]) -> Vec<(u64, u64, u64)> {
    let chunk = crate::pagecopy::CHUNK_PAGES;
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for &(addr, n, offset) in placed {
        let mut done = 0;
        while done < n {
            let a = addr + done * PAGE_SIZE;
            let o = offset + done * PAGE_SIZE;
            // Pages from here to the next blob start (which cuts).
            let next = blobs.partition_point(|b| b.offset <= o);
            let mut take = n - done;
            if let Some(b) = blobs.get(next) {
                take = take.min((b.offset - o).div_ceil(PAGE_SIZE));
            }
            let starts_blob = blob_starting_at(blobs, o).is_some();
            let taken = match runs.last_mut() {
                Some((ra, rn, ro))
                    if *ra + *rn * PAGE_SIZE == a
                        && *ro + *rn * PAGE_SIZE == o
                        && *rn < chunk
                        && !starts_blob =>
                {
                    let t = take.min(chunk - *rn);
                    *rn += t;
                    t
                }
                _ => {
                    let t = take.min(chunk);
                    runs.push((a, t, o));
                    t
                }
            };
            done += taken;
        }
    }
    runs
}

#[cfg(test)]
mod tests;
