//! Man pages and shell completions, generated from the clap definitions of
//! the binaries, so they say what `--help` says.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

pub use clap_complete::Shell;

/// The commands chpox installs, each with its man section: the tools in 1,
/// the daemon in 8. `chpox` itself is defined by its binary, which passes
/// it in.
pub fn commands(chpox: clap::Command) -> Vec<(clap::Command, &'static str)> {
    vec![
        (chpox, "1"),
        (super::ctl::Cli::command(), "1"),
        (super::ld::Cli::command(), "1"),
        (super::agent::Args::command(), "8"),
    ]
}

/// The completion script of `cmd` for `shell`.
pub fn completions(shell: Shell, mut cmd: clap::Command) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an
/// error.
pub fn print(bytes: &[u8]) -> Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// The file a completion script for `name` is installed as, in the
/// directory `shell` reads them from.
pub fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    }
}

/// Writes the man pages of `cmd` and of each of its visible subcommands
/// (`chpox-dump.1`, …) into `dir`; returns the files written.
pub fn man_pages(cmd: clap::Command, section: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    let mut stack = vec![cmd];
    while let Some(cmd) = stack.pop() {
        stack.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = clap_mangen::Man::new(cmd)
            .section(section)
            .manual("chpox manual")
            .source(format!("chpox {}", env!("CARGO_PKG_VERSION")));
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Every argument and subcommand of `cmd` (recursively) without a help
/// text, as `command --arg`: what `--help` would leave unexplained.
pub fn undocumented(cmd: &clap::Command) -> Vec<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut missing = Vec::new();
    let mut stack = vec![cmd];
    while let Some(cmd) = stack.pop() {
        let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
        for arg in cmd.get_arguments() {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{name} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(format!("{name} {}", sub.get_name()));
            }
        }
        stack.extend(cmd.get_subcommands().cloned());
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_and_argument_is_described() {
        for cmd in [
            super::super::ctl::Cli::command(),
            super::super::ld::Cli::command(),
            super::super::agent::Args::command(),
        ] {
            cmd.clone().debug_assert();
            assert_eq!(undocumented(&cmd), Vec::<String>::new());
        }
    }

    #[test]
    fn man_pages_are_written_for_each_subcommand() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pages = man_pages(super::super::ctl::Cli::command(), "1", dir.path()).expect("man");
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
            .collect();
        assert!(names.contains(&"chpoxctl.1".to_string()), "{names:?}");
        assert!(names.contains(&"chpoxctl-add.1".to_string()), "{names:?}");
        let text = std::fs::read_to_string(dir.path().join("chpoxctl-add.1")).expect("read");
        assert!(text.contains(".TH chpoxctl-add 1"), "{text}");
    }
}
