//! A tree registered with its children is frozen from the members the eBPF
//! program keeps as they fork (`TREE`), not found by scanning /proc: the
//! agent's "checkpoint written" line says how many came from each.

mod common;

use std::collections::HashMap;

use common::agent::{Agent, SIGSYS, no_core, scratch, send};
use common::procs::Guard;
use common::{Target, bin, chpox_bin};

/// `memtree PROCS 1`: the root forks PROCS - 1 children, prints READY
/// with every PID, then all sleep.
fn memtree_pids(t: &Target) -> Vec<i32> {
    t.ready_value("pids")
        .split(',')
        .map(|p| p.parse().expect("a PID in READY"))
        .collect()
}

/// The agent's "checkpoint written" line for checkpoint `generation` of
/// `root`.
fn written(agent: &Agent, root: i32, generation: u64) -> HashMap<String, String> {
    agent
        .events("checkpoint written")
        .into_iter()
        .find(|kv| {
            kv.get("pid") == Some(&root.to_string())
                && kv.get("generation") == Some(&generation.to_string())
        })
        .unwrap_or_else(|| panic!("no checkpoint {generation} of {root}: {}", agent.describe()))
}

#[test]
fn children_forked_after_chpox_run_are_frozen_from_the_ebpf_list() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut guard = Guard::default();
    let mut cmd = agent.client(chpox_bin());
    cmd.args(["run", "--"]).arg(bin("memtree")).args(["4", "1"]);
    no_core(&mut cmd, &s.logs);
    let t = Target::spawn_command(cmd, "memtree", &s.logs);
    guard.watch_tree(t.pid);
    let pids = memtree_pids(&t);
    assert_eq!(pids.len(), 4, "{}", t.ready_line);

    send(t.pid, SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let line = written(&agent, t.pid, 1);
    let context = agent.describe();
    assert_eq!(
        line.get("processes").map(String::as_str),
        Some("4"),
        "{context}"
    );
    assert_eq!(
        line.get("members_from_ebpf").map(String::as_str),
        Some("3"),
        "{context}"
    );
    assert_eq!(
        line.get("members_from_scan").map(String::as_str),
        Some("0"),
        "{context}"
    );
}

#[test]
fn children_of_a_tree_registered_later_are_seeded_into_the_ebpf_list() {
    let s = scratch();
    let agent = Agent::start(&s);
    let mut guard = Guard::default();
    let mut cmd = std::process::Command::new(bin("memtree"));
    cmd.args(["3", "1"]);
    no_core(&mut cmd, &s.logs);
    let t = Target::spawn_command(cmd, "memtree", &s.logs);
    guard.watch_tree(t.pid);
    assert_eq!(memtree_pids(&t).len(), 3, "{}", t.ready_line);

    // FLAGS 9: the process and its children, which exist already.
    agent.chpox_ok(&["register", &t.pid.to_string()]);
    send(t.pid, SIGSYS);
    agent.wait_checkpoints(t.pid, 1);
    let line = written(&agent, t.pid, 1);
    let context = agent.describe();
    assert_eq!(
        line.get("processes").map(String::as_str),
        Some("3"),
        "{context}"
    );
    assert_eq!(
        line.get("members_from_ebpf").map(String::as_str),
        Some("2"),
        "{context}"
    );
    assert_eq!(
        line.get("members_from_scan").map(String::as_str),
        Some("0"),
        "{context}"
    );
}
