//! `chpox-agent`: turns trigger signals into checkpoints.
//!
//! The eBPF program marks a registration "requested" and sends an event;
//! the agent moves it to "running", writes the image (freeze, dump, resume:
//! the target keeps running), and back to "idle" — or, if another trigger
//! came meanwhile, writes one more. Requests come over a Unix socket
//! (`chpox`, `chpoxctl`) and over the old-style register FIFO.
//!
//! Registrations are saved to `registrations.json` in the run directory
//! after every change; a restarted agent takes back those whose process is
//! still the same incarnation and still ignores its trigger signal, and
//! logs the others as lost. Between the two, a trigger signal is ignored by
//! the target (SIG_IGN), so it is harmless, but writes no checkpoint.
//!
//! The agent runs as root and every local user may talk to it, so no user
//! may make it wait or run out of anything for the others: connections are
//! capped per user and in total (with some kept for root), an idle
//! connection is closed, a request line is capped, a file a user names is
//! opened non-blocking and must be a regular file, no lock is held across
//! a file open or a dump, a failing accept backs off, and repeated log
//! lines are rate-limited.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chpox_common::{
    EVENT_CHECKPOINT, EVENT_EXIT, Event, MAX_REGISTRATIONS, Registration, STATE_IDLE,
    STATE_REQUESTED, STATE_RUNNING, STATE_RUNNING_AGAIN, flags,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::bpf::{Bpf, StatesMap, parse_event};
use crate::control::{
    FIFO_NAME, ListEntry, MAX_REQUEST_LINE, RegisterRequest, Request, Response, SOCKET_NAME,
    STATE_NAME, parse_register_line,
};
use crate::creds::UserCreds;
use crate::dump::{DumpOptions, dump};
use crate::image::model::{SavedRegistration, SigAction};
use crate::process::{monotonic_ns, unix_now};
use crate::signals::{self, Disposition};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub run_dir: PathBuf,
    pub ebpf_object: Option<PathBuf>,
    /// Earlier images kept per registration (`FILE.1` … `FILE.N`).
    pub keep: u32,
    /// Where images go when a registration names no file.
    pub image_dir: PathBuf,
    /// A connection that sends no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once, all users together; lowered at start to
    /// what the descriptor limit allows.
    pub max_connections: usize,
    /// Connections open at once for one user other than root.
    pub max_connections_per_user: usize,
}

impl AgentConfig {
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;
}

/// Connections kept for root whatever the users hold, so the administrator
/// can always list, unregister and see what is going on.
const ROOT_RESERVE: usize = 16;
/// Descriptors kept for all but connections: the BPF maps, the FIFO, the
/// files a dump holds open (one per mapped file of the tree).
const FD_RESERVE: u64 = 512;
/// The longest wait for a checkpoint a caller may ask for.
const MAX_CHECKPOINT_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Libraries in one user's list (`chpoxctl addlib`): it lives in the
/// agent's memory.
const MAX_LIBS_PER_USER: usize = 256;
/// How long to wait before accepting again after accept failed: it fails
/// again at once while the agent is out of descriptors (the connection
/// stays queued), so retrying at once would only spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Log lines of one kind let through per period; the rest are counted.
const LOG_BURST: u32 = 5;
/// The same for a user's registrations and unregistrations: more, as a
/// batch of jobs is registered at once, but a loop cannot flood the log.
const REGISTRATION_LOG_BURST: u32 = 100;
const LOG_PERIOD: Duration = Duration::from_secs(10);
/// Kinds of log line tracked at once (keys include a uid or PID).
const MAX_LOG_KINDS: usize = 4096;

/// Who sent a request, from the socket's credentials.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    const ROOT: Caller = Caller { uid: 0, pid: None };
}

fn yes() -> bool {
    true
}

/// One registered process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    pid: i32,
    start_time: u64,
    uid: u32,
    comm: String,
    signal: u32,
    flags: u32,
    output: PathBuf,
    /// The disposition we replaced with SIG_IGN, put back on unregister.
    /// None when the process ignored the signal already.
    previous_action: Option<SigAction>,
    /// Registered by its (non-root) owner: images are written with the
    /// owner's file rights, never ours.
    #[serde(default = "yes")]
    as_owner: bool,
    /// The registering user's gid and groups: with `uid`, whom checkpoints
    /// are written and checked for. Absent in what older agents saved.
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    groups: Vec<u32>,
    #[serde(skip)]
    slot: u32,
    #[serde(skip)]
    checkpoints: u64,
    /// Checkpoints begun, counting the one in progress.
    #[serde(skip)]
    started: u64,
    #[serde(skip)]
    last_checkpoint: Option<u64>,
    #[serde(skip)]
    last_error: Option<String>,
    /// Children the last checkpoint left out (FLAGS without 8).
    #[serde(skip)]
    children_not_saved: Vec<i32>,
    /// Whether the log has said so for this registration already.
    #[serde(skip)]
    warned_children: bool,
}

impl Entry {
    /// Whom this registration's checkpoints are for: the user who
    /// registered it, never whoever the process has become since (a setuid
    /// program it ran that made itself root, say).
    fn owner_creds(&self) -> Result<UserCreds, String> {
        if let Some(gid) = self.gid {
            return Ok(UserCreds {
                uid: self.uid,
                gid,
                groups: self.groups.clone(),
            });
        }
        // Saved by an older agent: the process's real ids, if still its
        // registering user's.
        let creds = UserCreds::of_process(self.pid)
            .map_err(|e| format!("cannot read the credentials of PID {}: {e}", self.pid))?;
        if creds.uid != self.uid {
            return Err(format!(
                "PID {} runs as uid {} now, not as uid {} who registered it; not checkpointed",
                self.pid, creds.uid, self.uid
            ));
        }
        Ok(creds)
    }
}

/// One checkpoint written, for `chpox checkpoint` waiters.
#[derive(Debug, Clone)]
struct Written {
    image: PathBuf,
    bytes: u64,
    /// From the tracepoint firing to every thread stopped.
    signal_to_frozen_us: u64,
    frozen_us: u64,
    /// Processes in the image.
    processes: usize,
    /// Children of the process left out (a single-process checkpoint).
    children_not_saved: Vec<i32>,
}

type Outcome = Result<(Written, u64), String>;

struct State {
    entries: HashMap<i32, Entry>,
    free_slots: Vec<u32>,
    /// Libraries to embed for FLAGS 4, per user (`chpoxctl addlib`).
    libs: HashMap<u32, Vec<PathBuf>>,
    /// `chpox checkpoint` callers waiting, per PID: each is answered by the
    /// first checkpoint that starts after its request (number given here).
    waiters: HashMap<i32, Vec<(u64, oneshot::Sender<Outcome>)>>,
    bpf: Bpf,
    /// Bumped on every change saved, so an older snapshot written late
    /// never replaces a newer one.
    save_generation: u64,
}

