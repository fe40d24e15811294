//! What `chpox` and `chpoxctl` share: talking to the agent and printing
//! its answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::control::{self, ListEntry, RegisterRequest, Request, Response};

pub mod agent;
pub mod ctl;
pub mod docs;
pub mod json;
pub mod ld;
pub mod progress;
pub mod values;

/// Log to stderr: warnings by default, more with each `-v`; `CHPOX_LOG`
/// (an env-filter) overrides.
pub fn init_logging(verbose: u8) {
    init_logging_as(verbose, LogFormat::Text);
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// As [`init_logging`], in `format`. Colours only when stderr is a
/// terminal and NO_COLOR is not set: a redirected log is plain text.
pub fn init_logging_as(verbose: u8, format: LogFormat) {
    use std::io::IsTerminal;
    let default = match verbose {
        0 => "warn",
        // One line per checkpoint: the agent's, not also the eBPF
        // program's note that one was requested (shown from -v on).
        1 => "info,chpox_ebpf=warn",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHPOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (a test, a library caller) keeps the first.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The logging and progress options every binary shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// More log output (repeat for more: info, debug, trace); the
    /// CHPOX_LOG environment variable (e.g. `chpox=debug`) overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Output", display_order = 1000)]
    pub verbose: u8,
    /// No progress bars (they are only drawn on a terminal anyway).
    #[arg(
        short,
        long,
        global = true,
        help_heading = "Output",
        display_order = 1000
    )]
    pub quiet: bool,
    /// How log lines are written to stderr.
    #[arg(
        long,
        value_enum,
        default_value_t,
        global = true,
        value_name = "FORMAT",
        help_heading = "Output",
        display_order = 1000
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Logging at warnings (plus `-v`s), and progress unless `--quiet`.
    pub fn init(&self) {
        self.init_at(0);
    }

    /// Logging at `base` more than warnings (plus `-v`s).
    pub fn init_at(&self, base: u8) {
        init_logging_as(base.saturating_add(self.verbose), self.log_format);
        progress::set_quiet(self.quiet);
    }
}

/// `--pid` of `chpox restore` and `ld-chpox`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PidChoice {
    /// The saved PID, or fail if it is taken.
    Same,
    /// A new PID.
    Any,
}

/// The arguments of `chpox restore` and `ld-chpox`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The image to restore.
    pub file: PathBuf,
    /// `same`: the saved PID, or fail if taken; `any`: a new PID (for a
    /// tree: a new PID namespace, as --pid-ns). Default: the saved PID if
    /// free, else a new one (for a tree: all saved PIDs, or fail naming
    /// the one taken).
    #[arg(long, value_enum)]
    pub pid: Option<PidChoice>,
    /// Restore into a new PID namespace (with chpox's own init as its PID
    /// 1), where every saved PID is free: for when one is taken.
    #[arg(long)]
    pub pid_ns: bool,
    /// Print the restored PID and return instead of waiting.
    #[arg(long)]
    pub detach: bool,
    /// Register the restored process with chpox-agent, so its trigger
    /// signal checkpoints it again: with the signal and FLAGS it was
    /// registered with (default 31 and 1), to FILE unless --output says
    /// otherwise.
    #[arg(long)]
    pub register: bool,
    /// With --register: where its checkpoints go (default: FILE).
    #[arg(short, long, requires = "register")]
    pub output: Option<PathBuf>,
    /// As root, restore an image another user owns (or others may write)
    /// as saved: credentials, files, limits. Without it, root restores
    /// another user's image with that user's rights only, and refuses one
    /// others may write: whoever can write an image can put anything in it.
    #[arg(long)]
    pub trust_image: bool,
    /// Give descriptor FD (of process PID, or of every process) the
    /// restorer's descriptor N: for what the image holds connected to the
    /// outside of the checkpoint (`inspect` names them), or replaced by
    /// /dev/null. Repeatable.
    #[arg(long = "inherit-fd", value_name = "[PID:]FD=N")]
    pub inherit_fd: Vec<crate::fds::external::InheritFd>,
    /// Run at once and bring memory in on demand and in the background
    /// (userfaultfd): a page the process touches first comes first. A page
    /// server process fills the rest and ends when all is in. Not with
    /// --register: a checkpoint before every page is in would miss pages
    /// (register with `chpox register PID` once the server has ended).
    #[arg(long, conflicts_with = "register")]
    pub lazy: bool,
}

