//! Incremental checkpoints: a generation stores only the pages written
//! since its parent, a full image (the base).
//!
//! Dump side ([`Tracking`]): at a full checkpoint every process of the
//! tree gets a [`Tracker`](crate::dirty::Tracker) (write-protect of its
//! private memory, while frozen); the trackers stay on while the processes
//! run. At the next checkpoint the trackers are scanned *without*
//! re-protecting, so they report every page written since the base, not
//! since the previous generation: each generation is the base plus one
//! increment, and a restore reads exactly two files whatever the number of
//! generations. This is the background fold of a chain done at write time:
//! a page written in generation 2 and not since is stored again in
//! generation 3 (a chain would have it in 2 only), which costs the pages
//! written since the base, and a full checkpoint is taken once those reach
//! half of the base ([`FULL_AFTER_FRACTION`]), once the pages stored
//! again unchanged reach half of it, when so many were written that
//! reading them while frozen would take longer than a snapshot
//! (`Tracking::too_much_written`), or every `full_every`-th time. No
//! background job, no chain to fold, no window in which a restore would
//! read three files.
//!
//! A page is taken from the base ("inherited") only if it is present and
//! was not written since (see `dirty`); everything else is stored from the
//! process as it is now, or is a hole. Mappings not tracked since the base
//! (new since, moved by `mremap`, shared memory) and processes born since
//! are stored whole. If tracking is lost (a process exec'd, a tracker
//! fails, the base image was removed or replaced), the checkpoint is a full
//! one, logged.
//!
//! The base is kept as `FILE.base`, a hard link made after the full
//! checkpoint was written: `--keep` rotation renames and deletes `FILE`,
//! `FILE.1` …, and the base must outlive them. An image names its parent
//! by the parent's random `image_id` and the path where it was; restore
//! side: [`open_parent`].

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

use crate::dirty::{Region, Tracker};
use crate::error::{Error, Result};
use crate::image::model::{Compression, Metadata};
use crate::memory::{MapEntry, PAGE_SIZE};

mod parent;
mod preread;

pub(crate) use parent::absorb_base;
use parent::{all_runs, link_base};
pub use parent::{base_path, inherited_pieces, open_parent, pages_inherited, read_memory};
pub use preread::{PREREAD_FROM_PAGES, PreRead};

/// A full checkpoint once an increment stores more than this fraction of
/// the base's pages.
pub const FULL_AFTER_FRACTION: f64 = 0.5;

/// A full checkpoint rather than an increment once the pages written
/// since the base reach this fraction (one in N) of the base's pages
/// (see `Tracking::too_much_written`)…
const SNAPSHOT_COSTS_READING_ONE_IN: u64 = 8;
/// …and at least this many (64 MiB): below, either pause lasts a few
/// milliseconds.
const FULL_FOR_WRITTEN_FROM_PAGES: u64 = 16384;

/// A random identity for a new image: 32 hex digits.
pub fn new_image_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough without the entropy pool: time and PID.
        let t = crate::process::monotonic_ns() ^ crate::process::unix_now().rotate_left(32);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The full image the trackers' protection dates from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub image_id: String,
    /// `FILE.base`, the hard link that keeps it.
    pub path: PathBuf,
    /// (device, inode) of the link when made: a base removed or replaced
    /// since is noticed before an increment would point at it.
    file: (u64, u64),
    /// Pages the base stored.
    pub pages: u64,
    /// Whether some of its pages are compressed: an increment could not
    /// take them from it, nor a full checkpoint from the base copy them.
    compressed: bool,
}

struct Tracked {
    start_time: u64,
    tracker: Tracker,
    /// Byte ranges whose pages the base stored for this process, sorted
    /// and merged: what an increment may inherit.
    base_runs: Vec<(u64, u64)>,
    /// Byte ranges written since the base that the tracker no longer
    /// reports: a read before a freeze protected them again (see
    /// `preread`). Sorted, merged.
    written_before: Vec<(u64, u64)>,
}

