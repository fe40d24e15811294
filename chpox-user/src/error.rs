//! Errors of the dump/restore engine. Each message is one line that says what
//! went wrong and, where there is one, what to do about it.

use std::io;

use crate::image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process with PID {0}")]
    NoSuchProcess(i32),
    #[error("PID {0} is a kernel thread; only user processes can be checkpointed")]
    KernelThread(i32),
    #[error("PID {0} is this chpox process itself; name another process")]
    SelfDump(i32),
    #[error("PID {0} is a zombie: it has exited and only waits for its parent to reap it")]
    Zombie(i32),
    #[error(
        "permission denied for PID {pid}: only root or the process's owner may checkpoint it{hint}"
    )]
    PermissionDenied { pid: i32, hint: &'static str },
    #[error("PID {pid} is already traced by PID {tracer} (a debugger?); detach it and retry")]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("PID {0} exited while being checkpointed")]
    Exited(i32),
    #[error("ptrace {op} on thread {tid}: {source}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        source: nix::Error,
    },
    #[error("remote {call} in thread {tid} failed: {errno}")]
    RemoteSyscall {
        call: &'static str,
        tid: i32,
        errno: nix::Error,
    },
    #[error("thread {tid} did not stop as expected during a remote syscall ({what})")]
    RemoteProtocol { tid: i32, what: String },
    #[error("no syscall instruction found in PID {0}'s vdso or code; cannot run remote syscalls")]
    NoSyscallInsn(i32),
    #[error("reading {path}: {source}")]
    Proc { path: String, source: io::Error },
    #[error("cannot parse {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("reading memory of PID {pid} at {addr:#x}: {source}")]
    Memory {
        pid: i32,
        addr: u64,
        source: io::Error,
    },
    #[error(
        "cannot checkpoint file descriptors of kinds chpox does not support yet: {0}; rerun with --unsupported-fd=null to restore them as /dev/null"
    )]
    UnsupportedFds(String),
    #[error(
        "cannot checkpoint established TCP connections: {0}; rerun with --tcp-established to keep them (TCP repair) or --tcp-close to restore them reset"
    )]
    TcpConnections(String),
    #[error("{path}: {source}")]
    File { path: String, source: io::Error },
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Other(String),
    #[error("{0}")]
    Dirty(#[from] crate::dirty::DirtyError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Read a /proc file, naming it in the error.
pub(crate) fn read_proc(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Proc {
        path: path.to_string(),
        source,
    })
}

pub(crate) fn read_proc_bytes(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Proc {
        path: path.to_string(),
        source,
    })
}

pub(crate) fn parse_err(path: &str, reason: impl Into<String>) -> Error {
    Error::Parse {
        path: path.to_string(),
        reason: reason.into(),
    }
}
