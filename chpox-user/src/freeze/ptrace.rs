//! Freezing a process with ptrace. The requests that read and write a
//! stopped thread's state are in `thread_state` (re-exported here).
//!
//! We seize (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`) rather than send SIGSTOP: a
//! job-control stop is visible to the target's parent shell, a ptrace
//! interrupt is not. If the tracer dies, the kernel detaches every tracee and
//! it runs on.
//!
//! ptrace binds a tracee to the *thread* that attached it: every call for a
//! `Frozen` process must come from the thread that froze it. `Frozen` is
//! therefore `!Send`.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{debug, warn};

pub use super::thread_state::*;
use crate::error::{Error, Result};

/// The stops a thread can report while we hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `PTRACE_EVENT_STOP`: our interrupt, or a group-stop.
    Event,
    /// A syscall entry or exit (with `PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// Signal-delivery-stop for this signal.
    Signal(Signal),
    /// The thread (or the whole process) is gone.
    Exited,
}

/// Seize thread `tid` of `pid`. A thread under a seccomp filter is seized
/// with PTRACE_O_SUSPEND_SECCOMP where we may (it takes CAP_SYS_ADMIN):
/// the syscalls a dump runs in it are then not judged by its filters, one
/// of which could kill it for a syscall it never makes itself. Without the
/// privilege, it is seized as any other thread.
fn seize_thread(tid: i32) -> nix::Result<()> {
    let options = ptrace::Options::PTRACE_O_TRACESYSGOOD;
    // Seccomp suspended, so that a filter cannot refuse our remote calls:
    // asked of every thread rather than only those /proc/PID/task/TID/status
    // shows filtered (that read cost 15 µs per thread while freezing), as it
    // changes nothing for a thread without seccomp. Refused (EPERM) without
    // CAP_SYS_ADMIN, or to a tracer under seccomp itself: then as before.
    let suspend = ptrace::Options::from_bits_retain(libc::PTRACE_O_SUSPEND_SECCOMP);
    match ptrace::seize(Pid::from_raw(tid), options | suspend) {
        Err(Errno::EPERM) => {}
        other => return other,
    }
    ptrace::seize(Pid::from_raw(tid), options)
}

/// How long [`wait_traced`] keeps asking before it starts to sleep: a
/// remote syscall or an interrupt stops its thread within microseconds.
const WAIT_SPIN: Duration = Duration::from_micros(300);

/// `waitpid(tid, __WALL)` that cannot hang on a process killed meanwhile.
///
/// SIGKILL wakes every thread out of its ptrace stop, and each dies. A
/// thread-group leader's death is reported only once its other threads
/// are reaped, and as their tracer we are the ones who must reap them: a
/// plain blocking `waitpid` on the leader would wait forever (seen: a dump
/// of a multi-threaded process killed during a remote syscall). So: ask
/// without blocking, spin briefly, then poll; while polling, a thread
/// found dead makes us reap the other threads of its group.
pub fn wait_traced(tid: i32) -> nix::Result<WaitStatus> {
    let pid = Pid::from_raw(tid);
    let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        match waitpid(pid, Some(flags)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            other => return other,
        }
        if start.elapsed() < WAIT_SPIN {
            std::thread::yield_now();
            continue;
        }
        if thread_is_dead(tid) {
            reap_siblings(tid);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// The thread is a zombie, or gone.
pub(crate) fn thread_is_dead(tid: i32) -> bool {
    match crate::error::read_proc(&format!("/proc/{tid}/stat")) {
        // The state follows the parenthesised name, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| matches!(state, 'Z' | 'X')),
        Err(_) => true,
    }
}

/// The process is dead or on its way out: gone, a zombie, past the start
/// of its exit (`PF_EXITING` in its stat flags) or with a SIGKILL pending.
/// A killed tracee answers ESRCH to ptrace before its state says so.
pub(crate) fn process_is_exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Ok(stat) = crate::error::read_proc(&format!("/proc/{pid}/stat")) else {
        return true;
    };
    // Fields after the parenthesised name (which may hold spaces): state,
    // ppid, pgrp, session, tty_nr, tpgid, flags.
    let mut fields = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace())
        .into_iter()
        .flatten();
    let state = fields.next().and_then(|s| s.chars().next());
    let flags = fields.nth(5).and_then(|f| f.parse::<u64>().ok());
    if state.is_none_or(|s| matches!(s, 'Z' | 'X')) || flags.is_some_and(|f| f & PF_EXITING != 0) {
        return true;
    }
    let Ok(status) = crate::error::read_proc(&format!("/proc/{pid}/status")) else {
        return true;
    };
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .any(|pending| pending & SIGKILL_BIT != 0)
}