/// What an increment needs to know of one tracked process.
pub(crate) struct Written {
    /// The written regions since the base of each tracked mapping, by its
    /// index in the process's maps.
    pub regions: HashMap<usize, Vec<Region>>,
    /// Byte ranges whose pages the base stored (sorted, merged).
    pub base_runs: Vec<(u64, u64)>,
    /// Of each tracked mapping, by index, the pages written since the base
    /// before the tracker's last protect and not since (see `preread`),
    /// with their state now, where the tracker tells it cheaply (see
    /// `dirty::reports_presence`)…
    pub earlier_scanned: HashMap<usize, Vec<Region>>,
    /// …and all those byte ranges (sorted, merged): where no scan told,
    /// their state is read from the pagemap.
    pub earlier: Vec<(u64, u64)>,
}

/// Write tracking of a registered tree between checkpoints: owned by the
/// caller (the agent, per registration) and passed to
/// [`crate::dump::dump_tracked`]. Dropping it stops the tracking.
#[derive(Default)]
pub struct Tracking {
    procs: HashMap<i32, Tracked>,
    base: Option<Base>,
    /// Increments since the base.
    increments: u32,
    /// Pages the last increment stored.
    last_stored: u64,
    /// Pages the increments since the base stored again although they had
    /// not changed since the increment before (see `heldpages`).
    unchanged_since_base: u64,
    /// Why the next checkpoint must be full (logged when it is taken).
    full_reason: Option<String>,
    /// Take a full checkpoint every this many (1: always; 0: only when
    /// needed).
    pub full_every: u32,
    /// Where an increment's pages wait, read while frozen, until the
    /// processes run again (kept from one checkpoint to the next).
    pub(crate) held: crate::memory::heldpages::HeldPages,
    /// The next increment's image file, allocated meanwhile (see
    /// `image::writer::spare`).
    pub(crate) spare: Option<crate::image::SpareFile>,
}

/// What this dump is, decided once the tree is frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Every page stored; trackers attached and protected afterwards.
    Full,
    /// Pages inherited from `base` where unchanged.
    Incremental(Base),
    /// A full image taken with an increment's pause: while frozen, the
    /// pages written since `base` are read and every page is protected
    /// again; once the processes run, the pages the increment would
    /// inherit are copied from `base` into the image ([`absorb_base`]).
    /// A full checkpoint's snapshot (a fork) instead copies the page
    /// tables while frozen: 10–35 ms per GiB here. It becomes the new
    /// base.
    FromBase(Base),
}

/// Why a checkpoint is full, and so how it is taken.
enum Full {
    /// A snapshot of every page (the first, or the tracking or the base is
    /// gone).
    Snapshot(String),
    /// By policy, with the tracking whole: see [`Plan::FromBase`].
    FromBase(String),
}

impl Tracking {
    pub fn new(full_every: u32) -> Self {
        Tracking {
            full_every,
            ..Tracking::default()
        }
    }

    /// The base of the next increment, if one can be taken.
    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    /// Have the next checkpoint be full, saying why.
    pub fn force_full(&mut self, why: &str) {
        self.full_reason.get_or_insert_with(|| why.to_string());
    }

    /// Stop tracking (every tracker detached); the next checkpoint is full.
    pub fn reset(&mut self, why: &str) {
        for (_, t) in self.procs.drain() {
            t.tracker.detach();
        }
        self.base = None;
        self.increments = 0;
        self.unchanged_since_base = 0;
        self.held.forget_sums();
        self.held.drop_preread();
        self.force_full(why);
    }

    /// Decide, with the tree frozen (`members`: PID and start time of
    /// each process), whether this checkpoint is incremental.
    pub(crate) fn plan(&mut self, members: &[(i32, u64)]) -> Plan {
        self.held.clear();
        let plan = self.plan_for(members);
        if plan == Plan::Full {
            // A snapshot: the pages read before the freeze are not needed.
            self.held.drop_preread();
        }
        plan
    }

    fn plan_for(&mut self, members: &[(i32, u64)]) -> Plan {
        // Without a base, `why_full` says so.
        match (self.why_full(members), self.base.clone()) {
            (None, Some(base)) => Plan::Incremental(base),
            (Some(Full::FromBase(why)), Some(base)) => {
                info!(reason = %why, "full checkpoint, the unchanged pages from the base");
                Plan::FromBase(base)
            }
            (Some(Full::Snapshot(why) | Full::FromBase(why)), base) => {
                if base.is_some() {
                    info!(reason = %why, "full checkpoint");
                } else {
                    debug!(reason = %why, "full checkpoint");
                }
                Plan::Full
            }
            (None, None) => Plan::Full,
        }
    }

