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
        /// Print the dump report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Describe an image: process, threads, memory, files, checksums.
    Inspect {
        file: PathBuf,
        /// Print everything, machine-readably.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHPOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
            };
            let report =
                dump(pid, &opts).with_context(|| format!("cannot checkpoint PID {pid}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "checkpointed PID {} ({}) to {}: {} threads, {} pages stored, image {} bytes, frozen {:.1} ms, total {:.1} ms",
                    report.pid,
                    report.comm,
                    report.image.display(),
                    report.threads,
                    report.pages_stored,
                    report.image_bytes,
                    report.frozen.as_secs_f64() * 1e3,
                    report.total.as_secs_f64() * 1e3
                );
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
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpox: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
