//! `chpox-agent`: the root daemon that turns `kill -31 PID` into a
//! checkpoint of a registered process (see `chpox::cli::agent`). Installed
//! as a link to `chpox`, which runs the same code by this name.

fn main() -> std::process::ExitCode {
    chpox::cli::agent::main()
}
