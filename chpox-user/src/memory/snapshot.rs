//! A copy-on-write snapshot of a frozen process's memory, so its pages can
//! be written while it runs again.
//!
//! While frozen, the process's leader is made to `clone` itself (a remote
//! syscall, no `CLONE_VM`): the kernel copies its page tables and shares
//! every private page copy-on-write, so the child's memory stays exactly
//! what the parent's was at the freeze, whatever the parent writes later.
//! The dump then reads the child's memory (`pagecopy`) after the process
//! runs on, kills the child, and has the parent reap it.
//!
//! The child never runs a single instruction of the program:
//! - the leader is traced with `PTRACE_O_TRACECLONE` for the call, so the
//!   child starts attached to us and held in a ptrace stop before it
//!   returns to user space; right away it gets `PTRACE_O_EXITKILL`, so it
//!   dies with us;
//! - should it run all the same (we die in the microseconds between the
//!   clone and that option), its stack pointer is an unmapped address and
//!   every signal is blocked (the borrowed thread's mask): its first `ret`
//!   faults and the kernel kills it;
//! - it shares the descriptor table (`CLONE_FILES`), so it holds no extra
//!   reference to any file, pipe or socket, and it has no exit signal, so
//!   the parent gets no SIGCHLD and a plain `wait()` never sees it.
//!
//! What a fork does not copy as it was is copied while frozen, from the
//! process itself, as before: shared memory (the child would see later
//! writes), and mappings marked `MADV_DONTFORK` or `MADV_WIPEONFORK`.
//! Processes under seccomp (a filter could kill them for `clone`) and
//! processes using userfaultfd (a fork event would reach their monitor) are
//! not snapshotted either: their pages are copied while frozen.
//!
//! The child is a child of the process, so only the process can reap it:
//! once the pages are written the process is frozen once more, very
//! briefly, for a remote `wait4`.

use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::debug;

use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{DataRef, Metadata, VmaKind};
use crate::memory::{self, MapEntry, PageDumper};
use crate::ptrace::{Frozen, Stop, wait_stop};
use crate::remote::RemoteThread;
use crate::safe_return::Gadgets;

/// Where the child's stack pointer points: never mapped (below
/// vm.mmap_min_addr), so a child that runs faults at its first `ret`.
const UNMAPPED_STACK: u64 = 16;

/// Whether `pid`, with mappings `maps`, may be snapshotted by a fork.
pub fn may_fork(pid: i32, maps: &[MapEntry]) -> bool {
    let seccomp = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() == "0")
        });
    if seccomp != Some(true) {
        debug!(pid, "seccomp (or unknown): pages copied while frozen");
        return false;
    }
    let uffd = maps.iter().any(|m| {
        m.vm_flags
            .iter()
            .any(|f| f == "um" || f == "uw" || f == "ui")
    });
    if uffd {
        debug!(pid, "userfaultfd in use: pages copied while frozen");
        return false;
    }
    true
}

/// Whether the pages of `map` can be read from a fork of its process: its
/// private pages, unless the fork leaves them out or empty.
pub fn fork_copies(map: &MapEntry, kind: VmaKind) -> bool {
    matches!(kind, VmaKind::Anonymous | VmaKind::PrivateFile)
        && !map.vm_flags.iter().any(|f| f == "dc" || f == "wf")
}

/// A mapping whose pages are to be read from the snapshot.
struct Deferred {
    vma_index: usize,
    start: u64,
    end: u64,
    kind: VmaKind,
}

/// The frozen copy of one process of the image (see the module
/// documentation). Dropping it kills the child.
pub struct Snapshot {
    target: i32,
    child: i32,
    /// Which process of the image (image order).
    process: usize,
    syscall_ip: u64,
    gadgets: Option<Gadgets>,
    deferred: Vec<Deferred>,
    /// Not yet sent SIGKILL.
    child_alive: bool,
    /// Its exit collected (waited for as its tracer).
    collected: bool,
    /// [`reap`](Self::reap) was tried: nothing left behind.
    reap_tried: bool,
    /// When the process started: with the PID, the same process.
    start_time: Option<u64>,
    /// The mappings as the image records them, when their flags were read
    /// before the freeze: checked against the copy (`earlymaps`).
    verify_flags: Vec<MapEntry>,
}