    fn why_full(&mut self, members: &[(i32, u64)]) -> Option<Full> {
        if let Some(why) = self.full_reason.take() {
            return Some(Full::Snapshot(why));
        }
        let Some(base) = &self.base else {
            return Some(Full::Snapshot("the first checkpoint is full".into()));
        };
        // Reasons of policy: with the tracking whole, such a full image
        // is the base plus what an increment stores, taken with an
        // increment's pause.
        let policy = if self.full_every == 1 {
            Some("every checkpoint is full (full_every = 1)".into())
        } else if self.full_every > 1 && self.increments + 1 >= self.full_every {
            Some(format!("every {}th checkpoint is full", self.full_every))
        } else if self.last_stored as f64 > base.pages as f64 * FULL_AFTER_FRACTION {
            Some(format!(
                "the last increment stored {} of the base's {} pages",
                self.last_stored, base.pages
            ))
        } else if self.unchanged_since_base as f64 > base.pages as f64 * FULL_AFTER_FRACTION {
            // Pages written once since the base (the end of a fill, a new
            // buffer) are stored by every increment: once storing them
            // again has cost half a base, a new base is cheaper than going
            // on.
            Some(format!(
                "the increments since the base stored {} unchanged pages again, more than half of the base's {}",
                self.unchanged_since_base, base.pages
            ))
        } else {
            None
        };
        if let Some(why) = self.why_not_from_base(members) {
            return Some(Full::Snapshot(why));
        }
        let base = self.base.as_ref()?;
        policy.map(|why| {
            if base.compressed {
                Full::Snapshot(why)
            } else {
                Full::FromBase(why)
            }
        })
    }

    /// Why neither an increment nor a full image from the base can be
    /// taken now: the base or the tracking is gone, or reading what was
    /// written while frozen would take longer than a snapshot.
    fn why_not_from_base(&self, members: &[(i32, u64)]) -> Option<String> {
        let base = self.base.as_ref()?;
        match std::fs::metadata(&base.path) {
            Ok(m) if (m.dev(), m.ino()) == base.file => {}
            _ => {
                return Some(format!(
                    "the base image {} was removed or replaced",
                    base.path.display()
                ));
            }
        }
        let (root, _) = members.first().copied().unwrap_or_default();
        let Some(t) = self.procs.get(&root) else {
            return Some("the root process is not tracked".into());
        };
        if let Err(e) = t.tracker.check_alive() {
            return Some(e.to_string());
        }
        for (pid, start) in members {
            if let Some(t) = self.procs.get(pid) {
                if t.start_time != *start {
                    return Some(format!("PID {pid} is another process now"));
                }
                if let Err(e) = t.tracker.check_alive() {
                    return Some(e.to_string());
                }
            }
        }
        self.too_much_written(members, base.pages)
    }

    /// An increment reads every page written since the base while the
    /// processes are frozen; a full checkpoint's snapshot copies their
    /// page tables instead, about as long as reading an eighth of their
    /// pages (measured here at 1 GiB: a fork 32 ms; 219 MB written read
    /// in 48–57 ms, 319 MB into a buffer that had to grow in 226 ms). Past
    /// that, a full checkpoint pauses them less, and the increments after
    /// it build on a base that holds those pages.
    fn too_much_written(&self, members: &[(i32, u64)], base_pages: u64) -> Option<String> {
        let limit = (base_pages / SNAPSHOT_COSTS_READING_ONE_IN).max(FULL_FOR_WRITTEN_FROM_PAGES);
        let mut written = 0u64;
        for (pid, _) in members {
            let Some(t) = self.procs.get(pid) else {
                continue;
            };
            // Written before the tracker's last protect: read frozen too,
            // unless read before a freeze (and not written since, which
            // the tracker counts).
            written += range_pages(&minus(
                &t.written_before,
                self.held.preread_ranges(*pid).into_iter(),
            ));
            if written >= limit {
                return Some(format!(
                    "{written} or more pages were written since the base's {base_pages}: reading them while frozen would pause the processes longer than a snapshot"
                ));
            }
            // A walk that fails says nothing: the increment's own scans
            // judge the tracker.
            written += t.tracker.written_pages(limit - written).unwrap_or(0);
            if written >= limit {
                return Some(format!(
                    "{written} or more pages were written since the base's {base_pages}: reading them while frozen would pause the processes longer than a snapshot"
                ));
            }
        }
        None
    }

