//! `chpox job`: run a batch job so that running the same command again
//! after any interruption carries it on from its last checkpoint.
//!
//! `chpox job --image IMG -- CMD` restores the job from IMG when there is
//! one, and otherwise starts CMD; either way the job is registered with
//! the agent (checkpoints go to IMG) and is our child, so a batch system
//! that tracks a job by its descendants (Slurm's proctrack/linuxproc) sees
//! and cleans up the restored job as it did the first one. We stay its
//! parent: we forward SIGTERM, SIGINT and SIGHUP, and exit with its status
//! (128 + N when signal N killed it), like a shell running it.
//!
//! Checkpoints are the agent's: `--every` asks it on a timer, and SIGSYS
//! (31) sent to us asks it now, both with the control protocol's
//! `checkpoint` request, which sends the job its trigger signal and waits
//! until that checkpoint is written — so the agent's coalescing applies and
//! a tick during a checkpoint makes at most one more.
//!
//! # Requeue
//!
//! Slurm's `--signal=B:31@N` sends SIGSYS to the batch script, that is to
//! us once the script `exec`s `chpox job`. With `--requeue` we then:
//! 1. stop the periodic checkpoints (none may start after this one);
//! 2. SIGSTOP the job's processes and wait until they are stopped: the
//!    image is then its last state, so it does nothing the image lacks
//!    (output written after the image would be written twice on resume);
//! 3. ask for a checkpoint and wait until the image is durably on disk
//!    (fsynced, renamed over IMG, the previous one kept as IMG.1);
//! 4. run `scontrol requeue $SLURM_JOB_ID`, and once Slurm accepted it,
//!    SIGKILL the job's processes. Slurm ends a job by sending SIGCONT
//!    *then* SIGTERM: a job left stopped would run between the two and
//!    could write output its image lacks (seen: a step's line twice in a
//!    requeued job's output). Should Slurm's SIGKILL come while an image
//!    is still being written, the agent's temporary file is discarded and
//!    IMG stays the previous complete image.
//!
//! Such an image holds the job stopped; restoring it, we continue it. A
//! failed checkpoint is not followed by a requeue, and a failed requeue
//! is not either: the job is continued and runs on to its time limit, IMG
//! the last good image.
//!
//! # Our own death
//!
//! If `chpox job` is killed, the job dies with it, the whole tree: see
//! [`guard`].

mod caught;
mod guard;
mod launch;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use tracing::info;

use crate::control::{self, ClientError, Request, Response};

/// The signal that asks `chpox job` for a checkpoint now (SIGSYS).
pub const CHECKPOINT_SIGNAL: i32 = chpox_common::DEFAULT_TRIGGER_SIGNAL as i32;

/// The longest a checkpoint may take before we give up waiting.
const CHECKPOINT_WAIT_SECS: u64 = 600;

/// What `chpox job` was asked to do.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Where the job's checkpoints go, and where it is restored from.
    pub image: PathBuf,
    /// Ask the agent for a checkpoint this often.
    pub every: Option<Duration>,
    /// After the checkpoint SIGSYS asks for, requeue the Slurm job.
    pub requeue: bool,
    /// Write the job's PID here.
    pub pidfile: Option<PathBuf>,
    /// The trigger signal and FLAGS a newly started job is registered with
    /// (a restored one: those saved in its image).
    pub signal: u32,
    pub flags: u32,
    /// The command that starts the job when there is no image yet.
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "--requeue asks Slurm to run the job again, but SLURM_JOB_ID is not set (not in a Slurm job)"
    )]
    RequeueOutsideSlurm,
    #[error("{path}: {reason}")]
    Path { path: String, reason: String },
    #[error("{image} is in use by another chpox job{}; one job per image", pid.map(|p| format!(" (PID {p})")).unwrap_or_default())]
    InUse { image: String, pid: Option<i32> },
    #[error("chpox job needs chpox-agent to checkpoint the job: {0}")]
    Agent(ClientError),
    #[error("cannot register the job (PID {pid}) with chpox-agent; nothing runs: {source}")]
    Register { pid: i32, source: ClientError },
    #[error("cannot restore the job from {image}: {source}; remove it to start the job over")]
    Restore {
        image: String,
        source: crate::error::Error,
    },
    #[error("cannot run {program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::errno::Errno,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> JobError {
    move |source| JobError::Sys { what, source }
}

