//! What /proc and the kernel's structures say of each process of a tree,
//! read as soon as that process is frozen, while the rest of the tree is
//! still being frozen.
//!
//! Freezing a tree is one thread's work (ptrace: the tracer is a thread),
//! one process after the other, and it left the other core idle: ~0.4 ms
//! of a tree of 8. A helper thread, started before the freeze, reads each
//! process's maps, status, stat and the rest of `dump_proc_info`, and its
//! kernel state (`process::kernelstate`), as the freeze hands it over; the
//! dump's thread helps with what is left once the freeze is over.
//!
//! Only what the frozen process alone can change is read this early: its
//! mappings (refused if shared with another process, `tree::check_unshared`),
//! its dispositions, credentials, limits and identifiers (its process group
//! only its parent can change, and parents are frozen before their
//! children). Its descriptors are not: a description shared with a process
//! not frozen yet (an inherited stdout) moves its offset meanwhile; they
//! are read once the whole tree is frozen, as are its threads (ptrace) and
//! pending signals.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;

use super::capture::{KernelFields, ProcTexts};
use crate::error::{Error, Result};
use crate::image::model::ProcessInfo;
use crate::process::{self, kernelstate::KernelState};

/// What the helper's heap is warmed with: the texts of a tree of 8 take
/// ~100 KiB.
const HELPER_WARM_BYTES: usize = 256 << 10;

/// One frozen process as read early.
pub(super) struct Early {
    pub(super) texts: ProcTexts,
    pub(super) info: ProcessInfo,
    pub(super) kernel: KernelFields,
}

#[derive(Default)]
struct State {
    /// (member index, PID) frozen and not read yet.
    waiting: VecDeque<(usize, i32)>,
    /// Members handed over so far.
    frozen: usize,
    /// The freeze is over: no more members come.
    closed: bool,
    /// By member index.
    read: Vec<Option<Result<Early>>>,
}

struct Shared {
    state: Mutex<State>,
    /// A member was handed over, read, or the freeze ended.
    changed: Condvar,
    kernel: Option<Arc<KernelState>>,
    /// The helper's thread id once it runs (0 before). Outside the lock:
    /// the dump's thread raises the helper when it finds the lock held.
    helper_tid: AtomicI32,
    /// CPU time the helper spends holding the lock once it is idled: a
    /// helper preempted there, as the scheduler may at any moment.
    #[cfg(test)]
    hold_when_idled: std::time::Duration,
}