    /// Full plan, process `pid` frozen with current `maps`: make its
    /// tracker if it has none (through `attach`, which borrows a thread),
    /// register what is new and protect everything. A process that cannot
    /// be tracked is only logged: its pages are stored whole every time.
    /// `rescanned`: [`written`](Self::written) just protected again what
    /// was written in the mappings tracked already, so only what is
    /// registered now needs protecting (a walk of all of them less, while
    /// frozen).
    pub(crate) fn protect(
        &mut self,
        pid: i32,
        start_time: u64,
        maps: &[MapEntry],
        attach: impl FnOnce() -> Result<Tracker>,
        rescanned: bool,
    ) -> Result<()> {
        // Another process under the PID, or the same after an exec (the
        // tracker follows memory that is gone): a new tracker.
        if self
            .procs
            .get(&pid)
            .is_some_and(|t| t.start_time != start_time || t.tracker.check_alive().is_err())
            && let Some(t) = self.procs.remove(&pid)
        {
            t.tracker.detach();
        }
        let t = match self.procs.entry(pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match attach() {
                Ok(tracker) => e.insert(Tracked {
                    start_time,
                    tracker,
                    base_runs: Vec::new(),
                    written_before: Vec::new(),
                }),
                Err(Error::Dirty(err)) => {
                    info!(pid, error = %err, "no write tracking: its checkpoints store every page");
                    return Ok(());
                }
                Err(err) => return Err(err),
            },
        };
        // `track` protects every page of what it registers.
        t.tracker.track(maps)?;
        if rescanned {
            return Ok(());
        }
        t.tracker.protect_all(maps)
    }

    /// Incremental plan: the written regions since the base of each
    /// tracked mapping of `pid` (by index in `maps`). None: the process is
    /// not tracked since the base (born since), and is stored whole. With
    /// `protect_again` (a full image from the base), the same walk
    /// protects those pages again: every tracked page is then protected.
    pub(crate) fn written(
        &mut self,
        pid: i32,
        start_time: u64,
        maps: &[MapEntry],
        protect_again: bool,
    ) -> Result<Option<Written>> {
        let Some(t) = self.procs.get_mut(&pid) else {
            return Ok(None);
        };
        if t.start_time != start_time {
            return Ok(None);
        }
        let regions: HashMap<usize, Vec<Region>> = t
            .tracker
            .scan_all_written(maps, protect_again)?
            .into_iter()
            .collect();
        // The state of the pages written before: from walks of their page
        // tables (~3 ns a page) where the pagemap costs ~100 ns a page,
        // 10 ms for an increment of 400 MB.
        let mut earlier_scanned = HashMap::new();
        if !t.written_before.is_empty() {
            for (&i, fresh) in &regions {
                let Some(map) = maps.get(i) else { continue };
                if !crate::dirty::reports_presence(map.kind()) {
                    continue;
                }
                let ranges = minus(
                    &clip(&t.written_before, map.start, map.end),
                    fresh.iter().map(|r| (r.start, r.end)),
                );
                earlier_scanned.insert(i, states_of(&t.tracker, &ranges)?);
            }
        }
        Ok(Some(Written {
            regions,
            base_runs: t.base_runs.clone(),
            earlier_scanned,
            earlier: t.written_before.clone(),
        }))
    }

    /// `maps` as `snapshot::may_fork` must see them: without our own
    /// tracking flags.
    pub(crate) fn hide_own(&self, pid: i32, maps: &[MapEntry]) -> Vec<MapEntry> {
        match self.procs.get(&pid) {
            Some(t) => t.tracker.hide_own(maps),
            None => maps.to_vec(),
        }
    }

