//! Keeping the trigger signal harmless after registration: a registered
//! process that sets its trigger signal back to SIG_DFL (a `signal(SIGSYS,
//! SIG_DFL)`, or a start-up that resets every signal, as Node.js does) is
//! reported by the eBPF `rt_sigaction` watch, and the agent sets SIG_IGN
//! again. With the BPF LSM guard, `kill` then reports success again (the
//! guard refused it meanwhile); without it, this closes the window in
//! which the signal would kill the process to a few milliseconds.
//!
//! A handler the process installs itself is left alone: it asked for the
//! signal.

use super::*;

/// How long to keep trying while a checkpoint holds the process (ptrace
/// allows one tracer at a time).
const RETRY_FOR: Duration = Duration::from_secs(10);
const RETRY_EVERY: Duration = Duration::from_millis(20);

impl Agent {
    /// The eBPF watch saw `event.tgid` begin an `rt_sigaction` that stops
    /// it ignoring its trigger signal.
    pub(super) fn on_disposition(&self, event: Event) {
        let pid = event.tgid as i32;
        let Some((signal, start)) = ({
            let mut state = self.lock();
            // The event of our own call giving the process its handler
            // back (below): acting on it would give it back again, and so
            // on, freezing the process over and over (a Go program, which
            // handles every signal, was never let go).
            if let Some(n) = state.own_actions.get_mut(&pid)
                && *n > 0
            {
                *n -= 1;
                return;
            }
            state.entries.get(&pid).map(|e| (e.signal, e.start_time))
        }) else {
            return;
        };
        let signo = signal as i32;
        let deadline = Instant::now() + RETRY_FOR;
        // Freezing the process lets its rt_sigaction finish first, so the
        // old action we get back is the one it set.
        let old = loop {
            if start_time(pid) != Some(start) {
                return;
            }
            match signals::set_action(pid, signals::ignore(signo)) {
                Ok(old) => break old,
                Err(e) if Instant::now() < deadline => {
                    debug!(pid, error = %e, "cannot set SIG_IGN yet; retrying");
                    std::thread::sleep(RETRY_EVERY);
                }
                Err(e) => {
                    if let Some(held) = self.log_limit.allow(&format!("reignore {pid}")) {
                        warn!(pid, signal, error = %e, suppressed = held, "the process stopped ignoring its trigger signal and it could not be set back");
                    }
                    return;
                }
            }
        };
        let handler = old.handler;
        if handler == libc::SIG_IGN as u64 {
            return;
        }
        if handler != libc::SIG_DFL as u64 {
            // Its own handler: give it back.
            *self.lock().own_actions.entry(pid).or_default() += 1;
            if let Err(e) = signals::set_action(pid, old) {
                if let Some(n) = self.lock().own_actions.get_mut(&pid) {
                    *n = n.saturating_sub(1);
                }
                warn!(pid, signal, error = %e, "could not give the process its handler back");
            }
            if let Some(held) = self.log_limit.allow(&format!("handler {pid}")) {
                warn!(
                    pid,
                    signal,
                    suppressed = held,
                    "the process handles its trigger signal itself now; kill -{signal} still checkpoints it{}",
                    if self.guard_active {
                        " (the guard keeps the signal from it)"
                    } else {
                        ", and also runs its handler"
                    }
                );
            }
            return;
        }
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(&pid) else {
            return;
        };
        if entry.start_time != start {
            return;
        }
        // Unregistering puts back what the process chose last.
        entry.previous_action = Some(old);
        let snapshot = self.snapshot(&mut state);
        drop(state);
        self.write_snapshot(snapshot);
        if let Some(held) = self.log_limit.allow(&format!("reignored {pid}")) {
            info!(
                pid,
                signal,
                suppressed = held,
                "the process set its trigger signal back to the default; ignored again"
            );
        }
    }
}