/// Reap the dead threads of `tid`'s group that we trace, so the kernel can
/// report the group's end. Threads we do not trace answer ECHILD.
fn reap_siblings(tid: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{tid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(other) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if other != tid && thread_is_dead(other) {
            let _ = waitpid(
                Pid::from_raw(other),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Wait for the next stop of one traced thread.
pub fn wait_stop(tid: i32) -> Result<Stop> {
    loop {
        match wait_traced(tid) {
            Ok(WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP)) => return Ok(Stop::Event),
            Ok(WaitStatus::PtraceEvent(_, _, event)) => {
                debug!(tid, event, "ignoring ptrace event");
                ptrace::cont(Pid::from_raw(tid), None).map_err(|source| Error::Ptrace {
                    op: "cont",
                    tid,
                    source,
                })?;
            }
            Ok(WaitStatus::PtraceSyscall(_)) => return Ok(Stop::Syscall),
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Signal(sig)),
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(Stop::Exited),
            Ok(WaitStatus::Continued(_) | WaitStatus::StillAlive) => continue,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return Ok(Stop::Exited),
            Err(source) => {
                return Err(Error::Ptrace {
                    op: "waitpid",
                    tid,
                    source,
                });
            }
        }
    }
}

/// A process with every thread held in a ptrace stop.
///
/// Dropping it releases every thread, so an error anywhere in a dump leaves
/// the target running as it was.
pub struct Frozen {
    pid: i32,
    /// Threads we hold, by tid.
    tids: Vec<i32>,
    /// The process was in a job-control stop before we came; it must be in
    /// one again when we leave.
    was_stopped: bool,
    /// It was in that stop when we seized it, so the kernel puts it back
    /// into it when we detach (the group stop stays in effect until a
    /// SIGCONT): a SIGSTOP of ours would stay pending, and the next freeze
    /// would meet it in the middle of a remote syscall.
    in_group_stop: bool,
    released: bool,
    /// CLOCK_MONOTONIC (ns) when the last of its threads stopped: the
    /// moment the process was frozen (the re-listing of its threads that
    /// finds nobody new comes after).
    stopped_at_ns: u64,
    _not_send: PhantomData<*const ()>,
    /// Declared last so it is dropped after `Drop::drop` released the
    /// process.
    _signals: HoldTerminalSignals,
}

/// Holds back, in the calling thread, the signals a user sends to stop a
/// program (Ctrl-C, Ctrl-\\, Ctrl-Z, SIGTERM, SIGHUP) while it holds a process
/// frozen. Dying or stopping mid-remote-syscall would leave the target with
/// our borrowed registers; held back, the signal takes effect the moment
/// the target is released. (SIGKILL cannot be held back; ptrace then
/// detaches the target itself.)
struct HoldTerminalSignals {
    previous: Option<nix::sys::signal::SigSet>,
}

/// The signals [`HoldTerminalSignals`] holds back.
fn terminal_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGTSTP,
    ] {
        set.add(sig);
    }
    set
}

impl HoldTerminalSignals {
    fn new() -> Self {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        let mut previous = SigSet::empty();
        let ok = pthread_sigmask(
            SigmaskHow::SIG_BLOCK,
            Some(&terminal_signals()),
            Some(&mut previous),
        )
        .is_ok();
        HoldTerminalSignals {
            previous: ok.then_some(previous),
        }
    }
}

/// Start helper threads that may outlive the start of a freeze (hashing
/// files, reading /proc beside it): `spawn` runs with the terminal signals
/// held back in the calling thread, so the threads it starts block them
/// from their first instruction, for good. A signal sent to the process
/// goes to a thread that does not block it; taken by such a helper while
/// the freezing thread holds it back, a Ctrl-C would end chpox with the
/// target frozen mid-remote-call. (Blocking them in the new thread itself
/// left a window: a thread not scheduled yet when the freeze began.)
pub fn spawn_leaving_terminal_signals_to_the_freezer<T>(spawn: impl FnOnce() -> T) -> T {
    let _held = HoldTerminalSignals::new();
    spawn()
}