/// The early reads of one dump: [`frozen`](Self::frozen) as each member
/// is frozen, then [`collect`](Self::collect) once the tree is.
pub(super) struct AsFrozen {
    shared: Arc<Shared>,
    helper: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The state, for the dump's thread. The helper may hold the lock at
    /// idle priority, and beside busy cores such a thread may not run
    /// again for a minute (a dump on CI waited so for its helper,
    /// preempted while it held the lock): a lock found held raises the
    /// helper first.
    fn lock_urgently(&self) -> MutexGuard<'_, State> {
        match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.raise_helper();
                lock(&self.state)
            }
        }
    }

    /// The helper at the normal policy and the dump's raised priority (see
    /// `Boost`), whether it was put at idle priority or not (it was born
    /// at the priority the dump had before its `Boost`): the frozen tree
    /// waits for what it reads. Raising it again costs two system calls.
    fn raise_helper(&self) {
        let tid = self.helper_tid.load(Ordering::Acquire);
        if tid == 0 || !may_raise_priority() {
            return;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscalls with a valid sched_param on one of our
        // own threads, alive: the helper ends only once the queue is
        // closed and empty, and it is raised only before that, while it
        // holds the lock, or while it owes a member. We hold CAP_SYS_NICE
        // (checked), so they succeed.
        unsafe {
            libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param);
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20);
        }
    }

    /// The helper's work: it idles itself while the freeze goes on, then
    /// reads each member handed over until the freeze is over.
    fn help(&self, warm: bool) {
        if warm {
            let _ = read_early(std::process::id() as i32, self.kernel.as_deref());
            // This thread's own heap, touched once so that what the tree's
            // texts take while frozen is no fresh page (see `heap`).
            super::heap::touch_and_free(HELPER_WARM_BYTES);
        }
        let tid = nix::unistd::gettid().as_raw();
        self.helper_tid.store(tid, Ordering::Release);
        // At idle priority until the freeze is over, set here, before the
        // freeze, rather than as the first member is handed over (that
        // cost the freeze ~60 us); decided under the lock (a helper that
        // first runs after the freeze stays as it is) but switched outside
        // it. The dump's thread raises the helper when it closes the
        // queue; a helper that idles itself just after that has taken no
        // member yet, so the dump's thread reads them all and waits for
        // none of them.
        let closed = lock(&self.state).closed;
        if !closed && may_raise_priority() && run_as_if_idle(tid) {
            #[cfg(test)]
            if !self.hold_when_idled.is_zero() {
                let _held = lock(&self.state);
                crate::testing::spend_cpu_time(self.hold_when_idled);
            }
        }
        while self.read_next(true) {}
    }

    /// Read the next member waiting, if any; false once none is waiting
    /// (and, with `until_closed`, the freeze is over). `until_closed`: the
    /// helper; without it, the dump's thread.
    fn read_next(&self, until_closed: bool) -> bool {
        let take = || {
            if until_closed {
                lock(&self.state)
            } else {
                self.lock_urgently()
            }
        };
        let job = {
            let mut state = take();
            loop {
                if let Some(job) = state.waiting.pop_front() {
                    break job;
                }
                if state.closed || !until_closed {
                    return false;
                }
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let (index, pid) = job;
        let result = read_early(pid, self.kernel.as_deref());
        let mut state = take();
        if state.read.len() <= index {
            state.read.resize_with(index + 1, || None);
        }
        state.read[index] = Some(result);
        drop(state);
        self.changed.notify_all();
        true
    }
}

fn read_early(pid: i32, kernel: Option<&KernelState>) -> Result<Early> {
    let texts = ProcTexts::read(pid)?;
    let info = process::dump_proc_info(pid, &texts.status)?;
    let kernel = kernel.and_then(|k| Some((k.read(pid)?, crate::timers::any_posix(pid))));
    Ok(Early {
        texts,
        info,
        kernel,
    })
}

impl AsFrozen {
    /// Start the helper; `kernel`: where the kernel's state of a process
    /// is read from, if anywhere (else remote syscalls ask, later). With
    /// `warm`, when the freeze is some time off (a pre-copy comes first),
    /// the helper first reads chpox's own process the same way: a new
    /// thread's first read took ~420 us against ~150 us for the next (its
    /// malloc arena and stack are new, the code cold), and a tree's root,
    /// read while the rest of it freezes, waited for that.
    pub(super) fn start(kernel: Option<Arc<KernelState>>, warm: bool) -> AsFrozen {
        Self::start_holding(kernel, warm, std::time::Duration::ZERO)
    }

    fn start_holding(
        kernel: Option<Arc<KernelState>>,
        warm: bool,
        #[cfg_attr(not(test), allow(unused_variables))] hold_when_idled: std::time::Duration,
    ) -> AsFrozen {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            kernel,
            helper_tid: AtomicI32::new(0),
            #[cfg(test)]
            hold_when_idled,
        });
        // A Ctrl-C taken by the helper would end chpox mid-freeze.
        let helper = crate::ptrace::spawn_leaving_terminal_signals_to_the_freezer(|| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("as-frozen".into())
                .spawn(move || shared.help(warm))
                .ok()
        });
        AsFrozen { shared, helper }
    }

    /// The next member of the tree (in the tree's order) is frozen.
    pub(super) fn frozen(&self, pid: i32) {
        let mut state = self.shared.lock_urgently();
        let index = state.frozen;
        state.frozen += 1;
        state.waiting.push_back((index, pid));
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Every member's early read, in the tree's order, once the tree of
    /// `members` is frozen: this thread reads what the helper has not
    /// started, then waits for the rest.
    pub(super) fn collect(mut self, members: usize) -> Result<Vec<Early>> {
        {
            let mut state = self.shared.lock_urgently();
            state.closed = true;
            // The freeze is over: the helper reads beside this thread now,
            // as urgently as it.
            self.shared.raise_helper();
            if state.frozen != members {
                return Err(Error::Other(format!(
                    "internal: {} members handed over early, {members} frozen",
                    state.frozen
                )));
            }
        }
        self.shared.changed.notify_all();
        while self.shared.read_next(false) {}
        let mut state = self.shared.lock_urgently();
        while state.read.len() < members || state.read.iter().any(Option::is_none) {
            // The helper reads what it took; only a panic there leaves a
            // member unread for good.
            if self.helper.as_ref().is_none_or(JoinHandle::is_finished) {
                return Err(Error::Other("internal: an early read panicked".into()));
            }
            // It took a member, so it idled itself (if ever) before the
            // raise above; raised again all the same, it costs little.
            self.shared.raise_helper();
            state = self
                .shared
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let read = std::mem::take(&mut state.read);
        drop(state);
        // Not joined: it has nothing left to do but see the queue closed
        // and end, which the frozen tree need not wait for.
        self.helper = None;
        read.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Other("internal: a member not read".into()))))
            .collect()
    }
}

