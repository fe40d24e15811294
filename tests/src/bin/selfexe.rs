//! `selfexe [<args>...]`
//!
//! Looks at itself through /proc before and after a checkpoint/restore:
//! at start it records `readlink(/proc/self/exe)`, an FNV-1a hash of the
//! content read through `/proc/self/exe`, `/proc/self/cmdline` and
//! `/proc/self/comm`. Prints `READY exe=<path>`, then sleeps (100 ms
//! steps) until SIGUSR1. Then it reads all four again and prints one line
//! each: `EXE OK` (same link and same content, else `EXE BAD <why>`),
//! `CMDLINE OK` (else `CMDLINE BAD <now>`), `COMM OK` (else
//! `COMM BAD <now>`). Exits 0 if all are OK, else 1.

use std::time::Duration;

use chpox_tests::{say, stop_on_signal, wait_for_stop};

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Seen {
    link: String,
    hash: Result<u64, String>,
    cmdline: Vec<u8>,
    comm: String,
}

fn look() -> Seen {
    Seen {
        link: std::fs::read_link("/proc/self/exe")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|e| format!("<{e}>")),
        hash: std::fs::read("/proc/self/exe")
            .map(|b| fnv1a(&b))
            .map_err(|e| e.to_string()),
        cmdline: std::fs::read("/proc/self/cmdline").unwrap_or_default(),
        comm: std::fs::read_to_string("/proc/self/comm").unwrap_or_default(),
    }
}

fn main() {
    stop_on_signal(libc::SIGUSR1);
    let before = look();
    say!("READY exe={}", before.link);
    wait_for_stop(Duration::from_millis(100));
    let after = look();
    let mut ok = true;
    if after.link != before.link {
        say!("EXE BAD link={}", after.link);
        ok = false;
    } else if after.hash != before.hash {
        say!("EXE BAD content {:?}", after.hash);
        ok = false;
    } else {
        say("EXE OK");
    }
    if after.cmdline == before.cmdline {
        say("CMDLINE OK");
    } else {
        say!("CMDLINE BAD {}", after.cmdline.escape_ascii());
        ok = false;
    }
    if after.comm == before.comm {
        say("COMM OK");
    } else {
        say!("COMM BAD {}", after.comm.trim_end());
        ok = false;
    }
    std::process::exit(if ok { 0 } else { 1 });
}