impl Drop for HoldTerminalSignals {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&previous),
                None,
            );
        }
    }
}

pub(crate) fn list_threads(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    if let Some(names) = crate::process::heldfiles::list(&path) {
        let mut tids: Vec<i32> = names.iter().filter_map(|n| n.parse().ok()).collect();
        tids.sort_unstable();
        return Ok(tids);
    }
    let entries = std::fs::read_dir(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::Exited(pid)
        } else {
            Error::Proc {
                path: path.clone(),
                source,
            }
        }
    })?;
    let mut tids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

fn tracer_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&t| t != 0)
}

/// A process whose threads are seized and asked to stop (see
/// [`Frozen::begin_freeze`]); [`finish`](Self::finish) waits for them.
/// Dropped unfinished, its threads are let go as a `Frozen`'s are.
pub struct Freezing {
    frozen: Frozen,
    held: BTreeMap<i32, ()>,
    dead: std::collections::BTreeSet<i32>,
    /// Seized and interrupted, not waited for yet.
    waiting: Vec<i32>,
}

impl Freezing {
    pub fn pid(&self) -> i32 {
        self.frozen.pid
    }

    /// Seize and interrupt the threads of the process not held yet (nor
    /// seen dying); returns them.
    fn seize_new(&mut self) -> Result<Vec<i32>> {
        let pid = self.frozen.pid;
        let current = list_threads(pid)?;
        let new: Vec<i32> = current
            .into_iter()
            .filter(|t| !self.held.contains_key(t) && !self.dead.contains(t))
            .collect();
        for &tid in &new {
            match seize_thread(tid) {
                Ok(()) => {}
                // The thread exited between listing and seizing.
                Err(Errno::ESRCH) => continue,
                // The kernel refuses to attach to a thread that is
                // exiting with EPERM too: that is an exit, not a
                // permission problem. The leader's exit ends the
                // dump; another thread's is skipped (it may linger
                // in the list until its group reaps it).
                Err(Errno::EPERM) if thread_is_dead(tid) => {
                    if tid == pid {
                        return Err(Error::Exited(pid));
                    }
                    self.dead.insert(tid);
                    continue;
                }
                Err(Errno::EPERM) => {
                    if let Some(tracer) = tracer_of(pid) {
                        return Err(Error::AlreadyTraced { pid, tracer });
                    }
                    return Err(Error::PermissionDenied {
                        pid,
                        hint: if nix::unistd::geteuid().is_root() {
                            ""
                        } else {
                            "; run as root (sudo) or dump a process you own"
                        },
                    });
                }
                Err(source) => {
                    return Err(Error::Ptrace {
                        op: "seize",
                        tid,
                        source,
                    });
                }
            }
            self.frozen.tids.push(tid);
            self.held.insert(tid, ());
            match ptrace::interrupt(Pid::from_raw(tid)) {
                // Exited after the seize; the wait below sees it go.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => {
                    return Err(Error::Ptrace {
                        op: "interrupt",
                        tid,
                        source,
                    });
                }
            }
        }
        Ok(new
            .into_iter()
            .filter(|t| self.held.contains_key(t))
            .collect())
    }

    /// Wait until every thread seized is stopped, seizing the threads
    /// they cloned meanwhile, until no new one appears.
    pub fn finish(mut self) -> Result<Frozen> {
        let pid = self.frozen.pid;
        while !self.waiting.is_empty() {
            for tid in std::mem::take(&mut self.waiting) {
                self.frozen.wait_for_interrupt(tid)?;
            }
            self.frozen.stopped_at_ns = crate::process::monotonic_ns();
            let held = &self.held;
            self.frozen.tids.retain(|t| held.contains_key(t));
            self.waiting = self.seize_new()?;
        }
        if !self.frozen.tids.contains(&pid) {
            return Err(Error::Exited(pid));
        }
        self.frozen.tids.sort_unstable();
        let was_stopped = self.frozen.was_stopped;
        debug!(pid, threads = self.frozen.tids.len(), was_stopped, "frozen");
        Ok(self.frozen)
    }
}

