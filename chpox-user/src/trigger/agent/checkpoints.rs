//! From a trigger to an image: the events of the eBPF program, the
//! checkpoints they ask for, and what a full ring buffer made us miss.

use std::sync::atomic::Ordering;

use super::*;

impl Agent {
    /// Send `pid` its trigger signal, as a user would, and return where
    /// the answer of the checkpoint it starts will come.
    pub(super) fn begin_checkpoint(
        &self,
        caller: Caller,
        pid: i32,
    ) -> Result<oneshot::Receiver<Outcome>, String> {
        let (tx, rx) = oneshot::channel();
        let signal = {
            let mut state = self.lock();
            let Some(entry) = state.entries.get(&pid) else {
                return Err(format!(
                    "PID {pid} is not registered; `chpox register {pid}` first"
                ));
            };
            if caller.uid != 0 && caller.uid != entry.uid {
                return Err(format!(
                    "permission denied: PID {pid} belongs to uid {}",
                    entry.uid
                ));
            }
            let signal = entry.signal;
            // A checkpoint already running began before this request.
            let first_acceptable = entry.started + 1;
            let waiting = state.waiters.entry(pid).or_default();
            // Callers that gave up (timed out, went away) wait no more.
            waiting.retain(|(_, w)| !w.is_closed());
            waiting.push((first_acceptable, tx));
            signal
        };
        // The same signal a user would send: the whole path is exercised.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::try_from(signal as i32).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("cannot signal PID {pid}: {e}"))?;
        Ok(rx)
    }

    /// Write the checkpoint(s) an event asked for. Blocking.
    pub(super) fn run_checkpoints(&self, event: Event) {
        let pid = event.tgid as i32;

        // Who asked, for an operator wondering where a checkpoint came from.
        debug!(
            pid,
            target = event.target_pid,
            signal = event.signal,
            si_code = event.code,
            result = event.result,
            sender_pid = event.sender_tgid,
            sender_tid = event.sender_pid,
            sender_uid = event.sender_uid,
            since_signal_us = monotonic_ns().saturating_sub(event.timestamp_ns) / 1000,
            "checkpoint requested"
        );
        let Some(entry) = self.lock().entries.get(&pid).cloned() else {
            // Unregistered meanwhile: nothing to do but free the state.
            self.states
                .transition(event.slot, STATE_REQUESTED, STATE_IDLE);
            return;
        };
        if !self
            .states
            .transition(entry.slot, STATE_REQUESTED, STATE_RUNNING)
        {
            warn!(
                pid,
                "checkpoint event for a registration that is not requested"
            );
            return;
        }
        // Whether the timer asked for the checkpoint about to start.
        let mut by_timer = event.result == RESULT_TIMER;
        // The request each checkpoint answers: for one more after the
        // first, asked for while it ran, with the time it was asked.
        let mut event = event;
        loop {
            let number = {
                let mut state = self.lock();
                match state.entries.get_mut(&pid) {
                    Some(e) => {
                        e.started += 1;
                        if by_timer {
                            e.timer_checkpoints += 1;
                        }
                        e.started
                    }
                    None => 0,
                }
            };
            let outcome = self.checkpoint_once(&entry, &event, number);
            {
                let mut state = self.lock();
                if let Some(e) = state.entries.get_mut(&pid) {
                    match &outcome {
                        Ok(written) => {
                            e.checkpoints += 1;
                            e.last_checkpoint = Some(unix_now());
                            e.last_error = None;
                            e.logged_error = None;
                            e.children_not_saved = written.children_not_saved.clone();
                            // Once per registration: the same children are
                            // left out of every checkpoint it takes.
                            if !e.children_not_saved.is_empty() && !e.warned_children {
                                e.warned_children = true;
                                warn!(
                                    pid,
                                    comm = %e.comm,
                                    flags = e.flags,
                                    children = ?e.children_not_saved,
                                    "children not in the checkpoint: registered without FLAGS 8, the process is saved alone"
                                );
                            }
                        }
                        Err(msg) => {
                            // Said once per reason: a registration whose
                            // checkpoints fail for the same reason every
                            // interval does not fill the log.
                            if e.logged_error.as_ref() != Some(msg) {
                                e.logged_error = Some(msg.clone());
                                if let Some(held) =
                                    self.log_limit.allow(&format!("checkpoint failed {pid}"))
                                {
                                    error!(pid, comm = %e.comm, error = %msg, suppressed = held, "checkpoint failed; the previous image stays");
                                }
                            }
                            e.last_error = Some(msg.clone());
                        }
                    }
                }
                let outcome = outcome.map(|written| (written, number));
                let waiting = state.waiters.remove(&pid).unwrap_or_default();
                let (answered, still): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(|(first, _)| *first <= number);
                for (_, w) in answered {
                    let _ = w.send(outcome.clone());
                }
                if !still.is_empty() {
                    state.waiters.insert(pid, still);
                }
            }
            // Under the lock, so that the timer's "one more" (it sets
            // `timer_again` with its transition, under the lock too) is
            // read with the transition it goes with.
            let mut state = self.lock();
            if self
                .states
                .transition(entry.slot, STATE_RUNNING, STATE_IDLE)
            {
                if let Some(e) = state.entries.get_mut(&pid) {
                    e.timer_again = false;
                }
                return;
            }
            // A trigger came while we were writing: one more, as asked.
            if !self
                .states
                .transition(entry.slot, STATE_RUNNING_AGAIN, STATE_RUNNING)
            {
                return;
            }
            by_timer = state
                .entries
                .get_mut(&pid)
                .is_some_and(|e| std::mem::take(&mut e.timer_again));
            let asked_at = self.states.load(entry.slot).again_ns;
            if asked_at != 0 {
                event.timestamp_ns = asked_at;
            }
        }
    }