impl Drop for AsFrozen {
    fn drop(&mut self) {
        // A failed freeze: nothing handed over is wanted now, and the
        // helper ends once it sees that. It is raised but not joined: one
        // that idled itself just after the raise would keep this thread
        // waiting as long as the scheduler keeps it from a core. After
        // `collect` (which closed and raised) there is nothing to do: the
        // helper may be gone already.
        {
            let mut state = self.shared.lock_urgently();
            if !state.closed {
                state.closed = true;
                state.waiting.clear();
                self.shared.raise_helper();
            }
        }
        self.shared.changed.notify_all();
        self.helper = None;
    }
}

/// Thread `tid` (our helper) runs only where a core would be idle
/// (`SCHED_IDLE`), whether it took it: while the tree is being frozen,
/// each process stops only once it runs (to take our interrupt), and a
/// helper that kept a core from it delayed the last stop of a tree of 8 by
/// ~1 ms. Only with CAP_SYS_NICE (`may_raise_priority`): without it a
/// thread cannot leave `SCHED_IDLE` again (at the default RLIMIT_NICE),
/// and the dump would wait for a member its starved helper is reading.
/// On a loaded machine an idle thread may not run for seconds: the dump's
/// thread raises it (`Shared::raise_helper`) before it ever waits for it.
fn run_as_if_idle(tid: i32) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread with a valid
    // sched_param; failure leaves its policy as it was.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "helper left at its priority");
    }
    r == 0
}

/// Whether chpox holds CAP_SYS_NICE (bit 23 of `CapEff`), asked once:
/// chpox never changes its own capabilities, and the answer is wanted on
/// the way to each freeze.
fn may_raise_priority() -> bool {
    static HELD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HELD.get_or_init(holds_cap_sys_nice)
}