impl Frozen {
    /// Seize and stop every thread of `pid`, re-reading the thread list until
    /// no new thread appears: a thread we have not stopped yet may be
    /// cloning another one, and a stopped thread cannot.
    pub fn freeze(pid: i32) -> Result<Frozen> {
        Frozen::begin_freeze(pid)?.finish()
    }

    /// The first half of [`freeze`](Self::freeze): every thread of `pid`
    /// seized and asked to stop, nobody waited for yet. A tree begins the
    /// freeze of all the children it found before waiting for any, so that
    /// their stops overlap ([`Freezing::finish`]).
    pub fn begin_freeze(pid: i32) -> Result<Freezing> {
        let was_stopped = process_state(pid)? == 'T';
        let mut freezing = Freezing {
            frozen: Frozen {
                pid,
                tids: Vec::new(),
                was_stopped,
                in_group_stop: was_stopped,
                released: false,
                stopped_at_ns: 0,
                _not_send: PhantomData,
                _signals: HoldTerminalSignals::new(),
            },
            held: BTreeMap::new(),
            dead: Default::default(),
            waiting: Vec::new(),
        };
        freezing.waiting = freezing.seize_new()?;
        Ok(freezing)
    }

    /// Wait until `tid` sits in the stop our interrupt asked for. A signal
    /// that reaches the thread first is delivered as it would have been
    /// without us; the interrupt stop follows.
    fn wait_for_interrupt(&mut self, tid: i32) -> Result<()> {
        loop {
            match wait_stop(tid)? {
                Stop::Event => return Ok(()),
                Stop::Syscall => {
                    ptrace::cont(Pid::from_raw(tid), None).map_err(|source| Error::Ptrace {
                        op: "cont",
                        tid,
                        source,
                    })?;
                }
                Stop::Signal(sig) => {
                    debug!(tid, ?sig, "passing signal through while freezing");
                    ptrace::cont(Pid::from_raw(tid), Some(sig)).map_err(|source| {
                        Error::Ptrace {
                            op: "cont",
                            tid,
                            source,
                        }
                    })?;
                }
                Stop::Exited => {
                    if tid == self.pid {
                        return Err(Error::Exited(self.pid));
                    }
                    self.tids.retain(|&t| t != tid);
                    return Ok(());
                }
            }
        }
    }

