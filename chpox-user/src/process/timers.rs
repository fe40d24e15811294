//! Timers that are not descriptors: `setitimer` (ITIMER_REAL, VIRTUAL,
//! PROF) and POSIX timers (`timer_create`). Both halves are here.
//!
//! Dump: `/proc/PID/timers` lists the POSIX timers (ID, signal and
//! `sigev_value`, how they notify and whom, clock); what only the process
//! can tell — the time left, the interval, the overrun count, and the
//! itimers — is asked with remote `timer_gettime`, `timer_getoverrun` and
//! `getitimer`.
//!
//! Restore: a program knows its timers by ID, so each comes back with the
//! same one. Since Linux 6.16, `prctl(PR_TIMER_CREATE_RESTORE_IDS)` makes
//! `timer_create` take the ID it is given; on older kernels, which hand
//! IDs out in order from 0 in a new process, the gaps are filled with
//! timers deleted afterwards. A timer restarts with the time it had left
//! at the checkpoint (relative, as CRIU does: an absolute deadline on
//! CLOCK_REALTIME is not told apart), and a SIGEV_THREAD_ID timer signals
//! the thread that took the place of the one it signalled. The overrun
//! count is recorded but cannot be set back.

use tracing::debug;

use crate::error::{Error, Result};
use crate::image::model::{ITimer, PosixTimer, Timers};
use crate::remote::{RemoteThread, read_memory};
use crate::restore::child::{ARGS_AT, Child, errno_of};

const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD: i32 = 2;
const SIGEV_THREAD_ID: i32 = 4;

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const RESTORE_IDS_OFF: u64 = 0;
const RESTORE_IDS_ON: u64 = 1;

/// What `/proc/PID/timers` says about one timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedTimer {
    pub id: i32,
    pub signo: i32,
    pub value: u64,
    pub notify: i32,
    /// The PID or TID after `pid.` / `tid.`.
    pub target: i32,
    pub clock: i32,
}

/// Whether frozen `pid` has POSIX timers (or /proc/PID/timers cannot be
/// read, which leaves it to [`dump`] to say why).
pub fn any_posix(pid: i32) -> bool {
    crate::error::read_proc(&format!("/proc/{pid}/timers"))
        .ok()
        .and_then(|text| parse_proc_timers(&text).ok())
        .is_none_or(|listed| !listed.is_empty())
}

/// Parse `/proc/PID/timers`: blocks of `ID:`, `signal: SIG/VALUE`,
/// `notify: KIND/pid.N` or `KIND/tid.N`, `ClockID:`.
pub fn parse_proc_timers(text: &str) -> std::result::Result<Vec<ListedTimer>, String> {
    let mut out = Vec::new();
    let mut cur: Option<ListedTimer> = None;
    let bad = |line: &str| format!("unexpected line in /proc/PID/timers: {line:?}");
    for line in text.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let val = val.trim();
        match key {
            "ID" => {
                out.extend(cur.take());
                cur = Some(ListedTimer {
                    id: val.parse().map_err(|_| bad(line))?,
                    signo: 0,
                    value: 0,
                    notify: SIGEV_SIGNAL,
                    target: 0,
                    clock: 0,
                });
            }
            "signal" => {
                let t = cur.as_mut().ok_or_else(|| bad(line))?;
                let (sig, value) = val.split_once('/').ok_or_else(|| bad(line))?;
                t.signo = sig.parse().map_err(|_| bad(line))?;
                let value = value.trim_start_matches("0x");
                t.value = u64::from_str_radix(value, 16).map_err(|_| bad(line))?;
            }
            "notify" => {
                let t = cur.as_mut().ok_or_else(|| bad(line))?;
                let (kind, who) = val.split_once('/').ok_or_else(|| bad(line))?;
                let (scope, n) = who.split_once('.').ok_or_else(|| bad(line))?;
                let base = match kind {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    "thread" => SIGEV_THREAD,
                    _ => return Err(bad(line)),
                };
                t.notify = if scope == "tid" {
                    base | SIGEV_THREAD_ID
                } else {
                    base
                };
                t.target = n.parse().map_err(|_| bad(line))?;
            }
            "ClockID" => {
                let t = cur.as_mut().ok_or_else(|| bad(line))?;
                t.clock = val.parse().map_err(|_| bad(line))?;
            }
            _ => {}
        }
    }
    out.extend(cur);
    Ok(out)
}

fn word(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(w)
}

/// (seconds, fraction) as nanoseconds; `unit` is 1000 for microseconds.
fn to_ns(sec: u64, frac: u64, unit: u64) -> u64 {
    sec.saturating_mul(1_000_000_000)
        .saturating_add(frac.saturating_mul(unit))
}

