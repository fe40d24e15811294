//! Periodic checkpoints (`--every DUR`): a timer asks for a checkpoint the
//! way a trigger signal does, through the same state in `STATES`, so it is
//! coalesced the same way: a tick while a checkpoint is asked for is
//! folded into it, a tick while one is being written makes at most one
//! more. A timer that falls behind (a checkpoint longer than the interval)
//! skips the ticks it missed rather than catching up with a burst.

use super::*;

/// `Event::result` of a checkpoint the timer asked for.
pub(super) const RESULT_TIMER: i32 = 101;

/// The longest the timer sleeps without looking (registrations made
/// meanwhile wake it earlier).
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// Unix time in milliseconds.
pub(super) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What one tick does to a registration's checkpoint state.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    /// IDLE → REQUESTED: a checkpoint to start.
    Start,
    /// RUNNING → RUNNING_AGAIN: one more after the running one.
    Again,
    /// Already asked for: folded in.
    Folded,
}

/// Move `slot` towards a checkpoint as a trigger signal would.
fn tick(states: &StatesMap, slot: u32) -> Tick {
    // The state may change under us (a checkpoint ending); a few tries
    // always see it settle, as in the eBPF program.
    for _ in 0..4 {
        match states.load(slot).state {
            STATE_IDLE if states.transition(slot, STATE_IDLE, STATE_REQUESTED) => {
                return Tick::Start;
            }
            STATE_RUNNING => {
                states.set_again_ns(slot, monotonic_ns());
                if states.transition(slot, STATE_RUNNING, STATE_RUNNING_AGAIN) {
                    return Tick::Again;
                }
            }
            STATE_REQUESTED | STATE_RUNNING_AGAIN => return Tick::Folded,
            _ => {}
        }
    }
    Tick::Folded
}

impl Agent {
    /// Ask for the periodic checkpoints that are due. Returns the
    /// checkpoints to start and when the next one is due.
    pub(super) fn timer_tick(&self) -> (Vec<Event>, Option<Instant>) {
        let now = Instant::now();
        let mut events = Vec::new();
        let mut next: Option<Instant> = None;
        let mut state = self.lock();
        for e in state.entries.values_mut() {
            let (Some(ms), Some(mut due)) = (e.every_ms, e.next_due) else {
                continue;
            };
            if due <= now {
                e.timer_ticks += 1;
                match tick(&self.states, e.slot) {
                    Tick::Start => events.push(Event {
                        kind: EVENT_CHECKPOINT,
                        tgid: e.pid as u32,
                        target_pid: e.pid as u32,
                        signal: e.signal,
                        slot: e.slot,
                        result: RESULT_TIMER,
                        timestamp_ns: monotonic_ns(),
                        ..Event::default()
                    }),
                    Tick::Again => e.timer_again = true,
                    Tick::Folded => {}
                }
                let every = Duration::from_millis(ms);
                due += every;
                if due <= now {
                    due = now + every;
                }
                e.next_due = Some(due);
            }
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        (events, next)
    }
}

/// The timer: wakes when the next periodic checkpoint is due, or when a
/// registration changes.
pub(super) async fn run_timer(agent: Arc<Agent>) {
    loop {
        let ticking = Arc::clone(&agent);
        let Ok((events, next)) = tokio::task::spawn_blocking(move || ticking.timer_tick()).await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        for event in events {
            let agent = Arc::clone(&agent);
            tokio::task::spawn_blocking(move || agent.run_checkpoints(event));
        }
        let wait = next
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_WAKE);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = agent.timer_changed.notified() => {}
        }
    }
}