impl RestoreArgs {
    fn options(&self) -> crate::restore::RestoreOptions {
        use crate::restore::PidMode;
        crate::restore::RestoreOptions {
            pid: match self.pid {
                Some(PidChoice::Same) => PidMode::Same,
                Some(PidChoice::Any) => PidMode::Any,
                None => PidMode::Prefer,
            },
            pid_ns: self.pid_ns,
            trust_image: self.trust_image,
            inherit_fds: self.inherit_fd.clone(),
            lazy: self.lazy,
        }
    }
}

/// `chpox restore` and `ld-chpox`: restore, register if asked, then either
/// print the PID and return 0 (`--detach`), or wait for the process and
/// return its shell-style exit status.
pub fn restore(args: &RestoreArgs) -> Result<i32> {
    let image = &args.file;
    // Ask the agent before anything is started: a restore the user wanted
    // registered must not run unprotected because the agent is down.
    let output = if args.register {
        ask(Request::List).context("nothing restored: --register needs chpox-agent")?;
        Some(absolute(args.output.as_deref().unwrap_or(image))?)
    } else {
        None
    };
    let restored = {
        let _bar = progress::Bar::start("restore", progress::restore_total(image));
        crate::restore::restore(image, &args.options())
            .with_context(|| format!("cannot restore {}", image.display()))?
    };
    if let Some(output) = output {
        let saved = restored.registration;
        let req = RegisterRequest {
            signal: saved.map_or(chpox_common::DEFAULT_TRIGGER_SIGNAL, |r| r.signal),
            flags: saved.map_or(chpox_common::flags::REGISTERED, |r| r.flags),
            output: Some(output),
            every_ms: saved.and_then(|r| r.every_ms),
            keep: saved.and_then(|r| r.keep),
            unsupported_fd_null: saved.is_some_and(|r| r.unsupported_fd_null),
            ..RegisterRequest::new(restored.pid)
        };
        // The process runs already: a failed registration must not cost
        // it its life, only its future checkpoints.
        match ask(Request::Register(req)) {
            Ok(Response::Registered {
                pid,
                signal,
                output,
            }) => eprintln!(
                "chpox: registered restored PID {pid}: `kill -{signal} {pid}` checkpoints it to {}",
                output.display()
            ),
            Ok(other) => eprintln!(
                "chpox: warning: restored PID {} runs unregistered: unexpected reply from chpox-agent: {other:?}",
                restored.pid
            ),
            Err(e) => eprintln!(
                "chpox: warning: restored PID {} runs unregistered: {e:#}; try `chpox register {}`",
                restored.pid, restored.pid
            ),
        }
    }
    if restored.in_namespace {
        eprintln!(
            "chpox: restored in a new PID namespace: PID {} here is PID {} inside, under init PID {}",
            restored.pid, restored.saved_pid, restored.wait_pid
        );
    }
    if args.detach {
        println!("{}", restored.pid);
        if let Some(hold) = restored.page_server_hold {
            hold.until_exit();
        }
        return Ok(0);
    }
    // The page server may fill memory in the background now.
    drop(restored.page_server_hold);
    // Like a shell waiting for a foreground job: the terminal's Ctrl-C and
    // Ctrl-\ are for the restored process (same process group), not for us.
    // SAFETY: SIG_IGN installs no handler.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    Ok(crate::restore::wait(restored.wait_pid)?)
}

/// Most requests answer at once; `register` may freeze a process briefly.
const TIMEOUT: Duration = Duration::from_secs(60);

pub fn ask(req: Request) -> Result<Response> {
    let timeout = match &req {
        Request::Checkpoint { timeout_secs, .. } => {
            Duration::from_secs(timeout_secs.saturating_add(5))
        }
        _ => TIMEOUT,
    };
    Ok(control::request(&control::run_dir(), &req, timeout)?)
}

/// An output path as the agent needs it: absolute, relative to our cwd.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot resolve the output path: no current directory")?
        .join(path))
}

pub fn register(
    pid: i32,
    signal: u32,
    flags: u32,
    output: Option<&Path>,
    force: bool,
    settings: &control::Settings,
) -> Result<()> {
    let output = output.map(absolute).transpose()?;
    match ask(Request::Register(RegisterRequest {
        signal,
        flags,
        output,
        force,
        ..settings.request(pid)
    }))? {
        Response::Registered {
            pid,
            signal,
            output,
        } => {
            println!(
                "registered PID {pid}: `kill -{signal} {pid}` checkpoints it to {}",
                output.display()
            );
            Ok(())
        }
        other => bail!("unexpected reply from chpox-agent: {other:?}"),
    }
}