    /// Learn the flag patterns of `pids` on a thread of its own while they
    /// run (`KernelVmaFlags::learn_while_running`): a freeze that meets a
    /// pattern not known reads smaps while frozen, a page walk of ~17 ms
    /// per GiB. At most one such thread at a time; a request while it
    /// runs is dropped (the next checkpoint asks again).
    pub(super) fn learn_flags_soon(&self, pids: Vec<i32>) {
        let Some(flags) = self.vma_flags.clone() else {
            return;
        };
        if self.learning_flags.swap(true, Ordering::AcqRel) {
            return;
        }
        let busy = Arc::clone(&self.learning_flags);
        let spawned = std::thread::Builder::new()
            .name("learn-flags".into())
            .spawn(move || {
                for pid in pids {
                    flags.learn_while_running(pid);
                }
                busy.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.learning_flags.store(false, Ordering::Release);
        }
    }

    /// Write checkpoint number `generation` (counting since registration).
    pub(super) fn checkpoint_once(
        &self,
        entry: &Entry,
        event: &Event,
        generation: u64,
    ) -> Result<Written, String> {
        let pid = entry.pid;
        let mut opts = DumpOptions::new(&entry.output);
        // The signal or the timer chose the instant: stop first.
        opts.freeze_first = true;
        opts.vma_flags = self.vma_flags.clone();
        opts.kernel_state = self.kernel_state.clone();
        // Checked by the dump once the process is frozen: a recycled PID
        // is refused, not checkpointed.
        opts.expect_start_time = Some(entry.start_time);
        opts.keep_previous = entry.keep.unwrap_or(self.config.keep);
        opts.registration = Some(SavedRegistration {
            signal: entry.signal,
            flags: entry.flags,
            every_ms: entry.every_ms,
            keep: entry.keep,
            unsupported_fd_null: entry.unsupported_fd_null,
        });
        if entry.as_owner {
            // The dump checks, once the tree is frozen, that this user may
            // trace every process of it.
            opts.as_user = Some(entry.owner_creds()?);
        }
        opts.embed_exe = entry.flags & flags::EMBED_EXE != 0;
        opts.children = entry.flags & flags::INCLUDE_CHILDREN != 0;
        if opts.children {
            let tree = Arc::clone(&self.tree);
            opts.member_hint = Some(crate::tree::MemberHint(Arc::new(move |root| {
                tree.members_of(root)
            })));
        }
        opts.tcp = crate::fds::inet::TcpPolicy::from_flags(entry.flags);
        if entry.flags & flags::EMBED_LIBS != 0 {
            opts.embed_libs = self
                .lock()
                .libs
                .get(&entry.uid)
                .cloned()
                .unwrap_or_default();
        }
        // A checkpoint that cannot bring back what it saw fails, by name,
        // and the previous image stays, unless the registration chose
        // /dev/null for descriptors chpox cannot restore.
        opts.unsupported_fd = if entry.unsupported_fd_null {
            crate::fds::UnsupportedFd::Null
        } else {
            crate::fds::UnsupportedFd::Fail
        };
        // The registration's write tracking, taken out while the dump runs
        // (one checkpoint of a registration runs at a time) and put back
        // after, unless the registration went meanwhile.
        let full_every = entry.full_every.unwrap_or(self.config.full_every);
        let mut tracking = match self.lock().tracking.remove(&pid) {
            Some((start, t)) if start == entry.start_time => t,
            _ => crate::incremental::Tracking::new(full_every),
        };
        tracking.full_every = full_every;
        let result = crate::dump::dump_tracked(pid, &opts, &mut tracking);
        {
            let mut state = self.lock();
            if state
                .entries
                .get(&pid)
                .is_some_and(|e| e.start_time == entry.start_time)
            {
                state.tracking.insert(pid, (entry.start_time, tracking));
            }
        }
        match result {
            Ok(report) => {
                // Its write tracking (attached by a full checkpoint) gives
                // its mappings new flag patterns: learned now, not at the
                // next freeze (one read of the bits when none is new).
                let mut pids = vec![pid];
                if opts.children {
                    pids.extend(self.tree.members_of(pid));
                }
                self.learn_flags_soon(pids);
                let latency_ns = report
                    .frozen_at_monotonic_ns
                    .saturating_sub(event.timestamp_ns);
                info!(
                    pid,
                    comm = %report.comm,
                    generation,
                    image = %report.image.display(),
                    processes = report.processes,
                    bytes = report.image_bytes,
                    pages_stored = report.pages_stored,
                    pages_inherited = report.pages_inherited,
                    parent = report.parent.as_ref().map(|p| p.display().to_string()),
                    frozen_us = report.frozen.as_micros() as u64,
                    total_us = report.total.as_micros() as u64,
                    signal_to_frozen_us = latency_ns / 1000,
                    pages_read_before_freeze = report.pages_read_before_freeze,
                    members_from_ebpf = report.members_from_hint,
                    members_from_scan = report.members_from_scan,
                    flags_without_smaps = report.flags_without_smaps,
                    state_from_kernel = report.state_from_kernel,
                    "checkpoint written"
                );
                Ok(Written {
                    image: report.image,
                    bytes: report.image_bytes,
                    signal_to_frozen_us: latency_ns / 1000,
                    frozen_us: report.frozen.as_micros() as u64,
                    processes: report.processes,
                    children_not_saved: report.children_not_saved,
                    snapshots: report.snapshots,
                    pages_read_before_freeze: report.pages_read_before_freeze,
                })
            }
            // Logged by the caller, once per reason; `chpox list` says it
            // every time.
            Err(e) => Err(e.to_string()),
        }
    }

    /// What events may have missed: a request the program could only record
    /// in STATES (ring buffer full), and processes that died without an exit
    /// event. Returns the requests to serve.
    pub(super) fn rescan(&self) -> Vec<Event> {
        let registered: Vec<(i32, u64)> = self
            .lock()
            .entries
            .values()
            .map(|e| (e.pid, e.start_time))
            .collect();
        // /proc is read without the lock.
        let mut gone = Vec::new();
        for (pid, start) in registered {
            match liveness(pid, start) {
                Liveness::Same => {}
                Liveness::Gone => gone.push((pid, start)),
                Liveness::Unknown(e) => {
                    if let Some(held) = self.log_limit.allow("liveness unknown") {
                        warn!(pid, error = %e, suppressed = held, "cannot tell whether a registered process still runs; its registration is kept");
                    }
                }
            }
        }
        let mut state = self.lock();
        // Only the registrations checked: one made meanwhile under a reused
        // PID is another.
        let gone: Vec<i32> = gone
            .into_iter()
            .filter(|(pid, start)| {
                state
                    .entries
                    .get(pid)
                    .is_some_and(|e| e.start_time == *start)
            })
            .map(|(pid, _)| pid)
            .collect();
        let snapshot = (!gone.is_empty()).then(|| self.forget(&mut state, &gone));
        let requested = state
            .entries
            .values()
            .filter(|e| self.states.load(e.slot).state == STATE_REQUESTED)
            .map(|e| Event {
                kind: EVENT_CHECKPOINT,
                tgid: e.pid as u32,
                target_pid: e.pid as u32,
                signal: e.signal,
                slot: e.slot,
                // Unknown: the tracepoint's time was in the lost event.
                timestamp_ns: monotonic_ns(),
                ..Event::default()
            })
            .collect();
        drop(state);
        self.write_snapshot(snapshot.flatten());
        requested
    }

    pub(super) fn forget(&self, state: &mut State, gone: &[i32]) -> Option<Snapshot> {
        for &pid in gone {
            if let Some(entry) = state.release(pid, "the process exited", true) {
                info!(pid, comm = %entry.comm, "registered process is gone");
            }
        }
        self.snapshot(state)
    }

    pub(super) fn on_exit(&self, event: Event) {
        let pid = event.tgid as i32;
        let mut state = self.lock();
        // The eBPF program dropped it from the map already, at the exit.
        if let Some(entry) = state.release(pid, "the process exited", false) {
            let snapshot = self.snapshot(&mut state);
            drop(state);
            self.write_snapshot(snapshot);
            info!(pid, comm = %entry.comm, checkpoints = entry.checkpoints, "registered process exited");
        }
    }
}

/// Catch what a full ring buffer made us miss.
pub(super) async fn rescan_periodically(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let scanning = Arc::clone(&agent);
        let Ok(missed) = tokio::task::spawn_blocking(move || scanning.rescan()).await else {
            continue;
        };
        for event in missed {
            let agent = Arc::clone(&agent);
            tokio::task::spawn_blocking(move || agent.run_checkpoints(event));
        }
    }
}