pub struct Agent {
    config: AgentConfig,
    state: Mutex<State>,
    states: Arc<StatesMap>,
    /// The generation of the registrations last written to disk; held
    /// while writing, and by nothing else.
    saved: Mutex<u64>,
    limits: Limits,
    connections: Mutex<Connections>,
    log_limit: LogLimiter,
}

/// The registrations as they were at one change, to be written to disk
/// once the state lock is released.
struct Snapshot {
    generation: u64,
    bytes: Vec<u8>,
}

/// What the connection caps come to on this machine.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// All connections together.
    total: usize,
    /// All non-root connections together: `total` less root's reserve.
    users: usize,
    /// One non-root user's connections.
    per_user: usize,
    idle: Duration,
}

impl Limits {
    /// The configured caps, lowered so that connections cannot take the
    /// descriptors a dump needs (`fd_limit`: the soft RLIMIT_NOFILE).
    fn new(config: &AgentConfig, fd_limit: u64) -> Limits {
        let budget = usize::try_from(fd_limit.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
        let total = config.max_connections.min(budget).max(2);
        let reserve = ROOT_RESERVE.min(total / 2);
        let users = total - reserve;
        Limits {
            total,
            users,
            per_user: config.max_connections_per_user.clamp(1, users),
            idle: config.idle_timeout,
        }
    }
}

/// Connections open now, by whom.
#[derive(Debug, Default)]
struct Connections {
    root: usize,
    users: usize,
    by_uid: HashMap<u32, usize>,
}

/// One admitted connection; its place is given back when it is dropped.
struct ConnectionSlot {
    agent: Arc<Agent>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.agent.connections);
        if self.uid == 0 {
            c.root = c.root.saturating_sub(1);
            return;
        }
        c.users = c.users.saturating_sub(1);
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Lets [`LOG_BURST`] lines of one kind through per [`LOG_PERIOD`] and
/// counts the rest, so a user who repeats a failing request cannot fill
/// the disk through the agent's log; the next line let through says how
/// many were held back.
#[derive(Debug, Default)]
struct LogLimiter(Mutex<HashMap<String, LogWindow>>);

#[derive(Debug)]
struct LogWindow {
    start: Instant,
    passed: u32,
    held: u64,
}

impl LogLimiter {
    /// Whether a line of `kind` may be logged now: if so, how many lines of
    /// its kind were held back since the last one let through.
    fn allow(&self, kind: &str) -> Option<u64> {
        self.allow_burst(kind, LOG_BURST)
    }

    /// [`LogLimiter::allow`] with `burst` lines per period.
    fn allow_burst(&self, kind: &str, burst: u32) -> Option<u64> {
        let now = Instant::now();
        let mut windows = lock(&self.0);
        if windows.len() >= MAX_LOG_KINDS && !windows.contains_key(kind) {
            windows.retain(|_, w| now.duration_since(w.start) < LOG_PERIOD);
            if windows.len() >= MAX_LOG_KINDS {
                return None;
            }
        }
        let w = windows.entry(kind.to_owned()).or_insert(LogWindow {
            start: now,
            passed: 0,
            held: 0,
        });
        if now.duration_since(w.start) >= LOG_PERIOD {
            w.start = now;
            w.passed = 0;
        }
        if w.passed < burst {
            w.passed += 1;
            Some(std::mem::take(&mut w.held))
        } else {
            w.held += 1;
            None
        }
    }
}

/// What a request comes to: an answer now, or a checkpoint to wait for
/// (awaited on the async side, so callers waiting for long checkpoints do
/// not hold the blocking threads other requests need).
enum Handled {
    Now(Response),
    Wait {
        pid: i32,
        timeout: Duration,
        rx: oneshot::Receiver<Outcome>,
    },
}

/// A mutex that a panic elsewhere left poisoned still holds plain data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `name` (a process's `comm`, a program's name: anything a process or a
/// user controls) as one safe file-name component for a path the agent
/// builds: ASCII letters, digits and `+ - . _` only (anything else, `/`
/// first of all, becomes `_`), no leading dot (so neither `.`, `..` nor a
/// hidden file), at most 64 bytes, never empty.
fn safe_file_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match mapped.trim_start_matches('.') {
        "" => "process".to_string(),
        rest => rest.to_string(),
    }
}

/// Whether a registered process is still the one registered.
#[derive(Debug)]
enum Liveness {
    Same,
    /// Exited (or a zombie), or its PID is another process's now.
    Gone,
    /// /proc could not say (out of descriptors, say): not a reason to drop
    /// anything.
    Unknown(io::Error),
}

/// Only "no such process" from the kernel (ENOENT, ESRCH) or a different
/// start time means a process is gone; any other error says nothing about
/// it.
fn liveness(pid: i32, start: u64) -> Liveness {
    liveness_from(
        pid,
        start,
        std::fs::read_to_string(format!("/proc/{pid}/stat")),
    )
}

/// [`liveness`] from what reading /proc/PID/stat gave.
fn liveness_from(pid: i32, start: u64, stat: io::Result<String>) -> Liveness {
    let text = match stat {
        Ok(t) => t,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
            return Liveness::Gone;
        }
        Err(e) => return Liveness::Unknown(e),
    };
    // The name in parentheses may hold anything, spaces and ')' too: the
    // fields that matter come after the last ')'.
    let fields: Vec<&str> = text
        .rfind(')')
        .map(|i| text[i + 1..].split_whitespace().collect())
        .unwrap_or_default();
    let (Some(state), Some(started)) = (
        fields.first(),
        fields.get(19).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return Liveness::Unknown(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        ));
    };
    if started != start || matches!(*state, "Z" | "X" | "x") {
        Liveness::Gone
    } else {
        Liveness::Same
    }
}

fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .filter(|s| s.state != 'Z')
        .map(|s| s.starttime)
}

