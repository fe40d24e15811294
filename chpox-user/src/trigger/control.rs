//! The agent's control protocol: one JSON request per line on a Unix
//! socket, one JSON response per line back. The agent learns who asks from
//! the socket (SO_PEERCRED), never from the request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default directory of the agent's socket, FIFO and state.
pub const RUN_DIR: &str = "/run/chpox";
pub const SOCKET_NAME: &str = "agent.sock";
pub const FIFO_NAME: &str = "register";
pub const STATE_NAME: &str = "registrations.json";
/// The longest request line the agent reads (64 KiB); it closes a
/// connection that sends a longer one.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// The run directory: `CHPOX_RUN_DIR` (tests run private agents) or /run/chpox.
pub fn run_dir() -> PathBuf {
    std::env::var_os("CHPOX_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Register a process: from now on its trigger signal checkpoints it.
    Register(RegisterRequest),
    Unregister {
        pid: i32,
    },
    List,
    /// Send the trigger signal and answer once that checkpoint is written.
    Checkpoint {
        pid: i32,
        timeout_secs: u64,
    },
    AddLib {
        path: PathBuf,
    },
    DelLib {
        path: PathBuf,
    },
    ClearLibs,
    ListLibs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisterRequest {
    pub pid: i32,
    pub signal: u32,
    pub flags: u32,
    /// Image file; the agent picks one when absent.
    pub output: Option<PathBuf>,
    /// Take over a signal the process handles itself.
    pub force: bool,
    /// The process set SIG_IGN for the signal itself (`chpox run`).
    pub self_ignored: bool,
    /// Name for the default image file (`chpox run`: the program about
    /// to be executed); else the process's current name.
    #[serde(default)]
    pub name: Option<String>,
    /// Checkpoint on a timer too, every this many milliseconds (at least
    /// [`MIN_INTERVAL`]); None: the agent's default interval, if any.
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// Earlier images kept (`FILE.1` … `FILE.N`); None: the agent's `--keep`.
    #[serde(default)]
    pub keep: Option<u32>,
    /// Descriptors chpox cannot restore come back as /dev/null instead of
    /// failing the checkpoint (`--unsupported-fd=null`).
    #[serde(default)]
    pub unsupported_fd_null: bool,
    /// Every this many checkpoints is a full one, the others incremental
    /// (1: all full); None: the agent's `--full-every`.
    #[serde(default)]
    pub full_every: Option<u32>,
}

/// What `chpox run` and `chpox register` ask of a registration beyond
/// the old chpox's signal, FLAGS and file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub every: Option<Duration>,
    pub keep: Option<u32>,
    pub unsupported_fd_null: bool,
    pub full_every: Option<u32>,
}

impl Settings {
    /// A registration request for `pid` with these settings.
    pub fn request(&self, pid: i32) -> RegisterRequest {
        RegisterRequest {
            every_ms: self
                .every
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            keep: self.keep,
            unsupported_fd_null: self.unsupported_fd_null,
            full_every: self.full_every,
            ..RegisterRequest::new(pid)
        }
    }
}

/// The shortest interval of periodic checkpoints.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The most earlier images a registration may keep.
pub const MAX_KEEP: u32 = 100;

/// A duration as users write it: `500ms`, `30s`, `10m`, `2h`, `1d`, or a
/// number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 30s, 10m, 2h)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("{text:?} is not a duration (like 30s, 10m, 2h)"))
}