pub(super) async fn serve_events(agent: Arc<Agent>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    let mut fd = match readable_fd(ring) {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(event) = parse_event(&item) else {
                continue;
            };
            drop(item);
            debug!(
                kind = event.kind,
                pid = event.tgid,
                since_signal_us = monotonic_ns().saturating_sub(event.timestamp_ns) / 1000,
                "event received"
            );
            let agent = Arc::clone(&agent);
            match event.kind {
                EVENT_CHECKPOINT => {
                    if event.result == chpox_common::RESULT_STOPPED_BY_GUARD {
                        // The guard refused the signal because the process
                        // no longer ignores it; once it is ignored again,
                        // `kill` succeeds again. (It waits for the
                        // checkpoint, which holds the process.)
                        let agent = Arc::clone(&agent);
                        tokio::task::spawn_blocking(move || agent.on_disposition(event));
                    }
                    tokio::task::spawn_blocking(move || agent.run_checkpoints(event));
                }
                // It saves the registrations to a file: not on this task.
                EVENT_EXIT => {
                    tokio::task::spawn_blocking(move || agent.on_exit(event));
                }
                EVENT_DISPOSITION => {
                    tokio::task::spawn_blocking(move || agent.on_disposition(event));
                }
                other => warn!(kind = other, "unknown event"),
            }
        }
        guard.clear_ready();
    }
}

/// Register a ring buffer (events or logs) with tokio for readability.
pub(super) fn readable_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is a ring buffer that owns its map's descriptor for
    // as long as it lives, and returns that same descriptor from
    // as_raw_fd() every time; the AsyncFd owns `inner`, so the descriptor
    // outlives the registration.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

pub(super) async fn serve_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(mut fd) = readable_fd(logger) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