fn state_name(state: u32) -> &'static str {
    match state {
        STATE_IDLE => "idle",
        STATE_REQUESTED => "requested",
        STATE_RUNNING => "running",
        STATE_RUNNING_AGAIN => "running+again",
        _ => "unknown",
    }
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on.
        lock(&self.state)
    }

    /// The registrations now, to be written once the lock is released.
    fn snapshot(&self, state: &mut State) -> Option<Snapshot> {
        state.save_generation += 1;
        let entries: Vec<&Entry> = state.entries.values().collect();
        match serde_json::to_vec_pretty(&entries) {
            Ok(bytes) => Some(Snapshot {
                generation: state.save_generation,
                bytes,
            }),
            Err(e) => {
                warn!(error = %e, "could not save registrations");
                None
            }
        }
    }

    /// Write a snapshot to `registrations.json`, mode 0600: it lists every
    /// user's PIDs and image paths, which are no other user's business.
    /// Called without the state lock, so requests are not held up by the
    /// disk; a snapshot overtaken by a newer one already written is dropped.
    fn write_snapshot(&self, snapshot: Option<Snapshot>) {
        let Some(snapshot) = snapshot else {
            return;
        };
        let mut written = lock(&self.saved);
        if snapshot.generation <= *written {
            return;
        }
        let path = self.config.run_dir.join(STATE_NAME);
        let tmp = self.config.run_dir.join(format!(".{STATE_NAME}.tmp"));
        let result = (|| -> io::Result<()> {
            // Created afresh, so a file an older agent left (0644) does not
            // keep its mode.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            file.write_all(&snapshot.bytes)?;
            std::fs::rename(&tmp, &path)
        })();
        match result {
            Ok(()) => *written = snapshot.generation,
            Err(e) => warn!(error = %e, path = %path.display(), "could not save registrations"),
        }
    }

    /// Serve one request from a connection: blocking work on a blocking
    /// thread, the wait for a checkpoint here.
    async fn serve(self: &Arc<Self>, caller: Caller, req: Request) -> Response {
        let agent = Arc::clone(self);
        let handled = match tokio::task::spawn_blocking(move || agent.handle(caller, req)).await {
            Ok(h) => h,
            Err(e) => {
                return Response::Error {
                    message: format!("internal error: {e}"),
                };
            }
        };
        let (pid, timeout, rx) = match handled {
            Handled::Now(response) => return response,
            Handled::Wait { pid, timeout, rx } => (pid, timeout, rx),
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok((w, generation)))) => Response::Checkpointed {
                pid,
                image: w.image,
                generation,
                bytes: w.bytes,
                signal_to_frozen_us: w.signal_to_frozen_us,
                frozen_us: w.frozen_us,
                processes: w.processes,
                children_not_saved: w.children_not_saved,
            },
            Ok(Ok(Err(message))) => Response::Error { message },
            Ok(Err(_)) => Response::Error {
                message: format!("PID {pid}: the checkpoint was abandoned"),
            },
            Err(_) => Response::Error {
                message: format!("no checkpoint of PID {pid} within {} s", timeout.as_secs()),
            },
        }
    }

    /// Handle one request. Blocking: may freeze a process briefly; call
    /// from a blocking thread. A checkpoint request comes back as the wait
    /// for it.
    fn handle(&self, caller: Caller, req: Request) -> Handled {
        let result = match req {
            Request::Register(req) => self.register(caller, req),
            Request::Unregister { pid } => self.unregister(caller, pid),
            Request::List => Ok(self.list(caller)),
            Request::Checkpoint { pid, timeout_secs } => {
                let timeout = Duration::from_secs(timeout_secs).min(MAX_CHECKPOINT_WAIT);
                return match self.begin_checkpoint(caller, pid) {
                    Ok(rx) => Handled::Wait { pid, timeout, rx },
                    Err(message) => Handled::Now(Response::Error { message }),
                };
            }
            Request::AddLib { path } => self.add_lib(caller, path),
            Request::DelLib { path } => self.edit_libs(caller, |libs| {
                let before = libs.len();
                libs.retain(|l| l != &path);
                if libs.len() == before {
                    return Err(format!("{} is not in your library list", path.display()));
                }
                Ok(())
            }),
            Request::ClearLibs => self.edit_libs(caller, |libs| {
                libs.clear();
                Ok(())
            }),
            Request::ListLibs => Ok(Response::Libs {
                libs: self
                    .lock()
                    .libs
                    .get(&caller.uid)
                    .cloned()
                    .unwrap_or_default(),
            }),
        };
        Handled::Now(result.unwrap_or_else(|message| Response::Error { message }))
    }

    fn add_lib(&self, caller: Caller, path: PathBuf) -> Result<Response, String> {
        if !path.is_absolute() {
            return Err(format!(
                "{} is not an absolute path; give the library's full path",
                path.display()
            ));
        }
        // Readable by the caller, by the kernel's own checks (the agent
        // must not become a way to read other users' files), and a regular
        // file, opened without blocking and before taking the lock: a FIFO
        // must not stall the agent for everybody.
        crate::creds::open_regular(&Self::caller_creds(caller), &path)
            .map_err(|e| format!("cannot add {}: {e}", path.display()))?;
        let mut state = self.lock();
        let libs = state.libs.entry(caller.uid).or_default();
        if !libs.contains(&path) {
            if libs.len() >= MAX_LIBS_PER_USER {
                return Err(format!(
                    "your library list is full ({MAX_LIBS_PER_USER}); `chpoxctl dellib` some first"
                ));
            }
            libs.push(path);
        }
        Ok(Response::Ok)
    }

    fn edit_libs(
        &self,
        caller: Caller,
        edit: impl FnOnce(&mut Vec<PathBuf>) -> Result<(), String>,
    ) -> Result<Response, String> {
        let mut state = self.lock();
        edit(state.libs.entry(caller.uid).or_default())?;
        Ok(Response::Ok)
    }

    fn check_owner(caller: Caller, pid: i32) -> Result<u32, String> {
        let uid = crate::process::owner(pid)
            .map_err(|_| format!("no process with PID {pid}"))?
            .0;
        if caller.uid != 0 && caller.uid != uid {
            return Err(format!(
                "permission denied: PID {pid} belongs to uid {uid}; only root or its owner may register it"
            ));
        }
        Ok(uid)
    }

    /// The identity of a caller for file access: its process's groups too.
    fn caller_creds(caller: Caller) -> UserCreds {
        caller
            .pid
            .and_then(|pid| UserCreds::of_process(pid).ok())
            .filter(|c| c.uid == caller.uid)
            .unwrap_or(UserCreds {
                uid: caller.uid,
                gid: caller.uid,
                groups: Vec::new(),
            })
    }

    /// Where a user's images go by default: a directory of their own.
    fn default_image_dir(&self, creds: &UserCreds) -> Result<PathBuf, String> {
        if creds.is_root() {
            return Ok(self.config.image_dir.clone());
        }
        let dir = self.config.image_dir.join(creds.uid.to_string());
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .and_then(|()| std::os::unix::fs::chown(&dir, Some(creds.uid), Some(creds.gid)))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        Ok(dir)
    }

    /// Check, with the user's own rights, that they may create files where
    /// their images are to go.
    fn check_writable(creds: &UserCreds, output: &Path) -> Result<(), String> {
        let dir = output.parent().unwrap_or(Path::new("/"));
        let probe = dir.join(format!(".chpox-probe.{}", std::process::id()));
        crate::creds::as_user(creds, || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|_| std::fs::remove_file(&probe))
        })
        .and_then(|r| r)
        .map_err(|e| {
            format!(
                "uid {} may not write images to {}: {e}; choose a directory you can write with -o",
                creds.uid,
                dir.display()
            )
        })
    }

    fn register(&self, caller: Caller, req: RegisterRequest) -> Result<Response, String> {
        let RegisterRequest {
            pid,
            signal,
            flags,
            output,
            force,
            self_ignored,
            name,
        } = req;
        if !chpox_common::is_trigger_signal(signal) {
            return Err(format!(
                "signal {signal} cannot trigger checkpoints (1–64, not KILL or STOP)"
            ));
        }
        if flags & !flags::KNOWN != 0 {
            return Err(format!("unknown FLAGS bits in {flags}"));
        }
        crate::process::check_dumpable(pid).map_err(|e| e.to_string())?;
        let uid = Self::check_owner(caller, pid)?;
        let as_owner = caller.uid != 0;
        let owner_creds = if as_owner {
            Self::caller_creds(caller)
        } else {
            UserCreds {
                uid: 0,
                gid: 0,
                groups: Vec::new(),
            }
        };
        // A checkpoint hands the user what tracing the process would: only
        // a process the kernel would let them trace (a setuid program, or
        // one that dropped privileges and is not dumpable, is not). Checked
        // again at every checkpoint, while the process is frozen.
        crate::creds::may_checkpoint(pid, &owner_creds).map_err(|e| e.to_string())?;
        if self.lock().entries.contains_key(&pid) {
            return Err(format!(
                "PID {pid} is registered already; `chpox unregister {pid}` first to change it"
            ));
        }
        let start = start_time(pid).ok_or_else(|| format!("no process with PID {pid}"))?;
        // `chpox run` registers before exec: it names the program to come.
        let comm = name
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .unwrap_or_else(|| crate::process::thread_comm(pid, pid).unwrap_or_default());
        let output = match output {
            Some(p) if p.is_absolute() => p,
            Some(p) => return Err(format!("output {} must be an absolute path", p.display())),
            // The name is the process's to choose ("../../etc/x"): only a
            // safe file name of it goes into a path.
            None => self
                .default_image_dir(&owner_creds)?
                .join(format!("{}-{pid}.chpox", safe_file_name(&comm))),
        };
        if as_owner {
            Self::check_writable(&owner_creds, &output)?;
        }
        let signo = signal as i32;

        // Make the trigger harmless: SIG_IGN drops it at generation, after
        // the tracepoint has seen it.
        let previous_action = match signals::disposition(pid, signo).map_err(|e| e.to_string())? {
            Disposition::Ignored => None,
            _ if self_ignored => {
                return Err(format!(
                    "PID {pid} was to ignore signal {signal} itself but does not"
                ));
            }
            Disposition::Handled if !force => {
                return Err(format!(
                    "PID {pid} handles signal {signal} itself; register it with another --signal, or --force to take the signal over"
                ));
            }
            _ => Some(
                signals::set_action(pid, signals::ignore(signo)).map_err(|e| {
                    format!("cannot make signal {signal} harmless in PID {pid}: {e}")
                })?,
            ),
        };

        let mut state = self.lock();
        // Registered meanwhile by a concurrent request, which owns the
        // disposition now.
        if state.entries.contains_key(&pid) {
            return Err(format!("PID {pid} is registered already"));
        }
        let Some(slot) = state.free_slots.pop() else {
            drop(state);
            self.put_back(pid, previous_action);
            return Err(format!(
                "{MAX_REGISTRATIONS} processes are registered already"
            ));
        };
        let reg = Registration {
            signal,
            flags,
            slot,
            _pad: 0,
            start_time: start,
        };
        if let Err(e) = state.bpf.register(pid as u32, reg) {
            state.free_slots.push(slot);
            drop(state);
            self.put_back(pid, previous_action);
            return Err(e.to_string());
        }
        state.entries.insert(
            pid,
            Entry {
                pid,
                start_time: start,
                uid,
                comm: comm.clone(),
                signal,
                flags,
                output: output.clone(),
                previous_action,
                as_owner,
                gid: Some(owner_creds.gid),
                groups: owner_creds.groups.clone(),
                slot,
                checkpoints: 0,
                started: 0,
                last_checkpoint: None,
                last_error: None,
                children_not_saved: Vec::new(),
                warned_children: false,
            },
        );
        drop(state);
        // The process may have exited between our checks and the insert; the
        // exit tracepoint would then have found nothing to remove. (Read
        // after the lock is released; only "no such process" counts.)
        let gone = matches!(liveness(pid, start), Liveness::Gone);
        let mut state = self.lock();
        if gone
            && state
                .entries
                .get(&pid)
                .is_some_and(|e| e.start_time == start)
        {
            state.release(pid, "the process exited", true);
            return Err(format!("PID {pid} exited while being registered"));
        }
        let snapshot = self.snapshot(&mut state);
        drop(state);
        self.write_snapshot(snapshot);
        if let Some(held) = self.log_registration(caller) {
            info!(pid, comm, uid, signal, flags, output = %output.display(), suppressed = held, "registered");
        }
        Ok(Response::Registered {
            pid,
            signal,
            output,
        })
    }

    /// Whether to log a (un)registration by `caller`: always for root,
    /// rate-limited per user.
    fn log_registration(&self, caller: Caller) -> Option<u64> {
        if caller.uid == 0 {
            return Some(0);
        }
        self.log_limit.allow_burst(
            &format!("registrations {}", caller.uid),
            REGISTRATION_LOG_BURST,
        )
    }

    /// Restore a disposition we changed, best effort.
    fn put_back(&self, pid: i32, previous: Option<SigAction>) {
        if let Some(action) = previous
            && let Err(e) = signals::set_action(pid, action)
        {
            warn!(pid, error = %e, "could not restore the signal disposition");
        }
    }

    fn unregister(&self, caller: Caller, pid: i32) -> Result<Response, String> {
        let entry = {
            let mut state = self.lock();
            let Some(entry) = state.entries.get(&pid) else {
                return Err(format!("PID {pid} is not registered"));
            };
            if caller.uid != 0 && caller.uid != entry.uid {
                return Err(format!(
                    "permission denied: PID {pid} belongs to uid {}",
                    entry.uid
                ));
            }
            let entry = state
                .release(pid, "the process was unregistered", true)
                .ok_or("vanished")?;
            let snapshot = self.snapshot(&mut state);
            drop(state);
            self.write_snapshot(snapshot);
            entry
        };
        if start_time(pid) == Some(entry.start_time) {
            self.put_back(pid, entry.previous_action);
        }
        if let Some(held) = self.log_registration(caller) {
            info!(pid, uid = caller.uid, suppressed = held, "unregistered");
        }
        Ok(Response::Ok)
    }

    fn list(&self, caller: Caller) -> Response {
        let state = self.lock();
        let mut entries: Vec<ListEntry> = state
            .entries
            .values()
            .filter(|e| caller.uid == 0 || caller.uid == e.uid)
            .map(|e| {
                let slot = self.states.load(e.slot);
                ListEntry {
                    pid: e.pid,
                    comm: e.comm.clone(),
                    uid: e.uid,
                    signal: e.signal,
                    flags: e.flags,
                    output: e.output.clone(),
                    checkpoints: e.checkpoints,
                    last_checkpoint: e.last_checkpoint,
                    state: state_name(slot.state).to_string(),
                    signals: slot.signals,
                    coalesced: slot.coalesced,
                    last_error: e.last_error.clone(),
                    children_not_saved: e.children_not_saved.clone(),
                }
            })
            .collect();
        drop(state);
        // The name changes on exec (`chpox run` registers first); read
        // without the lock.
        for e in &mut entries {
            if let Ok(comm) = crate::process::thread_comm(e.pid, e.pid) {
                e.comm = comm;
            }
        }
        entries.sort_by_key(|e| e.pid);
        Response::List { entries }
    }

    /// Send `pid` its trigger signal, as a user would, and return where
    /// the answer of the checkpoint it starts will come.
    fn begin_checkpoint(
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
    fn run_checkpoints(&self, event: Event) {
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
        loop {
            let number = {
                let mut state = self.lock();
                match state.entries.get_mut(&pid) {
                    Some(e) => {
                        e.started += 1;
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
                        Err(msg) => e.last_error = Some(msg.clone()),
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
            if self
                .states
                .transition(entry.slot, STATE_RUNNING, STATE_IDLE)
            {
                return;
            }
            // A trigger came while we were writing: one more, as asked.
            if !self
                .states
                .transition(entry.slot, STATE_RUNNING_AGAIN, STATE_RUNNING)
            {
                return;
            }
        }
    }

    /// Write checkpoint number `generation` (counting since registration).
    fn checkpoint_once(
        &self,
        entry: &Entry,
        event: &Event,
        generation: u64,
    ) -> Result<Written, String> {
        let pid = entry.pid;
        let mut opts = DumpOptions::new(&entry.output);
        // Checked by the dump once the process is frozen: a recycled PID
        // is refused, not checkpointed.
        opts.expect_start_time = Some(entry.start_time);
        opts.keep_previous = self.config.keep;
        opts.registration = Some(SavedRegistration {
            signal: entry.signal,
            flags: entry.flags,
        });
        if entry.as_owner {
            // The dump checks, once the tree is frozen, that this user may
            // trace every process of it.
            opts.as_user = Some(entry.owner_creds()?);
        }
        opts.embed_exe = entry.flags & flags::EMBED_EXE != 0;
        opts.children = entry.flags & flags::INCLUDE_CHILDREN != 0;
        opts.tcp = crate::fds::inet::TcpPolicy::from_flags(entry.flags);
        if entry.flags & flags::EMBED_LIBS != 0 {
            opts.embed_libs = self
                .lock()
                .libs
                .get(&entry.uid)
                .cloned()
                .unwrap_or_default();
        }
        // Descriptors chpox cannot restore yet must not cost a long-running
        // job its checkpoints: they are recorded and come back as /dev/null.
        opts.unsupported_fd = crate::fds::UnsupportedFd::Null;
        match dump(pid, &opts) {
            Ok(report) => {
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
                    frozen_ms = format!("{:.1}", report.frozen.as_secs_f64() * 1e3),
                    total_ms = format!("{:.1}", report.total.as_secs_f64() * 1e3),
                    signal_to_frozen_ms = format!("{:.2}", latency_ns as f64 / 1e6),
                    "checkpoint written"
                );
                Ok(Written {
                    image: report.image,
                    bytes: report.image_bytes,
                    signal_to_frozen_us: latency_ns / 1000,
                    frozen_us: report.frozen.as_micros() as u64,
                    processes: report.processes,
                    children_not_saved: report.children_not_saved,
                })
            }
            Err(e) => {
                // A user can trigger failing checkpoints of their own
                // process as fast as they like: the log says it a few
                // times, `chpox list` every time.
                if let Some(held) = self.log_limit.allow(&format!("checkpoint failed {pid}")) {
                    error!(pid, error = %e, suppressed = held, "checkpoint failed");
                }
                Err(e.to_string())
            }
        }
    }

    /// What events may have missed: a request the program could only record
    /// in STATES (ring buffer full), and processes that died without an exit
    /// event. Returns the requests to serve.
    fn rescan(&self) -> Vec<Event> {
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

    fn forget(&self, state: &mut State, gone: &[i32]) -> Option<Snapshot> {
        for &pid in gone {
            if let Some(entry) = state.release(pid, "the process exited", true) {
                info!(pid, comm = %entry.comm, "registered process is gone");
            }
        }
        self.snapshot(state)
    }

    fn on_exit(&self, event: Event) {
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

    /// Take back the registrations a previous agent saved.
    fn restore_registrations(&self) {
        let path = self.config.run_dir.join(STATE_NAME);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let saved: Vec<Entry> = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, path = %path.display(), "ignoring unreadable saved registrations");
                return;
            }
        };
        let mut kept = Vec::new();
        for entry in saved {
            let alive = match liveness(entry.pid, entry.start_time) {
                Liveness::Same => true,
                Liveness::Gone => false,
                Liveness::Unknown(e) => {
                    warn!(pid = entry.pid, error = %e, "cannot tell whether a saved registration's process still runs; keeping it");
                    true
                }
            };
            let ignored = signals::disposition(entry.pid, entry.signal as i32)
                .is_ok_and(|d| d == Disposition::Ignored);
            if !alive || !ignored {
                warn!(pid = entry.pid, comm = %entry.comm, "registration lost: the process is gone or no longer ignores its signal");
                continue;
            }
            kept.push(entry);
        }
        let mut state = self.lock();
        for mut entry in kept {
            let Some(slot) = state.free_slots.pop() else {
                break;
            };
            entry.slot = slot;
            let reg = Registration {
                signal: entry.signal,
                flags: entry.flags,
                slot,
                _pad: 0,
                start_time: entry.start_time,
            };
            if let Err(e) = state.bpf.register(entry.pid as u32, reg) {
                warn!(pid = entry.pid, error = %e, "registration lost");
                state.free_slots.push(slot);
                continue;
            }
            info!(pid = entry.pid, comm = %entry.comm, "registration taken back after restart");
            state.entries.insert(entry.pid, entry);
        }
        // Saved again even if unchanged: the file gets mode 0600 if an
        // older agent left it readable by all.
        let snapshot = self.snapshot(&mut state);
        drop(state);
        self.write_snapshot(snapshot);
    }

    /// Admit a connection from `uid`, or say why not: each user other than
    /// root may hold `per_user` connections, all users together `users`,
    /// and root the rest of `total`, so no user can lock the others or
    /// root out, nor run the agent out of descriptors.
    fn admit_connection(self: &Arc<Self>, uid: u32) -> Result<ConnectionSlot, String> {
        let limits = self.limits;
        let mut c = lock(&self.connections);
        let open = c.root + c.users;
        if open >= limits.total {
            return Err(format!(
                "chpox-agent has {open} connections open, its most; try again shortly"
            ));
        }
        if uid == 0 {
            c.root += 1;
        } else {
            let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
            if mine >= limits.per_user {
                return Err(format!(
                    "uid {uid} has {mine} connections to chpox-agent open already, the most one user may; close some"
                ));
            }
            if c.users >= limits.users {
                return Err(format!(
                    "chpox-agent has {} connections of users open, its most; try again shortly",
                    c.users
                ));
            }
            c.users += 1;
            *c.by_uid.entry(uid).or_default() += 1;
        }
        Ok(ConnectionSlot {
            agent: Arc::clone(self),
            uid,
        })
    }
}

impl State {
    /// Drop `pid`'s registration: its entry, its slot, its map entries
    /// (`in_map`: unless the eBPF program removed them already), and tell
    /// whoever waits for its checkpoint `why`.
    fn release(&mut self, pid: i32, why: &str, in_map: bool) -> Option<Entry> {
        let entry = self.entries.remove(&pid)?;
        if in_map {
            self.bpf.unregister(pid as u32);
        }
        self.free_slots.push(entry.slot);
        for (_, w) in self.waiters.remove(&pid).unwrap_or_default() {
            let _ = w.send(Err(format!("PID {pid}: {why}")));
        }
        Some(entry)
    }
}

fn prepare_run_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let socket = dir.join(SOCKET_NAME);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "another chpox-agent is already serving {}; stop it first",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Run the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "chpox-agent must run as root (it loads eBPF and traces processes); use sudo"
        );
    }
    let fd_limit = raise_fd_limit();
    let limits = Limits::new(&config, fd_limit);
    info!(
        fd_limit,
        max_connections = limits.total,
        max_connections_per_user = limits.per_user,
        idle_timeout_s = limits.idle.as_secs_f64(),
        "connection limits"
    );
    prepare_run_dir(&config.run_dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.image_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", config.image_dir.display()))?;
    remove_stale_temps(&config.image_dir);

    let mut bpf = Bpf::load(config.ebpf_object.as_deref())?;
    let events = bpf
        .events
        .take()
        .ok_or_else(|| anyhow::anyhow!("event ring buffer missing"))?;
    let logger = bpf.logger.take();
    let states = bpf.states();
    let agent = Arc::new(Agent {
        config: config.clone(),
        state: Mutex::new(State {
            entries: HashMap::new(),
            free_slots: (0..MAX_REGISTRATIONS).rev().collect(),
            libs: HashMap::new(),
            waiters: HashMap::new(),
            bpf,
            save_generation: 0,
        }),
        states,
        saved: Mutex::new(0),
        limits,
        connections: Mutex::new(Connections::default()),
        log_limit: LogLimiter::default(),
    });
    agent.restore_registrations();

    let socket_path = config.run_dir.join(SOCKET_NAME);
    let listener = UnixListener::bind(&socket_path)?;
    // Anyone may connect; the agent checks each caller's credentials.
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o666))?;
    start_fifo(Arc::clone(&agent), &config.run_dir)?;

    let event_task = tokio::spawn(serve_events(Arc::clone(&agent), events));
    tokio::spawn(rescan_periodically(Arc::clone(&agent)));
    if let Some(logger) = logger {
        tokio::spawn(serve_logger(logger));
    }
    info!(socket = %socket_path.display(), "chpox-agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    admit(&agent, stream);
                }
                Err(e) => {
                    if let Some(held) = agent.log_limit.allow("accept failed") {
                        warn!(error = %e, suppressed = held, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    }
                    // Out of descriptors (EMFILE, ENFILE) or memory, the
                    // connection stays queued and accept fails again at
                    // once: wait, longer each time, for some to close.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("chpox-agent stopping; registrations are kept for the next start");
    event_task.abort();
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(config.run_dir.join(FIFO_NAME));
    Ok(())
}

/// Catch what a full ring buffer made us miss.
async fn rescan_periodically(agent: Arc<Agent>) {
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

/// Serve a new connection if its user may open one more, else tell it why
/// (if its socket takes the line at once: a refused client is never waited
/// for) and close it.
fn admit(agent: &Arc<Agent>, stream: UnixStream) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            pid: c.pid(),
        },
        Err(e) => {
            if let Some(held) = agent.log_limit.allow("no credentials") {
                warn!(error = %e, suppressed = held, "no credentials on control connection");
            }
            return;
        }
    };
    match agent.admit_connection(caller.uid) {
        Ok(slot) => {
            tokio::spawn(serve_client(Arc::clone(agent), stream, caller, slot));
        }
        Err(message) => {
            if let Some(held) = agent.log_limit.allow(&format!("refused {}", caller.uid)) {
                warn!(uid = caller.uid, reason = %message, suppressed = held, "connection refused");
            }
            if let Ok(mut text) = serde_json::to_string(&Response::Error { message }) {
                text.push('\n');
                let _ = stream.try_write(text.as_bytes());
            }
        }
    }
}

