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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::capture::{KernelFields, ProcTexts};
use crate::error::{Error, Result};
use crate::image::model::ProcessInfo;
use crate::process::{self, kernelstate::KernelState};

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
    /// The helper's thread id, once it runs.
    helper_tid: Option<i32>,
    /// The helper is at idle priority (the dump's thread must raise it
    /// again before it waits for it).
    idled: bool,
}

struct Shared {
    state: Mutex<State>,
    /// A member was handed over, read, or the freeze ended.
    changed: Condvar,
    kernel: Option<Arc<KernelState>>,
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
    /// Read the next member waiting, if any; false once none is waiting
    /// (and, with `until_closed`, the freeze is over).
    fn read_next(&self, until_closed: bool) -> bool {
        let job = {
            let mut state = lock(&self.state);
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
        let mut state = lock(&self.state);
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            kernel,
        });
        // A Ctrl-C taken by the helper would end chpox mid-freeze.
        let helper = crate::ptrace::spawn_leaving_terminal_signals_to_the_freezer(|| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("as-frozen".into())
                .spawn(move || {
                    if warm {
                        let _ = read_early(std::process::id() as i32, shared.kernel.as_deref());
                    }
                    {
                        // At idle priority until the freeze is over, set
                        // here, before the freeze, rather than as the
                        // first member is handed over (that cost the
                        // freeze ~60 us). Under the lock, and only while
                        // the freeze goes on: `collect` (or a failed
                        // freeze) closes and raises under the same lock,
                        // so a helper idled after that, starving while it
                        // is joined, cannot be.
                        let mut state = lock(&shared.state);
                        let tid = nix::unistd::gettid().as_raw();
                        state.helper_tid = Some(tid);
                        if !state.closed && may_raise_priority() {
                            state.idled = run_as_if_idle(tid);
                        }
                    }
                    while shared.read_next(true) {}
                })
                .ok()
        });
        AsFrozen { shared, helper }
    }

    /// The next member of the tree (in the tree's order) is frozen.
    pub(super) fn frozen(&self, pid: i32) {
        let mut state = lock(&self.shared.state);
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
            let mut state = lock(&self.shared.state);
            state.closed = true;
            // The freeze is over: the helper reads beside this thread now,
            // as urgently as it.
            raise_helper(&mut state);
            if state.frozen != members {
                return Err(Error::Other(format!(
                    "internal: {} members handed over early, {members} frozen",
                    state.frozen
                )));
            }
        }
        self.shared.changed.notify_all();
        while self.shared.read_next(false) {}
        let mut state = lock(&self.shared.state);
        while state.read.len() < members || state.read.iter().any(Option::is_none) {
            // The helper reads what it took; only a panic there leaves a
            // member unread for good.
            if self.helper.as_ref().is_none_or(JoinHandle::is_finished) {
                return Err(Error::Other("internal: an early read panicked".into()));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let read = std::mem::take(&mut state.read);
        drop(state);
        if let Some(helper) = self.helper.take() {
            let _ = helper.join();
        }
        read.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Other("internal: a member not read".into()))))
            .collect()
    }
}

impl Drop for AsFrozen {
    fn drop(&mut self) {
        // A failed freeze: the helper stops once nothing is waiting.
        {
            let mut state = lock(&self.shared.state);
            state.closed = true;
            raise_helper(&mut state);
        }
        self.shared.changed.notify_all();
        if let Some(helper) = self.helper.take() {
            let _ = helper.join();
        }
    }
}

/// Thread `tid` (our helper) runs only where a core would be idle
/// (`SCHED_IDLE`), whether it took it: while the tree is being frozen,
/// each process stops only once it runs (to take our interrupt), and a
/// helper that kept a core from it delayed the last stop of a tree of 8 by
/// ~1 ms. Only with CAP_SYS_NICE (`may_raise_priority`): without it a
/// thread cannot leave `SCHED_IDLE` again (at the default RLIMIT_NICE),
/// and the dump would wait for a member its starved helper is reading.
/// On a loaded
/// machine an idle thread may not run for seconds: the dump's thread
/// raises it ([`raise_helper`]) before it ever waits for it.
fn run_as_if_idle(tid: i32) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on one of our own threads, alive until it is
    // joined (after `raise_helper`), with a valid sched_param; failure
    // leaves its policy as it was.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "helper left at its priority");
    }
    r == 0
}

/// The helper at the normal policy and the dump's raised priority (see
/// `Boost`), whether it was put at idle priority or ran only once the
/// freeze was over (it was born at the priority the dump had before its
/// `Boost`): the frozen tree waits for what it reads.
fn raise_helper(state: &mut State) {
    let Some(tid) = state.helper_tid.filter(|_| may_raise_priority()) else {
        return;
    };
    state.idled = false;
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on one of our own threads, alive until it is
    // joined, with a valid sched_param; we hold CAP_SYS_NICE (checked),
    // so they succeed.
    unsafe {
        libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20);
    }
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

    /// What a failed freeze on a loaded machine does: the helper was put
    /// at idle priority, every core is busy, and the dump gives up. The
    /// helper must be raised before it is joined (it once was not, and a
    /// dump waited for good on a helper that never ran).
    #[test]
    fn a_helper_put_at_idle_priority_is_raised_before_it_is_joined() {
        let reads = AsFrozen::start(None, false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock(&reads.shared.state).helper_tid.is_none() {
            assert!(std::time::Instant::now() < deadline, "helper never ran");
            std::thread::yield_now();
        }
        reads.frozen(std::process::id() as i32);
        let tid = lock(&reads.shared.state).helper_tid;
        let tid = tid.expect("published");
        let policy = |tid: i32| {
            // SAFETY: a query of one of our own threads' policy.
            unsafe { libc::sched_getscheduler(tid) }
        };
        // The helper waits for more members until the freeze is over.
        if may_raise_priority() {
            assert!(lock(&reads.shared.state).idled);
            assert_eq!(policy(tid), libc::SCHED_IDLE);
        }
        {
            let mut state = lock(&reads.shared.state);
            raise_helper(&mut state);
            assert!(!state.idled);
        }
        assert_eq!(policy(tid), libc::SCHED_OTHER);
        drop(reads);
    }

    /// A helper that first ran only after the freeze was over was never
    /// put at idle priority; it runs at the priority the dump had before
    /// its boost, and is raised all the same.
    #[test]
    fn a_helper_never_idled_is_raised_too() {
        if !may_raise_priority() {
            return;
        }
        let parked = crate::testing::ParkedThread::start();
        let tid = parked.tid;
        let mut state = State {
            helper_tid: Some(tid),
            ..State::default()
        };
        raise_helper(&mut state);
        // SAFETY: a query of one of our own threads' nice value.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        assert_eq!(nice, -20);
        drop(parked);
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
