//! The restorer's hold on the page server's background work.
//!
//! Once the restored processes run, `chpox restore` still has to let them
//! go, print and exit, which is part of `--lazy`'s time to running. On two
//! cores, the page server copying and verifying the rest of the memory
//! beside the restored process left it half a core for that (1.5–5 ms).
//! So the server serves faults at once, but starts its background work
//! only when the restorer lets go: it drops its [`ServerHold`] (in
//! [`crate::restore::Restored`]) or exits, or [`HOLD_AT_MOST`] passes,
//! whichever comes first.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{Result, os};

/// Longest the background work waits for the restorer: a library caller
/// that keeps its [`crate::restore::Restored`] for long costs the memory
/// being filled that much later, no more.
pub const HOLD_AT_MOST: Duration = Duration::from_millis(100);

/// The restorer's end, with the page server (our child) it holds.
///
/// Dropped: the server's background work starts, and a thread reaps the
/// server when it ends, so that no zombie is left while we wait for the
/// restored process.
#[derive(Debug)]
pub struct ServerHold {
    write: Option<OwnedFd>,
    server: i32,
}

impl ServerHold {
    /// The restorer's end `write` of a hold on the page server `server`.
    pub(super) fn new(write: OwnedFd, server: i32) -> ServerHold {
        ServerHold {
            write: Some(write),
            server,
        }
    }

    /// Keep the hold until we exit, and leave the server to be reaped by
    /// whoever inherits it: for a restorer about to exit. Dropping the hold
    /// instead woke the server's background work, which took our CPU for
    /// 3–5 ms before we could exit, and the reaping thread had to be
    /// scheduled to end before our exit was complete; the kernel closes
    /// the pipe as we exit, and does not preempt an exit.
    pub fn until_exit(mut self) {
        if let Some(fd) = self.write.take() {
            // Left open, for the kernel to close.
            let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
        }
        self.server = 0;
    }
}

impl Drop for ServerHold {
    fn drop(&mut self) {
        drop(self.write.take());
        let server = self.server;
        if server > 0 {
            // A failure to start the thread leaves a zombie until we exit,
            // nothing worse.
            let _ = std::thread::Builder::new()
                .name("chpox-lazy-reap".into())
                .spawn(move || {
                    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(server), None);
                });
        }
    }
}

/// The server's end.
pub(super) struct Held {
    /// None once released.
    fd: Option<OwnedFd>,
    until: Instant,
}

/// A new hold: the restorer's end (for [`ServerHold::new`]) and the
/// server's.
pub(super) fn new() -> Result<(OwnedFd, Held)> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| os("pipe", e.into()))?;
    Ok((
        write,
        Held {
            fd: Some(read),
            until: Instant::now() + HOLD_AT_MOST,
        },
    ))
}

impl Held {
    /// The server's end of the pipe while held (to keep open, and to poll).
    pub(super) fn raw_fd(&self) -> Option<i32> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Another end for another thread of the server, with the same end.
    pub(super) fn try_clone(&self) -> Held {
        Held {
            fd: self.fd.as_ref().and_then(|f| f.try_clone().ok()),
            until: self.until,
        }
    }

    /// Whether the background work may go on; checks without waiting.
    pub(super) fn released(&mut self) -> bool {
        self.wait(Duration::ZERO)
    }

    /// Milliseconds a poll may wait before the hold ends by itself.
    pub(super) fn timeout_ms(&self) -> i32 {
        if self.fd.is_none() {
            return 0;
        }
        let left = self.until.saturating_duration_since(Instant::now());
        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    }

    /// Wait up to `at_most` (and no later than the hold's end) for the
    /// release; whether it came.
    pub(super) fn wait(&mut self, at_most: Duration) -> bool {
        let Some(fd) = &self.fd else {
            return true;
        };
        let now = Instant::now();
        let left = self.until.saturating_duration_since(now);
        if left.is_zero() {
            self.fd = None;
            return true;
        }
        let wait = at_most.min(left);
        let mut pfd = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout =
            nix::poll::PollTimeout::try_from(wait.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(nix::poll::PollTimeout::MAX);
        // The only writer never writes: readable or hung up means closed.
        // EINTR or any other failure: as if not yet released; the deadline
        // still ends the hold.
        let closed = matches!(nix::poll::poll(&mut pfd, timeout), Ok(n) if n > 0);
        if closed || Instant::now() >= self.until {
            self.fd = None;
            return true;
        }
        false
    }
}
