//! `chpoxctl`: the command-line tool of old chpox, kept for its users'
//! habits and scripts. Everything goes to chpox-agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use chpox::control::Request;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chpoxctl",
    version,
    about = "Register processes and libraries with chpox (old chpox syntax)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register PID: signal SIG checkpoints it to FILE (FLAGS: 1 plain,
    /// 2 embed the executable, 4 embed the libraries added with addlib,
    /// 8 its descendants too; without 8 the process alone).
    Add {
        pid: i32,
        sig: u32,
        flags: u32,
        file: PathBuf,
    },
    /// Unregister PID.
    Del { pid: i32 },
    /// Add a library to embed in images of processes registered with FLAGS 4.
    Addlib { file: PathBuf },
    /// Remove a library from the list.
    Dellib { file: PathBuf },
    /// Empty the library list.
    Clearlibs,
    /// Show the library list.
    Listlibs,
    /// Show registered processes.
    List,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Add {
            pid,
            sig,
            flags,
            file,
        } => chpox::cli::register(
            pid,
            sig,
            flags,
            Some(&file),
            false,
            &chpox::control::Settings::default(),
        ),
        Command::Del { pid } => chpox::cli::unregister(pid),
        Command::Addlib { file } => chpox::cli::libs(Request::AddLib {
            path: chpox::cli::absolute(&file)?,
        }),
        Command::Dellib { file } => chpox::cli::libs(Request::DelLib {
            path: chpox::cli::absolute(&file)?,
        }),
        Command::Clearlibs => chpox::cli::libs(Request::ClearLibs),
        Command::Listlibs => chpox::cli::libs(Request::ListLibs),
        Command::List => chpox::cli::list(false),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpoxctl: {e}");
            ExitCode::FAILURE
        }
    }
}
