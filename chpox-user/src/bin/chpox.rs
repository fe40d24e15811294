//! `chpox`: the command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chpox::dump::{DumpOptions, dump};
use chpox::fds::UnsupportedFd;
use chpox::image::ImageReader;
use chpox::image::model::AfterDump;
use chpox::inspect;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

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

/// `--tcp-established` and `--tcp-close` of `run` and `register` as flags.
fn with_tcp(flags: u32, tcp: TcpArgs) -> u32 {
    use chpox_common::flags::{TCP_CLOSE, TCP_ESTABLISHED};
    flags
        | if tcp.tcp_established {
            TCP_ESTABLISHED
        } else {
            0
        }
        | if tcp.tcp_close { TCP_CLOSE } else { 0 }
}

/// What checkpoints do with established TCP connections.
#[derive(clap::Args, Clone, Copy)]
struct TcpArgs {
    /// Save established TCP connections (TCP repair mode, flag 16) so they
    /// come back in place; the peer must be quiet during the dump.
    #[arg(long, conflicts_with = "tcp_close")]
    tcp_established: bool,
    /// Restore established TCP connections reset (flag 32).
    #[arg(long)]
    tcp_close: bool,
}

#[derive(Parser)]
#[command(
    name = "chpox",
    version,
    about = "Checkpoint and restore Linux processes",
    long_about = "Checkpoint and restore Linux processes.\n\n\
        `chpox dump PID -o FILE` writes a running process and its descendants to an image \
        file while they keep running; `chpox restore FILE` brings them back. With \
        chpox-agent running, `chpox run` and `chpox register` make the trigger signal \
        (`kill -31 PID`) checkpoint a process. `chpox check` says what this machine supports."
)]
struct Cli {
    #[command(flatten)]
    log: chpox::cli::LogArgs,
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

/// What a registration asks of the agent beyond signal, FLAGS and file.
#[derive(clap::Args)]
struct RegistrationArgs {
    /// Checkpoint every DUR as well as on the signal (30s, 10m, 2h; at
    /// least 1s).
    #[arg(long, value_name = "DUR", value_parser = chpox::control::parse_duration)]
    every: Option<std::time::Duration>,
    /// Earlier images to keep, as FILE.1 … FILE.N (default: the agent's --keep).
    #[arg(long, value_name = "N")]
    keep: Option<u32>,
    /// Descriptors chpox cannot restore: `fail` the checkpoint (the
    /// previous image stays, `chpox list` says why) or restore `null`
    /// (/dev/null) in their place.
    #[arg(long, value_enum, default_value = "fail")]
    unsupported_fd: FdPolicy,
    /// Every Nth checkpoint is a full image; the others store only the
    /// pages written since the last full one (1: every checkpoint full;
    /// default: the agent's --full-every).
    #[arg(long, value_name = "N")]
    full_every: Option<u32>,
}

impl RegistrationArgs {
    fn settings(&self) -> chpox::control::Settings {
        chpox::control::Settings {
            every: self.every,
            keep: self.keep,
            unsupported_fd_null: matches!(self.unsupported_fd, FdPolicy::Null),
            full_every: self.full_every,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a running process to an image file.
    Dump {
        /// The process to checkpoint (with its descendants).
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
        /// Compress the image with zstd (once the process runs again:
        /// meanwhile the uncompressed image needs room beside it).
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
        /// Save established TCP connections (TCP repair mode) so they come
        /// back in place; the peer must be quiet during the dump.
        #[arg(long, conflicts_with = "tcp_close")]
        tcp_established: bool,
        /// Restore established TCP connections reset (ECONNRESET).
        #[arg(long)]
        tcp_close: bool,
        /// Print the dump report as JSON (durations in µs as `*_us`).
        #[arg(long)]
        json: bool,
        /// Do not copy pages while the process runs before freezing it
        /// (the pre-copy that keeps the freeze short, by default for a
        /// tree of more than one process, or for one process of 32 MiB of
        /// private memory or more); the checkpoint is then the
        /// moment of the call, and the freeze copies page tables.
        #[arg(long)]
        no_precopy: bool,
        /// Pre-copy whatever the size.
        #[arg(long, conflicts_with = "no_precopy")]
        precopy: bool,
    },
    /// Run a command registered with chpox-agent from its first instruction:
    /// its trigger signal then checkpoints it instead of killing it.
    #[command(
        after_long_help = "Exit status: the command's (chpox becomes it, keeping its PID); 127 if \
                           the command is not found, 126 if it cannot be run, 1 if it cannot be \
                           registered (nothing is started then)."
    )]
    Run {
        /// The trigger signal: a number (31) or a name (SYS, SIGUSR1, RTMIN+2).
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL, value_parser = chpox::cli::values::parse_signal)]
        signal: u32,
        /// Image file (default: chosen by the agent; `chpox list` shows it).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// FLAGS of old chpox, added up: 1 plain, 2 embeds the executable,
        /// 4 the libraries of `chpoxctl addlib`, 8 the descendants.
        #[arg(long, default_value_t = DEFAULT_FLAGS, value_parser = chpox::cli::values::parse_flags)]
        flags: u32,
        /// Checkpoint the process alone, not its descendants (clears 8).
        #[arg(long)]
        no_children: bool,
        #[command(flatten)]
        tcp: TcpArgs,
        #[command(flatten)]
        settings: RegistrationArgs,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Register a running process with chpox-agent.
    #[command(visible_alias = "add")]
    Register {
        /// The running process to register.
        pid: i32,
        /// The trigger signal: a number (31) or a name (SYS, SIGUSR1, RTMIN+2).
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL, value_parser = chpox::cli::values::parse_signal)]
        signal: u32,
        /// Image file (default: chosen by the agent; `chpox list` shows it).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// FLAGS of old chpox (see `run`; the default 9 includes descendants).
        #[arg(long, default_value_t = DEFAULT_FLAGS, value_parser = chpox::cli::values::parse_flags)]
        flags: u32,
        /// Checkpoint the process alone, not its descendants (clears 8).
        #[arg(long)]
        no_children: bool,
        #[command(flatten)]
        tcp: TcpArgs,
        /// Take the signal over even if the process handles it itself.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        settings: RegistrationArgs,
    },
    /// Stop checkpointing a process and give it back its old signal disposition.
    #[command(visible_alias = "del")]
    Unregister {
        /// The registered process.
        pid: i32,
    },
    /// Registered processes, their images and checkpoint counts.
    List {
        /// Print the registrations as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send the trigger signal and wait until that checkpoint is written;
    /// prints the image path.
    Checkpoint {
        /// The registered process to checkpoint now.
        pid: i32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the agent's report as JSON (named as `dump --json`).
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
        /// The trigger signal a new job is registered with: a number (31)
        /// or a name (SYS, SIGUSR1).
        #[arg(long, default_value_t = chpox_common::DEFAULT_TRIGGER_SIGNAL, value_parser = chpox::cli::values::parse_signal)]
        signal: u32,
        /// FLAGS a new job is registered with (see `run`).
        #[arg(long, default_value_t = DEFAULT_FLAGS, value_parser = chpox::cli::values::parse_flags)]
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
        /// The image to describe.
        file: PathBuf,
        /// Print everything as JSON (addresses and registers as hex strings).
        #[arg(long)]
        json: bool,
    },
    /// What this machine supports that chpox uses, and what chpox does
    /// without it.
    Check {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script of a chpox command for a shell.
    Completions {
        /// The shell (bash, zsh, fish, elvish, powershell).
        shell: chpox::cli::docs::Shell,
        /// The command to complete.
        #[arg(long, value_enum, default_value = "chpox")]
        command: Tool,
    },
    /// Write the man pages of every chpox command into DIR.
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
}

/// The commands chpox installs (one program under four names).
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Tool {
    /// `chpox`.
    Chpox,
    /// `chpoxctl`, old chpox's registration tool.
    Chpoxctl,
    /// `ld-chpox`, old chpox's restore command.
    LdChpox,
    /// `chpox-agent`, the daemon.
    ChpoxAgent,
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
            tcp_established,
            tcp_close,
            json,
            no_precopy,
            precopy,
        } => {
            chpox::dump::warm_heap_for_one_dump();
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
                tcp: if tcp_established {
                    chpox::fds::inet::TcpPolicy::Established
                } else if tcp_close {
                    chpox::fds::inet::TcpPolicy::Close
                } else {
                    chpox::fds::inet::TcpPolicy::Refuse
                },
                member_hint: None,
                freeze_first: false,
                vma_flags: chpox::trigger::bpf::vma_flags_from_agent(),
                // For comparing the two ways: CHPOX_REMOTE_STATE asks every
                // process with remote syscalls, as without an agent.
                kernel_state: if std::env::var_os("CHPOX_REMOTE_STATE").is_some() {
                    None
                } else {
                    chpox::trigger::bpf::kernel_state_from_agent()
                },
                precopy: if no_precopy {
                    chpox::dump::Precopy::Off
                } else if precopy {
                    chpox::dump::Precopy::Always
                } else {
                    chpox::dump::Precopy::Auto
                },
            };
            let report = {
                let _bar = chpox::cli::progress::Bar::start_with("dump", || {
                    // Compressed, the image is written, then compressed
                    // once the process runs again: two passes.
                    let passes = if compress { 2 } else { 1 };
                    chpox::cli::progress::dump_total(pid, no_children) * passes
                });
                dump(pid, &opts).with_context(|| format!("cannot checkpoint PID {pid}"))?
            };
            if json {
                println!(
                    "{}",
                    chpox::cli::json::to_string(&chpox::cli::json::DumpJson::from(&report))?
                );
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
            tcp,
            settings,
            command,
        } => {
            return run_registered(
                signal,
                output,
                with_tcp(with_children(flags, no_children), tcp),
                &settings.settings(),
                command,
            );
        }
        Command::Register {
            pid,
            signal,
            output,
            flags,
            no_children,
            tcp,
            force,
            settings,
        } => chpox::cli::register(
            pid,
            signal,
            with_tcp(with_children(flags, no_children), tcp),
            output.as_deref(),
            force,
            &settings.settings(),
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
        Command::Check { json } => {
            let report = chpox::check::run();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", chpox::check::text(&report));
            }
        }
        Command::Completions { shell, command } => {
            let (cmd, _) = chpox::cli::docs::commands(Cli::command())
                .into_iter()
                .find(|(c, _)| {
                    c.get_name()
                        == match command {
                            Tool::Chpox => "chpox",
                            Tool::Chpoxctl => "chpoxctl",
                            Tool::LdChpox => "ld-chpox",
                            Tool::ChpoxAgent => "chpox-agent",
                        }
                })
                .context("no such command")?;
            chpox::cli::docs::print(&chpox::cli::docs::completions(shell, cmd))?;
        }
        Command::Man { dir } => {
            for (cmd, section) in chpox::cli::docs::commands(Cli::command()) {
                for page in chpox::cli::docs::man_pages(cmd, section, &dir)? {
                    println!("{}", page.display());
                }
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
    settings: &chpox::control::Settings,
    command: Vec<std::ffi::OsString>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;

    let (program, args) = command.split_first().context("no command to run")?;
    // Like env and nohup: 127 when the command is not found, 126 when it
    // cannot be run; checked before anything is registered.
    if let Err((code, why)) = runnable(program) {
        eprintln!(
            "chpox: cannot run {}: {why}",
            std::path::Path::new(program).display()
        );
        std::process::exit(code);
    }
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
            ..settings.request(std::process::id() as i32)
        },
    ))
    .context("cannot register with chpox-agent")?;
    tracing::info!(?reply, "registered");
    let err = std::process::Command::new(program).args(args).exec();
    // Still us: the command did not start. Do not leave a registration
    // behind for a process that is about to exit.
    let _ = chpox::cli::ask(chpox::control::Request::Unregister {
        pid: std::process::id() as i32,
    });
    eprintln!(
        "chpox: cannot run {}: {err}",
        std::path::Path::new(program).display()
    );
    std::process::exit(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    });
}

