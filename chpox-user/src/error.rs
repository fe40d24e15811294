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
    #[error(
        "cannot take back the {what} lock of PID {pid}'s fd {fd} on {path}: {source}; another process holds a conflicting lock now (see /proc/locks): stop it and restore again"
    )]
    FileLock {
        pid: i32,
        fd: i32,
        what: String,
        path: String,
        source: io::Error,
    },
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Other(String),
    #[error("{0}")]
    Dirty(#[from] crate::dirty::DirtyError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Read a /proc file, naming it in the error: through its held copy if
/// it is held (see `process::heldfiles`).
pub(crate) fn read_proc(path: &str) -> Result<String> {
    String::from_utf8(read_proc_bytes(path)?).map_err(|_| Error::Proc {
        path: path.to_string(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ),
    })
}

pub(crate) fn read_proc_bytes(path: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(PROC_READ_CAPACITY);
    if crate::process::heldfiles::read(path, &mut bytes).is_none() {
        read_proc_into(path, |r| std::io::Read::read_to_end(r, &mut bytes))?;
    }
    Ok(bytes)
}

/// Room for most /proc files in one `read`: `fs::read_to_string` asks a
/// /proc file (whose size says 0) for 32 bytes, then 32, 64, 128…, each a
/// syscall that formats the file again up to there; many of these are
/// read while the processes are frozen. A page: a seq_file gives no more
/// per read anyway, and more room only spreads what a frozen tree's
/// texts keep over more fresh pages, each a fault (see `dump::heap`).
const PROC_READ_CAPACITY: usize = 4096;

fn read_proc_into(
    path: &str,
    read: impl FnOnce(&mut std::io::Take<std::fs::File>) -> std::io::Result<usize>,
) -> Result<()> {
    use std::io::Read;
    let err = |source| Error::Proc {
        path: path.to_string(),
        source,
    };
    // Through `Take`: a `File` would first ask for its size and position
    // (two more syscalls that say nothing about a /proc file).
    let mut reader = std::fs::File::open(path).map_err(err)?.take(u64::MAX);
    read(&mut reader).map_err(err)?;
    Ok(())
}

pub(crate) fn parse_err(path: &str, reason: impl Into<String>) -> Error {
    Error::Parse {
        path: path.to_string(),
        reason: reason.into(),
    }
}