/// When `pid` started (clock ticks since boot, /proc/PID/stat field 22),
/// while it is alive (not a zombie).
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl Snapshot {
    /// The copy's PID.
    pub fn child(&self) -> i32 {
        self.child
    }

    /// Fork the frozen process through its borrowed `leader`. An error from
    /// the clone itself (no memory, a PID or process limit) is not fatal:
    /// Ok(None), and the pages are copied while frozen.
    pub fn take(
        leader: &mut RemoteThread<'_>,
        process: usize,
        syscall_ip: u64,
        gadgets: Option<Gadgets>,
    ) -> Result<Option<Snapshot>> {
        let target = leader.pid();
        let started = Instant::now();
        let flags = libc::CLONE_FILES as u64; // exit signal 0
        let child = match leader.clone_attached([flags, UNMAPPED_STACK, 0, 0, 0, 0]) {
            Ok(child) => child,
            Err(Error::RemoteSyscall { errno, .. }) => {
                debug!(target, %errno, "no snapshot: clone failed; pages copied while frozen");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let snapshot = Snapshot {
            target,
            child,
            process,
            syscall_ip,
            gadgets,
            deferred: Vec::new(),
            child_alive: true,
            collected: false,
            reap_tried: false,
            start_time: start_time(target),
            verify_flags: Vec::new(),
        };
        // Its first stop, before it ever returns to user space.
        match wait_stop(child)? {
            Stop::Event => {}
            other => {
                return Err(Error::Other(format!(
                    "snapshot of PID {target}: its copy {child} stopped as {other:?}"
                )));
            }
        }
        ptrace::setoptions(Pid::from_raw(child), ptrace::Options::PTRACE_O_EXITKILL).map_err(
            |source| Error::Ptrace {
                op: "setoptions",
                tid: child,
                source,
            },
        )?;
        debug!(
            target,
            child,
            us = started.elapsed().as_micros() as u64,
            "snapshot taken"
        );
        Ok(Some(snapshot))
    }

    /// Leave the pages of `map` (VMA `vma_index` of the process's image) to
    /// be read from the snapshot later.
    pub fn defer(&mut self, vma_index: usize, map: &MapEntry, kind: VmaKind) {
        self.deferred.push(Deferred {
            vma_index,
            start: map.start,
            end: map.end,
            kind,
        });
    }

    /// `maps`, as recorded in the image, carry flags read before the
    /// freeze: check them against the copy before its pages are written.
    pub fn verify_flags_later(&mut self, maps: Vec<MapEntry>) {
        self.verify_flags = maps;
    }

    /// Write the deferred pages into `writer` and their runs into `meta`;
    /// returns (pages stored, pages resident).
    fn write_pages(&self, meta: &mut Metadata, writer: &mut ImageWriter) -> Result<(u64, u64)> {
        // The flags check (a page walk of the copy's smaps) runs beside the
        // copy, and fails the dump before anything is recorded. Once it
        // passed (or there is nothing to check), the copy is killed as soon
        // as its pages are all read: it frees its memory while the last of
        // them are written (~2 ms for 64 MiB, else waited for at the reap).
        let checked = std::sync::atomic::AtomicBool::new(self.verify_flags.is_empty());
        std::thread::scope(|scope| {
            let verify = (!self.verify_flags.is_empty()).then(|| {
                scope.spawn(|| {
                    let r = crate::earlymaps::verify_from_copy(
                        self.target,
                        self.child,
                        &self.verify_flags,
                    );
                    if r.is_ok() {
                        checked.store(true, std::sync::atomic::Ordering::Release);
                    }
                    r
                })
            });
            let copied = self.copy_pages(writer, &|| {
                if checked.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(self.child), Signal::SIGKILL);
                }
            });
            if let Some(v) = verify {
                v.join().unwrap_or_else(|_| {
                    Err(Error::Other("internal: the flags check panicked".into()))
                })?;
            }
            self.record_runs(meta, copied?)
        })
    }

    /// The deferred pages copied into `writer`: the runs, their blobs, and
    /// which deferred mapping each run belongs to; pages stored, resident.
    #[allow(clippy::type_complexity)]
    fn copy_pages(
        &self,
        writer: &mut ImageWriter,
        read_done: &(dyn Fn() + Sync),
    ) -> Result<(Vec<(u64, u64)>, Vec<DataRef>, Vec<usize>, u64, u64)> {
        let mut pagemap = PageDumper::new(self.child);
        let mut runs = Vec::new();
        let mut resident = 0u64;
        // Which deferred VMA each run belongs to.
        let mut owner = Vec::new();
        for (i, d) in self.deferred.iter().enumerate() {
            let entries = pagemap.pagemap(d.start, d.end)?;
            resident += entries.iter().filter(|&&e| e >> 63 != 0).count() as u64;
            let needed = entries
                .iter()
                .map(|&e| memory::page_needs_storing(d.kind, e));
            let selected = crate::pagecopy::split_runs(&memory::runs_of(d.start, needed));
            owner.extend(std::iter::repeat_n(i, selected.len()));
            runs.extend(selected);
        }
        let stored: u64 = runs.iter().map(|r| r.1).sum();
        let started = Instant::now();
        let refs = crate::pagecopy::copy_runs_then(
            self.child,
            crate::pagecopy::Source::ProcMem,
            &runs,
            writer,
            read_done,
        )?;
        debug!(
            target = self.target,
            pages = stored,
            us = started.elapsed().as_micros() as u64,
            "snapshot pages written"
        );
        Ok((runs, refs, owner, stored, resident))
    }

    /// Record the runs [`copy_pages`](Self::copy_pages) wrote in `meta`.
    #[allow(clippy::type_complexity)]
    fn record_runs(
        &self,
        meta: &mut Metadata,
        (runs, refs, owner, stored, resident): (
            Vec<(u64, u64)>,
            Vec<DataRef>,
            Vec<usize>,
            u64,
            u64,
        ),
    ) -> Result<(u64, u64)> {
        let proc_image = meta
            .processes_mut()
            .nth(self.process)
            .ok_or_else(|| Error::Other("internal: a snapshot of no process".into()))?;
        for ((&(addr, npages), data), i) in runs.iter().zip(refs).zip(owner) {
            let vma = proc_image
                .vmas
                .get_mut(self.deferred[i].vma_index)
                .ok_or_else(|| Error::Other("internal: a snapshot of no mapping".into()))?;
            vma.pages
                .push(crate::image::model::PageRun { addr, npages, data });
        }
        Ok((stored, resident))
    }

    /// Send the child SIGKILL. It frees its memory on its own time (a
    /// large address space takes a while): collect it later.
    fn signal_child(&mut self) {
        if !self.child_alive {
            return;
        }
        self.child_alive = false;
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child), Signal::SIGKILL);
    }

    /// Kill the child and collect its ptrace exit; it stays a zombie child
    /// of the process until [`reap`](Self::reap).
    fn kill_child(&mut self) {
        if self.collected {
            return;
        }
        self.signal_child();
        self.collected = true;
        let started = Instant::now();
        while !matches!(wait_stop(self.child), Ok(Stop::Exited) | Err(_)) {
            let _ = ptrace::cont(Pid::from_raw(self.child), None);
        }
        debug!(
            child = self.child,
            us = started.elapsed().as_micros() as u64,
            "snapshot collected"
        );
    }

    /// Whether the process is still the one snapshotted.
    fn target_alive(&self) -> bool {
        self.start_time.is_some() && start_time(self.target) == self.start_time
    }

    /// Freeze the process once more and have it reap the dead child.
    /// Returns how long it was frozen. Fails if the process is gone.
    fn reap(&mut self) -> Result<Duration> {
        self.kill_child();
        self.reap_tried = true;
        if !self.target_alive() {
            return Err(Error::Exited(self.target));
        }
        reap_in(
            self.target,
            self.child,
            self.syscall_ip,
            self.gadgets.as_ref(),
        )
    }
}