/// Why a request line could not be read.
#[derive(Debug)]
enum LineError {
    /// Longer than [`MAX_REQUEST_LINE`].
    TooLong,
    Io(io::Error),
}

/// One request line, without its newline; `None` at the end of the stream.
/// At most `max` bytes are ever held: a longer line is an error as soon as
/// that many have come, whatever the client still sends.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            // A last line without its newline still counts.
            return Ok((!line.is_empty()).then_some(line));
        }
        let (chunk, used, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if line.len() + chunk.len() > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(chunk);
        reader.consume(used);
        if complete {
            return Ok(Some(line));
        }
    }
}

/// Send one response line, giving up after `timeout` (a client that does
/// not read its answers does not keep the connection for ever).
async fn reply<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    response: &Response,
    timeout: Duration,
) -> io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(io::Error::other)?;
    text.push('\n');
    tokio::time::timeout(timeout, write.write_all(text.as_bytes()))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn serve_client(
    agent: Arc<Agent>,
    stream: UnixStream,
    caller: Caller,
    _slot: ConnectionSlot,
) {
    let idle = agent.limits.idle;
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        // The whole line must come within the idle time: a client sending
        // a byte now and then holds a connection no longer than a silent one.
        let line = match tokio::time::timeout(idle, read_line(&mut reader, MAX_REQUEST_LINE)).await
        {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(LineError::Io(e))) => {
                debug!(uid = caller.uid, error = %e, "control connection failed");
                return;
            }
            Err(_) => {
                debug!(
                    uid = caller.uid,
                    idle_s = idle.as_secs_f64(),
                    "closing an idle connection"
                );
                return;
            }
            Ok(Err(LineError::TooLong)) => {
                if let Some(held) = agent.log_limit.allow(&format!("too long {}", caller.uid)) {
                    warn!(
                        uid = caller.uid,
                        max_bytes = MAX_REQUEST_LINE,
                        suppressed = held,
                        "request line too long; connection closed"
                    );
                }
                let message = format!(
                    "request longer than {} KiB; connection closed",
                    MAX_REQUEST_LINE / 1024
                );
                let _ = reply(&mut write, &Response::Error { message }, idle).await;
                return;
            }
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => agent.serve(caller, req).await,
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        if reply(&mut write, &response, idle).await.is_err() {
            return;
        }
    }
}

