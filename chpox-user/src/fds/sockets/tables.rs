//! The socket diagnostics a dump's descriptors are probed against, asked
//! for once, when the first socket descriptor is met: most processes have
//! none, and the queries (every UNIX, TCP and UDP socket of the namespace)
//! cost about half a millisecond of frozen time.

use std::sync::{Mutex, OnceLock, PoisonError};

use super::{inet, unix};
use crate::error::Result;

pub struct SocketTables {
    tcp: inet::TcpPolicy,
    queried: OnceLock<(unix::UnixTable, inet::InetTable)>,
    /// Held while asking, so that two threads scanning descriptors ask
    /// the kernel once.
    asking: Mutex<()>,
    /// What non-socket descriptors are probed with: no socket is theirs.
    none: (unix::UnixTable, inet::InetTable),
}

impl SocketTables {
    /// Nothing asked yet; `tcp` says what becomes of connections.
    pub fn new(tcp: inet::TcpPolicy) -> Self {
        SocketTables {
            tcp,
            queried: OnceLock::new(),
            asking: Mutex::new(()),
            none: Default::default(),
        }
    }

    /// The tables for a descriptor pointing at `target` (its
    /// /proc/PID/fd link): the kernel's, asked now if not yet, for a
    /// socket; empty ones otherwise. The dumped processes are frozen, so
    /// no socket of theirs comes or goes between two descriptors.
    pub fn for_target(&self, target: &str) -> Result<(&unix::UnixTable, &inet::InetTable)> {
        if !target.starts_with("socket:") {
            return Ok((&self.none.0, &self.none.1));
        }
        if self.queried.get().is_none() {
            let _asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
            if self.queried.get().is_none() {
                let tables = (unix::query()?, inet::query(self.tcp)?);
                let _ = self.queried.set(tables);
            }
        }
        let (u, i) = self.queried.get().unwrap_or(&self.none);
        Ok((u, i))
    }

    /// Whether the kernel was asked (for the debug timing).
    pub fn queried(&self) -> bool {
        self.queried.get().is_some()
    }
}