    /// After a checkpoint under `plan` was written to `output` (storing
    /// `stored` pages; `members`: the processes in it).
    pub(crate) fn done(
        &mut self,
        plan: &Plan,
        output: &Path,
        meta: &Metadata,
        stored: u64,
        members: &[(i32, u64)],
    ) -> Result<()> {
        let image_id = meta.image_id.clone().unwrap_or_default();
        // Trackers of processes gone from the tree go.
        let gone: Vec<i32> = self
            .procs
            .keys()
            .filter(|pid| !members.iter().any(|(p, _)| p == *pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some(t) = self.procs.remove(&pid) {
                t.tracker.detach();
            }
        }
        match plan {
            Plan::Incremental(_) => {
                self.increments += 1;
                self.last_stored = stored;
                self.unchanged_since_base += self.held.unchanged_pages();
            }
            Plan::Full | Plan::FromBase(_) => {
                // Every tracked page is protected again: what the tracker
                // reports from now on is all that is written since.
                for t in self.procs.values_mut() {
                    t.written_before.clear();
                }
                self.held.drop_preread();
                for p in meta.processes() {
                    if let Some(t) = self.procs.get_mut(&p.process.pid) {
                        let mut runs: Vec<(u64, u64)> = p
                            .vmas
                            .iter()
                            .flat_map(|v| &v.pages)
                            .map(|r| (r.addr, r.addr + r.npages * PAGE_SIZE))
                            .collect();
                        runs.sort_unstable();
                        t.base_runs = merge(runs);
                    }
                }
                let path = base_path(output);
                // The image is written: a base that cannot be kept only
                // makes the next checkpoint full again.
                self.base = match link_base(output, &path) {
                    Ok(file) => Some(Base {
                        image_id,
                        path,
                        file,
                        pages: stored,
                        compressed: all_runs(meta).any(|r| r.data.compression != Compression::None),
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "the next checkpoint is full too");
                        None
                    }
                };
                self.increments = 0;
                self.last_stored = 0;
                self.unchanged_since_base = 0;
                self.held.forget_sums();
            }
        }
        Ok(())
    }

    /// After a checkpoint written to `output`: have a file the size of the
    /// last increment allocated beside it until the next, unless one is
    /// there already. Best effort: without it the image is written to a
    /// new file. Not the larger size the held pages' buffer grows to: the
    /// space an image does not use is freed before it is published, at
    /// about 0.5 µs a page (10 ms for 88 MB), which a spare too large for
    /// the increment after a full checkpoint paid; a spare too small costs
    /// only the allocation it would have saved.
    pub(crate) fn prepare_spare(
        &mut self,
        output: &Path,
        as_user: Option<&crate::creds::UserCreds>,
    ) {
        let pages = self.held.last_held_bytes() as u64;
        if self.spare.is_some() || pages == 0 {
            return;
        }
        // With its metadata: ~100 bytes per stored run of one page.
        let bytes = pages + pages / 40 + (256 << 10);
        match crate::image::SpareFile::prepare(output, bytes, as_user) {
            Ok(spare) => self.spare = Some(spare),
            Err(e) => tracing::debug!(error = %e, "no spare file for the next image"),
        }
    }
}

/// (address, page count) runs.
pub(crate) type Runs = Vec<(u64, u64)>;

/// The state of the pages of `ranges` (sorted, apart, inside one tracked
/// mapping of `tracker`), as written regions that say whether they are
/// present (not as the zero page) or swapped. A walk per range costs
/// ~3 us, a walk over their whole span ~4 ns a page: 10 000 scattered
/// pages of a 4 GiB mapping took 30 ms a range at a time.
fn states_of(tracker: &Tracker, ranges: &[(u64, u64)]) -> Result<Vec<Region>> {
    let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
        return Ok(Vec::new());
    };
    let span_pages = (last.1 - first.0) / PAGE_SIZE;
    let not_present = if span_pages < ranges.len() as u64 * 750 {
        tracker.absent_or_zero(first.0, last.1)?
    } else {
        let mut all = Vec::new();
        for &(s, e) in ranges {
            all.extend(tracker.absent_or_zero(s, e)?);
        }
        all
    };
    // Both sorted: each range cut where it meets pages not present.
    let written = crate::dirty::PAGE_IS_WRITTEN;
    let present = written | crate::dirty::PAGE_IS_PRESENT;
    let mut out = Vec::with_capacity(ranges.len());
    let mut k = 0;
    for &(s, e) in ranges {
        while k < not_present.len() && not_present[k].end <= s {
            k += 1;
        }
        let mut at = s;
        let mut j = k;
        while j < not_present.len() && not_present[j].start < e {
            let r = &not_present[j];
            let (rs, re) = (r.start.max(s), r.end.min(e));
            if at < rs {
                out.push(Region {
                    start: at,
                    end: rs,
                    categories: present,
                });
            }
            out.push(Region {
                start: rs,
                end: re,
                // Swapped: its state is read from the pagemap; gone or
                // the zero page: a hole.
                categories: written | (r.categories & crate::dirty::PAGE_IS_SWAPPED),
            });
            at = re;
            j += 1;
        }
        if at < e {
            out.push(Region {
                start: at,
                end: e,
                categories: present,
            });
        }
    }
    Ok(out)
}