/// A duration as `--every` takes it: a number with an optional unit, `ms`,
/// `s` (the default), `m`, `h` or `d` (`90`, `30s`, `10m`, `1h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 30s, 10m, 1h)"))?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    if d < Duration::from_millis(100) {
        return Err(format!("{text:?} is too short (at least 100ms)"));
    }
    Ok(d)
}

/// What the threads of `chpox job` share.
struct Shared {
    run_dir: PathBuf,
    /// The job's root process, as we see it.
    pid: i32,
    image: PathBuf,
    requeue: bool,
    /// No more periodic checkpoints: the job is ending or being requeued.
    ending: Mutex<bool>,
    wake: Condvar,
    /// We stopped the job (SIGSTOP) for its last checkpoint, before a requeue.
    stopped_by_us: AtomicBool,
    /// A checkpoint asked by SIGSYS is under way.
    signal_checkpoint: AtomicBool,
}

impl Shared {
    fn set_ending(&self, value: bool) {
        *self.ending.lock().unwrap_or_else(|e| e.into_inner()) = value;
        self.wake.notify_all();
    }

    /// Ask the agent for a checkpoint of the job and wait until it is
    /// written; the image path, or the agent's one-line reason.
    fn checkpoint(&self) -> Result<PathBuf, ClientError> {
        let req = Request::Checkpoint {
            pid: self.pid,
            timeout_secs: CHECKPOINT_WAIT_SECS,
        };
        match control::request(
            &self.run_dir,
            &req,
            Duration::from_secs(CHECKPOINT_WAIT_SECS + 5),
        )? {
            Response::Checkpointed { image, .. } => {
                if let Some((pid, sig)) = caught::termination_in_flight(&image) {
                    let sig = Signal::try_from(sig).map_or(sig.to_string(), |s| s.to_string());
                    match caught::fall_back(&image) {
                        Ok(previous) => eprintln!(
                            "chpox: the checkpoint caught {sig} on its way to PID {pid}; {} is the previous image again ({})",
                            image.display(),
                            previous.display()
                        ),
                        Err(why) => eprintln!(
                            "chpox: warning: the checkpoint caught {sig} on its way to PID {pid}: restored, the job would get it again; {why}"
                        ),
                    }
                }
                Ok(image)
            }
            other => Err(ClientError::Decode(format!("{other:?}"))),
        }
    }

    /// Undo a requeue that did not happen: the job runs on, and so do
    /// the periodic checkpoints.
    fn run_on(&self) {
        self.stopped_by_us.store(false, Ordering::SeqCst);
        self.signal_tree(Signal::SIGCONT);
        self.set_ending(false);
    }

    /// Wait until every process of the job is in a job-control stop.
    fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // (The root is the list's first entry.)
            let pids = crate::tree::descendants_now(self.pid);
            if pids
                .iter()
                .all(|&p| matches!(state(p), None | Some('T' | 'Z' | 'X')))
            {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send `sig` to the job's root and every descendant it has now.
    fn signal_tree(&self, sig: Signal) {
        // Once each: a second SIGSTOP reaching a process already stopped
        // would stay pending, and be in its image.
        for pid in crate::tree::descendants_now(self.pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
    }
}

/// Run the job; returns its shell-style exit status.
pub fn run(opts: &JobOptions) -> Result<i32, JobError> {
    let slurm_job = std::env::var("SLURM_JOB_ID").ok().filter(|s| !s.is_empty());
    if opts.requeue && slurm_job.is_none() {
        return Err(JobError::RequeueOutsideSlurm);
    }
    let image = absolute(&opts.image)?;
    // From here the signals we act on wait for us in a signalfd (a SIGSYS
    // or SIGTERM while we start is acted on once the job runs); the job
    // gets an empty mask (started) or its saved one (restored).
    let mut watched = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        watched.add(sig);
    }
    watched.add(Signal::try_from(CHECKPOINT_SIGNAL).map_err(sys("the checkpoint signal"))?);
    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&watched), Some(&mut old_mask))
        .map_err(sys("sigprocmask"))?;
    let sfd = SignalFd::with_flags(&watched, SfdFlags::SFD_CLOEXEC).map_err(sys("signalfd"))?;

    // Held until we return; not inherited by the job (close-on-exec, and
    // a restored job gets the image's descriptors only).
    let lock = launch::lock_image(&image)?;
    let run_dir = control::run_dir();
    // Nothing starts unless its checkpoints can be taken.
    control::request(&run_dir, &Request::List, Duration::from_secs(60)).map_err(JobError::Agent)?;
    // Still single-threaded, as the guard's fork needs.
    let mut guard = {
        use std::os::fd::AsRawFd;
        guard::Guard::spawn(&[lock.as_raw_fd(), sfd.as_raw_fd()])?
    };

    let (pid, wait_pid) = if launch::image_exists(&image)? {
        launch::restore(&image, &run_dir)?
    } else {
        let pid = launch::start(opts, &image, &run_dir)?;
        (pid, pid)
    };
    guard.guard(pid);
    eprintln!(
        "chpox: job PID {pid}: checkpoints go to {}{}",
        image.display(),
        opts.every
            .map(|d| format!(", every {}", humanize(d)))
            .unwrap_or_default()
    );
    if let Some(pidfile) = &opts.pidfile
        && let Err(e) = launch::write_pidfile(pidfile, pid)
    {
        // The job runs already: a lost pidfile must not cost it its life.
        eprintln!("chpox: warning: {e}");
    }

    let shared = Arc::new(Shared {
        run_dir,
        pid,
        image,
        requeue: opts.requeue,
        ending: Mutex::new(false),
        wake: Condvar::new(),
        stopped_by_us: AtomicBool::new(false),
        signal_checkpoint: AtomicBool::new(false),
    });
    if let Some(every) = opts.every {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("every".into())
            .spawn(move || tick(&shared, every))
            .map_err(|e| JobError::Start {
                program: "the checkpoint timer".into(),
                source: e,
            })?;
    }
    let code = serve(&shared, &sfd, wait_pid, slurm_job)?;
    if let Some(pidfile) = &opts.pidfile {
        launch::remove_pidfile(pidfile, pid);
    }
    Ok(code)
}

