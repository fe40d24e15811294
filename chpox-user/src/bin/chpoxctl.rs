//! `chpoxctl`: the command-line tool of old chpox (see `chpox::cli::ctl`).
//! Installed as a link to `chpox`, which runs the same code by this name.

fn main() -> std::process::ExitCode {
    chpox::cli::ctl::main()
}