fn holds_cap_sys_nice() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_back_in_the_order_they_froze_whoever_read_them() {
        let me = std::process::id() as i32;
        let reads = AsFrozen::start(None, false);
        for _ in 0..5 {
            reads.frozen(me);
        }
        let read = reads.collect(5).expect("collected");
        assert_eq!(read.len(), 5);
        for e in &read {
            assert_eq!(e.info.pid, me);
            assert!(e.texts.maps.contains("[stack]"), "{}", e.texts.maps);
            assert!(e.kernel.is_none());
        }
    }

    #[test]
    fn root_may_raise_a_threads_priority_again() {
        // The tests run as root (see README), which holds CAP_SYS_NICE.
        assert_eq!(may_raise_priority(), nix::unistd::geteuid().is_root());
    }

    fn policy(tid: i32) -> i32 {
        // SAFETY: a query of one of our own threads' policy.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// The helper idles itself while the freeze goes on; a failed freeze
    /// (the dump gives up) raises it and does not wait for it: a helper
    /// that never ran again beside busy cores once kept a dump waiting
    /// for good.
    #[test]
    fn a_helper_idles_until_a_failed_freeze_raises_it_and_goes_on() {
        let reads = AsFrozen::start(None, false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let idled = |tid: i32| !may_raise_priority() || policy(tid) == libc::SCHED_IDLE;
        loop {
            let tid = reads.shared.helper_tid.load(Ordering::Acquire);
            if tid != 0 && idled(tid) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "helper never idled");
            std::thread::yield_now();
        }
        reads.frozen(std::process::id() as i32);
        let shared = Arc::clone(&reads.shared);
        drop(reads);
        let state = lock(&shared.state);
        assert!(state.closed && state.waiting.is_empty());
    }

    /// A helper at idle priority, or one that first ran only after the
    /// freeze was over (never idled, at the priority the dump had before
    /// its boost), is raised alike.
    #[test]
    fn a_helper_is_raised_to_the_normal_policy_and_the_dumps_priority() {
        if !may_raise_priority() {
            return;
        }
        for idle_first in [true, false] {
            let parked = crate::testing::ParkedThread::start();
            let tid = parked.tid;
            if idle_first {
                assert!(run_as_if_idle(tid));
                assert_eq!(policy(tid), libc::SCHED_IDLE);
            }
            let shared = Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                kernel: None,
                helper_tid: AtomicI32::new(tid),
                hold_when_idled: std::time::Duration::ZERO,
            };
            shared.raise_helper();
            assert_eq!(policy(tid), libc::SCHED_OTHER);
            // SAFETY: a query of one of our own threads' nice value.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
            assert_eq!(nice, -20);
            drop(parked);
        }
    }

    /// The helper idles itself beside cores kept busy by others, as on
    /// CI or a shared lab's machine: the dump's thread must never wait on
    /// it for long. A helper preempted at idle priority while it held the
    /// state's lock kept a dump waiting for over 10 s on CI; here the
    /// helper, once idled, holds the lock for 20 ms of CPU time, on one
    /// core with 16 threads spinning at normal priority (at idle weight
    /// that takes it minutes); the dump's thread runs on any core.
    #[test]
    fn a_helper_idled_beside_busy_cores_never_keeps_the_dump_waiting() {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        if !may_raise_priority() {
            return;
        }
        let Ok(all) = sched_getaffinity(Pid::from_raw(0)) else {
            return;
        };
        let Some(busy) = (0..CpuSet::count())
            .rev()
            .find(|&c| all.is_set(c).unwrap_or(false))
        else {
            return;
        };
        let mut one = CpuSet::new();
        one.set(busy).expect("a CPU in range");
        let stop = Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..16)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let _ = sched_setaffinity(Pid::from_raw(0), &one);
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let (done, rounds) = std::sync::mpsc::channel();
        let me = std::process::id() as i32;
        std::thread::spawn(move || {
            for _ in 0..5 {
                // The helper is born on the busy core (it inherits this
                // thread's affinity); this thread then leaves it.
                let _ = sched_setaffinity(Pid::from_raw(0), &one);
                let reads = AsFrozen::start_holding(None, false, Duration::from_millis(20));
                let _ = sched_setaffinity(Pid::from_raw(0), &all);
                // A freeze begins some time after the start: the helper
                // has idled itself by then.
                std::thread::sleep(Duration::from_millis(50));
                reads.frozen(me);
                if done.send(reads.collect(1).is_ok()).is_err() {
                    return;
                }
            }
        });
        let outcome =
            (0..5).try_for_each(|round| match rounds.recv_timeout(Duration::from_secs(5)) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("round {round}: the early read failed")),
                Err(_) => Err(format!(
                    "round {round}: the dump waited 5 s for its idle helper"
                )),
            });
        stop.store(true, Ordering::Relaxed);
        for spinner in spinners {
            let _ = spinner.join();
        }
        if let Err(e) = outcome {
            panic!("{e}");
        }
    }

    #[test]
    fn a_count_that_differs_from_the_freeze_is_refused() {
        let reads = AsFrozen::start(None, false);
        reads.frozen(std::process::id() as i32);
        assert!(reads.collect(2).is_err());
    }

    #[test]
    fn a_process_gone_is_an_error_in_its_place() {
        let reads = AsFrozen::start(None, false);
        reads.frozen(std::process::id() as i32);
        // PIDs above pid_max are never a process.
        reads.frozen(i32::MAX);
        assert!(reads.collect(2).is_err());
    }
}