/// Wait for the job, acting on the signals we get meanwhile.
fn serve(
    shared: &Arc<Shared>,
    sfd: &SignalFd,
    wait_pid: i32,
    slurm_job: Option<String>,
) -> Result<i32, JobError> {
    loop {
        // The job may have ended before we read the signalfd (or between
        // restore and now): look first, then wait.
        if let Some(code) = reap(wait_pid)? {
            return Ok(code);
        }
        let info = match sfd.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(sys("reading the signalfd")(e)),
        };
        let signo = info.ssi_signo as i32;
        match signo {
            libc::SIGCHLD => {}
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => forward(shared, signo, info.ssi_code),
            _ if signo == CHECKPOINT_SIGNAL => {
                if shared.stopped_by_us.load(Ordering::SeqCst) {
                    // Being requeued: its last image is taken (or being
                    // taken), and the job waits, stopped, to be ended.
                    info!("a requeue is under way; signal {signo} ignored");
                    continue;
                }
                if shared.signal_checkpoint.swap(true, Ordering::SeqCst) {
                    info!("a checkpoint asked by signal {signo} is under way already");
                    continue;
                }
                let shared = Arc::clone(shared);
                let slurm_job = slurm_job.clone();
                std::thread::spawn(move || {
                    checkpoint_now(&shared, slurm_job.as_deref());
                    shared.signal_checkpoint.store(false, Ordering::SeqCst);
                });
            }
            _ => {}
        }
    }
}

/// Pass a termination or hangup signal on to the job.
fn forward(shared: &Shared, signo: i32, code: i32) {
    if signo != libc::SIGHUP {
        // The job is asked to end: no checkpoint of it may start now, or
        // the image would hold the pending signal and die on restore.
        shared.set_ending(true);
    }
    // A terminal's ^C (sent by the kernel to the foreground process group)
    // reached the job already when it is in our group: not twice.
    let from_terminal = code == libc::SI_KERNEL;
    let same_group = nix::unistd::getpgid(Some(Pid::from_raw(shared.pid)))
        .is_ok_and(|g| g == nix::unistd::getpgrp());
    if !(from_terminal && same_group)
        && let Ok(sig) = Signal::try_from(signo)
    {
        info!(pid = shared.pid, signal = %sig, "forwarding");
        let _ = nix::sys::signal::kill(Pid::from_raw(shared.pid), sig);
    }
    if shared.stopped_by_us.load(Ordering::SeqCst) {
        // Stopped for its last checkpoint: it must run to act on it.
        shared.signal_tree(Signal::SIGCONT);
    }
}

