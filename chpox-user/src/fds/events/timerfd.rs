//! timerfd: clock, interval, time left and expirations not read yet, from
//! fdinfo (`clockid:`, `ticks:`, `settime flags:`, `it_value:`,
//! `it_interval:`).
//!
//! Restore arms a new timer on the same clock: a relative timer with the
//! time it had left (the time the job was down does not count, as for a
//! sleep), a TFD_TIMER_ABSTIME one at its deadline (if that has passed, it
//! fires at once and counts the periods it missed); the unread
//! expirations are put back with TFD_IOC_SET_TICKS.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::error::{Error, Result, parse_err};
use crate::fds::restore::{file_err, key, one};
use crate::fds::{Kind, Probe, field, no_key};
use crate::image::model::FdKind;

const NS: u64 = 1_000_000_000;
/// `_IOW('T', 0, __u64)`
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// `(sec, nsec)` as fdinfo prints a timespec.
fn timespec_ns(v: &str) -> Option<u64> {
    let (s, ns) = v
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    let (s, ns): (u64, u64) = (s.trim().parse().ok()?, ns.trim().parse().ok()?);
    s.checked_mul(NS)?.checked_add(ns)
}

fn probe(p: &Probe<'_>) -> Result<Option<FdKind>> {
    if p.target != "anon_inode:[timerfd]" {
        return Ok(None);
    }
    let what = format!("/proc/{}/fdinfo/{}", p.pid, p.fd);
    let bad = |f: &str| parse_err(&what, format!("no {f}"));
    let clockid: i32 = field(p.fdinfo, "clockid:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("clockid:"))?;
    let ticks: u64 = field(p.fdinfo, "ticks:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("ticks:"))?;
    let settime_flags = field(p.fdinfo, "settime flags:")
        .and_then(|v| i32::from_str_radix(v, 8).ok())
        .ok_or_else(|| bad("settime flags:"))?;
    let value_ns = field(p.fdinfo, "it_value:")
        .and_then(timespec_ns)
        .ok_or_else(|| bad("it_value:"))?;
    let interval_ns = field(p.fdinfo, "it_interval:")
        .and_then(timespec_ns)
        .ok_or_else(|| bad("it_interval:"))?;
    let mut deadline_ns = 0;
    if settime_flags & libc::TFD_TIMER_ABSTIME != 0 && value_ns > 0 {
        let now = nix::time::clock_gettime(nix::time::ClockId::from_raw(clockid)).map_err(|e| {
            Error::Other(format!(
                "PID {} fd {} (timerfd): clock {clockid}: {e}",
                p.pid, p.fd
            ))
        })?;
        deadline_ns = now.tv_sec() as u64 * NS + now.tv_nsec() as u64 + value_ns;
    }
    Ok(Some(FdKind::TimerFd {
        clockid,
        settime_flags,
        value_ns,
        interval_ns,
        deadline_ns,
        ticks,
    }))
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / NS) as libc::time_t,
        tv_nsec: (ns % NS) as libc::c_long,
    }
}

pub static KIND: Kind = Kind {
    probe,
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make: |d, m, e| {
        let FdKind::TimerFd {
            clockid,
            settime_flags,
            value_ns,
            interval_ns,
            deadline_ns,
            ticks,
        } = e.kind
        else {
            return Ok(false);
        };
        let name = format!("timerfd (fd {} of PID {})", e.fd, m.pid);
        // Alarm clocks wake a suspended machine: CAP_WAKE_ALARM, which the
        // restorer has and another user's image need not have had.
        if (clockid == libc::CLOCK_REALTIME_ALARM || clockid == libc::CLOCK_BOOTTIME_ALARM)
            && let Some(refusal) = m
                .opener
                .beyond_owner(&format!("{name} is on an alarm clock (CAP_WAKE_ALARM)"))
        {
            return Err(refusal);
        }
        let os_err = |name: &str| Error::File {
            path: name.to_string(),
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: timerfd_create takes integers; the result is checked.
        let raw = unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
        if raw < 0 {
            return Err(os_err(&name));
        }
        // SAFETY: a descriptor we just created.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if value_ns > 0 || interval_ns > 0 {
            let abstime = settime_flags & libc::TFD_TIMER_ABSTIME != 0 && deadline_ns > 0;
            let value = if abstime {
                deadline_ns
            } else {
                // Expired but not yet moved on to its next period: 0 would
                // disarm it.
                value_ns.max(1)
            };
            let spec = libc::itimerspec {
                it_interval: timespec(interval_ns),
                it_value: timespec(value),
            };
            let flags = if abstime { settime_flags } else { 0 };
            // SAFETY: the kernel reads `spec`; no old value is asked for.
            let r = unsafe {
                libc::timerfd_settime(fd.as_raw_fd(), flags, &spec, std::ptr::null_mut())
            };
            if r < 0 {
                return Err(os_err(&name));
            }
        }
        if ticks > 0 {
            // SAFETY: the kernel reads one u64 from `ticks`.
            let r =
                unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &raw const ticks) };
            if r < 0 {
                return Err(os_err(&format!("{name}: TFD_IOC_SET_TICKS")));
            }
        }
        let status = OFlag::from_bits_retain(e.flags as i32 & libc::O_NONBLOCK);
        fcntl(&fd, FcntlArg::F_SETFL(status)).map_err(file_err(&name))?;
        d.insert(key(m.pid, e), fd);
        Ok(true)
    },
};

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    let FdKind::TimerFd {
        clockid,
        settime_flags,
        value_ns,
        interval_ns,
        ticks,
        ..
    } = kind
    else {
        return None;
    };
    let secs = |ns: &u64| *ns as f64 / NS as f64;
    Some(format!(
        "timerfd on clock {clockid}, {} s left{}{}, {ticks} expirations unread",
        secs(value_ns),
        if *interval_ns > 0 {
            format!(", every {} s", secs(interval_ns))
        } else {
            String::new()
        },
        if settime_flags & libc::TFD_TIMER_ABSTIME != 0 {
            " (absolute)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn timespecs_are_parsed() {
        assert_eq!(super::timespec_ns("(99, 848153260)"), Some(99_848_153_260));
        assert_eq!(super::timespec_ns("(0, 0)"), Some(0));
        assert_eq!(super::timespec_ns("99"), None);
    }
}