pub fn unregister(pid: i32) -> Result<()> {
    ask(Request::Unregister { pid })?;
    println!("unregistered PID {pid}");
    Ok(())
}

pub fn checkpoint(pid: i32, timeout_secs: u64, json: bool) -> Result<()> {
    match ask(Request::Checkpoint { pid, timeout_secs })? {
        reply @ Response::Checkpointed { .. } if json => {
            println!(
                "{}",
                json::to_string(&json::CheckpointJson::from_reply(&reply))?
            );
            Ok(())
        }
        Response::Checkpointed {
            image,
            children_not_saved,
            ..
        } => {
            if !children_not_saved.is_empty() {
                eprintln!(
                    "chpox: warning: {}",
                    children_left_out(pid, &children_not_saved)
                );
            }
            println!("{}", image.display());
            Ok(())
        }
        other => bail!("unexpected reply from chpox-agent: {other:?}"),
    }
}

fn format_time(unix: Option<u64>) -> String {
    let Some(t) = unix else {
        return "-".into();
    };
    let ago = crate::process::unix_now().saturating_sub(t);
    match ago {
        0..60 => format!("{ago}s ago"),
        60..3600 => format!("{}m ago", ago / 60),
        3600..86400 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// When a periodic checkpoint is due, from now: `in 5s`, `now`, `-`.
fn format_due(unix_ms: Option<u64>) -> String {
    let Some(due) = unix_ms else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match due.saturating_sub(now) / 1000 {
        0 => "now".into(),
        s @ 1..60 => format!("{s}s"),
        s @ 60..3600 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

pub fn list(json: bool) -> Result<()> {
    let Response::List { entries } = ask(Request::List)? else {
        bail!("unexpected reply from chpox-agent");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    print_list(&entries);
    Ok(())
}

pub fn print_list(entries: &[ListEntry]) {
    if entries.is_empty() {
        println!("no registered processes");
        return;
    }
    println!(
        "{:>7} {:<16} {:>3} {:>5} {:>11} {:>9} {:>6} {:>6} {:<13} FILE",
        "PID", "COMMAND", "SIG", "FLAGS", "CHECKPOINTS", "LAST", "EVERY", "NEXT", "STATE"
    );
    for e in entries {
        let state = e.shown_state();
        // A failure's reason can be long: it goes last.
        let (state, reason) = match state.split_once(": ") {
            Some((s, r)) => (s.to_string(), format!("  ({s}: {r})")),
            None => (state, String::new()),
        };
        println!(
            "{:>7} {:<16} {:>3} {:>5} {:>11} {:>9} {:>6} {:>6} {:<13} {}{}{}",
            e.pid,
            e.comm,
            e.signal,
            e.flags,
            e.checkpoints,
            format_time(e.last_checkpoint),
            e.every_ms.map_or("-".into(), |ms| control::format_duration(
                Duration::from_millis(ms)
            )),
            format_due(e.next_due_ms),
            state,
            e.output.display(),
            reason,
            match &e.last_error {
                Some(m) if e.state != "idle" => format!("  (last attempt failed: {m})"),
                _ => String::new(),
            }
        );
    }
    for e in entries.iter().filter(|e| !e.children_not_saved.is_empty()) {
        println!(
            "note: {} (FLAGS {} without 8)",
            children_left_out(e.pid, &e.children_not_saved),
            e.flags
        );
    }
}

/// What a single-process checkpoint of `pid` left out, in one sentence.
fn children_left_out(pid: i32, children: &[i32]) -> String {
    let list: Vec<String> = children.iter().map(i32::to_string).collect();
    let (noun, verb) = if children.len() == 1 {
        ("child", "is")
    } else {
        ("children", "are")
    };
    format!(
        "PID {pid} was checkpointed alone: its {noun} {} {verb} not in the image",
        list.join(", ")
    )
}

pub fn libs(req: Request, json: bool) -> Result<()> {
    match ask(req)? {
        Response::Libs { libs } if json => {
            println!("{}", serde_json::to_string_pretty(&libs)?);
        }
        Response::Libs { libs } => {
            for l in libs {
                println!("{}", l.display());
            }
        }
        Response::Ok => {}
        other => bail!("unexpected reply from chpox-agent: {other:?}"),
    }
    Ok(())
}
