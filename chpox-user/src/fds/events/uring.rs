//! io_uring instances and AIO contexts (`io_setup`): chpox cannot save
//! their in-flight requests or their rings, so a process holding one is
//! refused by name, whatever `--unsupported-fd` says (a ring left mapped
//! without its instance would not be a checkpoint either).

use crate::error::{Error, Result, read_proc};
use crate::fds::restore::one;
use crate::fds::{Kind, no_key};

pub static KIND: Kind = Kind {
    probe: |p| {
        if p.target == "anon_inode:[io_uring]" {
            return Err(Error::Other(format!(
                "fd {} of PID {} is an io_uring instance, which chpox cannot save",
                p.fd, p.pid
            )));
        }
        Ok(None)
    },
    classify: None,
    embed: None,
    key: no_key,
    needs: one,
    make: |_, _, _| Ok(false),
};

/// Refuse a process with an AIO ring or an io_uring mapped (read from its
/// maps, before anything reads that memory).
pub fn check_rings(pid: i32) -> Result<()> {
    check_rings_in(pid, &read_proc(&format!("/proc/{pid}/maps"))?)
}

/// [`check_rings`] on `maps`, the text of /proc/PID/maps read already.
pub fn check_rings_in(pid: i32, maps: &str) -> Result<()> {
    for line in maps.lines() {
        let range = line.split_whitespace().next().unwrap_or("");
        if line.ends_with("/[aio] (deleted)") {
            return Err(Error::Other(format!(
                "PID {pid} has an AIO context (io_setup ring at {range}), which chpox cannot save"
            )));
        }
        if line.ends_with("anon_inode:[io_uring]") {
            return Err(Error::Other(format!(
                "PID {pid} has an io_uring ring mapped at {range}, which chpox cannot save"
            )));
        }
    }
    Ok(())
}