    /// Take charge of threads the caller already holds in a ptrace stop
    /// (seized and interrupted by this thread), e.g. a process the
    /// restorer created itself. The result behaves like a `freeze` result:
    /// `resume` detaches, `kill` kills, dropping it detaches.
    pub fn adopt(pid: i32, tids: Vec<i32>) -> Frozen {
        Frozen {
            pid,
            tids,
            was_stopped: false,
            in_group_stop: false,
            released: false,
            stopped_at_ns: 0,
            _not_send: PhantomData,
            _signals: HoldTerminalSignals::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// CLOCK_MONOTONIC (ns) when the last of its threads stopped (0 for a
    /// hold taken over with [`Frozen::adopt`]).
    pub fn stopped_at_ns(&self) -> u64 {
        self.stopped_at_ns
    }

    /// Take over the hold on threads seized by the caller (a restore's new
    /// threads), to be released or killed with the rest. They go before
    /// the leader, which is released last.
    pub fn add_tids(&mut self, tids: &[i32]) {
        self.tids.splice(0..0, tids.iter().copied());
    }

    /// Thread ids, leader first.
    pub fn tids(&self) -> Vec<i32> {
        let mut tids = self.tids.clone();
        tids.sort_by_key(|&t| (t != self.pid, t));
        tids
    }

    pub fn was_stopped(&self) -> bool {
        self.was_stopped
    }

    /// Leave the process in a job-control stop when it is released, as it
    /// was when checkpointed.
    pub fn stop_on_release(&mut self) {
        self.was_stopped = true;
    }

    /// Let every thread run on from where it was.
    pub fn resume(mut self) {
        self.release(false);
    }

    /// Leave the process in a job-control stop (as if by SIGSTOP), for a
    /// debugger or a later `kill -CONT`.
    pub fn leave_stopped(mut self) {
        self.release(true);
    }

    /// Kill the process, and reap our ptrace hold on each thread.
    pub fn kill(self) {
        collect_killed(&self.kill_nowait());
    }

    /// Kill the process without waiting for it to go (freeing a large
    /// address space takes a while): its threads, to be collected with
    /// [`collect_killed`] by any thread of ours, or by the kernel when we
    /// exit. It never runs again: SIGKILL ends a tracee's stop in death.
    pub fn kill_nowait(mut self) -> Vec<i32> {
        self.released = true;
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        // The kernel reports the leader's exit only once every other thread
        // is reaped, so the leader comes last.
        let mut order = self.tids.clone();
        order.sort_by_key(|&t| t == self.pid);
        order
    }
}

/// Reap our ptrace hold on each killed thread of `tids` (leader last, as
/// [`Frozen::kill_nowait`] gives them).
pub fn collect_killed(tids: &[i32]) {
    for &tid in tids {
        // A SIGKILLed tracee leaves its stop at once; waiting lets the
        // kernel release the thread instead of holding it for us.
        while !matches!(wait_stop(tid), Ok(Stop::Exited) | Err(_)) {
            let _ = ptrace::cont(Pid::from_raw(tid), None);
        }
    }
}

impl Frozen {
    fn release(&mut self, stopped: bool) {
        if self.released {
            return;
        }
        self.released = true;
        if (stopped || self.was_stopped) && !self.in_group_stop {
            // Queued before detaching, so the process stops as soon as the
            // first thread runs, and the parent sees an ordinary stop.
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGSTOP);
        }
        for &tid in &self.tids {
            match ptrace::detach(Pid::from_raw(tid), None) {
                Ok(()) => {}
                // A live thread answers ESRCH when it is seized but not in
                // a stop yet: an error cut the freeze short between its
                // interrupt and the wait (another tracer took a thread
                // meanwhile). It would stop for a tracer that never looks
                // again, and stay stopped: take its stop, then let it go.
                Err(Errno::ESRCH) if !thread_is_dead(tid) => detach_once_stopped(tid),
                // ESRCH: the thread died (e.g. SIGKILL from someone else).
                Err(Errno::ESRCH) => {}
                Err(e) => warn!(tid, error = %e, "detach failed"),
            }
        }
        if stopped || self.was_stopped {
            self.wait_until_stopped();
        }
    }

    /// The queued SIGSTOP takes effect only once a thread runs, a moment
    /// after the detach; waiting for it means whoever looks right after we
    /// return (a job-control shell, `chpox restore`'s caller) sees the
    /// process stopped, as it was, and not briefly running.
    fn wait_until_stopped(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match process_state(self.pid) {
                Ok('T' | 'Z' | 'X') | Err(_) => return,
                Ok(_) if std::time::Instant::now() >= deadline => {
                    warn!(pid = self.pid, "the process has not stopped yet");
                    return;
                }
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// Detach `tid`, seized and interrupted but perhaps not stopped yet, once
/// it stops; a signal it stopped to receive is delivered.
fn detach_once_stopped(tid: i32) {
    let signal = match wait_stop(tid) {
        Ok(Stop::Signal(sig)) => Some(sig),
        Ok(Stop::Event | Stop::Syscall) => None,
        Ok(Stop::Exited) => return,
        Err(e) => {
            warn!(tid, error = %e, "detach failed: the thread did not stop");
            return;
        }
    };
    if let Err(e) = ptrace::detach(Pid::from_raw(tid), signal)
        && e != Errno::ESRCH
    {
        warn!(tid, error = %e, "detach failed");
    }
}

/// The one-letter state from /proc/PID/stat (R, S, D, T, t, Z, X, I).
pub fn process_state(pid: i32) -> Result<char> {
    let path = format!("/proc/{pid}/stat");
    let stat = crate::error::read_proc(&path).map_err(|e| match e {
        Error::Proc { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::NoSuchProcess(pid)
        }
        other => other,
    })?;
    // The command name may contain spaces and parentheses; the state is the
    // first field after the *last* ')'.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .and_then(|s| s.chars().next())
        .ok_or_else(|| crate::error::parse_err(&path, "no state field"))
}
