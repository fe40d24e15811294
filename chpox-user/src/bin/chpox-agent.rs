//! `chpox-agent`: the root daemon that turns `kill -31 PID` into a
//! checkpoint of a registered process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chpox::agent::{AgentConfig, run};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "chpox-agent",
    version,
    about = "Checkpoint registered processes when they are sent their trigger signal"
)]
struct Args {
    /// Directory of the control socket, the register FIFO and saved registrations.
    #[arg(long, env = "CHPOX_RUN_DIR", default_value = chpox::control::RUN_DIR)]
    run_dir: PathBuf,
    /// The eBPF object (default: next to this binary, or target/chpox-ebpf.o).
    #[arg(long)]
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
}

fn main() -> ExitCode {
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
    // Info by default: one line per checkpoint; CHPOX_LOG overrides.
    chpox::cli::init_logging(1);
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
