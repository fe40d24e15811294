//! `chpox-agent`: the root daemon that turns `kill -31 PID` into a
//! checkpoint of a registered process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::agent::config::FileConfig;
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
    /// Settings file (TOML: image_dir, keep, full_every, interval, idle_timeout,
    /// max_connections, max_connections_per_user, ebpf_object); flags
    /// given here override it. A missing default file is no error.
    #[arg(long, value_name = "FILE", default_value = crate::agent::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Earlier images to keep per process, as FILE.1 … FILE.N [default: 1].
    #[arg(long, value_name = "N")]
    keep: Option<u32>,
    /// Every Nth checkpoint of a registration is a full image, the others
    /// incremental (only the pages written since the last full one; the
    /// full one is kept as FILE.base); 1: every checkpoint full; 0: full
    /// only when needed [default: 0].
    #[arg(long, value_name = "N")]
    full_every: Option<u32>,
    /// Where images go for registrations that name no file [default: /var/lib/chpox].
    #[arg(long, value_name = "DIR")]
    image_dir: Option<PathBuf>,
    /// Checkpoint registered processes that name no interval every DUR
    /// (30s, 10m, 2h) [default: only on signals].
    #[arg(long, value_name = "DUR", value_parser = crate::control::parse_duration)]
    interval: Option<Duration>,
    /// Close a connection that sends no complete request for this many seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<f64>,
    /// Connections open at once, all users together (lowered to what the
    /// descriptor limit allows; some are kept for root) [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections open at once for one user other than root [default: 64].
    #[arg(long, value_name = "N")]
    max_connections_per_user: Option<usize>,
    #[command(flatten)]
    log: super::LogArgs,
}

/// The settings: the defaults, then the file, then the flags.
fn settings(args: Args) -> Result<AgentConfig, String> {
    let explicit = args.config.as_os_str() != crate::agent::config::DEFAULT_PATH;
    let file = FileConfig::load(&args.config, explicit).map_err(|e| e.to_string())?;
    let idle_timeout = match args.idle_timeout {
        Some(secs) => match Duration::try_from_secs_f64(secs) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                return Err(format!(
                    "--idle-timeout {secs} is not a number of seconds above 0"
                ));
            }
        },
        None => file
            .idle_timeout()?
            .unwrap_or(AgentConfig::DEFAULT_IDLE_TIMEOUT),
    };
    let default_interval = match args.interval {
        Some(d) if d < crate::control::MIN_INTERVAL => {
            return Err(format!(
                "--interval {} is shorter than {}",
                crate::control::format_duration(d),
                crate::control::format_duration(crate::control::MIN_INTERVAL)
            ));
        }
        Some(d) => Some(d),
        None => file.interval()?,
    };
    let keep = args.keep.or(file.keep).unwrap_or(1);
    if keep > crate::control::MAX_KEEP {
        return Err(format!("--keep is at most {}", crate::control::MAX_KEEP));
    }
    Ok(AgentConfig {
        default_interval,
        run_dir: args.run_dir,
        ebpf_object: args.ebpf_object.or(file.ebpf_object),
        keep,
        full_every: args.full_every.or(file.full_every).unwrap_or(0),
        image_dir: args
            .image_dir
            .or(file.image_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/chpox")),
        idle_timeout,
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(AgentConfig::DEFAULT_MAX_CONNECTIONS),
        max_connections_per_user: args
            .max_connections_per_user
            .or(file.max_connections_per_user)
            .unwrap_or(AgentConfig::DEFAULT_MAX_CONNECTIONS_PER_USER),
    })
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    let config = match settings(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chpox-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Info by default: one line per checkpoint; -v and CHPOX_LOG for more.
    log.init_at(1);
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
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chpox-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
