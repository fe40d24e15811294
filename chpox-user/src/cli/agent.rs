//! `chpox-agent`: the root daemon that turns `kill -31 PID` into a
//! checkpoint of a registered process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::agent::{AgentConfig, run};

#[derive(Parser)]
#[command(
    name = "chpox-agent",
    version,
    about = "Checkpoint registered processes when they are sent their trigger signal",
    long_about = "Checkpoint registered processes when they are sent their trigger signal.\n\n\
        Loads the eBPF program that sees the trigger signal (mounting tracefs and bpffs if \
        needed), serves the control socket and the register FIFO in --run-dir, and writes \
        each registered process's checkpoint when it is sent its signal. Runs as root; \
        `systemctl enable --now chpox-agent` runs it as a service."
)]
pub struct Args {
    /// Directory of the control socket, the register FIFO and saved registrations.
    #[arg(long, env = "CHPOX_RUN_DIR", default_value = crate::control::RUN_DIR)]
    run_dir: PathBuf,
    /// The eBPF object. Default: the first that exists of chpox-ebpf.o
    /// next to this program, PREFIX/lib/chpox/chpox-ebpf.o for a program
    /// in PREFIX/bin (/usr/local/lib/chpox/, /usr/lib/chpox/, as `cargo
    /// xtask install` puts it), target/chpox-ebpf.o in a build tree, and
    /// /usr/lib/chpox/chpox-ebpf.o.
    #[arg(long, value_name = "FILE")]
    ebpf_object: Option<PathBuf>,
    /// Earlier images to keep per process, as FILE.1 … FILE.N.
    #[arg(long, default_value_t = 1)]
    keep: u32,
    /// Where images go for registrations that name no file.
    #[arg(long, default_value = "/var/lib/chpox")]
    image_dir: PathBuf,
    /// Close a connection that sends no complete request for this many seconds.
    #[arg(long, default_value_t = AgentConfig::DEFAULT_IDLE_TIMEOUT.as_secs_f64())]
    idle_timeout: f64,
    /// Connections open at once, all users together (lowered to what the
    /// descriptor limit allows; some are kept for root).
    #[arg(long, default_value_t = AgentConfig::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections open at once for one user other than root.
    #[arg(long, default_value_t = AgentConfig::DEFAULT_MAX_CONNECTIONS_PER_USER)]
    max_connections_per_user: usize,
    #[command(flatten)]
    log: super::LogArgs,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let idle_timeout = match Duration::try_from_secs_f64(args.idle_timeout) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            eprintln!(
                "chpox-agent: --idle-timeout {} is not a number of seconds above 0",
                args.idle_timeout
            );
            return ExitCode::FAILURE;
        }
    };
    // Info by default: one line per checkpoint; -v and CHPOX_LOG for more.
    args.log.init_at(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chpox-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = AgentConfig {
        run_dir: args.run_dir,
        ebpf_object: args.ebpf_object,
        keep: args.keep,
        image_dir: args.image_dir,
        idle_timeout,
        max_connections: args.max_connections,
        max_connections_per_user: args.max_connections_per_user,
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpox-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
