//! chpox: checkpoint and restore of Linux processes.
//!
//! One module per kind of state, as in CRIU: find "where are fds dumped?" in
//! `fds`, "where are registers read?" in `registers`, and so on. `dump`
//! orchestrates them; `image` is the on-disk format; `ptrace` freezes a
//! process and `remote` runs syscalls inside it.

pub mod agent;
pub mod bpf;
pub mod check;
pub mod cli;
pub mod control;
pub mod creds;
pub mod deleted;
pub mod dirty;
pub mod dump;
pub mod earlymaps;
pub mod error;
pub mod fds;
pub mod files;
pub mod image;
pub mod inspect;
pub mod job;
pub mod memory;
pub mod pagecopy;
pub mod precopy;
pub mod process;
pub mod progress;
pub mod ptrace;
pub mod registers;
pub mod remote;
pub mod restore;
pub mod safe_return;
pub mod signals;
pub mod snapshot;
pub mod threads;
pub mod timers;
pub mod tree;

pub use error::{Error, Result};