/// Read the timers of the frozen process `pid`, through its borrowed
/// `thread`, with `scratch` (at least 32 bytes) for the results.
pub async fn dump(pid: i32, thread: &mut RemoteThread<'_>, scratch: u64) -> Result<Timers> {
    let mut timers = Timers::default();
    let mut buf = [0u8; 32];
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        thread
            .call(
                "getitimer",
                libc::SYS_getitimer,
                [which as u64, scratch, 0, 0, 0, 0],
            )
            .await?;
        read_memory(pid, scratch, &mut buf)?;
        let t = ITimer {
            which,
            interval_ns: to_ns(word(&buf, 0), word(&buf, 1), 1000),
            value_ns: to_ns(word(&buf, 2), word(&buf, 3), 1000),
        };
        if t.value_ns != 0 {
            timers.itimers.push(t);
        }
    }
    let path = format!("/proc/{pid}/timers");
    let listed = parse_proc_timers(&crate::error::read_proc(&path)?)
        .map_err(|e| Error::Other(format!("PID {pid}: {e}")))?;
    for l in listed {
        thread
            .call(
                "timer_gettime",
                libc::SYS_timer_gettime,
                [l.id as u64, scratch, 0, 0, 0, 0],
            )
            .await?;
        read_memory(pid, scratch, &mut buf)?;
        let overrun = thread
            .call(
                "timer_getoverrun",
                libc::SYS_timer_getoverrun,
                [l.id as u64, 0, 0, 0, 0, 0],
            )
            .await? as i32;
        timers.posix.push(PosixTimer {
            id: l.id,
            clock: l.clock,
            notify: l.notify,
            signo: l.signo,
            value: l.value,
            tid: if l.notify & SIGEV_THREAD_ID != 0 {
                l.target
            } else {
                0
            },
            interval_ns: to_ns(word(&buf, 0), word(&buf, 1), 1),
            value_ns: to_ns(word(&buf, 2), word(&buf, 3), 1),
            overrun,
        });
    }
    debug!(
        pid,
        itimers = timers.itimers.len(),
        posix = timers.posix.len(),
        "timers"
    );
    Ok(timers)
}

/// One line for `chpox inspect`, if the process has timers.
pub fn describe(t: &Timers) -> Option<String> {
    if t.itimers.is_empty() && t.posix.is_empty() {
        return None;
    }
    let secs = |ns: u64| format!("{:.3}s", ns as f64 / 1e9);
    let mut parts: Vec<String> = t
        .itimers
        .iter()
        .map(|i| {
            let name = match i.which {
                libc::ITIMER_REAL => "real",
                libc::ITIMER_VIRTUAL => "virtual",
                _ => "prof",
            };
            format!(
                "itimer {name} in {} every {}",
                secs(i.value_ns),
                secs(i.interval_ns)
            )
        })
        .collect();
    parts.extend(t.posix.iter().map(|p| {
        let when = if p.value_ns == 0 {
            "disarmed".to_string()
        } else {
            format!("in {} every {}", secs(p.value_ns), secs(p.interval_ns))
        };
        format!("posix {} clock {} signal {} {when}", p.id, p.clock, p.signo)
    }));
    Some(format!("timers: {}", parts.join("; ")))
}

/// (seconds, fraction) of `ns`, the fraction in units of `unit` ns.
fn split(ns: u64, unit: u64) -> [u64; 2] {
    [ns / 1_000_000_000, (ns % 1_000_000_000) / unit]
}

/// Scratch offsets inside the argument area.
const SIGEVENT_AT: u64 = ARGS_AT;
const TIMER_ID_AT: u64 = ARGS_AT + 64;
const SPEC_AT: u64 = ARGS_AT + 128;

