//! `chpox`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chpox::dump::{DumpOptions, dump};
use chpox::fds::UnsupportedFd;
use chpox::image::ImageReader;
use chpox::image::model::AfterDump;
use chpox::inspect;
use clap::{Parser, Subcommand, ValueEnum};

/// `chpox run` and `chpox register` checkpoint the whole tree unless told
/// otherwise; `chpoxctl` and the register line keep old chpox's meaning.
const DEFAULT_FLAGS: u32 = chpox_common::flags::REGISTERED | chpox_common::flags::INCLUDE_CHILDREN;

fn with_children(flags: u32, no_children: bool) -> u32 {
    if no_children {
        flags & !chpox_common::flags::INCLUDE_CHILDREN
    } else {
        flags
    }
}

#[derive(Parser)]
#[command(
    name = "chpox",
    version,
    about = "Checkpoint and restore Linux processes"
)]
struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FdPolicy {
    /// Refuse to dump a process holding a descriptor chpox cannot restore.
    Fail,
    /// Record such descriptors and restore /dev/null in their place.
    Null,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a running process to an image file.
    Dump {
        pid: i32,
        /// Image file to write (replaced atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Kill the process once its image is safely written.
        #[arg(long, conflicts_with = "leave_stopped")]
        kill: bool,
        /// Leave the process stopped (as by SIGSTOP) after the dump.
        #[arg(long)]
        leave_stopped: bool,
        /// Let the process run on after the dump (the default).
        #[arg(long, conflicts_with_all = ["kill", "leave_stopped"])]
        leave_running: bool,
        /// Compress the image with zstd.
        #[arg(long)]
        compress: bool,
        /// Put the executable into the image.
        #[arg(long)]
        embed_exe: bool,
        /// Put this file into the image (repeatable).
        #[arg(long = "embed-lib", value_name = "FILE")]
        embed_lib: Vec<PathBuf>,
        /// Put every mapped file (libraries, executable) into the image.
        #[arg(long)]
        embed_all_libs: bool,
        /// What to do with descriptors chpox cannot restore (pipes, sockets…).
        #[arg(long, value_enum, default_value = "fail")]
        unsupported_fd: FdPolicy,
        /// Checkpoint the process alone, not its descendants.
        #[arg(long)]
        no_children: bool,
        /// Print the dump report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command registered with chpox-agent from its first instruction:
    /// its trigger signal then checkpoints it instead of killing it.
    Run {
        /// The trigger signal.
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL)]
        signal: u32,
        /// Image file (default: chosen by the agent; `chpox list` shows it).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// FLAGS of old chpox: 2 embeds the executable, 4 the libraries of
        /// `chpoxctl addlib`, 8 the descendants (the default: 9).
        #[arg(long, default_value_t = DEFAULT_FLAGS)]
        flags: u32,
        /// Checkpoint the process alone, not its descendants (clears 8).
        #[arg(long)]
        no_children: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Register a running process with chpox-agent.
    #[command(visible_alias = "add")]
    Register {
        pid: i32,
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL)]
        signal: u32,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// FLAGS of old chpox (see `run`; the default 9 includes descendants).
        #[arg(long, default_value_t = DEFAULT_FLAGS)]
        flags: u32,
        /// Checkpoint the process alone, not its descendants (clears 8).
        #[arg(long)]
        no_children: bool,
        /// Take the signal over even if the process handles it itself.
        #[arg(long)]
        force: bool,
    },
    /// Stop checkpointing a process and give it back its old signal disposition.
    #[command(visible_alias = "del")]
    Unregister { pid: i32 },
    /// Registered processes, their images and checkpoint counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Send the trigger signal and wait until that checkpoint is written;
    /// prints the image path.
    Checkpoint {
        pid: i32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the agent's report (image, generation, latency) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a checkpointed process from its image; wait for it and exit
    /// with its exit status (128 + N if killed by signal N).
    Restore(chpox::cli::RestoreArgs),
    /// Run a batch job that carries on from its last checkpoint when run again.
    ///
    /// Restores the job from IMG if there is one, else starts the command;
    /// registered either way, our child, SIGTERM/SIGINT/SIGHUP forwarded;
    /// exits with its exit status. SIGSYS (31) to `chpox job` checkpoints
    /// the job now.
    Job {
        /// The job's image: restored from when it exists, checkpoints go there.
        #[arg(long, value_name = "IMG")]
        image: PathBuf,
        /// Also checkpoint every DUR (`30s`, `10m`, `1h`).
        #[arg(long, value_name = "DUR", value_parser = chpox::job::parse_duration)]
        every: Option<std::time::Duration>,
        /// On SIGSYS, stop the job, checkpoint it, then run `scontrol
        /// requeue $SLURM_JOB_ID` (in a Slurm job only).
        #[arg(long)]
        requeue: bool,
        /// Write the job's PID to FILE.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
        /// The trigger signal a new job is registered with.
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL)]
        signal: u32,
        /// FLAGS a new job is registered with (see `run`).
        #[arg(long, default_value_t = DEFAULT_FLAGS)]
        flags: u32,
        /// Checkpoint the job's first process alone, not its descendants.
        #[arg(long)]
        no_children: bool,
        /// The command that starts the job (used when there is no image yet).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Describe an image: process, threads, memory, files, checksums.
    Inspect {
        file: PathBuf,
        /// Print everything, machine-readably.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dump {
            pid,
            output,
            kill,
            leave_stopped,
            leave_running: _,
            compress,
            embed_exe,
            embed_lib,
            embed_all_libs,
            unsupported_fd,
            no_children,
            json,
        } => {
            let opts = DumpOptions {
                output,
                after: if kill {
                    AfterDump::Kill
                } else if leave_stopped {
                    AfterDump::LeaveStopped
                } else {
                    AfterDump::LeaveRunning
                },
                compress,
                embed_exe,
                embed_libs: embed_lib,
                embed_all_libs,
                unsupported_fd: match unsupported_fd {
                    FdPolicy::Fail => UnsupportedFd::Fail,
                    FdPolicy::Null => UnsupportedFd::Null,
                },
                keep_previous: 0,
                as_user: None,
                registration: None,
                expect_start_time: None,
                children: !no_children,
            };
            let report =
                dump(pid, &opts).with_context(|| format!("cannot checkpoint PID {pid}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "checkpointed PID {} ({}) to {}: {} process(es), {} threads, {} pages stored, image {} bytes, frozen {:.1} ms, total {:.1} ms",
                    report.pid,
                    report.comm,
                    report.image.display(),
                    report.processes,
                    report.threads,
                    report.pages_stored,
                    report.image_bytes,
                    report.frozen.as_secs_f64() * 1e3,
                    report.total.as_secs_f64() * 1e3
                );
            }
            if !report.children_not_saved.is_empty() {
                eprintln!(
                    "chpox: warning: PID {pid} was checkpointed alone (--no-children): its children {:?} are not in the image",
                    report.children_not_saved
                );
            }
        }
        Command::Run {
            signal,
            output,
            flags,
            no_children,
            command,
        } => return run_registered(signal, output, with_children(flags, no_children), command),
        Command::Register {
            pid,
            signal,
            output,
            flags,
            no_children,
            force,
        } => chpox::cli::register(
            pid,
            signal,
            with_children(flags, no_children),
            output.as_deref(),
            force,
        )?,
        Command::Unregister { pid } => chpox::cli::unregister(pid)?,
        Command::List { json } => chpox::cli::list(json)?,
        Command::Checkpoint { pid, timeout, json } => chpox::cli::checkpoint(pid, timeout, json)?,
        Command::Restore(args) => {
            let code = chpox::cli::restore(&args)?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::Job {
            image,
            every,
            requeue,
            pidfile,
            signal,
            flags,
            no_children,
            command,
        } => {
            let code = chpox::job::run(&chpox::job::JobOptions {
                image,
                every,
                requeue,
                pidfile,
                signal,
                flags: with_children(flags, no_children),
                command,
            })?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::Inspect { file, json } => {
            let reader = ImageReader::open(&file)
                .with_context(|| format!("cannot read image {}", file.display()))?;
            let status = inspect::checksum_status(&reader);
            if json {
                println!("{}", inspect::to_json(&reader, &status)?);
            } else {
                print!("{}", inspect::summary(&reader, &status));
            }
            // The summary is printed either way, but a script must be able
            // to tell a damaged image from a good one.
            if let Some(e) = status.error {
                anyhow::bail!("image {} is damaged: {e}", file.display());
            }
        }
    }
    Ok(())
}

