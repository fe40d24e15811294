//! Holding live processes: freezing a process (`ptrace`) or a whole tree
//! (`tree`) before any state is read, running system calls inside a
//! frozen process (`remote`), and what a borrowed thread does if chpox dies
//! while holding it (`safe_return`).

pub mod overlap;
pub mod ptrace;
pub mod remote;
pub mod safe_return;
pub mod thread_state;
pub mod tree;