async fn serve_events(agent: Arc<Agent>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
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
            let agent = Arc::clone(&agent);
            match event.kind {
                EVENT_CHECKPOINT => {
                    tokio::task::spawn_blocking(move || agent.run_checkpoints(event));
                }
                // It saves the registrations to a file: not on this task.
                EVENT_EXIT => {
                    tokio::task::spawn_blocking(move || agent.on_exit(event));
                }
                other => warn!(kind = other, "unknown event"),
            }
        }
        guard.clear_ready();
    }
}

/// Register a ring buffer (events or logs) with tokio for readability.
fn readable_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is a ring buffer that owns its map's descriptor for
    // as long as it lives, and returns that same descriptor from
    // as_raw_fd() every time; the AsyncFd owns `inner`, so the descriptor
    // outlives the registration.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

async fn serve_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
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

/// The old-style register FIFO: `echo PID:SIG:FLAGS:FILE > /run/chpox/register`.
/// Root-only (mode 0600), so each line is handled as root's request.
fn start_fifo(agent: Arc<Agent>, run_dir: &Path) -> anyhow::Result<()> {
    let path = run_dir.join(FIFO_NAME);
    let _ = std::fs::remove_file(&path);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("register-fifo".into())
        .spawn(move || {
            loop {
                // Blocks until a writer opens it; EOF when the writer closes.
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        error!(error = %e, path = %path.display(), "register FIFO unusable");
                        return;
                    }
                };
                // Bytes, not lines of text: one line that is not UTF-8 is
                // rejected alone and the lines after it still count.
                let mut reader = BufReader::new(file);
                loop {
                    let bytes = match read_fifo_line(&mut reader) {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "register line rejected");
                            continue;
                        }
                    };
                    match String::from_utf8(bytes) {
                        Ok(line) if line.trim().is_empty() => {}
                        Ok(line) => handle_register_line(&agent, &line),
                        Err(e) => warn!(
                            line = %String::from_utf8_lossy(e.as_bytes()),
                            reason = "not text",
                            "register line rejected"
                        ),
                    }
                }
            }
        })?;
    Ok(())
}

