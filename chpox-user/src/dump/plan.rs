//! A frozen process's memory plan: its mappings and, for a pre-copied
//! process, which of its pages come from the copy made while it ran and
//! which are read now. Made without the process's threads (no remote
//! call), so a tree's are made on two threads at once.

use super::capture::ProcTexts;
use crate::earlymaps::EarlyMaps;
use crate::error::{Error, Result};
use crate::memory::{self, PAGE_SIZE};
use crate::precopy::Planned;
use crate::snapshot;

/// A frozen process's mappings and, if it was pre-copied, the plan of its
/// pages: what [`capture_process`](super::capture) starts from, made without its threads
/// (no remote call), so also on another thread (see [`plan_precopied`]).
pub(super) struct MemoryPlan {
    pub(super) maps: Vec<memory::MapEntry>,
    /// The flags of `maps` are the early ones (see `earlymaps`).
    pub(super) early_flags: bool,
    /// Which of `maps` the pre-copy tracked (their pages come from `plan`).
    pub(super) claimed: Vec<bool>,
    pub(super) plan: Option<Planned>,
    /// The pre-copy, kept while `plan` refers to it.
    pub(super) precopied: Option<crate::precopy::PreCopied>,
}

/// The memory plans of the tree's pre-copied processes (which run on after
/// the dump): each is a page-table walk of its tracked memory and a read
/// of the pages written since its pre-copy (~0.15 ms per 128 MiB). Once
/// the remote calls are done nothing else needs the other core, so most
/// are made there, while this thread makes the first few and then
/// assembles each process's image as its plan comes ([`take`]): the
/// assemblies run beside the other thread's plans instead of after them
/// (tree of 8 × 128 MiB: plans and assemblies 1.21 ms before, 1.05 ms). (Beside the remote calls it cost
/// more than it saved: the tracees run their calls on that core.)
///
/// [`take`]: PlansBeside::take
pub(super) struct PlansBeside<'scope> {
    ready: Vec<Option<Result<MemoryPlan>>>,
    /// Plans still to come from the other thread, in the order it makes
    /// them (ascending member index).
    coming: std::collections::VecDeque<usize>,
    from_beside: Option<std::sync::mpsc::Receiver<(usize, Result<MemoryPlan>)>>,
    /// Joined when dropped, so that a panic there becomes an error here
    /// rather than the scope's panic.
    thread: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
}

/// A pre-copied process to plan: (index among the members, PID, pre-copy).
pub(super) type PlanJob = (usize, i32, crate::precopy::PreCopied);

impl<'scope> PlansBeside<'scope> {
    /// Start planning `jobs` (ascending member index) of a tree of
    /// `members`: the first part here, now, the rest on a thread of
    /// `scope`.
    pub(super) fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        members: usize,
        mut jobs: Vec<PlanJob>,
        texts: &'env [ProcTexts],
        early: &'env EarlyMaps,
    ) -> PlansBeside<'scope> {
        let plan = move |(i, pid, p): PlanJob| {
            (
                i,
                plan_memory(pid, false, Some(p), &texts[i], Some(i), early),
            )
        };
        let mut ready: Vec<Option<Result<MemoryPlan>>> = (0..members).map(|_| None).collect();
        // This thread's share: its plans plus every assembly should take
        // as long as the other thread's plans (a plan ~150 us, an
        // assembly ~60 us, a thread's first plan ~100 us more). On a tree
        // of 8, 3 here froze 3.00 ms and 2 here 3.15 ms (medians of 15):
        // 3/8 of the plans. A lone process is planned here, without a
        // thread.
        let here = if jobs.len() < 2 {
            jobs.len()
        } else {
            jobs.len() * 3 / 8
        };
        let beside = jobs.split_off(here);
        let coming = beside.iter().map(|j| j.0).collect();
        let (from_beside, thread) = if beside.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            let thread = scope.spawn(move || {
                for job in beside {
                    // The receiver gone: the dump failed, nothing to do.
                    if tx.send(plan(job)).is_err() {
                        return;
                    }
                }
            });
            (Some(rx), Some(thread))
        };
        for (i, result) in jobs.into_iter().map(plan) {
            if let Some(slot) = ready.get_mut(i) {
                *slot = Some(result);
            }
        }
        PlansBeside {
            ready,
            coming,
            from_beside,
            thread,
        }
    }

    /// The plan of member `i`, once made; None where [`capture_process`]
    /// plans the process itself (not pre-copied).
    ///
    /// [`capture_process`]: super::capture
    pub(super) fn take(&mut self, i: usize) -> Result<Option<MemoryPlan>> {
        while self.coming.contains(&i) {
            let received = self.from_beside.as_ref().and_then(|rx| rx.recv().ok());
            let Some((index, result)) = received else {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                return Err(Error::Other("internal: a memory plan panicked".into()));
            };
            self.coming.retain(|&c| c != index);
            if let Some(slot) = self.ready.get_mut(index) {
                *slot = Some(result);
            }
        }
        self.ready.get_mut(i).and_then(Option::take).transpose()
    }
}

