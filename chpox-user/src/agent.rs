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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use chpox_common::{
    EVENT_CHECKPOINT, EVENT_EXIT, Event, MAX_REGISTRATIONS, Registration, STATE_IDLE,
    STATE_REQUESTED, STATE_RUNNING, STATE_RUNNING_AGAIN, flags,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, error, info, warn};

use crate::bpf::{Bpf, StatesMap, parse_event};
use crate::control::{
    FIFO_NAME, ListEntry, RegisterRequest, Request, Response, SOCKET_NAME, STATE_NAME,
    parse_register_line,
};
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
}

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
    waiters: HashMap<i32, Vec<(u64, mpsc::Sender<Outcome>)>>,
    bpf: Bpf,
}

pub struct Agent {
    config: AgentConfig,
    state: Mutex<State>,
    states: Arc<StatesMap>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, state: &State) {
        let entries: Vec<&Entry> = state.entries.values().collect();
        let path = self.config.run_dir.join(STATE_NAME);
        let tmp = self.config.run_dir.join(format!(".{STATE_NAME}.tmp"));
        let result = serde_json::to_vec_pretty(&entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            warn!(error = %e, path = %path.display(), "could not save registrations");
        }
    }

    /// Handle one request. Blocking: may freeze a process or wait for a
    /// checkpoint; call from a blocking thread.
    pub fn handle(&self, caller: Caller, req: Request) -> Response {
        let result = match req {
            Request::Register(req) => self.register(caller, req),
            Request::Unregister { pid } => self.unregister(caller, pid),
            Request::List => Ok(self.list(caller)),
            Request::Checkpoint { pid, timeout_secs } => {
                self.checkpoint(caller, pid, Duration::from_secs(timeout_secs))
            }
            Request::AddLib { path } => self.edit_libs(caller, |libs| {
                if !path.is_absolute() {
                    return Err(format!(
                        "{} is not an absolute path; give the library's full path",
                        path.display()
                    ));
                }
                // Readable by the caller, by the kernel's own checks: the
                // agent must not become a way to read other users' files.
                crate::creds::as_user(&Self::caller_creds(caller), || std::fs::File::open(&path))
                    .and_then(|r| r)
                    .map_err(|e| format!("cannot add {}: {e}", path.display()))?;
                if !libs.contains(&path) {
                    libs.push(path.clone());
                }
                Ok(())
            }),
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
        result.unwrap_or_else(|message| Response::Error { message })
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
    fn caller_creds(caller: Caller) -> crate::creds::UserCreds {
        caller
            .pid
            .and_then(|pid| crate::creds::UserCreds::of_process(pid).ok())
            .filter(|c| c.uid == caller.uid)
            .unwrap_or(crate::creds::UserCreds {
                uid: caller.uid,
                gid: caller.uid,
                groups: Vec::new(),
            })
    }

    /// Where a user's images go by default: a directory of their own.
    fn default_image_dir(&self, creds: &crate::creds::UserCreds) -> Result<PathBuf, String> {
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
    fn check_writable(creds: &crate::creds::UserCreds, output: &Path) -> Result<(), String> {
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
        let as_owner = caller.uid != 0;
        let owner_creds = if as_owner {
            Self::caller_creds(caller)
        } else {
            crate::creds::UserCreds {
                uid: 0,
                gid: 0,
                groups: Vec::new(),
            }
        };
        let output = match output {
            Some(p) if p.is_absolute() => p,
            Some(p) => return Err(format!("output {} must be an absolute path", p.display())),
            None => self
                .default_image_dir(&owner_creds)?
                .join(format!("{comm}-{pid}.chpox")),
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
        // The process may have exited between our checks and the insert; the
        // exit tracepoint would then have found nothing to remove.
        if start_time(pid) != Some(start) {
            state.bpf.unregister(pid as u32);
            state.free_slots.push(slot);
            return Err(format!("PID {pid} exited while being registered"));
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
                slot,
                checkpoints: 0,
                started: 0,
                last_checkpoint: None,
                last_error: None,
                children_not_saved: Vec::new(),
                warned_children: false,
            },
        );
        self.save(&state);
        info!(pid, comm, signal, flags, output = %output.display(), "registered");
        Ok(Response::Registered {
            pid,
            signal,
            output,
        })
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
            self.save(&state);
            entry
        };
        if start_time(pid) == Some(entry.start_time) {
            self.put_back(pid, entry.previous_action);
        }
        info!(pid, "unregistered");
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
                    // The name changes on exec (`chpox run` registers first).
                    comm: crate::process::thread_comm(e.pid, e.pid)
                        .unwrap_or_else(|_| e.comm.clone()),
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
        entries.sort_by_key(|e| e.pid);
        Response::List { entries }
    }

    fn checkpoint(&self, caller: Caller, pid: i32, timeout: Duration) -> Result<Response, String> {
        let (tx, rx) = mpsc::channel();
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
            state
                .waiters
                .entry(pid)
                .or_default()
                .push((first_acceptable, tx));
            signal
        };
        // The same signal a user would send: the whole path is exercised.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::try_from(signal as i32).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("cannot signal PID {pid}: {e}"))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok((w, generation))) => Ok(Response::Checkpointed {
                pid,
                image: w.image,
                generation,
                bytes: w.bytes,
                signal_to_frozen_us: w.signal_to_frozen_us,
                frozen_us: w.frozen_us,
                processes: w.processes,
                children_not_saved: w.children_not_saved,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "no checkpoint of PID {pid} within {} s",
                timeout.as_secs()
            )),
        }
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
            opts.as_user = Some(
                crate::creds::UserCreds::of_process(pid)
                    .map_err(|e| format!("cannot read the credentials of PID {pid}: {e}"))?,
            );
        }
        opts.embed_exe = entry.flags & flags::EMBED_EXE != 0;
        opts.children = entry.flags & flags::INCLUDE_CHILDREN != 0;
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
                error!(pid, error = %e, "checkpoint failed");
                Err(e.to_string())
            }
        }
    }

    /// What events may have missed: a request the program could only record
    /// in STATES (ring buffer full), and processes that died without an exit
    /// event. Returns the requests to serve.
    fn rescan(&self) -> Vec<Event> {
        let mut state = self.lock();
        let gone: Vec<i32> = state
            .entries
            .values()
            .filter(|e| start_time(e.pid) != Some(e.start_time))
            .map(|e| e.pid)
            .collect();
        if !gone.is_empty() {
            self.forget(&mut state, &gone);
        }
        state
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
            .collect()
    }

    fn forget(&self, state: &mut State, gone: &[i32]) {
        for &pid in gone {
            if let Some(entry) = state.release(pid, "the process exited", true) {
                info!(pid, comm = %entry.comm, "registered process is gone");
            }
        }
        self.save(state);
    }

    fn on_exit(&self, event: Event) {
        let pid = event.tgid as i32;
        let mut state = self.lock();
        // The eBPF program dropped it from the map already, at the exit.
        if let Some(entry) = state.release(pid, "the process exited", false) {
            self.save(&state);
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
        let mut state = self.lock();
        for mut entry in saved {
            let alive = start_time(entry.pid) == Some(entry.start_time);
            let ignored = signals::disposition(entry.pid, entry.signal as i32)
                .is_ok_and(|d| d == Disposition::Ignored);
            if !alive || !ignored {
                warn!(pid = entry.pid, comm = %entry.comm, "registration lost: the process is gone or no longer ignores its signal");
                continue;
            }
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
        self.save(&state);
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
    prepare_run_dir(&config.run_dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.image_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", config.image_dir.display()))?;

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
        }),
        states,
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve_client(Arc::clone(&agent), stream)); }
                Err(e) => warn!(error = %e, "accept failed"),
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

async fn serve_client(agent: Arc<Agent>, stream: UnixStream) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            pid: c.pid(),
        },
        Err(e) => {
            warn!(error = %e, "no credentials on control connection");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let agent = Arc::clone(&agent);
                tokio::task::spawn_blocking(move || agent.handle(caller, req))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("internal error: {e}"),
                    })
            }
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
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
                for line in BufReader::new(file).split(b'\n') {
                    let Ok(bytes) = line else { break };
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
            if let Response::Error { message } = response {
                warn!(line, reason = message, "register line rejected");
            }
        }
    }
}