fn handle_register_line(agent: &Agent, line: &str) {
    match parse_register_line(line) {
        Err(reason) => warn!(line, reason, "register line rejected"),
        Ok(reg) => {
            let response = agent.handle(
                Caller::ROOT,
                Request::Register(RegisterRequest {
                    signal: reg.signal,
                    flags: reg.flags,
                    output: Some(reg.output),
                    ..RegisterRequest::new(reg.pid)
                }),
            );
            if let Handled::Now(Response::Error { message }) = response {
                warn!(line, reason = message, "register line rejected");
            }
        }
    }
}

/// One line of the register FIFO, without its newline; `None` at EOF. A
/// line longer than [`MAX_REQUEST_LINE`] is skipped whole and is an error:
/// no more than that is ever held.
fn read_fifo_line(reader: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = MAX_REQUEST_LINE as u64 + 1;
    if reader.take(limit).read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(line));
    }
    if line.len() <= MAX_REQUEST_LINE {
        return Ok(Some(line)); // the last line, without a newline
    }
    // Skip the rest of the line, a bounded piece at a time.
    loop {
        line.clear();
        let n = reader.take(limit).read_until(b'\n', &mut line)?;
        if n == 0 || line.last() == Some(&b'\n') {
            break;
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("line longer than {} KiB", MAX_REQUEST_LINE / 1024),
    ))
}

