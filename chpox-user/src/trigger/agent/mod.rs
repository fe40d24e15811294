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
    EVENT_CHECKPOINT, EVENT_DISPOSITION, EVENT_EXIT, Event, MAX_REGISTRATIONS, Registration,
    STATE_IDLE, STATE_REQUESTED, STATE_RUNNING, STATE_RUNNING_AGAIN, flags,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::bpf::{Bpf, StatesMap, parse_event};
use crate::control::{
    FIFO_NAME, ListEntry, MAX_KEEP, MAX_REQUEST_LINE, MIN_INTERVAL, RegisterRequest, Request,
    Response, SOCKET_NAME, STATE_NAME, format_duration, parse_register_line,
};
use crate::creds::UserCreds;
use crate::dump::DumpOptions;
use crate::image::model::{SavedRegistration, SigAction};
use crate::process::{monotonic_ns, unix_now};
use crate::signals::{self, Disposition};

mod checkpoints;
pub mod config;
mod dispositions;
mod fifo;
mod files;
mod registrations;
mod server;
mod timer;

use checkpoints::*;
use fifo::*;
use files::*;
use server::*;
use timer::*;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Periodic checkpoints for registrations that ask for no interval.
    pub default_interval: Option<Duration>,
    pub run_dir: PathBuf,
    pub ebpf_object: Option<PathBuf>,
    /// Earlier images kept per registration (`FILE.1` … `FILE.N`).
    pub keep: u32,
    /// Every this many checkpoints of a registration is a full one (1:
    /// all of them; 0: only when needed); the others are incremental.
    pub full_every: u32,
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
    /// Checkpoint on a timer too, every this many milliseconds.
    #[serde(default)]
    every_ms: Option<u64>,
    /// Earlier images kept; None: the agent's `--keep`.
    #[serde(default)]
    keep: Option<u32>,
    /// Every this many checkpoints is full; None: the agent's.
    #[serde(default)]
    full_every: Option<u32>,
    /// Descriptors chpox cannot restore become /dev/null rather than
    /// failing the checkpoint (the registration opted in).
    #[serde(default)]
    unsupported_fd_null: bool,
    /// When the timer next asks for a checkpoint.
    #[serde(skip)]
    next_due: Option<Instant>,
    /// The timer asked for the checkpoint that follows the running one.
    #[serde(skip)]
    timer_again: bool,
    #[serde(skip)]
    timer_ticks: u64,
    #[serde(skip)]
    timer_checkpoints: u64,
    /// The last checkpoint error the log said, so each is said once.
    #[serde(skip)]
    logged_error: Option<String>,
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
    /// Processes written from a copy-on-write snapshot.
    snapshots: usize,
    /// Pages of an increment read before the freeze.
    pages_read_before_freeze: u64,
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
    /// Write tracking between checkpoints, per registered PID (with the
    /// process's start time): what makes the next checkpoint incremental.
    tracking: HashMap<i32, (u64, crate::incremental::Tracking)>,
    /// Per registered PID, the `rt_sigaction` calls the agent made in it
    /// itself (giving a process its own handler back) whose eBPF events are
    /// still to come: skipped, or each would make the next (`dispositions`).
    own_actions: HashMap<i32, u32>,
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
    /// The BPF LSM guard is attached: a trigger signal never reaches a
    /// registered process that would not ignore it.
    guard_active: bool,
    /// Wakes the periodic timer when registrations change.
    timer_changed: tokio::sync::Notify,
    /// The members of registered trees, kept by the eBPF program: a tree
    /// is frozen without scanning /proc between the stops.
    tree: Arc<crate::bpf::TreeMembers>,
    /// Mappings' flags of frozen processes without smaps, through the
    /// eBPF `task_vma` iterator (`memory::vmflags`), where it loaded.
    vma_flags: Option<Arc<crate::memory::vmflags::KernelVmaFlags>>,
    /// What remote syscalls would ask of frozen processes, through the
    /// eBPF `task` iterator (`process::kernelstate`), where it loaded.
    kernel_state: Option<Arc<crate::process::kernelstate::KernelState>>,
    /// A thread learns `vma_flags` patterns (see [`Agent::learn_flags_soon`]).
    learning_flags: Arc<std::sync::atomic::AtomicBool>,
}