impl Drop for PlansBeside<'_> {
    fn drop(&mut self) {
        // Its remaining plans are not wanted: the receiver goes first, so
        // the thread stops after the plan it is making.
        self.from_beside = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Plan frozen `pid`'s memory (see [`MemoryPlan`]): its mappings, from
/// `texts` where they are those of the early read, else read now; which
/// of them its pre-copy tracked; and the pages written since its
/// pre-copy, read now.
pub(super) fn plan_memory(
    pid: i32,
    was_stopped: bool,
    precopied: Option<crate::precopy::PreCopied>,
    texts: &ProcTexts,
    snapshot_as: Option<usize>,
    early: &EarlyMaps,
) -> Result<MemoryPlan> {
    // The address space as read before the remote calls, which leave it
    // as they found it: they map one scratch page in the process at most
    // and unmap exactly it again, and nothing else maps or unmaps in a
    // frozen process (a merge of the page with a neighbour is undone by
    // the unmap, to the same lines). A process to be snapshotted keeps the
    // flags read before the freeze when its mappings are unchanged
    // (`earlymaps`).
    let snapshot_wanted = snapshot_as.is_some() && !was_stopped;
    let (mut maps, early_flags) = if snapshot_wanted {
        match early.unchanged_maps_in(pid, &texts.maps, &texts.status, texts.started)? {
            Some(maps) => (maps, true),
            None => (early.read_now(pid)?, false),
        }
    } else {
        (early.read_now(pid)?, false)
    };
    // Mappings a pre-copy tracked: planned from their earlier copy.
    let mut precopied = precopied.filter(|_| snapshot_wanted);
    let mut claimed = vec![false; maps.len()];
    if let Some(p) = &precopied {
        for (c, m) in claimed.iter_mut().zip(maps.iter_mut()) {
            *c = p.claim(m);
        }
    }
    memory::refuse_missing_page_handlers(pid, &maps)?;
    let plan = match (precopied.as_mut(), snapshot_as) {
        (Some(p), Some(index)) => {
            let tracked: Vec<(usize, &memory::MapEntry)> = maps
                .iter()
                .enumerate()
                .filter(|&(i, _)| claimed[i])
                .collect();
            // Mappings made since the attach are copied while frozen: too
            // many of them, and the snapshot is the shorter freeze.
            let untracked: u64 = maps
                .iter()
                .zip(&claimed)
                .filter(|&(m, &c)| !c && snapshot::fork_copies(m, m.kind()))
                .map(|(m, _)| m.len() / PAGE_SIZE)
                .sum();
            if untracked > crate::precopy::FROZEN_COPY_LIMIT_PAGES {
                None
            } else {
                p.plan(index, &tracked)?
            }
        }
        _ => None,
    };
    if plan.is_none() {
        claimed.iter_mut().for_each(|c| *c = false);
        // Dumped the ordinary way: our protection markers must not show
        // in its pagemap (as "swapped" pages). Dropping the tracker
        // removes them (a page-table walk, in this rare case while frozen).
        precopied = None;
    }
    Ok(MemoryPlan {
        maps,
        early_flags,
        claimed,
        plan,
        precopied,
    })
}