/// Raise the soft limit on open descriptors to the hard one (at most
/// `fs.nr_open`): each connection and each file a dump holds open is a
/// descriptor, and the usual soft limit of 1024 is soon reached. Returns
/// the soft limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the descriptor limit");
            return 1024;
        }
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(e) => {
            warn!(error = %e, soft, hard, "cannot raise the descriptor limit");
            soft
        }
    }
}

/// Whether `name` is one of our temporary image files,
/// `.<image name>.chpox-tmp.<pid>.<n>` (as `image::writer` names them),
/// and if so the PID of the process that wrote it.
fn temp_file_writer(name: &[u8]) -> Option<u32> {
    const MARK: &[u8] = b".chpox-tmp.";
    let rest = name.strip_prefix(b".")?;
    let at = rest.windows(MARK.len()).rposition(|w| w == MARK)?;
    if at == 0 {
        return None; // no image name
    }
    let tail = std::str::from_utf8(&rest[at + MARK.len()..]).ok()?;
    let (pid, n) = tail.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Whether the process that wrote a temporary file last modified at
/// `mtime` (Unix seconds) may still be writing it: a process `pid` exists
/// and started before then (a later one only reuses the PID).
fn writer_may_live(pid: u32, mtime: i64) -> bool {
    let Some(started_ticks) = start_time(pid as i32) else {
        return false;
    };
    let Ok(boot) = procfs::boot_time_secs() else {
        return true; // cannot tell: keep the file
    };
    let ticks = procfs::ticks_per_second();
    let started = boot + started_ticks / ticks.max(1);
    // One second of slack for the rounding of both times.
    started <= u64::try_from(mtime).unwrap_or(0) + 1
}

/// Remove the temporary files interrupted dumps (a SIGKILLed agent, a
/// power loss) left in the image directory and in its per-user
/// directories: only regular files named exactly as the image writer names
/// them, whose writer is gone. Each directory is opened without following
/// a symlink and files are removed relative to it, so a user who controls
/// their own image directory cannot point this elsewhere. Best effort.
fn remove_stale_temps(image_dir: &Path) {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    // The image directory is root's choice, a link to elsewhere included;
    // the per-user directories in it are not followed if links.
    let Ok(top) = nix::fcntl::open(image_dir, flags, Mode::empty()) else {
        return;
    };
    let mut dirs = vec![(image_dir.to_path_buf(), top)];
    for name in dir_names(&dirs[0].1) {
        // The per-user directories: /var/lib/chpox/UID.
        if !name.is_empty()
            && name.iter().all(u8::is_ascii_digit)
            && let Ok(fd) = openat(
                &dirs[0].1,
                name.as_slice(),
                flags | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
        {
            let path = image_dir.join(std::ffi::OsStr::from_bytes(&name));
            dirs.push((path, fd));
        }
    }
    for (path, dir) in &dirs {
        for name in dir_names(dir) {
            let Some(pid) = temp_file_writer(&name) else {
                continue;
            };
            let Ok(st) = nix::sys::stat::fstatat(
                dir,
                name.as_slice(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || writer_may_live(pid, st.st_mtime) {
                continue;
            }
            let file = path.join(std::ffi::OsStr::from_bytes(&name));
            match nix::unistd::unlinkat(
                dir,
                name.as_slice(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) => {
                    info!(file = %file.display(), bytes = st.st_size, "removed a temporary file left by an interrupted dump")
                }
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "cannot remove a stale temporary file")
                }
            }
        }
    }
}

/// The names in directory `dir` (not `.` and `..`).
fn dir_names(dir: &std::os::fd::OwnedFd) -> Vec<Vec<u8>> {
    use nix::fcntl::OFlag;
    let Ok(mut listing) = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) else {
        return Vec::new();
    };
    listing
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_become_safe_file_names() {
        assert_eq!(safe_file_name("mempattern"), "mempattern");
        assert_eq!(safe_file_name("../../../etc/pw"), "_.._.._etc_pw");
        assert_eq!(safe_file_name(".."), "process");
        assert_eq!(safe_file_name(""), "process");
        assert_eq!(safe_file_name(".hidden"), "hidden");
        assert_eq!(safe_file_name("a b\n\u{1b}[0m"), "a_b___0m");
        assert_eq!(safe_file_name(&"x".repeat(300)).len(), 64);
        for name in ["../x", "/etc/passwd", "..", ".", "a/../../b"] {
            let safe = safe_file_name(name);
            assert!(
                !safe.contains('/') && !safe.starts_with('.'),
                "{name:?} -> {safe:?}"
            );
        }
    }

    #[test]
    fn only_our_exact_temp_names_match() {
        assert_eq!(
            temp_file_writer(b".job-12.chpox.chpox-tmp.4242.0"),
            Some(4242)
        );
        assert_eq!(temp_file_writer(b".a.chpox-tmp.b.chpox-tmp.7.12"), Some(7));
        for other in [
            &b"job.chpox.chpox-tmp.42.0"[..],
            b".job.chpox-tmp.42",
            b".job.chpox-tmp.42.",
            b".job.chpox-tmp.x.0",
            b".job.chpox-tmp.42.0.bak",
            b"..chpox-tmp.42.0",
            b".chpox-tmp.42.0",
            b".job.chpox",
        ] {
            assert_eq!(
                temp_file_writer(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn log_lines_of_a_kind_are_rate_limited_and_counted() {
        let limiter = LogLimiter::default();
        for _ in 0..LOG_BURST {
            assert_eq!(limiter.allow("a"), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limiter.allow("a"), None);
        }
        assert_eq!(limiter.allow("b"), Some(0), "another kind is not held back");
        lock(&limiter.0).get_mut("a").expect("window").start -= LOG_PERIOD;
        assert_eq!(
            limiter.allow("a"),
            Some(1000),
            "the next line says how many were held"
        );
    }

    #[test]
    fn only_a_missing_process_is_gone() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("our start time");
        assert!(matches!(liveness(me, start), Liveness::Same));
        assert!(matches!(liveness(me, start + 1), Liveness::Gone));
        assert!(matches!(liveness(i32::MAX, 0), Liveness::Gone));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EACCES] {
            let err = Err(io::Error::from_raw_os_error(errno));
            assert!(
                matches!(liveness_from(me, start, err), Liveness::Unknown(_)),
                "errno {errno} taken for a process gone"
            );
        }
        let esrch = Err(io::Error::from_raw_os_error(libc::ESRCH));
        assert!(matches!(liveness_from(me, start, esrch), Liveness::Gone));
        let zombie = format!("{me} (a) b) Z 1 {}", "0 ".repeat(17) + &start.to_string());
        assert!(matches!(
            liveness_from(me, start, Ok(zombie)),
            Liveness::Gone
        ));
    }

    #[tokio::test]
    async fn a_request_line_is_capped() {
        let mut input: &[u8] = b"{\"op\":\"list\"}\nlast";
        assert_eq!(
            read_line(&mut input, 64).await.expect("line"),
            Some(b"{\"op\":\"list\"}".to_vec())
        );
        assert_eq!(
            read_line(&mut input, 64).await.expect("line"),
            Some(b"last".to_vec())
        );
        assert_eq!(read_line(&mut input, 64).await.expect("eof"), None);
        let long = vec![b'x'; 1000];
        let mut input: &[u8] = &long;
        assert!(matches!(
            read_line(&mut input, 64).await,
            Err(LineError::TooLong)
        ));
    }

    #[test]
    fn a_long_fifo_line_is_skipped_and_the_next_one_read() {
        let mut data = vec![b'x'; MAX_REQUEST_LINE * 3];
        data.extend_from_slice(b"\n1:31:1:/tmp/f\n");
        let mut reader = BufReader::new(data.as_slice());
        assert!(read_fifo_line(&mut reader).is_err());
        assert_eq!(
            read_fifo_line(&mut reader).expect("next line"),
            Some(b"1:31:1:/tmp/f".to_vec())
        );
        assert_eq!(read_fifo_line(&mut reader).expect("eof"), None);
    }
}