/// The registrations as they were at one change, to be written to disk
/// once the state lock is released.
struct Snapshot {
    generation: u64,
    bytes: Vec<u8>,
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
                snapshots: w.snapshots,
                pages_read_before_freeze: w.pages_read_before_freeze,
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
}

impl State {
    /// Drop `pid`'s registration: its entry, its slot, its map entries
    /// (`in_map`: unless the eBPF program removed them already), and tell
    /// whoever waits for its checkpoint `why`.
    fn release(&mut self, pid: i32, why: &str, in_map: bool) -> Option<Entry> {
        let entry = self.entries.remove(&pid)?;
        self.tracking.remove(&pid);
        self.own_actions.remove(&pid);
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

/// Run the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "chpox-agent must run as root (it loads eBPF and traces processes); use sudo"
        );
    }
    let fd_limit = raise_fd_limit();
    // Checkpoints freeze first and describe the host while frozen.
    crate::process::warm_cpu_model();
    crate::ptrace::warm_xstate_buffer();
    crate::dirty::warm();
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
    let guard_active = bpf.guard == crate::bpf::Guard::Active;
    match &bpf.guard {
        crate::bpf::Guard::Active => info!(
            "trigger guard active (BPF LSM): the trigger signal never reaches a registered process that would not ignore it"
        ),
        crate::bpf::Guard::Unavailable(why) if bpf.watch => warn!(
            reason = %why,
            "trigger guard unavailable: a registered process is protected by SIG_IGN, which the agent sets again within milliseconds when the process resets it; a trigger signal in between kills it"
        ),
        crate::bpf::Guard::Unavailable(why) => warn!(
            reason = %why,
            "trigger guard unavailable: a registered process is protected by SIG_IGN alone, so one that sets its trigger signal back to the default is killed by it"
        ),
    }
    let states = bpf.states();
    let tree = bpf.tree();
    let vma_flags = bpf.vma_iter.clone().map(|iter| {
        crate::memory::vmflags::KernelVmaFlags::from_cache(Box::new(move |pid| iter.read(pid)))
    });
    let kernel_state = bpf.task_iter.clone().map(|iter| {
        crate::process::kernelstate::KernelState::new(Box::new(move |pid| iter.read(pid)))
    });
    let agent = Arc::new(Agent {
        config: config.clone(),
        state: Mutex::new(State {
            entries: HashMap::new(),
            free_slots: (0..MAX_REGISTRATIONS).rev().collect(),
            libs: HashMap::new(),
            waiters: HashMap::new(),
            bpf,
            save_generation: 0,
            tracking: HashMap::new(),
            own_actions: HashMap::new(),
        }),
        states,
        saved: Mutex::new(0),
        limits,
        connections: Mutex::new(Connections::default()),
        log_limit: LogLimiter::default(),
        guard_active,
        timer_changed: tokio::sync::Notify::new(),
        tree,
        vma_flags,
        kernel_state,
        learning_flags: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    agent.restore_registrations();

    let socket_path = config.run_dir.join(SOCKET_NAME);
    let listener = UnixListener::bind(&socket_path)?;
    // Anyone may connect; the agent checks each caller's credentials.
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o666))?;
    start_fifo(Arc::clone(&agent), &config.run_dir)?;

    let event_task = tokio::spawn(serve_events(Arc::clone(&agent), events));
    tokio::spawn(rescan_periodically(Arc::clone(&agent)));
    tokio::spawn(run_timer(Arc::clone(&agent)));
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
                        warn!(error = %e, suppressed = held, retry_in_us = backoff.as_micros() as u64, "accept failed");
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
    // The register FIFO stays: a writer meanwhile waits for the next agent.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
