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
/// the dump), half of them on a second thread: each is a page-table walk
/// of its tracked memory and a read of the pages written since its
/// pre-copy (~0.15 ms per 128 MiB), and once the remote calls are done
/// nothing else needs the other core. (Beside the remote calls it cost
/// more than it saved: the tracees run their calls on that core.)
/// `jobs` are (index among the members, PID, pre-copy); the plans come
/// indexed like the members, None where [`capture_process`] plans the
/// process itself.
///
/// [`capture_process`]: super::capture
pub(super) fn plan_precopied(
    members: usize,
    mut jobs: Vec<(usize, i32, crate::precopy::PreCopied)>,
    texts: &[ProcTexts],
    early: &EarlyMaps,
) -> Result<Vec<Option<MemoryPlan>>> {
    let mut planned: Vec<Option<MemoryPlan>> = (0..members).map(|_| None).collect();
    let plan_all = |jobs: Vec<(usize, i32, crate::precopy::PreCopied)>| {
        jobs.into_iter()
            .map(|(i, pid, p)| {
                (
                    i,
                    plan_memory(pid, false, Some(p), &texts[i], Some(i), early),
                )
            })
            .collect::<Vec<_>>()
    };
    let second = jobs.split_off(jobs.len() / 2);
    let results = if jobs.is_empty() {
        plan_all(second)
    } else {
        std::thread::scope(|scope| {
            let beside = scope.spawn(|| plan_all(second));
            let mut results = plan_all(jobs);
            match beside.join() {
                Ok(more) => results.extend(more),
                Err(_) => results.push((
                    0,
                    Err(Error::Other("internal: a memory plan panicked".into())),
                )),
            }
            results
        })
    };
    for (i, result) in results {
        if let Some(slot) = planned.get_mut(i) {
            *slot = Some(result?);
        }
    }
    Ok(planned)
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