/// Recreate the timers of `timers` in the child. `tids` pairs each
/// thread's TID at the checkpoint with the one it has now, as the process
/// sees it. Call once every thread exists.
pub fn restore(c: &mut Child<'_>, timers: &Timers, tids: &[(i32, i32)]) -> Result<()> {
    if !timers.posix.is_empty() {
        restore_posix(c, &timers.posix, tids)?;
    }
    for t in &timers.itimers {
        let [is, iu] = split(t.interval_ns, 1000);
        let [vs, vu] = split(t.value_ns.max(1000), 1000);
        let mut spec = Vec::with_capacity(32);
        for w in [is, iu, vs, vu] {
            spec.extend_from_slice(&w.to_ne_bytes());
        }
        let addr = c.put(SPEC_AT, &spec)?;
        c.call(
            "setitimer",
            libc::SYS_setitimer,
            [t.which as u64, addr, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// The `struct sigevent` (64 bytes) that recreates `t`, its thread target
/// mapped through `tids`.
fn sigevent(t: &PosixTimer, tids: &[(i32, i32)]) -> Result<[u8; 64]> {
    let mut ev = [0u8; 64];
    ev[..8].copy_from_slice(&t.value.to_ne_bytes());
    ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
    ev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
    if t.notify & SIGEV_THREAD_ID != 0 {
        let tid = tids
            .iter()
            .find(|&&(old, _)| old == t.tid)
            .map(|&(_, new)| new)
            .ok_or_else(|| {
                Error::Other(format!(
                    "POSIX timer {} signals thread {}, which is not in the image",
                    t.id, t.tid
                ))
            })?;
        ev[16..20].copy_from_slice(&tid.to_ne_bytes());
    }
    Ok(ev)
}

/// `timer_create` for `t`, asking for ID `want` (honoured only while
/// PR_TIMER_CREATE_RESTORE_IDS is on); the ID given.
fn create(c: &mut Child<'_>, t: &PosixTimer, want: i32, tids: &[(i32, i32)]) -> Result<i64> {
    let ev = c.put(SIGEVENT_AT, &sigevent(t, tids)?)?;
    let id_addr = c.put(TIMER_ID_AT, &want.to_ne_bytes())?;
    let ret = c.raw(
        libc::SYS_timer_create,
        [t.clock as i64 as u64, ev, id_addr, 0, 0, 0],
    )?;
    if ret < 0 {
        return Err(Error::Other(format!(
            "cannot recreate POSIX timer {} (clock {}): timer_create: {}",
            t.id,
            t.clock,
            errno_of(ret)
        )));
    }
    let mut got = [0u8; 4];
    c.get(TIMER_ID_AT, &mut got)?;
    Ok(i64::from(i32::from_ne_bytes(got)))
}

fn restore_posix(c: &mut Child<'_>, posix: &[PosixTimer], tids: &[(i32, i32)]) -> Result<()> {
    let mut sorted: Vec<&PosixTimer> = posix.iter().collect();
    sorted.sort_by_key(|t| t.id);
    let exact = c.raw(
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0, 0],
    )? == 0;
    let mut fillers = Vec::new();
    for t in &sorted {
        loop {
            let got = create(c, t, t.id, tids)?;
            if got == i64::from(t.id) {
                break;
            }
            if exact || got > i64::from(t.id) {
                return Err(Error::Other(format!(
                    "cannot recreate POSIX timer {} with its ID (the kernel gave {got})",
                    t.id
                )));
            }
            fillers.push(got);
        }
        let [is, ins] = split(t.interval_ns, 1);
        let [vs, vns] = split(t.value_ns, 1);
        if vs != 0 || vns != 0 {
            let mut spec = Vec::with_capacity(32);
            for w in [is, ins, vs, vns] {
                spec.extend_from_slice(&w.to_ne_bytes());
            }
            let addr = c.put(SPEC_AT, &spec)?;
            c.call(
                "timer_settime",
                libc::SYS_timer_settime,
                [t.id as u64, 0, addr, 0, 0, 0],
            )?;
        }
    }
    if exact {
        c.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0, 0],
        )?;
    }
    for id in fillers {
        c.call(
            "timer_delete",
            libc::SYS_timer_delete,
            [id as u64, 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_timers_are_parsed() {
        let text = "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.1234\nClockID: 1\n\
                    ID: 3\nsignal: 34/00007f00deadbeef\nnotify: signal/tid.1236\nClockID: 0\n\
                    ID: 4\nsignal: 0/0000000000000000\nnotify: none/pid.1234\nClockID: 2\n";
        let t = parse_proc_timers(text).expect("parses");
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            ListedTimer {
                id: 0,
                signo: 14,
                value: 0,
                notify: SIGEV_SIGNAL,
                target: 1234,
                clock: 1
            }
        );
        assert_eq!(t[1].notify, SIGEV_THREAD_ID);
        assert_eq!(t[1].target, 1236);
        assert_eq!(t[1].value, 0x7f00_dead_beef);
        assert_eq!(t[2].notify, SIGEV_NONE);
        assert_eq!(t[2].clock, 2);
        assert!(parse_proc_timers("").expect("empty").is_empty());
        assert!(parse_proc_timers("signal: 1/0\n").is_err());
    }

    #[test]
    fn a_thread_timer_follows_its_thread() {
        let t = PosixTimer {
            id: 2,
            clock: 1,
            notify: SIGEV_THREAD_ID,
            signo: 34,
            value: 7,
            tid: 101,
            interval_ns: 0,
            value_ns: 5,
            overrun: 0,
        };
        let ev = sigevent(&t, &[(100, 200), (101, 201)]).expect("mapped");
        assert_eq!(i32::from_ne_bytes(ev[16..20].try_into().expect("4")), 201);
        assert!(sigevent(&t, &[(100, 200)]).is_err());
    }
}
