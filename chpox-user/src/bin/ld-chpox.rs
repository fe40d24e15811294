//! `ld-chpox FILE`: the old chpox's restore command (see `chpox::cli::ld`).
//! Installed as a link to `chpox`, which runs the same code by this name.

fn main() -> std::process::ExitCode {
    chpox::cli::ld::main()
}
