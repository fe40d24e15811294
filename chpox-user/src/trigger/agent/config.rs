//! `/etc/chpox/agent.toml`: the agent's settings in a file, under the
//! command line (a flag given overrides the file). Every key is optional:
//!
//! ```toml
//! image_dir = "/var/lib/chpox"
//! keep = 3                  # earlier images kept per registration
//! full_every = 10           # every 10th checkpoint full, the others incremental (1: all full)
//! interval = "10m"          # periodic checkpoints for registrations that name none
//! idle_timeout = "10s"
//! max_connections = 1024
//! max_connections_per_user = 64
//! ebpf_object = "/usr/lib/chpox/chpox-ebpf.o"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::control::{MAX_KEEP, MIN_INTERVAL, parse_duration};

/// Where the agent looks when not told.
pub const DEFAULT_PATH: &str = "/etc/chpox/agent.toml";

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub image_dir: Option<PathBuf>,
    pub keep: Option<u32>,
    /// Every this many checkpoints is full (`--full-every`).
    #[serde(default)]
    pub full_every: Option<u32>,
    /// A duration (`"10m"`).
    pub interval: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_user: Option<usize>,
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl FileConfig {
    /// The file at `path`; a missing file is an empty configuration when
    /// `required` is false (the default path), an error otherwise.
    pub fn load(path: &Path, required: bool) -> Result<FileConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(FileConfig::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let config = FileConfig::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let config: FileConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        config.interval()?;
        config.idle_timeout()?;
        if config.keep.is_some_and(|k| k > MAX_KEEP) {
            return Err(format!("keep is at most {MAX_KEEP}"));
        }
        Ok(config)
    }

    /// `interval`, checked.
    pub fn interval(&self) -> Result<Option<Duration>, String> {
        self.interval
            .as_deref()
            .map(|text| {
                let d = parse_duration(text).map_err(|e| format!("interval: {e}"))?;
                if d < MIN_INTERVAL {
                    return Err(format!(
                        "interval {text:?} is shorter than {}s",
                        MIN_INTERVAL.as_secs()
                    ));
                }
                Ok(d)
            })
            .transpose()
    }

    /// `idle_timeout`, checked.
    pub fn idle_timeout(&self) -> Result<Option<Duration>, String> {
        self.idle_timeout
            .as_deref()
            .map(|text| match parse_duration(text) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err("idle_timeout must be above 0".to_string()),
                Err(e) => Err(format!("idle_timeout: {e}")),
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = FileConfig::parse(
            r#"
image_dir = "/srv/images"
keep = 3
interval = "10m"
idle_timeout = "5s"
max_connections = 100
max_connections_per_user = 4
"#,
        )
        .expect("parse");
        assert_eq!(c.image_dir, Some(PathBuf::from("/srv/images")));
        assert_eq!(c.keep, Some(3));
        assert_eq!(c.interval(), Ok(Some(Duration::from_secs(600))));
        assert_eq!(c.idle_timeout(), Ok(Some(Duration::from_secs(5))));
        assert_eq!(c.max_connections_per_user, Some(4));
        assert_eq!(FileConfig::parse(""), Ok(FileConfig::default()));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, phrase) in [
            ("kep = 3", "unknown field"),
            ("keep = \"three\"", "keep"),
            ("interval = \"0.5s\"", "shorter"),
            ("interval = \"soon\"", "interval"),
            ("keep = 1000", "at most"),
            ("idle_timeout = \"0s\"", "above 0"),
            ("keep = ", ""),
        ] {
            let err = FileConfig::parse(text).expect_err(text);
            assert!(err.contains(phrase), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_missing_default_file_is_empty_and_a_named_one_an_error() {
        let missing = Path::new("/nonexistent/chpox/agent.toml");
        assert_eq!(
            FileConfig::load(missing, false).expect("default"),
            FileConfig::default()
        );
        assert!(FileConfig::load(missing, true).is_err());
    }
}
