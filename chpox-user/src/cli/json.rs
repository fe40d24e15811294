//! The JSON chpox prints, with one vocabulary across commands: durations
//! as integer microseconds named `*_us`, sizes as bytes named `*_bytes`,
//! the image path as `image`; and 64-bit values a JSON reader cannot hold
//! exactly in a double (register contents, addresses, signal masks) as
//! `0x` hex strings.

use serde::Serialize;
use serde_json::Value;

use crate::control::Response;
use crate::dump::DumpReport;

/// `chpox dump --json`.
#[derive(Serialize)]
pub struct DumpJson<'a> {
    pub pid: i32,
    pub comm: &'a str,
    pub image: &'a std::path::Path,
    pub image_bytes: u64,
    pub processes: usize,
    pub threads: usize,
    pub vmas: usize,
    pub pages_stored: u64,
    pub resident_bytes: u64,
    pub frozen_us: u64,
    pub total_us: u64,
    pub frozen_at_monotonic_us: u64,
    pub children_not_saved: &'a [i32],
    /// Processes whose pages were written from a copy-on-write snapshot
    /// after they ran on.
    pub snapshots: usize,
    /// The longest brief freeze that reaped a snapshot's copy.
    pub reap_pause_us: u64,
    /// Processes pre-copied while running (only pages written since were
    /// copied while frozen).
    pub precopied: usize,
    /// The longest brief freeze that attached write tracking for a pre-copy.
    pub precopy_pause_us: u64,
    /// Pages the pre-copied processes wrote while their pages were copied,
    /// copied again before the freeze; and pages read while frozen.
    pub precopy_pages_copied_again: u64,
    pub precopy_pages_read_frozen: u64,
    /// Processes whose state was read from the kernel's structures (a
    /// running agent's iterator) rather than asked with remote syscalls.
    pub state_from_kernel: usize,
    /// Pre-copied processes whose mappings' flags were checked after the
    /// freeze from the kernel's bits rather than smaps.
    pub flags_checked_without_smaps: usize,
    /// Processes whose mappings' flags, read while frozen, came from the
    /// kernel's bits (named by patterns learned before) rather than smaps.
    pub flags_without_smaps: usize,
}

impl<'a> From<&'a DumpReport> for DumpJson<'a> {
    fn from(r: &'a DumpReport) -> Self {
        DumpJson {
            pid: r.pid,
            comm: &r.comm,
            image: &r.image,
            image_bytes: r.image_bytes,
            processes: r.processes,
            threads: r.threads,
            vmas: r.vmas,
            pages_stored: r.pages_stored,
            resident_bytes: r.resident_bytes,
            frozen_us: r.frozen.as_micros() as u64,
            total_us: r.total.as_micros() as u64,
            frozen_at_monotonic_us: r.frozen_at_monotonic_ns / 1000,
            children_not_saved: &r.children_not_saved,
            snapshots: r.snapshots,
            reap_pause_us: r.reap_pause.as_micros() as u64,
            precopied: r.precopied,
            precopy_pause_us: r.precopy_pause.as_micros() as u64,
            precopy_pages_copied_again: r.precopy_pages_copied_again,
            precopy_pages_read_frozen: r.precopy_pages_read_frozen,
            state_from_kernel: r.state_from_kernel,
            flags_checked_without_smaps: r.flags_checked_without_smaps,
            flags_without_smaps: r.flags_without_smaps,
        }
    }
}

/// `chpox checkpoint --json`: the agent's reply, named as `dump --json`.
#[derive(Serialize)]
pub struct CheckpointJson<'a> {
    pub pid: i32,
    pub image: &'a std::path::Path,
    pub image_bytes: u64,
    pub generation: u64,
    pub processes: usize,
    pub signal_to_frozen_us: u64,
    pub frozen_us: u64,
    pub children_not_saved: &'a [i32],
    pub snapshots: usize,
    pub pages_read_before_freeze: u64,
}

