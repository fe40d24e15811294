//! `ld-chpox FILE`: the old chpox's restore command, the same as
//! `chpox restore FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use chpox::cli::PidChoice;
use clap::Parser;

/// Restore a checkpointed process from its image; wait for it and exit with
/// its exit status (128 + N if killed by signal N).
#[derive(Parser)]
#[command(name = "ld-chpox", version)]
struct Cli {
    file: PathBuf,
    /// `same`: the saved PID, or fail if taken; `any`: a new PID. Default:
    /// the saved PID if free, else a new one.
    #[arg(long, value_enum)]
    pid: Option<PidChoice>,
    /// Print the restored PID and return instead of waiting.
    #[arg(long)]
    detach: bool,
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    chpox::cli::init_logging(cli.verbose);
    let opts = chpox::cli::restore_options(cli.pid);
    match chpox::restore::run_cli(&cli.file, &opts, cli.detach) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ld-chpox: cannot restore {}: {e}", cli.file.display());
            ExitCode::FAILURE
        }
    }
}
