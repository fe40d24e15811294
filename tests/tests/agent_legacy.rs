//! The interfaces the old chpox taught its users, against a real
//! `chpox-agent`: the register FIFO (`PID:SIG:FLAGS:FILE` lines) and
//! `chpoxctl`. The rest of the trigger path is in `agent.rs`.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use common::agent::{
    Agent, SIGSYS, STATE_TIMEOUT, assert_running, check_image, ignores, output_of, plain_target,
    poll, scratch,
};
use common::{check_pattern, free_pid, path_str, show};

// ---------------------------------------------------------------------------
// 1. The register FIFO

/// Writes `data` to the agent's register FIFO in one write (as root).
fn write_fifo(agent: &Agent, data: &[u8]) {
    let path = agent.run_dir.join("register");
    // Non-blocking: with no reader (agent gone) this fails instead of hanging.
    let mut f = poll(
        "the agent to open its register FIFO",
        STATE_TIMEOUT,
        || agent.describe(),
        || match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
            Err(e) => panic!("open {}: {e}", path.display()),
        },
    );
    f.write_all(data).expect("write to the FIFO");
}

#[test]
fn the_register_fifo_takes_good_lines_and_rejects_garbage() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let fifo = agent.run_dir.join("register");
    let meta = fs::metadata(&fifo).expect("register FIFO");
    assert!(
        meta.file_type().is_fifo(),
        "{} is not a FIFO",
        fifo.display()
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);

    let mut t = plain_target(&s, "mempattern", &["4"]);
    let (addr, len) = (t.ready_hex("addr"), t.ready_u64("len"));
    let img = s.tmp.path().join("from-fifo.chpox");
    write_fifo(
        &agent,
        format!("{}:31:1:{}\n", t.pid, img.display()).as_bytes(),
    );
    let e = agent.wait_for("the FIFO registration", STATE_TIMEOUT, || {
        agent.entry(t.pid)
    });
    assert_eq!(e["signal"], 31);
    assert_eq!(e["flags"], 1);
    assert_eq!(output_of(&e), img);
    assert!(ignores(t.pid, SIGSYS));
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    check_pattern(&check_image(&img, t.pid), addr, len);

    let before = agent.list();
    let nowhere = s.tmp.path().join("nowhere.chpox");
    let bad = [
        "hello".to_string(),
        "1:2:3".to_string(),
        "12:31:99:/tmp/x".to_string(),
        format!("{}:31:1:{}", free_pid(), nowhere.display()),
        format!("{}:31:1:relative/path", t.pid),
    ];
    for (i, line) in bad.iter().enumerate() {
        write_fifo(&agent, format!("{line}\n").as_bytes());
        agent.wait_for(
            &format!("the agent to reject {line:?}"),
            STATE_TIMEOUT,
            || (agent.events("register line rejected").len() > i).then_some(()),
        );
        let last = agent
            .log_text()
            .lines()
            .filter(|l| l.contains("agent::fifo: register line rejected"))
            .nth(i)
            .map(str::to_string)
            .unwrap_or_default();
        assert!(last.contains(line.as_str()), "{line:?} not in {last:?}");
        assert!(last.contains("reason="), "no reason given: {last}");
        agent.assert_alive();
    }
    assert_eq!(agent.list(), before, "garbage changed the registrations");
    assert!(!nowhere.exists(), "{} appeared", nowhere.display());

    // Still serving, the FIFO included.
    let mut u = plain_target(&s, "mempattern", &["4"]);
    let img2 = s.tmp.path().join("second.chpox");
    write_fifo(
        &agent,
        format!("{}:31:1:{}\n", u.pid, img2.display()).as_bytes(),
    );
    agent.wait_for("the second FIFO registration", STATE_TIMEOUT, || {
        agent.entry(u.pid)
    });
    u.signal(SIGSYS);
    agent.wait_checkpoints(u.pid, 1);
    check_image(&img2, u.pid);
    agent.assert_alive();
    assert_running(&mut t);
    assert_running(&mut u);
}

