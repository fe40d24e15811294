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
mod install;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, build the eBPF object and every binary
    /// (release) into target/release.
    Build,
    /// `build`, then run chpox-agent in the foreground (needs root).
    Start {
        /// Extra arguments for chpox-agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite (must be root: tests trace real processes
    /// and load eBPF).
    Test,
    /// Formatting and lints, as CI checks them.
    Lint,
    /// Measure dump throughput, freeze and restore time against dd and
    /// memcpy, for one process and for a process tree, and the latency from
    /// `kill -31` to a frozen target.
    Bench {
        /// MiB of dirty anonymous memory in the benchmarked process, one
        /// table row per size (comma-separated).
        #[arg(long, visible_alias = "sizes", value_delimiter = ',', default_values_t = [64, 1024, 4096])]
        mib: Vec<u64>,
        /// Rounds; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Skip the `--compress` dumps.
        #[arg(long)]
        no_compress: bool,
        /// Skip the `--kill` dumps (each needs a fresh process).
        #[arg(long)]
        no_kill: bool,
        /// Directory for images and the dd comparison (tmpfs by default).
        #[arg(long, default_value = "/dev/shm")]
        dir: PathBuf,
        /// Checkpoints triggered for the latency measurement (of each of a
        /// 16 MiB and a 1 GiB process).
        #[arg(long, default_value_t = 200)]
        triggers: usize,
        /// Processes in the tree case (the root and its children).
        #[arg(long, default_value_t = 8)]
        tree_procs: usize,
        /// MiB of dirty anonymous memory in each process of the tree.
        #[arg(long, default_value_t = 128)]
        tree_mib: u64,
        /// Skip the tree case.
        #[arg(long)]
        no_tree: bool,
        /// MiB of the process in the incremental part (a full checkpoint,
        /// then increments after ~1 % of its pages changed).
        #[arg(long, default_value_t = 4096)]
        incremental_mib: u64,
        /// Skip the incremental part.
        #[arg(long)]
        no_incremental: bool,
        /// Run only the incremental part.
        #[arg(long, conflicts_with = "no_incremental")]
        only_incremental: bool,
        /// Run only the agent's checkpoints: the trigger latencies and the
        /// writing job's.
        #[arg(long, conflicts_with = "only_incremental")]
        only_triggers: bool,
        /// MiB of the job that writes its memory all the while it is
        /// dumped (pre-copy against snapshot), and checkpointed once a
        /// second through the agent after the trigger measurements; 0
        /// skips both.
        #[arg(long, default_value_t = 1024)]
        writing_mib: u64,
        /// Dump without pre-copy (`chpox dump --no-precopy`): the
        /// copy-on-write snapshot alone, to compare the two.
        #[arg(long)]
        no_precopy: bool,
        /// Measure dumps without a running chpox-agent (by default the
        /// bench runs one, as `cargo xtask start` leaves one: dumps then
        /// read processes' state through its eBPF iterator).
        #[arg(long)]
        no_agent: bool,
    },
    /// Build (release) and install chpox: the program (also as chpoxctl,
    /// ld-chpox and chpox-agent), the eBPF object in PREFIX/lib/chpox, man
    /// pages, bash/zsh/fish completions and the systemd unit
    /// chpox-agent.service.
    Install {
        #[command(flatten)]
        to: InstallTo,
        #[command(flatten)]
        from: InstallFrom,
    },
    /// Remove what `install` put into PREFIX (under DESTDIR).
    Uninstall {
        #[command(flatten)]
        to: InstallTo,
    },
    /// Build a Debian package (.deb) holding what `install --prefix /usr`
    /// installs.
    Package {
        /// Directory to write chpox_VERSION_ARCH.deb into.
        #[arg(long, default_value = "target/package")]
        out: PathBuf,
        /// How dpkg-deb compresses the files: xz, zstd, gzip or none.
        #[arg(long, default_value = "xz")]
        compression: String,
        #[command(flatten)]
        from: InstallFrom,
    },
    /// Measure restore, eager and --lazy (time to running, to fully
    /// resident), against first touch, memcpy and dd, at several sizes.
    BenchRestore {
        /// MiB of dirty anonymous memory, one run per size.
        #[arg(long, value_delimiter = ',', default_values_t = [64, 1024, 4096])]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value = "/dev/shm")]
        dir: PathBuf,
    },
    /// Install LLVM 22, bpf-linker and nightly rust-src if missing.
    InstallEbpfPrerequisites,
    /// Build the eBPF object (installing its prerequisites first).
    BuildEbpf {
        /// Debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
}

/// Where `install` and `uninstall` put files.
#[derive(clap::Args)]
struct InstallTo {
    /// Installation prefix: programs in PREFIX/bin, the eBPF object in
    /// PREFIX/lib/chpox, the unit in PREFIX/lib/systemd/system.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Stage the files under this directory (for packaging), as if it were /.
    #[arg(long)]
    destdir: Option<PathBuf>,
}

/// Which build `install` and `package` take.
#[derive(clap::Args)]
struct InstallFrom {
    /// Install what is already built instead of building the release now.
    #[arg(long)]
    no_build: bool,
    /// With --no-build: the build to take (release or debug).
    #[arg(long, default_value = "release", requires = "no_build")]
    profile: String,
}

impl InstallFrom {
    fn source(&self) -> Result<install::Source> {
        if self.no_build {
            install::prebuilt(&self.profile)
        } else {
            install::build_release()
        }
    }
}

impl InstallTo {
    fn layout(&self) -> install::Layout {
        install::Layout {
            prefix: self.prefix.clone(),
            destdir: self.destdir.clone(),
        }
    }
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

/// Debian packages the test suite runs real programs from (servers,
/// runtimes, a batch system). `cargo xtask test` installs the missing ones.
const TEST_PACKAGES: &[&str] = &[
    "python3",
    "openjdk-17-jdk-headless",
    "slurm-wlm",
    "munge",
    "nodejs",
    "redis-server",
    "golang-go",
    "systemd",
    "man-db",
    "zsh",
    "fish",
    "make",
    "gcc",
];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    if !ebpf::is_root() {
        bail!("{what} needs root (it ptraces real processes); rerun with sudo");
    }
    Ok(())
}

/// Build the eBPF object and the release binaries, and put the object
/// next to chpox-agent, where the agent looks for it.
fn build_all() -> Result<PathBuf> {
    let object = ebpf::build_ebpf(true)?;
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let release = workspace_root().join("target/release");
    std::fs::copy(&object, release.join("chpox-ebpf.o"))
        .with_context(|| format!("cannot copy {} to {}", object.display(), release.display()))?;
    Ok(release)
}

/// Run `cargo test`, passing its output through, and end with one line
/// that totals every test binary's result.
fn test_all() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cargo()
        .args([
            "test",
            "--workspace",
            "--lib",
            "--bins",
            "--tests",
            "--no-fail-fast",
        ])
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(what))
                    .and_then(|n| n.trim().rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("some tests failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Build => {
            let release = build_all()?;
            eprintln!(
                "xtask: binaries and eBPF object are in {}",
                release.display()
            );
            Ok(())
        }
        Task::Start { args } => {
            require_root("chpox-agent")?;
            let release = build_all()?;
            run(Command::new(release.join("chpox-agent")).args(args))
        }
        Task::Test => {
            require_root("the test suite")?;
            ebpf::ensure_debian_packages(TEST_PACKAGES)?;
            ebpf::build_ebpf(true)?;
            run(cargo().args(["build", "--workspace", "--bins"]))?;
            test_all()
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
            ]))?;
            ebpf::lint_ebpf()
        }
        Task::Bench {
            mib,
            rounds,
            no_compress,
            no_kill,
            dir,
            triggers,
            tree_procs,
            tree_mib,
            no_tree,
            incremental_mib,
            no_incremental,
            only_incremental,
            only_triggers,
            writing_mib,
            no_precopy,
            no_agent,
        } => {
            require_root("the benchmark")?;
            bench::NO_PRECOPY.store(no_precopy, std::sync::atomic::Ordering::Relaxed);
            build_all()?;
            let agent = if no_agent {
                println!("no chpox-agent: dumps ask processes with remote syscalls");
                None
            } else {
                println!(
                    "with a chpox-agent running: dumps read processes' state through its eBPF iterator"
                );
                Some(bench::start_agent("dumps")?)
            };
            let rounds = rounds.max(1);
            if only_incremental {
                return bench::incremental::run(incremental_mib.max(1), rounds, &dir);
            }
            if only_triggers {
                drop(agent);
                return bench::trigger_latency(triggers.max(1), writing_mib);
            }
            let opts = bench::SizeOptions {
                rounds,
                compress: !no_compress,
                kill: !no_kill,
            };
            let mut sizes = Vec::new();
            for &m in &mib {
                sizes.push(bench::run_size(m.max(1), &opts, &dir)?);
            }
            bench::size_table(&sizes);
            if !no_tree {
                // The tree is held against one process of the same total size.
                let single_mib = tree_procs.max(1) as u64 * tree_mib.max(1);
                let single = bench::run(single_mib, rounds, &dir)?;
                let tree = bench::run_tree(tree_procs.max(1), tree_mib.max(1), rounds, &dir)?;
                bench::compare(&[&single, &tree]);
            }
            if writing_mib > 0 && !no_precopy {
                bench::writing::run(writing_mib, rounds, &dir)?;
            }
            // The trigger measurements start agents of their own.
            drop(agent);
            bench::trigger_latency(triggers.max(1), writing_mib)?;
            if !no_incremental {
                bench::incremental::run(incremental_mib.max(1), rounds, &dir)?;
            }
            Ok(())
        }
        Task::Install { to, from } => {
            let src = from.source()?;
            let layout = to.layout();
            let (files, total) = install::install(&src, &layout)?;
            eprintln!(
                "xtask: installed into {}{}: {}",
                to.prefix.display(),
                to.destdir
                    .as_ref()
                    .map(|d| format!(" under {}", d.display()))
                    .unwrap_or_default(),
                install::describe(&layout, &files, total)
            );
            if to.destdir.is_none() {
                eprintln!(
                    "xtask: start the agent with `systemctl daemon-reload && systemctl enable --now chpox-agent`"
                );
            }
            Ok(())
        }
        Task::Uninstall { to } => {
            let removed = install::uninstall(&to.layout())?;
            eprintln!(
                "xtask: removed {removed} files from {}",
                to.prefix.display()
            );
            Ok(())
        }
        Task::Package {
            out,
            compression,
            from,
        } => {
            let src = from.source()?;
            let out = if out.is_absolute() {
                out
            } else {
                workspace_root().join(out)
            };
            let deb = install::package(&src, &out, &compression)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::BenchRestore { sizes, rounds, dir } => {
            require_root("the benchmark")?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench::restore::run(&sizes, rounds, &dir)
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