/// Pages in byte ranges.
fn range_pages(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|&(s, e)| (e - s) / PAGE_SIZE).sum()
}

/// The parts of sorted byte ranges inside `[start, end)`.
fn clip(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|&(s, e)| s < e)
        .collect()
}

/// Sorted, apart byte ranges `a` without those of `b` (sorted).
fn minus(a: &[(u64, u64)], b: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let b: Vec<(u64, u64)> = b.collect();
    let mut out = Vec::with_capacity(a.len());
    let mut k = 0;
    for &(s, e) in a {
        let mut at = s;
        while k < b.len() && b[k].1 <= at {
            k += 1;
        }
        let mut j = k;
        while j < b.len() && b[j].0 < e {
            if b[j].0 > at {
                out.push((at, b[j].0));
            }
            at = at.max(b[j].1);
            j += 1;
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// Sorted, merged byte ranges `a` and `b` together.
fn union(a: &[(u64, u64)], b: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().copied().chain(b).collect();
    all.sort_unstable();
    merge(all)
}

/// Sorted ranges with touching or overlapping ones joined.
fn merge(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Written pages closer than this are read from the pagemap in one read.
const PAGEMAP_GAP: u64 = 16 * PAGE_SIZE;

/// For a tracked mapping `map` of an increment: the runs to store
/// (address, pages) and the runs taken from the base (address, pages).
/// Stored: the pages written since the base (`written`, from the fast
/// scan) that hold data now. The scan tells which of an anonymous
/// mapping's are present (`dirty::reports_presence`); of the others, and
/// of the pages it reports swapped, `pagemap` tells, for them alone (the
/// entries of each of the windows it is given, one after the other) — a
/// large mapping is never walked whole while frozen. Inherited: the pages
/// not written since, that the base stored (`base_runs`). A page written
/// and now absent is a hole. `earlier`: byte ranges written since the
/// base that the scan no longer reports (sorted, merged; see `preread`),
/// stored as written; of those outside `written`, `earlier_scanned` tells
/// the state of some (sorted), the pagemap that of the rest.
pub(crate) fn split_tracked(
    map: &MapEntry,
    kind: crate::image::model::VmaKind,
    written: &[Region],
    earlier_scanned: &[Region],
    earlier: &[(u64, u64)],
    base_runs: &[(u64, u64)],
    pagemap: impl FnOnce(&[(u64, u64)]) -> Result<Vec<u64>>,
) -> Result<(Runs, Runs)> {
    // The scan's regions, those of the earlier ranges scanned, and the
    // rest of the earlier ranges (whose state is unknown), in order.
    let earlier_only = minus(
        &clip(earlier, map.start, map.end),
        union(
            &[],
            written
                .iter()
                .chain(earlier_scanned)
                .map(|r| (r.start, r.end)),
        )
        .into_iter(),
    );
    let mut all: Vec<(u64, u64, Option<&Region>)> = written
        .iter()
        .chain(earlier_scanned)
        .map(|r| (r.start, r.end, Some(r)))
        .chain(earlier_only.iter().map(|&(s, e)| (s, e, None)))
        .collect();
    all.sort_unstable_by_key(|&(s, _, _)| s);
    // Written byte ranges inside the mapping, sorted and apart (should a
    // region reach back into the last, it counts from where that ended).
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    let mut at = map.start;
    let presence_known = crate::dirty::reports_presence(kind);
    let mut store: Runs = Vec::new();
    // Those whose state the pagemap is to tell.
    let mut unknown: Vec<(u64, u64)> = Vec::new();
    for (start, end, region) in all {
        let (s, e) = (start.max(map.start).max(at), end.min(map.end));
        if s < e {
            ranges.push((s, e));
            at = e;
            match region {
                Some(r) if presence_known && !r.swapped() => {
                    if r.present() {
                        store.push((s, (e - s) / PAGE_SIZE));
                    }
                }
                _ => unknown.push((s, e)),
            }
        }
    }
    // One pagemap window for unknown ranges close together.
    let mut clusters: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < unknown.len() {
        let mut j = i + 1;
        while j < unknown.len() && unknown[j].0 - unknown[j - 1].1 <= PAGEMAP_GAP {
            j += 1;
        }
        clusters.push((i, j));
        i = j;
    }
    let windows: Vec<(u64, u64)> = clusters
        .iter()
        .map(|&(i, j)| (unknown[i].0, unknown[j - 1].1))
        .collect();
    let all_entries = if windows.is_empty() {
        Vec::new()
    } else {
        pagemap(&windows)?
    };
    let mut first_entry = 0;
    for (&(i, j), &(ws, we)) in clusters.iter().zip(&windows) {
        let count = ((we - ws) / PAGE_SIZE) as usize;
        let entries = all_entries
            .get(first_entry..first_entry + count)
            .unwrap_or_default();
        first_entry += count;
        for &(s, e) in &unknown[i..j] {
            let mut a = s;
            while a < e {
                let entry = entries
                    .get(((a - ws) / PAGE_SIZE) as usize)
                    .copied()
                    .unwrap_or(0);
                if crate::memory::page_needs_storing(kind, entry) {
                    match store.last_mut() {
                        Some((ra, rn)) if *ra + *rn * PAGE_SIZE == a => *rn += 1,
                        _ => store.push((a, 1)),
                    }
                }
                a += PAGE_SIZE;
            }
        }
    }
    // The pagemap's answers among the scan's, in order and joined.
    store.sort_unstable();
    let mut joined: Runs = Vec::with_capacity(store.len());
    for (a, n) in store {
        match joined.last_mut() {
            Some((ra, rn)) if *ra + *rn * PAGE_SIZE == a => *rn += n,
            _ => joined.push((a, n)),
        }
    }
    let store = joined;
    // Not written ∩ stored by the base; both sorted.
    let mut unwritten = Vec::with_capacity(ranges.len() + 1);
    let mut at = map.start;
    for &(s, e) in &ranges {
        if at < s {
            unwritten.push((at, s));
        }
        at = e;
    }
    if at < map.end {
        unwritten.push((at, map.end));
    }
    let mut inherited = Vec::new();
    let mut b = 0;
    for (s, e) in unwritten {
        while b < base_runs.len() && base_runs[b].1 <= s {
            b += 1;
        }
        let mut k = b;
        while k < base_runs.len() && base_runs[k].0 < e {
            let (is, ie) = (s.max(base_runs[k].0), e.min(base_runs[k].1));
            if is < ie {
                inherited.push((is, (ie - is) / PAGE_SIZE));
            }
            k += 1;
        }
    }
    Ok((store, inherited))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private anonymous read-write mapping of `[start, end)`.
    fn private_anon(start: u64, end: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev: (0, 0),
            inode: 0,
            path: String::new(),
            deleted: false,
            vm_flags: Vec::new(),
        }
    }

    #[test]
    fn increments_store_what_was_written_and_inherit_what_the_base_stored() {
        use crate::dirty::PAGE_IS_WRITTEN;
        let p = PAGE_SIZE;
        let at = |i: u64| 0x10000 + i * p;
        let map = private_anon(at(0), at(10));
        let region = |a: u64, b: u64, c: u64| Region {
            start: at(a),
            end: at(b),
            categories: PAGE_IS_WRITTEN | c,
        };
        use crate::dirty::{PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
        use crate::image::model::VmaKind;
        // Pages 1-2 written and present, 4 discarded (absent), 6 present
        // (in the pagemap; in the scan of an anonymous mapping, which tells
        // presence, a "swapped" page 6 that only the pagemap can confirm).
        let present = 1u64 << 63;
        let entry = |a: u64| match (a - at(0)) / p {
            1 | 2 | 6 => present,
            _ => 0,
        };
        // The base stored pages 0-5 and 8.
        let base = [(at(0), at(6)), (at(8), at(9))];
        let cases = [
            (
                VmaKind::PrivateFile,
                [region(1, 3, 0), region(4, 5, 0), region(6, 7, 0)],
                // Close together: one read.
                vec![(at(1), at(7))],
            ),
            (
                VmaKind::Anonymous,
                [
                    region(1, 3, PAGE_IS_PRESENT),
                    region(4, 5, 0),
                    region(6, 7, PAGE_IS_SWAPPED),
                ],
                // Only the swapped page's state is read.
                vec![(at(6), at(7))],
            ),
        ];
        for (kind, written, want_reads) in cases {
            let mut reads = Vec::new();
            let (store, inherited) =
                split_tracked(&map, kind, &written, &[], &[], &base, |windows| {
                    reads.extend_from_slice(windows);
                    Ok(windows
                        .iter()
                        .flat_map(|&(s, e)| (s..e).step_by(p as usize).map(entry))
                        .collect())
                })
                .expect("split");
            assert_eq!(store, vec![(at(1), 2), (at(6), 1)], "{kind:?}");
            assert_eq!(
                inherited,
                vec![(at(0), 1), (at(3), 1), (at(5), 1), (at(8), 1)],
                "{kind:?}"
            );
            assert_eq!(reads, want_reads, "{kind:?}");
        }
    }

    #[test]
    fn pages_written_before_the_last_protect_are_stored_as_the_pagemap_says() {
        use crate::dirty::{PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
        use crate::image::model::VmaKind;
        let p = PAGE_SIZE;
        let at = |i: u64| 0x10000 + i * p;
        let map = private_anon(at(0), at(10));
        // Written since the last protect: page 3, present. Written before
        // it: pages 2-5 (3 among them) and 8-11 (past the mapping's end);
        // of those the pagemap has 2, 4 and 8 present, 5 gone.
        let written = [Region {
            start: at(3),
            end: at(4),
            categories: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
        }];
        let earlier = [(at(2), at(6)), (at(8), at(12))];
        let present = 1u64 << 63;
        let mut reads = Vec::new();
        let (store, inherited) = split_tracked(
            &map,
            VmaKind::Anonymous,
            &written,
            &[],
            &earlier,
            &[(at(0), at(10))],
            |windows| {
                reads.extend_from_slice(windows);
                Ok(windows
                    .iter()
                    .flat_map(|&(s, e)| (s..e).step_by(p as usize))
                    .map(|a| match (a - at(0)) / p {
                        2 | 4 | 8 => present,
                        _ => 0,
                    })
                    .collect())
            },
        )
        .expect("split");
        assert_eq!(store, vec![(at(2), 3), (at(8), 1)]);
        assert_eq!(inherited, vec![(at(0), 2), (at(6), 2)]);
        // Page 3's state came from the scan; the rest from the pagemap,
        // 2-5 and 8-9 in one read (close together).
        assert_eq!(reads, vec![(at(2), at(10))]);

        // The same, with a walk of the page tables having told the state
        // of 4-5 (4 present, 5 gone) and 8-9 (8 present): only 2 is left
        // to the pagemap.
        let scanned = [
            Region {
                start: at(4),
                end: at(5),
                categories: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
            },
            Region {
                start: at(5),
                end: at(6),
                categories: PAGE_IS_WRITTEN,
            },
            Region {
                start: at(8),
                end: at(9),
                categories: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
            },
            Region {
                start: at(9),
                end: at(10),
                categories: PAGE_IS_WRITTEN,
            },
        ];
        let mut reads = Vec::new();
        let (store, inherited) = split_tracked(
            &map,
            VmaKind::Anonymous,
            &written,
            &scanned,
            &earlier,
            &[(at(0), at(10))],
            |windows| {
                reads.extend_from_slice(windows);
                Ok(windows.iter().map(|_| present).collect())
            },
        )
        .expect("split");
        assert_eq!(store, vec![(at(2), 3), (at(8), 1)]);
        assert_eq!(inherited, vec![(at(0), 2), (at(6), 2)]);
        assert_eq!(reads, vec![(at(2), at(3))]);
    }

    #[test]
    fn byte_ranges_subtract_and_join() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 8), (9, 22), (25, 26), (45, 60)];
        assert_eq!(
            minus(&a, b.iter().copied()),
            vec![(0, 5), (8, 9), (22, 25), (26, 30), (40, 45)]
        );
        assert_eq!(minus(&a, std::iter::empty()), a.to_vec());
        assert_eq!(union(&a, b.iter().copied()), vec![(0, 30), (40, 60)]);
        assert_eq!(clip(&a, 8, 42), vec![(8, 10), (20, 30), (40, 42)]);
    }

    #[test]
    fn ids_differ() {
        let (a, b) = (new_image_id(), new_image_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