impl<'a> CheckpointJson<'a> {
    pub fn from_reply(reply: &'a Response) -> Option<Self> {
        match reply {
            Response::Checkpointed {
                pid,
                image,
                generation,
                bytes,
                signal_to_frozen_us,
                frozen_us,
                processes,
                children_not_saved,
                snapshots,
                pages_read_before_freeze,
            } => Some(CheckpointJson {
                pid: *pid,
                image,
                image_bytes: *bytes,
                generation: *generation,
                processes: *processes,
                signal_to_frozen_us: *signal_to_frozen_us,
                frozen_us: *frozen_us,
                children_not_saved,
                snapshots: *snapshots,
                pages_read_before_freeze: *pages_read_before_freeze,
            }),
            _ => None,
        }
    }
}

/// Keys whose numbers are addresses, register contents or bit masks: as
/// hex strings wherever they appear. Everything inside a `regs` object is
/// a register.
const HEX_KEYS: &[&str] = &[
    "start",
    "end",
    "addr",
    "sp",
    "head",
    "handler",
    "restorer",
    "mask",
    "sigmask",
    "blocked",
    "xfeatures",
    "start_code",
    "end_code",
    "start_data",
    "end_data",
    "start_brk",
    "brk",
    "start_stack",
    "arg_start",
    "arg_end",
    "env_start",
    "env_end",
    "auxv",
];

/// Rewrites, in place, the numbers under [`HEX_KEYS`] and `regs` as
/// `0x…` strings, and times in nanoseconds (`*_ns`, past what a double
/// holds exactly) as microseconds (`*_us`), the unit of every duration.
pub fn hex_addresses(v: &mut Value) {
    walk(v, false);
}

fn walk(v: &mut Value, hex: bool) {
    match v {
        Value::Number(n) if hex => {
            if let Some(u) = n.as_u64() {
                *v = Value::String(format!("{u:#x}"));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| walk(i, hex)),
        Value::Object(map) => {
            let nanos: Vec<String> = map
                .iter()
                .filter(|(k, v)| k.ends_with("_ns") && v.is_u64())
                .map(|(k, _)| k.clone())
                .collect();
            for k in nanos {
                if let Some(ns) = map.remove(&k).and_then(|v| v.as_u64()) {
                    let us = format!("{}_us", k.trim_end_matches("_ns"));
                    map.insert(us, Value::from(ns / 1000));
                }
            }
            for (k, item) in map.iter_mut() {
                walk(item, hex || k == "regs" || HEX_KEYS.contains(&k.as_str()));
            }
        }
        _ => {}
    }
}

/// Pretty JSON of `value`, with addresses as hex strings.
pub fn to_string(value: &impl Serialize) -> serde_json::Result<String> {
    let mut v = serde_json::to_value(value)?;
    hex_addresses(&mut v);
    serde_json::to_string_pretty(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_registers_become_hex_strings() {
        let mut v = serde_json::json!({
            "pid": 7,
            "regs": {"rip": u64::MAX, "rax": 1},
            "vmas": [{"start": 4096, "end": 8192, "offset": 0, "pages": [{"addr": 4096, "npages": 1}]}],
            "image_bytes": 12345,
            "created_unix_ns": 1_764_000_000_123_456_789u64,
        });
        hex_addresses(&mut v);
        assert_eq!(v["pid"], 7);
        assert_eq!(v["regs"]["rip"], "0xffffffffffffffff");
        assert_eq!(v["regs"]["rax"], "0x1");
        assert_eq!(v["vmas"][0]["start"], "0x1000");
        assert_eq!(v["vmas"][0]["offset"], 0);
        assert_eq!(v["vmas"][0]["pages"][0]["addr"], "0x1000");
        assert_eq!(v["vmas"][0]["pages"][0]["npages"], 1);
        assert_eq!(v["image_bytes"], 12345);
        assert_eq!(v["created_unix_us"], 1_764_000_000_123_456u64);
        assert!(v.get("created_unix_ns").is_none());
    }
}