/// Whether `program` can be executed, as the shell finds it (through PATH
/// unless it has a `/`): the exit status and reason when not.
fn runnable(program: &std::ffi::OsStr) -> std::result::Result<(), (i32, &'static str)> {
    use std::os::unix::ffi::OsStrExt;
    let candidates: Vec<PathBuf> = if program.as_bytes().contains(&b'/') {
        vec![PathBuf::from(program)]
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .collect()
    };
    let mut found = false;
    for c in candidates {
        let Ok(meta) = std::fs::metadata(&c) else {
            continue;
        };
        found = true;
        if meta.is_file() && nix::unistd::access(&c, nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(());
        }
    }
    Err(if found {
        (126, "permission denied (not an executable file)")
    } else {
        (127, "no such file or directory")
    })
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
    // One program under four names, as busybox: the name it was run by
    // says which.
    let name = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match name.as_deref() {
        Some("chpoxctl") => return chpox::cli::ctl::main(),
        Some("ld-chpox") => return chpox::cli::ld::main(),
        Some("chpox-agent") => return chpox::cli::agent::main(),
        _ => {}
    }
    let cli = Cli::parse();
    cli.log.init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpox: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_and_argument_is_described() {
        Cli::command().debug_assert();
        assert_eq!(
            chpox::cli::docs::undocumented(&Cli::command()),
            Vec::<String>::new()
        );
    }
}