/// A duration the way [`parse_duration`] reads it back, in its largest
/// whole unit.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl RegisterRequest {
    /// A plain registration of `pid` with the defaults of old chpox.
    pub fn new(pid: i32) -> Self {
        RegisterRequest {
            pid,
            signal: chpox_common::DEFAULT_TRIGGER_SIGNAL,
            flags: chpox_common::flags::REGISTERED,
            output: None,
            force: false,
            self_ignored: false,
            name: None,
            every_ms: None,
            keep: None,
            unsupported_fd_null: false,
            full_every: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Registered {
        pid: i32,
        signal: u32,
        output: PathBuf,
    },
    List {
        entries: Vec<ListEntry>,
    },
    Checkpointed {
        pid: i32,
        image: PathBuf,
        generation: u64,
        bytes: u64,
        /// From the tracepoint firing to every thread stopped.
        signal_to_frozen_us: u64,
        /// How long the process was stopped.
        frozen_us: u64,
        /// Processes in the image (the process and its descendants).
        #[serde(default)]
        processes: usize,
        /// Children of the process the checkpoint left out (registered
        /// without FLAGS 8).
        #[serde(default)]
        children_not_saved: Vec<i32>,
        /// Processes whose pages were written from a copy-on-write
        /// snapshot once they ran again (the others were copied while
        /// frozen).
        #[serde(default)]
        snapshots: usize,
        /// Pages of an increment read before the freeze, while the
        /// processes ran (`incremental::preread`): the freeze came that
        /// much later after the trigger, to be that much shorter.
        #[serde(default)]
        pages_read_before_freeze: u64,
    },
    Libs {
        libs: Vec<PathBuf>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListEntry {
    pub pid: i32,
    pub comm: String,
    pub uid: u32,
    pub signal: u32,
    pub flags: u32,
    pub output: PathBuf,
    /// Checkpoints written so far.
    pub checkpoints: u64,
    /// Unix time (seconds) of the last checkpoint written.
    pub last_checkpoint: Option<u64>,
    /// idle, requested, running, running+again.
    pub state: String,
    /// Trigger signals seen, and how many were folded into another checkpoint.
    pub signals: u64,
    pub coalesced: u64,
    pub last_error: Option<String>,
    /// Children of the process the last checkpoint left out: registered
    /// without FLAGS 8, it saves the process alone.
    #[serde(default)]
    pub children_not_saved: Vec<i32>,
    /// Periodic checkpoints: every this many milliseconds.
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// Unix time (milliseconds) when the next periodic checkpoint is due.
    #[serde(default)]
    pub next_due_ms: Option<u64>,
    /// Earlier images kept.
    #[serde(default)]
    pub keep: u32,
    /// Descriptors chpox cannot restore come back as /dev/null.
    #[serde(default)]
    pub unsupported_fd_null: bool,
    /// Timer ticks so far, and the checkpoints the timer started (the
    /// others came from trigger signals).
    #[serde(default)]
    pub timer_ticks: u64,
    #[serde(default)]
    pub timer_checkpoints: u64,
}

impl ListEntry {
    /// The state as `chpox list` shows it: the checkpoint state, or
    /// `failed: REASON` while idle after a failed checkpoint.
    pub fn shown_state(&self) -> String {
        match &self.last_error {
            Some(e) if self.state == "idle" => format!("failed: {e}"),
            _ => self.state.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach chpox-agent at {path}: {source}; start it with `sudo chpox-agent` (or `cargo xtask start`)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to chpox-agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("chpox-agent sent a reply this chpox does not understand: {0}")]
    Decode(String),
    #[error("{0}")]
    Agent(String),
}

/// Send one request and wait for its response (at most `timeout`).
pub fn request(run_dir: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = run_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Decode(e.to_string()))?;
    if line.len() > MAX_REQUEST_LINE {
        return Err(ClientError::Agent(format!(
            "request too long ({} bytes; chpox-agent reads at most {} KiB): a path that long?",
            line.len(),
            MAX_REQUEST_LINE / 1024
        )));
    }
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let response: Response =
        serde_json::from_str(&reply).map_err(|e| ClientError::Decode(e.to_string()))?;
    match response {
        Response::Error { message } => Err(ClientError::Agent(message)),
        other => Ok(other),
    }
}

/// One old-style register line, `PID:SIG:FLAGS:FILE`, as written to
/// /proc/chpox/register under old chpox and to /run/chpox/register now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterLine {
    pub pid: i32,
    pub signal: u32,
    pub flags: u32,
    pub output: PathBuf,
}

/// Parse a register line; the error says what is wrong with it.
pub fn parse_register_line(line: &str) -> Result<RegisterLine, String> {
    let line = line.trim();
    // FILE may itself contain ':'; it is everything after the third one.
    let mut parts = line.splitn(4, ':');
    let (Some(pid), Some(sig), Some(flags), Some(file)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{line:?} is not PID:SIG:FLAGS:FILE"));
    };
    let pid: i32 = pid
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("PID {pid:?} is not a process id"))?;
    let signal: u32 = sig
        .trim()
        .parse()
        .ok()
        .filter(|&s| chpox_common::is_trigger_signal(s))
        .ok_or_else(|| {
            format!("SIG {sig:?} is not a signal chpox can use (1–64, not KILL or STOP)")
        })?;
    let flags: u32 = flags
        .trim()
        .parse()
        .map_err(|_| format!("FLAGS {flags:?} is not a number"))?;
    if flags & !chpox_common::flags::KNOWN != 0 {
        return Err(format!(
            "FLAGS {flags} has bits chpox does not know (known: 1, 2 = embed executable, 4 = embed libraries, 8 = children)"
        ));
    }
    let file = file.trim();
    if file.is_empty() || !file.starts_with('/') {
        return Err(format!("FILE {file:?} must be an absolute path"));
    }
    Ok(RegisterLine {
        pid,
        signal,
        flags,
        output: PathBuf::from(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_register_line_parses() {
        assert_eq!(
            parse_register_line("1234:31:1:/tmp/proc-dump\n"),
            Ok(RegisterLine {
                pid: 1234,
                signal: 31,
                flags: 1,
                output: "/tmp/proc-dump".into()
            })
        );
        let with_colon = parse_register_line("7:12:6:/tmp/a:b").expect("colon in file");
        assert_eq!(with_colon.output, PathBuf::from("/tmp/a:b"));
        assert_eq!(with_colon.flags, 6);
    }

    #[test]
    fn garbage_lines_are_rejected_with_a_reason() {
        for bad in [
            "",
            "hello",
            "1234:31:1",
            "x:31:1:/tmp/f",
            "-5:31:1:/tmp/f",
            "1234:9:1:/tmp/f",
            "1234:99:1:/tmp/f",
            "1234:31:64:/tmp/f",
            "1234:31:1:relative",
            "1234:31:1:",
        ] {
            assert!(parse_register_line(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn list_entries_of_an_agent_without_children_not_saved_still_parse() {
        let old = r#"{"pid":7,"comm":"job","uid":0,"signal":31,"flags":1,
            "output":"/tmp/img","checkpoints":1,"last_checkpoint":5,"state":"idle",
            "signals":1,"coalesced":0,"last_error":null}"#;
        let entry: ListEntry = serde_json::from_str(old).expect("decode");
        assert!(entry.children_not_saved.is_empty());
    }

    #[test]
    fn durations_parse_and_print_back() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "10x", "-1s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in ["1s", "10m", "2h", "3d", "1500ms"] {
            assert_eq!(format_duration(parse_duration(d).expect("parse")), d);
        }
    }

    #[test]
    fn requests_round_trip_as_json() {
        let req = Request::Register(RegisterRequest {
            self_ignored: true,
            ..RegisterRequest::new(1)
        });
        let text = serde_json::to_string(&req).expect("encode");
        assert!(text.contains("\"op\":\"register\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).expect("decode"), req);
    }
}
