//! `chpoxctl`: the command-line tool of old chpox, kept for its users'
//! habits and scripts. Everything goes to chpox-agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::control::Request;

#[derive(Parser)]
#[command(
    name = "chpoxctl",
    version,
    about = "Register processes and libraries with chpox (old chpox syntax)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register PID: signal SIG checkpoints it to FILE (FLAGS: 1 plain,
    /// 2 embed the executable, 4 embed the libraries added with addlib,
    /// 8 its descendants too; without 8 the process alone).
    Add {
        /// The process to register.
        pid: i32,
        /// The trigger signal: a number (31) or a name (SYS, SIGUSR1).
        #[arg(value_parser = super::values::parse_signal)]
        sig: u32,
        /// Bits, added up: 1 plain, 2 embed the executable, 4 embed the
        /// libraries of `addlib`, 8 include the descendants.
        #[arg(value_parser = super::values::parse_flags)]
        flags: u32,
        /// The image file its checkpoints replace.
        file: PathBuf,
    },
    /// Unregister PID.
    Del {
        /// The registered process.
        pid: i32,
    },
    /// Add a library to embed in images of processes registered with FLAGS 4.
    Addlib {
        /// The library (or any file) to embed.
        file: PathBuf,
    },
    /// Remove a library from the list.
    Dellib {
        /// The library to take off the list.
        file: PathBuf,
    },
    /// Empty the library list.
    Clearlibs,
    /// Show the library list.
    Listlibs {
        /// Print the list as a JSON array of paths.
        #[arg(long)]
        json: bool,
    },
    /// Show registered processes.
    List {
        /// Print the registrations as JSON (as `chpox list --json`).
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Add {
            pid,
            sig,
            flags,
            file,
        } => super::register(
            pid,
            sig,
            flags,
            Some(&file),
            false,
            &crate::control::Settings::default(),
        ),
        Command::Del { pid } => super::unregister(pid),
        Command::Addlib { file } => super::libs(
            Request::AddLib {
                path: super::absolute(&file)?,
            },
            false,
        ),
        Command::Dellib { file } => super::libs(
            Request::DelLib {
                path: super::absolute(&file)?,
            },
            false,
        ),
        Command::Clearlibs => super::libs(Request::ClearLibs, false),
        Command::Listlibs { json } => super::libs(Request::ListLibs, json),
        Command::List { json } => super::list(json),
    }
}

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpoxctl: {e}");
            ExitCode::FAILURE
        }
    }
}
