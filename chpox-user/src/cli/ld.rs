//! `ld-chpox FILE`: the old chpox's restore command, the same as
//! `chpox restore FILE`.

use std::process::ExitCode;

use clap::Parser;

/// Restore a checkpointed process from its image; wait for it and exit with
/// its exit status (128 + N if killed by signal N).
#[derive(Parser)]
#[command(name = "ld-chpox", version)]
pub struct Cli {
    #[command(flatten)]
    restore: super::RestoreArgs,
    #[command(flatten)]
    log: super::LogArgs,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    match super::restore(&cli.restore) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ld-chpox: {e:#}");
            ExitCode::FAILURE
        }
    }
}
