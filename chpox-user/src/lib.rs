//! chpox: checkpoint and restore of Linux processes.
//!
//! One module per kind of state, each with its dump and restore halves, as
//! in CRIU:
//! - `memory`: mappings and pages (`memory::pagecopy` writes them,
//!   `memory::snapshot` reads them from a copy-on-write copy,
//!   `memory::dirty` tracks writes for `memory::incremental` images and
//!   `memory::precopy` dumps);
//! - `process`: process-wide state, with `creds`, `registers`, `signals`,
//!   `threads` and `timers` beside it;
//! - `fds`: open descriptors, one file per kind;
//! - `files`: the executable and mapped files, and deleted ones.
//!
//! `dump` and `restore` orchestrate them; `freeze` holds live processes
//! (`ptrace`, whole `tree`s, `remote` syscalls); `image` is the on-disk
//! format; `trigger` is the path from a signal to a checkpoint (`bpf`,
//! `agent`, `control`), apart from the engine; `cli`, `job`, `check`,
//! `inspect` and `progress` serve the command line; `cache` keeps what
//! one run learned for the next.
//!
//! The modules inside those folders are also reachable from the crate
//! root (`chpox::timers`, `chpox::ptrace`, `chpox::agent`…), the names
//! they are known by everywhere.

pub mod cache;
pub mod check;
pub mod cli;
pub mod dump;
pub mod error;
pub mod fds;
pub mod files;
pub mod freeze;
pub mod image;
pub mod inspect;
pub mod job;
pub mod memory;
pub mod process;
pub mod progress;
pub mod restore;
pub mod trigger;

#[cfg(test)]
pub(crate) mod testing;

pub use error::{Error, Result};
pub use files::deleted;
pub use freeze::{overlap, ptrace, remote, safe_return, tree};
pub use memory::{dirty, earlymaps, incremental, pagecopy, precopy, snapshot};
pub use process::{creds, registers, signals, threads, timers};
pub use trigger::{agent, bpf, control};