/// The SIGSYS path: checkpoint now; with `--requeue`, stop the job and
/// have Slurm run it again.
fn checkpoint_now(shared: &Shared, slurm_job: Option<&str>) {
    // `run` refused --requeue outside a Slurm job.
    let requeue = slurm_job.filter(|_| shared.requeue);
    if requeue.is_some() {
        // The image is the job's last state: stopped before it, the job
        // does nothing the image lacks (no output written twice).
        shared.set_ending(true);
        shared.stopped_by_us.store(true, Ordering::SeqCst);
        shared.signal_tree(Signal::SIGSTOP);
        if !shared.wait_stopped(Duration::from_secs(10)) {
            info!(
                pid = shared.pid,
                "not every process of the job stopped in time"
            );
        }
    }
    let image = match shared.checkpoint() {
        Ok(image) => image,
        Err(e) => {
            eprintln!(
                "chpox: the checkpoint asked by signal {CHECKPOINT_SIGNAL} failed: {e}{}",
                if requeue.is_some() {
                    "; the job is not requeued and runs on"
                } else {
                    ""
                }
            );
            if requeue.is_some() {
                shared.run_on();
            }
            return;
        }
    };
    eprintln!(
        "chpox: job PID {} checkpointed to {}",
        shared.pid,
        image.display()
    );
    let Some(job_id) = requeue else {
        return;
    };
    let requeued = std::process::Command::new("scontrol")
        .args(["requeue", job_id])
        .stdin(std::process::Stdio::null())
        .output();
    let failure = match requeued {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`scontrol requeue {job_id}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")
        )),
        Err(e) => Some(format!("cannot run `scontrol requeue {job_id}`: {e}")),
    };
    match failure {
        None => {
            // Said first: once the job is gone, our main thread returns.
            eprintln!(
                "chpox: Slurm job {job_id} requeued; it resumes from {}",
                shared.image.display()
            );
            // Still stopped, and to stay so until it is gone: see the
            // module's "Requeue".
            shared.signal_tree(Signal::SIGKILL);
        }
        Some(why) => {
            eprintln!(
                "chpox: {why}; the job runs on (its image is {})",
                image.display()
            );
            shared.run_on();
        }
    }
}

/// `--every`: one checkpoint request per period, until the job ends.
fn tick(shared: &Shared, every: Duration) {
    loop {
        let guard = shared.ending.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = shared
            .wake
            .wait_timeout_while(guard, every, |ending| !*ending)
            .unwrap_or_else(|e| e.into_inner());
        let ending = *guard;
        drop(guard);
        if ending {
            // Requeue or termination under way; a failed requeue clears it.
            let guard = shared.ending.lock().unwrap_or_else(|e| e.into_inner());
            let _guard = shared
                .wake
                .wait_while(guard, |ending| *ending)
                .unwrap_or_else(|e| e.into_inner());
            continue;
        }
        match shared.checkpoint() {
            Ok(image) => {
                info!(pid = shared.pid, image = %image.display(), "periodic checkpoint written")
            }
            // The job may have just exited; anything else is worth a line.
            Err(e) if alive(shared.pid) => {
                eprintln!(
                    "chpox: warning: periodic checkpoint of PID {} failed: {e}",
                    shared.pid
                );
            }
            Err(_) => return,
        }
    }
}

/// The state letter of `pid` in /proc (R, S, T, Z…); `None` if it is gone.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether `pid` exists and is not a zombie waiting for us.
fn alive(pid: i32) -> bool {
    !matches!(state(pid), None | Some('Z' | 'X'))
}

/// The job's shell-style exit status once it has ended.
fn reap(pid: i32) -> Result<Option<i32>, JobError> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        return match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(128 + sig as i32)),
            Ok(_) => Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(sys("waiting for the job")(e)),
        };
    }
}

fn absolute(path: &Path) -> Result<PathBuf, JobError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|d| d.join(path))
        .map_err(|e| JobError::Path {
            path: path.display().to_string(),
            reason: format!("no current directory to resolve it in: {e}"),
        })
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{} ms", d.as_millis())
    } else if s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in [
            "",
            "s",
            "10x",
            "-5s",
            "1.5h",
            "50ms",
            "0",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_print_in_their_largest_whole_unit() {
        assert_eq!(humanize(Duration::from_secs(600)), "10 min");
        assert_eq!(humanize(Duration::from_secs(7200)), "2 h");
        assert_eq!(humanize(Duration::from_secs(45)), "45 s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500 ms");
    }
}