/// Have `target` reap its dead copy `child` (a wait4 in a brief freeze).
fn reap_in(
    target: i32,
    child: i32,
    syscall_ip: u64,
    gadgets: Option<&Gadgets>,
) -> Result<Duration> {
    let started = Instant::now();
    let frozen = Frozen::freeze(target)?;
    let mut leader = RemoteThread::borrow_guarded(&frozen, target, gadgets, syscall_ip)?;
    let ret = leader.syscall(
        libc::SYS_wait4,
        [
            child as u64,
            0,
            (libc::__WALL | libc::WNOHANG) as u64,
            0,
            0,
            0,
        ],
    )?;
    leader.give_back()?;
    frozen.resume();
    if ret != child as i64 {
        // ECHILD: the process reaped it itself (a wait with __WALL).
        debug!(target, child, ret, "snapshot reaped elsewhere");
    }
    Ok(started.elapsed())
}

/// A copy killed on an error path, whose zombie its process still holds.
struct LeftBehind {
    target: i32,
    child: i32,
    start_time: Option<u64>,
    syscall_ip: u64,
    gadgets: Option<Gadgets>,
}

thread_local! {
    /// Copies left behind by a failed dump on this thread, for
    /// [`reap_left_behind`] once the processes run again.
    static LEFT_BEHIND: std::cell::RefCell<Vec<LeftBehind>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// After a failed dump, once its processes run again: have each process
/// reap the copy the dump left in it. Without this every failed dump left
/// a zombie child in the process (one `wait` without `__WALL` never sees),
/// which the next checkpoint of its tree would record as a member.
pub fn reap_left_behind() {
    let left = LEFT_BEHIND.with(|l| std::mem::take(&mut *l.borrow_mut()));
    for l in left {
        if l.start_time.is_none() || start_time(l.target) != l.start_time {
            continue;
        }
        match reap_in(l.target, l.child, l.syscall_ip, l.gadgets.as_ref()) {
            Ok(_) => debug!(
                target = l.target,
                child = l.child,
                "copy left by the failed dump reaped"
            ),
            Err(e) => {
                debug!(target = l.target, error = %e, "copy left by the failed dump not reaped")
            }
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // An error path: the child must not outlive the dump. Its zombie
        // stays with the process (invisible to a plain wait) until
        // `reap_left_behind` has the process reap it.
        if self.child_alive {
            // The dump's own error says what failed; this is cleanup.
            debug!(
                target = self.target,
                child = self.child,
                "dump failed with a snapshot out: its copy is killed"
            );
        }
        self.kill_child();
        if !self.reap_tried {
            LEFT_BEHIND.with(|l| {
                l.borrow_mut().push(LeftBehind {
                    target: self.target,
                    child: self.child,
                    start_time: self.start_time,
                    syscall_ip: self.syscall_ip,
                    gadgets: self.gadgets.take(),
                })
            });
        }
    }
}

/// What writing the snapshots' pages did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub pages_stored: u64,
    pub resident_pages: u64,
}

/// Write every snapshot's pages into `writer` and `meta`, and send each
/// copy SIGKILL once its pages are written (if not already once they were
/// all read) (it frees its memory while the
/// image is finished; [`reap_all`] collects it). The root of the image
/// exiting in the meantime fails the dump: the image would be of a process
/// that no longer exists by the time it is published.
pub fn write_all(
    snapshots: &mut [Snapshot],
    meta: &mut Metadata,
    writer: &mut ImageWriter,
) -> Result<Written> {
    let mut written = Written::default();
    for s in snapshots.iter_mut() {
        let (stored, resident) = s.write_pages(meta, writer)?;
        written.pages_stored += stored;
        written.resident_pages += resident;
        s.signal_child();
    }
    // The image is a checkpoint of the process that was asked for: if it
    // is gone, nothing is published. Its descendants may come and go (a
    // build's compilers exit all the time): their copies hold their pages
    // whatever becomes of them.
    if let Some(gone) = snapshots
        .iter()
        .find(|s| s.process == 0 && !s.target_alive())
    {
        return Err(Error::Other(format!(
            "PID {} exited while its image was being written; no checkpoint written",
            gone.target
        )));
    }
    Ok(written)
}

/// Once the image is published: collect every copy and have each process
/// reap its own. Returns the longest of these brief freezes. A process
/// that exited since is no error: its image was complete.
pub fn reap_all(snapshots: Vec<Snapshot>) -> Duration {
    let mut longest = Duration::ZERO;
    for mut s in snapshots {
        match s.reap() {
            Ok(pause) => longest = longest.max(pause),
            Err(e) => debug!(target = s.target, error = %e, "snapshot not reaped"),
        }
    }
    longest
}
