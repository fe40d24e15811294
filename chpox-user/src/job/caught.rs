//! A checkpoint that caught the job's end in flight.
//!
//! A SIGTERM or SIGINT sent to the job while the agent holds it frozen
//! (Slurm ending a job sends it to every process, and a periodic checkpoint
//! may be under way just then) stays pending and goes into the image: a
//! faithful one, of a job about to end, which would end again right after
//! every restore. Such a signal is recognisable — pending while not blocked
//! means it was not delivered yet only because the job was frozen; one the
//! job blocks is its own business and stays — and the image before it is
//! IMG.1: that one becomes IMG again.

use std::path::{Path, PathBuf};

use crate::image::ImageReader;

/// The first termination request (PID, signal) pending unblocked in the
/// image at `path`; `None` if there is none or the image cannot be read.
pub fn termination_in_flight(path: &Path) -> Option<(i32, i32)> {
    let reader = ImageReader::open(path).ok()?;
    let meta = reader.metadata();
    for p in meta.processes() {
        // A process-wide signal waits only while every thread blocks it.
        let blocked_by_all = p.threads.iter().fold(u64::MAX, |m, t| m & t.sigmask);
        let pid = p.process.pid;
        for s in &p.signals.shared_pending {
            if is_termination(s.signo) && blocked_by_all & bit(s.signo) == 0 {
                return Some((pid, s.signo));
            }
        }
        for t in &p.threads {
            for s in &t.pending {
                if is_termination(s.signo) && t.sigmask & bit(s.signo) == 0 {
                    return Some((pid, s.signo));
                }
            }
        }
    }
    None
}

fn is_termination(signo: i32) -> bool {
    signo == libc::SIGTERM || signo == libc::SIGINT
}

fn bit(signo: i32) -> u64 {
    1u64 << ((signo - 1) & 63)
}

/// Put the previous image (`IMG.1`, kept by the agent) back in place of
/// `image`; its name, or why not.
pub fn fall_back(image: &Path) -> Result<PathBuf, String> {
    let mut name = image.as_os_str().to_owned();
    name.push(".1");
    let previous = PathBuf::from(name);
    // A rename: IMG is always one complete image, the new or the old.
    std::fs::rename(&previous, image)
        .map(|()| previous.clone())
        .map_err(|e| format!("cannot put {} back: {e}", previous.display()))
}