/// A line that is not UTF-8 is garbage like any other: logged as rejected,
/// and the lines after it in the same write still count.
#[test]
fn a_non_utf8_fifo_line_is_rejected_without_losing_the_next_line() {
    let s = scratch();
    let mut agent = Agent::start(&s);
    let t = plain_target(&s, "mempattern", &["4"]);
    let img = s.tmp.path().join("after-garbage.chpox");
    let mut data = b"\xff\xfe not utf-8\n".to_vec();
    data.extend_from_slice(format!("{}:31:1:{}\n", t.pid, img.display()).as_bytes());
    write_fifo(&agent, &data);
    agent.wait_for(
        "the good line after a non-UTF-8 line to register",
        STATE_TIMEOUT,
        || agent.entry(t.pid),
    );
    agent.wait_for(
        "the non-UTF-8 line to be logged as rejected",
        STATE_TIMEOUT,
        || (!agent.events("register line rejected").is_empty()).then_some(()),
    );
    agent.assert_alive();
}

// ---------------------------------------------------------------------------
// 2. chpoxctl

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

#[test]
fn chpoxctl_registers_and_manages_libraries() {
    let s = scratch();
    let agent = Agent::start(&s);
    let img_dir = s.dir("out", 0o755);
    let mut t = plain_target(&s, "mempattern", &["4"]);
    let pid = t.pid.to_string();

    let plain = img_dir.join("plain.chpox");
    agent.chpoxctl_ok(&["add", &pid, "31", "1", path_str(&plain)]);
    let e = agent.entry(t.pid).expect("registered by chpoxctl add");
    assert_eq!(
        (e["signal"].as_u64(), e["flags"].as_u64()),
        (Some(31), Some(1))
    );
    assert_eq!(output_of(&e), plain);
    assert!(ignores(t.pid, SIGSYS));
    let listed = agent.chpoxctl_ok(&["list"]);
    assert!(
        listed.contains(&pid) && listed.contains(path_str(&plain)),
        "{listed}"
    );
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let reader = check_image(&plain, t.pid);
    let libc_file = reader
        .metadata()
        .files
        .iter()
        .find(|f| f.path == LIBC)
        .unwrap_or_else(|| panic!("{LIBC} not among the image's files"));
    assert!(libc_file.embedded.is_none(), "FLAGS 1 embedded {LIBC}");

    agent.chpoxctl_ok(&["del", &pid]);
    assert!(agent.entry(t.pid).is_none());
    assert!(!ignores(t.pid, SIGSYS), "del did not restore SIGSYS");

    // The library list.
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    agent.chpoxctl_ok(&["addlib", LIBC]);
    agent.chpoxctl_ok(&["addlib", LIBC]);
    assert_eq!(
        agent.chpoxctl_ok(&["listlibs"]).lines().collect::<Vec<_>>(),
        [LIBC]
    );
    agent.chpoxctl_ok(&["dellib", LIBC]);
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    let out = agent.chpoxctl(&["dellib", LIBC]);
    assert!(
        !out.status.success(),
        "dellib of a library not listed {}",
        show(&out)
    );
    let out = agent.chpoxctl(&["addlib", "/no/such/lib.so"]);
    assert!(
        !out.status.success(),
        "addlib of a missing file {}",
        show(&out)
    );
    agent.chpoxctl_ok(&["addlib", LIBC]);

    // FLAGS 4 embeds them.
    let with_libs = img_dir.join("libs.chpox");
    agent.chpoxctl_ok(&["add", &pid, "31", "4", path_str(&with_libs)]);
    t.signal(SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let reader = check_image(&with_libs, t.pid);
    let libc_file = reader
        .metadata()
        .files
        .iter()
        .find(|f| f.path == LIBC)
        .unwrap_or_else(|| panic!("{LIBC} not among the image's files"));
    let data = libc_file
        .embedded
        .as_ref()
        .unwrap_or_else(|| panic!("FLAGS 4 did not embed {LIBC}"));
    let embedded = reader.read_data(data).expect("read embedded libc");
    assert!(
        embedded == fs::read(LIBC).expect("read libc"),
        "embedded {LIBC} differs from the file"
    );

    agent.chpoxctl_ok(&["clearlibs"]);
    assert_eq!(agent.chpoxctl_ok(&["listlibs"]), "");
    agent.chpoxctl_ok(&["del", &pid]);
    assert!(!ignores(t.pid, SIGSYS));
    assert_running(&mut t);
}
