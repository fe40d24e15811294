//! A frozen tree's descriptors, read by both of the dump's threads: each
//! takes the next process not taken yet (see `capture::capture_tree`),
//! and the descriptions they share are linked once all are read.

use std::sync::{Condvar, Mutex, PoisonError};

use super::DumpOptions;
use super::capture::ProcTexts;
use crate::error::{Error, Result};
use crate::fds;
use crate::image::model_fds::FdEntry;
use crate::tree;

/// One process's descriptors, with the file each refers to (for
/// [`tree::link_descriptions`]).
type ScannedFds = Vec<(FdEntry, Option<fds::FileId>)>;

/// The descriptors of every process of a frozen tree, read by whichever
/// thread takes the next process (see `capture_tree`).
pub(super) struct DescriptorScan<'a> {
    pids: &'a [i32],
    policy: fds::UnsupportedFd,
    sockets: fds::sockets::tables::SocketTables,
    next: std::sync::atomic::AtomicUsize,
    scanned: Vec<Mutex<Option<Result<ScannedFds>>>>,
    /// How many processes are scanned, for [`wait`](Self::wait).
    finished: Mutex<usize>,
    changed: Condvar,
}

impl<'a> DescriptorScan<'a> {
    pub(super) fn new(pids: &'a [i32], opts: &DumpOptions) -> DescriptorScan<'a> {
        DescriptorScan {
            pids,
            policy: opts.unsupported_fd,
            sockets: fds::sockets::tables::SocketTables::new(opts.tcp),
            next: std::sync::atomic::AtomicUsize::new(0),
            scanned: pids.iter().map(|_| Mutex::new(None)).collect(),
            finished: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    /// Scan processes not taken yet until none is left; `texts` are theirs.
    pub(super) fn run(&self, texts: &[ProcTexts]) {
        loop {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (Some(&pid), Some(texts), Some(slot)) =
                (self.pids.get(i), texts.get(i), self.scanned.get(i))
            else {
                return;
            };
            let scanned = fds::scan_fds(pid, self.policy, &self.sockets, &texts.maps);
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(scanned);
            *self.finished.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            self.changed.notify_all();
        }
    }

    /// Until every process is scanned, by either thread; an error if the
    /// other thread (`beside`) ended without finishing its part (a panic).
    pub(super) fn wait(&self, beside: &std::thread::ScopedJoinHandle<'_, ()>) -> Result<()> {
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        while *finished < self.pids.len() {
            if beside.is_finished() {
                // This thread's own are done (it waits only once none is
                // left to take): what is missing was lost with the other.
                return Err(Error::Other(
                    "internal: the descriptor scan panicked".into(),
                ));
            }
            finished = self
                .changed
                .wait_timeout(finished, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// Every process's descriptors (the first failure, in the tree's
    /// order), with which of them share a description, once
    /// [`wait`](Self::wait) returned.
    pub(super) fn take_all(&self) -> Result<Vec<Vec<FdEntry>>> {
        let mut scanned = self
            .scanned
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .unwrap_or_else(|| {
                        Err(Error::Other("internal: descriptors not scanned".into()))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        tree::link_descriptions(self.pids, &mut scanned);
        Ok(scanned
            .into_iter()
            .map(|entries| entries.into_iter().map(|(e, _)| e).collect())
            .collect())
    }
}
