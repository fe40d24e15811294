//! `cargo xtask`: set-up, test and benchmark chores.
//!
//! Every step says what it does and installs what it needs itself, so a
//! fresh machine needs nothing but Rust and root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod ebpf;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build every host binary in release mode.
    Build,
    /// Run the whole test suite (must be root: tests trace real processes).
    Test,
    /// Formatting and lints, as CI checks them.
    Lint,
    /// Measure dump throughput and freeze time against dd and memcpy.
    Bench {
        /// MiB of dirty anonymous memory in the benchmarked process.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Rounds; medians are reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Directory for images and the dd comparison (tmpfs by default).
        #[arg(long, default_value = "/dev/shm")]
        dir: PathBuf,
    },
    /// Install what building the eBPF program needs (LLVM 22, nightly Rust
    /// with rust-src, bpf-linker); skips whatever is there.
    InstallEbpfPrerequisites,
    /// Build the eBPF program (chpox-ebpf) and copy it to target/chpox-ebpf.o.
    BuildEbpf {
        /// Build the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Run a command in the workspace root, echoing it first.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (it ptraces real processes); rerun with sudo");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Build => run(cargo().args(["build", "--release", "--workspace", "--bins"])),
        Task::Test => {
            require_root("the test suite")?;
            run(cargo().args(["build", "--workspace", "--bins"]))?;
            run(cargo().args(["test", "--workspace", "--no-fail-fast"]))
        }
        Task::Lint => {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }
        Task::Bench { mib, rounds, dir } => {
            require_root("the benchmark")?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "chpox-user",
                "-p",
                "chpox-tests",
                "--bins",
            ]))?;
            bench::run(mib, rounds.max(1), &dir)
        }
        Task::InstallEbpfPrerequisites => ebpf::install_prerequisites(),
        Task::BuildEbpf { debug } => {
            let object = ebpf::build_ebpf(!debug)?;
            println!("{}", object.display());
            eprintln!(
                "xtask: eBPF object copied to {}",
                ebpf::object_copy_path().display()
            );
            Ok(())
        }
    }
}
