//! What the command line says and how: exit codes of `chpox run`, signal
//! names, FLAGS checking, progress bars on a terminal and not elsewhere,
//! plain and JSON logs, and the JSON of dump, inspect, checkpoint, list,
//! listlibs and check.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::agent::{Agent, scratch};
use common::{Target, chpox_bin, chpox_ok, path_str, run_chpox, show, tempdir};
use serde_json::Value;

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn run_exits_127_when_the_command_is_missing_and_126_when_it_cannot_run() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-program");
    let out = run_chpox(&["run", "--", path_str(&missing)]);
    assert_eq!(code(&out), Some(127), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such file"),
        "{}",
        show(&out)
    );
    // Through PATH too, as env and nohup do.
    let out = run_chpox(&["run", "--", "chpox-no-such-command-anywhere"]);
    assert_eq!(code(&out), Some(127), "{}", show(&out));

    let text = dir.path().join("not-executable");
    std::fs::write(&text, "just text").expect("write");
    let out = run_chpox(&["run", "--", path_str(&text)]);
    assert_eq!(code(&out), Some(126), "{}", show(&out));
    let out = run_chpox(&["run", "--", path_str(dir.path())]);
    assert_eq!(code(&out), Some(126), "a directory: {}", show(&out));
}

#[test]
fn invalid_flags_are_refused_naming_the_valid_bits() {
    for args in [
        vec!["register", "1", "--flags", "64"],
        vec!["run", "--flags", "99", "--", "true"],
        vec!["register", "1", "--flags", "lots"],
    ] {
        let out = run_chpox(&args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for bit in [
            "1 = registered",
            "2 = embed the executable",
            "4 = embed the libraries",
            "8 = include the descendants",
            "16 = keep established TCP connections",
        ] {
            assert!(err.contains(bit), "{args:?}: {err}");
        }
    }
    let out = run_chpox(&["register", "1", "--signal", "KILL"]);
    assert_eq!(code(&out), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot trigger checkpoints"),
        "{}",
        show(&out)
    );
}

/// `--signal` and chpoxctl's SIG take names; `chpox list --json` shows
/// the number; `chpoxctl listlibs --json` is a JSON array.
#[test]
fn signals_by_name_and_listlibs_json() {
    let s = scratch();
    let agent = Agent::start(&s);
    let a = Target::spawn("sleeper", &[], &s.logs);
    let b = Target::spawn("sleeper", &[], &s.logs);
    let img = s.path("img");
    agent.chpox_ok(&[
        "register",
        &a.pid.to_string(),
        "--signal",
        "SIGUSR2",
        "-o",
        path_str(&img),
    ]);
    assert_eq!(
        agent.entry(a.pid).expect("registered")["signal"],
        libc::SIGUSR2
    );
    agent.chpoxctl_ok(&["add", &b.pid.to_string(), "usr1", "9", path_str(&img)]);
    assert_eq!(
        agent.entry(b.pid).expect("registered")["signal"],
        libc::SIGUSR1
    );

    let libs = |agent: &Agent| -> Value {
        serde_json::from_str(&agent.chpoxctl_ok(&["listlibs", "--json"])).expect("JSON")
    };
    assert_eq!(libs(&agent), serde_json::json!([]));
    let lib = s.path("libfoo.so");
    std::fs::write(&lib, "x").expect("write");
    agent.chpoxctl_ok(&["addlib", path_str(&lib)]);
    assert_eq!(libs(&agent), serde_json::json!([path_str(&lib)]));
}

/// Runs `shell_command` with stderr on a pseudo-terminal (`script`), and
/// returns what the terminal showed.
fn on_terminal(shell_command: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", shell_command, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .env_remove("CHPOX_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run script");
    assert!(out.status.success(), "{shell_command}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// The shell command of a dump of `pid` to `img` with `extra`, its
/// report to /dev/null (what is left is what stderr shows).
fn dump_command(pid: i32, img: &Path, extra: &str) -> String {
    format!(
        "{} dump {pid} -o {} --unsupported-fd null {extra} >/dev/null",
        quote(&chpox_bin()),
        quote(img)
    )
}

/// The totals ("/N MiB") a progress bar drew in `shown`, in MiB.
fn drawn_totals_mib(shown: &str) -> Vec<f64> {
    shown
        .split('/')
        .skip(1)
        .filter_map(|rest| rest.split_once(" MiB").map(|(n, _)| n.trim()))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A compressed dump's image passes twice (written, then compressed once
/// the process runs on): its progress bar counts both, so it does not sit
/// full while the longer half goes on.
#[test]
fn a_compressed_dump_counts_its_compression_in_its_progress() {
    let dir = tempdir();
    let t = Target::spawn("mempattern", &["64"], dir.path());
    let img = dir.path().join("img");
    let env = [("CHPOX_PROGRESS_DELAY_MS", "0")];
    let dump = |extra: &str| dump_command(t.pid, &img, extra);
    let plain = drawn_totals_mib(&on_terminal(&dump(""), &env));
    let compressed = drawn_totals_mib(&on_terminal(&dump("--compress"), &env));
    // The total from the first frame on (a bar that outgrows its total
    // draws a larger one as it goes, full all along).
    let first = |v: &[f64]| v.first().copied().unwrap_or(0.0);
    assert!(
        (60.0..80.0).contains(&first(&plain)),
        "a plain dump of 64 MiB: totals {plain:?}"
    );
    assert!(
        (120.0..160.0).contains(&first(&compressed)),
        "a compressed dump of 64 MiB: totals {compressed:?}"
    );
}

/// A progress bar on a terminal (here after 0 ms instead of a second, so
/// the test does not depend on how fast the dump is), none on a pipe or
/// with --quiet.
#[test]
fn progress_shows_on_a_terminal_only() {
    let dir = tempdir();
    let t = Target::spawn("mempattern", &["64"], dir.path());
    let img = dir.path().join("img");
    let dump = |extra: &str| dump_command(t.pid, &img, extra);
    let env = [("CHPOX_PROGRESS_DELAY_MS", "0")];
    let shown = on_terminal(&dump(""), &env);
    assert!(
        shown.contains("dump [") && shown.contains("MiB"),
        "no progress bar on a terminal: {shown:?}"
    );
    let quiet = on_terminal(&dump("--quiet"), &env);
    assert!(!quiet.contains("dump ["), "--quiet: {quiet:?}");

    // stderr a pipe: nothing but the result on stdout.
    let out = Command::new(chpox_bin())
        .args(["dump", &t.pid.to_string(), "-o", path_str(&img)])
        .args(["--unsupported-fd", "null"])
        .env("CHPOX_PROGRESS_DELAY_MS", "0")
        .output()
        .expect("run chpox");
    assert!(out.status.success(), "{}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));

    // A restore too.
    let pid_file = dir.path().join("restored.pid");
    let restore = format!(
        "{} restore --pid any --detach {} >{}",
        quote(&chpox_bin()),
        quote(&img),
        quote(&pid_file)
    );
    let shown = on_terminal(&restore, &env);
    let restored: i32 = std::fs::read_to_string(&pid_file)
        .expect("restored PID")
        .trim()
        .parse()
        .expect("a PID");
    // SAFETY: kill has no memory effects; the PID is the copy we restored.
    unsafe { libc::kill(restored, libc::SIGKILL) };
    assert!(shown.contains("restore ["), "{shown:?}");
}

/// Logs are plain text when stderr is a file, coloured on a terminal, and
/// JSON lines with --log-format json.
#[test]
fn logs_are_plain_off_a_terminal_and_json_on_request() {
    let dir = tempdir();
    let t = Target::spawn("sleeper", &[], dir.path());
    let img = dir.path().join("img");
    let pid = t.pid.to_string();
    let dump = |extra: &[&str]| -> Output {
        Command::new(chpox_bin())
            .args(["-vv", "dump", &pid, "-o", path_str(&img)])
            .args(["--unsupported-fd", "null"])
            .args(extra)
            .env_remove("NO_COLOR")
            .env_remove("CHPOX_LOG")
            .output()
            .expect("run chpox")
    };
    let out = dump(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(" DEBUG "), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI codes in a redirected log: {log:?}"
    );
    // Durations in one unit.
    assert!(!log.contains("_ms=") && !log.contains(" ms="), "{log}");

    let out = dump(&["--log-format", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!events.is_empty(), "{log}");
    assert!(
        events
            .iter()
            .all(|e| e["level"].is_string() && e["fields"]["message"].is_string()),
        "{log}"
    );

    // On a terminal the same log is coloured: the test above can fail.
    let shown = on_terminal(
        &format!(
            "{} -vv dump {pid} -o {} --unsupported-fd null >/dev/null",
            quote(&chpox_bin()),
            quote(&img)
        ),
        &[],
    );
    assert!(shown.contains("\x1b["), "{shown:?}");
}

fn is_hex(v: &Value) -> bool {
    v.as_str()
        .and_then(|s| s.strip_prefix("0x"))
        .is_some_and(|h| !h.is_empty() && u64::from_str_radix(h, 16).is_ok())
}

/// The same names and units in every JSON: `*_us` durations,
/// `image_bytes`, addresses and registers as hex strings.
#[test]
fn json_names_and_hex_strings() {
    let s = scratch();
    let agent = Agent::start(&s);
    let t = Target::spawn("sleeper", &[], &s.logs);
    let img = s.path("img");
    let pid = t.pid.to_string();

    let dump: Value = serde_json::from_str(&chpox_ok(&[
        "dump",
        &pid,
        "-o",
        path_str(&img),
        "--unsupported-fd",
        "null",
        "--json",
    ]))
    .expect("dump --json");
    for key in [
        "frozen_us",
        "total_us",
        "frozen_at_monotonic_us",
        "image_bytes",
        "processes",
        "pid",
    ] {
        assert!(dump[key].is_u64(), "{key}: {dump}");
    }
    assert!(dump.get("frozen").is_none(), "{dump}");
    assert_eq!(dump["image"], path_str(&img));

    let inspect: Value =
        serde_json::from_str(&chpox_ok(&["inspect", path_str(&img), "--json"])).expect("inspect");
    let thread = &inspect["threads"][0];
    for reg in ["rip", "rsp", "rax", "fs_base"] {
        assert!(is_hex(&thread["regs"][reg]), "{reg}: {}", thread["regs"]);
    }
    let vma = &inspect["vmas"][0];
    assert!(is_hex(&vma["start"]) && is_hex(&vma["end"]), "{vma}");
    assert!(inspect["image_bytes"].is_u64(), "{inspect}");
    assert!(
        inspect["created_unix_us"].is_u64(),
        "{}",
        inspect["created_unix_us"]
    );
    assert_eq!(inspect["process"]["pid"], t.pid);

    // Through the agent: checkpoint --json names what dump --json names.
    agent.chpox_ok(&["register", &pid, "-o", path_str(&img)]);
    let cp: Value =
        serde_json::from_str(&agent.chpox_ok(&["checkpoint", &pid, "--json"])).expect("checkpoint");
    for key in [
        "frozen_us",
        "signal_to_frozen_us",
        "image_bytes",
        "processes",
        "pid",
    ] {
        assert!(cp[key].is_u64(), "{key}: {cp}");
    }
    assert_eq!(cp["image"], path_str(&img));
    assert!(
        cp.get("bytes").is_none() && cp.get("result").is_none(),
        "{cp}"
    );
    let e = agent.entry(t.pid).expect("listed");
    assert_eq!(e["checkpoints"], 1, "{e}");
}

#[test]
fn check_reports_each_feature() {
    let out = chpox_ok(&["check", "--json"]);
    let report: Value = serde_json::from_str(&out).expect("check --json");
    let names: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            assert!(
                f["available"].is_boolean() && f["without"].is_string(),
                "{f}"
            );
            f["name"].as_str().expect("name")
        })
        .collect();
    assert_eq!(
        names,
        [
            "bpf_lsm",
            "tracefs",
            "bpffs",
            "ring_buffer",
            "ptrace",
            "clone3_set_tid",
            "userfaultfd_wp",
            "pagemap_scan",
            "tcp_repair",
            "pid_namespace"
        ]
    );
    // What the rest of the suite relies on is found here.
    for f in report["findings"].as_array().into_iter().flatten() {
        if ["ring_buffer", "clone3_set_tid", "pid_namespace", "tracefs"]
            .contains(&f["name"].as_str().unwrap_or(""))
        {
            assert_eq!(f["available"], true, "{f}");
        }
    }
    let text = chpox_ok(&["check"]);
    assert!(text.lines().count() >= 11, "{text}");
}
