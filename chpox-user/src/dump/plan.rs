//! A frozen process's memory plan: its mappings and, for a pre-copied
//! process, which of its pages come from the copy made while it ran and
//! which are read now. Made without the process's threads (no remote
//! call), so a tree's are made on two threads at once ([`PlanPool`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

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
/// of the pages written since its pre-copy (~0.15 ms per 128 MiB). Made by
/// both of the dump's threads, each taking the next plan not taken yet,
/// as soon as the remote calls are over (beside them it cost more than
/// it saved: the tracees run their calls on the other core). The other
/// thread comes to them from the descriptors; the dump's thread
/// assembles each process's image in order as its plan is made
/// ([`take`]), and makes the next plan not taken whenever the one it needs
/// is not made yet.
///
/// [`take`]: PlanPool::take
pub(super) struct PlanPool<'a> {
    texts: &'a [ProcTexts],
    early: &'a EarlyMaps,
    /// In ascending member order, each taken once.
    jobs: Vec<Mutex<Option<PlanJob>>>,
    next: AtomicUsize,
    /// Which members have a plan made here.
    planned: Vec<bool>,
    state: Mutex<PoolState>,
    changed: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// The remote calls are over (or the dump failed): plans may start.
    open: bool,
    /// By member index, once made.
    made: Vec<Option<Result<MemoryPlan>>>,
}

/// Abandons its [`PlanPool`] when dropped.
pub(super) struct AbandonOnDrop<'p, 'a>(&'p PlanPool<'a>);

impl Drop for AbandonOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// A pre-copied process to plan: (index among the members, PID, pre-copy).
pub(super) type PlanJob = (usize, i32, crate::precopy::PreCopied);

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<'a> PlanPool<'a> {
    /// The plans of `jobs` (ascending member index) of a tree of
    /// `members`, none started yet.
    pub(super) fn new(
        members: usize,
        jobs: Vec<PlanJob>,
        texts: &'a [ProcTexts],
        early: &'a EarlyMaps,
    ) -> PlanPool<'a> {
        let mut planned = vec![false; members];
        for job in &jobs {
            if let Some(p) = planned.get_mut(job.0) {
                *p = true;
            }
        }
        PlanPool {
            texts,
            early,
            jobs: jobs.into_iter().map(|j| Mutex::new(Some(j))).collect(),
            next: AtomicUsize::new(0),
            planned,
            state: Mutex::new(PoolState {
                open: false,
                made: (0..members).map(|_| None).collect(),
            }),
            changed: Condvar::new(),
        }
    }

    /// The remote calls are over: plans may be made.
    pub(super) fn open(&self) {
        lock(&self.state).open = true;
        self.changed.notify_all();
    }

    /// The dump failed: no plan is started any more (one being made is
    /// finished), and a thread waiting to make one returns.
    pub(super) fn abandon(&self) {
        self.next.store(self.jobs.len(), Ordering::Relaxed);
        self.open();
    }

    /// [`abandon`](Self::abandon) once the result is dropped.
    pub(super) fn abandon_when_dropped(&self) -> AbandonOnDrop<'_, 'a> {
        AbandonOnDrop(self)
    }

    /// Make plans not taken yet until none is left, once open.
    pub(super) fn run(&self) {
        {
            let mut state = lock(&self.state);
            while !state.open {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        while self.make_next() {}
    }

    /// Make the next plan not taken yet; false if none is left.
    fn make_next(&self) -> bool {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.jobs.get(i) else {
                return false;
            };
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            let Some((index, pid, precopied)) = taken else {
                continue;
            };
            let plan = plan_memory(
                pid,
                false,
                Some(precopied),
                &self.texts[index],
                Some(index),
                self.early,
            );
            if let Some(made) = lock(&self.state).made.get_mut(index) {
                *made = Some(plan);
            }
            self.changed.notify_all();
            return true;
        }
    }

    /// The plan of member `i`, once made; None where [`capture_process`]
    /// plans the process itself (not pre-copied). `beside`: the other
    /// thread making plans; if it ended (a panic) with the plan unmade,
    /// that is an error rather than a wait for good.
    ///
    /// [`capture_process`]: super::capture
    pub(super) fn take(
        &self,
        i: usize,
        beside: &std::thread::ScopedJoinHandle<'_, ()>,
    ) -> Result<Option<MemoryPlan>> {
        if !self.planned.get(i).copied().unwrap_or(false) {
            return Ok(None);
        }
        loop {
            if let Some(made) = lock(&self.state).made.get_mut(i).and_then(Option::take) {
                return made.map(Some);
            }
            // Not made yet: rather than wait, make the next one not taken
            // (the pool is open once the caller assembles).
            if !self.make_next() {
                break;
            }
        }
        let mut state = lock(&self.state);
        loop {
            if let Some(made) = state.made.get_mut(i).and_then(Option::take) {
                return made.map(Some);
            }
            if beside.is_finished() {
                // Every plan was taken (this thread takes none any more)
                // and the other thread, which needed this lock to hand
                // it over, ended without it: lost with a panic there.
                return Err(Error::Other("internal: a memory plan panicked".into()));
            }
            state = self
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
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