/// `chpox run`: ignore the trigger signal (SIG_IGN survives execve), register
/// this very process, then become the command, like `env` or `nohup`: the
/// PID the caller sees is the command's, registered before its first
/// instruction runs.
fn run_registered(
    signal: u32,
    output: Option<PathBuf>,
    flags: u32,
    command: Vec<std::ffi::OsString>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;

    let sig = nix::sys::signal::Signal::try_from(signal as i32)
        .with_context(|| format!("{signal} is not a signal"))?;
    // SAFETY: SIG_IGN installs no handler, so nothing runs in signal
    // context; this process is single-threaded here.
    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) }
        .with_context(|| format!("cannot ignore signal {signal}"))?;
    let output = output.as_deref().map(chpox::cli::absolute).transpose()?;
    let reply = chpox::cli::ask(chpox::control::Request::Register(
        chpox::control::RegisterRequest {
            signal,
            flags,
            output,
            self_ignored: true,
            name: command
                .first()
                .and_then(|c| std::path::Path::new(c).file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            ..chpox::control::RegisterRequest::new(std::process::id() as i32)
        },
    ))
    .context("cannot register with chpox-agent")?;
    tracing::info!(?reply, "registered");
    let (program, args) = command.split_first().context("no command to run")?;
    let err = std::process::Command::new(program).args(args).exec();
    // Still us: the command did not start. Do not leave a registration
    // behind for a process that is about to exit.
    let _ = chpox::cli::ask(chpox::control::Request::Unregister {
        pid: std::process::id() as i32,
    });
    Err(anyhow::anyhow!(
        "cannot run {}: {err}",
        std::path::Path::new(program).display()
    ))
}

/// The context, then each cause that adds something: library errors already
/// quote their source in their own message, so a cause whose text the
/// previous part contains is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|prev| prev.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    chpox::cli::init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpox: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
