//! The resources an image asks for against what this system and the
//! restorer may have (see the documentation of `validate`).

use crate::error::{Error, Result};
use crate::image::model::Metadata;

/// What limits the restore: this system's and the restorer's.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostLimits {
    /// `kernel.pid_max`.
    pub pid_max: Option<u64>,
    /// `kernel.threads-max`.
    pub threads_max: Option<u64>,
    /// Tasks (threads) that exist now, system-wide.
    pub tasks: u64,
    /// For a restorer that is not root: its `RLIMIT_NPROC` (soft) and the
    /// tasks its real uid has now.
    pub nproc: Option<(u64, u64)>,
    /// The restorer's `RLIMIT_NOFILE` (soft), which the processes inherit
    /// while their descriptors are given back.
    pub nofile: Option<u64>,
    /// Descriptors the restorer has open now.
    pub open_fds: u64,
    /// `vm.max_map_count`.
    pub max_map_count: Option<u64>,
}

/// Mappings a process holds besides its own while it is rebuilt: the
/// trampoline, its scratch area, the vdso on its way.
const EXTRA_VMAS: u64 = 4;
/// Descriptors the restorer and each process hold besides the image's: the
/// image, the socket pair that hands descriptors over, a spare.
const EXTRA_FDS: u64 = 4;

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl HostLimits {
    pub fn read() -> HostLimits {
        // "0.00 0.01 0.05 1/234 5678": 234 tasks exist.
        let tasks = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| {
                let field = l.split_whitespace().nth(3)?;
                field.split_once('/')?.1.parse().ok()
            })
            .unwrap_or(0);
        let limit = |r| {
            nix::sys::resource::getrlimit(r)
                .ok()
                .map(|(soft, _)| soft)
                .filter(|&soft| soft != libc::RLIM_INFINITY)
        };
        // Root makes tasks past RLIMIT_NPROC (CAP_SYS_RESOURCE).
        let uid = nix::unistd::getuid().as_raw();
        let nproc = if uid == 0 {
            None
        } else {
            limit(nix::sys::resource::Resource::RLIMIT_NPROC).map(|l| (l, tasks_of(uid)))
        };
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        HostLimits {
            pid_max: read_number("/proc/sys/kernel/pid_max"),
            threads_max: read_number("/proc/sys/kernel/threads-max"),
            tasks,
            nproc,
            nofile: limit(nix::sys::resource::Resource::RLIMIT_NOFILE),
            open_fds,
            max_map_count: read_number("/proc/sys/vm/max_map_count"),
        }
    }
}

/// Tasks (threads) whose real uid is `uid`, as `RLIMIT_NPROC` counts them.
fn tasks_of(uid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            n += field("Threads:").unwrap_or(1);
        }
    }
    n
}

/// Every count the image asks for must fit what the restorer can make:
/// checked before any process exists, so that a huge count is one line,
/// not a restore that dies halfway through making it.
pub fn check_counts(meta: &Metadata, host: &HostLimits) -> Result<()> {
    let processes = meta.processes().count() as u64;
    let threads: u64 = meta.processes().map(|p| p.threads.len() as u64).sum();
    let zombies = meta.zombies.len() as u64;
    let tasks = threads + zombies;
    let what = || {
        format!(
            "the image holds {threads} thread{} in {processes} process{}{}",
            if threads == 1 { "" } else { "s" },
            if processes == 1 { "" } else { "es" },
            if zombies > 0 {
                format!(
                    " and {zombies} zombie{}",
                    if zombies == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            }
        )
    };
    if let Some(pid_max) = host.pid_max {
        let room = pid_max.saturating_sub(host.tasks);
        if tasks > room {
            return Err(Error::Other(format!(
                "{}: more than the {room} IDs this system has free (kernel.pid_max {pid_max}, {} tasks running); nothing was started",
                what(),
                host.tasks
            )));
        }
    }
    if let Some(max) = host.threads_max {
        let room = max.saturating_sub(host.tasks);
        if tasks > room {
            return Err(Error::Other(format!(
                "{}: more than the {room} tasks this system may still make (kernel.threads-max {max}, {} tasks running); nothing was started",
                what(),
                host.tasks
            )));
        }
    }
    if let Some((limit, used)) = host.nproc {
        let room = limit.saturating_sub(used);
        if tasks > room {
            return Err(Error::Other(format!(
                "{}: more than the {room} tasks your RLIMIT_NPROC ({limit}, {used} in use) leaves; nothing was started",
                what()
            )));
        }
    }
    for p in meta.processes() {
        let pid = p.process.pid;
        if let Some(nofile) = host.nofile {
            // Each process gets its descriptors at their numbers, with two
            // helpers above the highest.
            let top = p.fds.iter().map(|e| e.fd.max(0) as u64 + 1).max();
            if let Some(top) = top
                && top + 2 > nofile
            {
                return Err(Error::Other(format!(
                    "PID {pid} of the image has descriptor {}, beyond the open-file limit {nofile} (RLIMIT_NOFILE) it would inherit from this restorer; raise it (ulimit -n) and retry",
                    top - 1
                )));
            }
        }
        if let Some(max) = host.max_map_count {
            let vmas = p.vmas.len() as u64;
            if vmas + EXTRA_VMAS > max {
                return Err(Error::Other(format!(
                    "PID {pid} of the image has {vmas} memory mappings, more than this system allows a process (vm.max_map_count {max})"
                )));
            }
        }
    }
    if let Some(nofile) = host.nofile {
        // The restorer holds every description at once.
        let needed = crate::fds::descriptions_needed(meta) as u64;
        if host.open_fds + needed + EXTRA_FDS > nofile {
            return Err(Error::Other(format!(
                "the image holds {needed} open files, pipes and sockets; with the {} this restorer has open, more than its open-file limit {nofile} (RLIMIT_NOFILE); raise it (ulimit -n) and retry",
                host.open_fds
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::sample_metadata;

    fn roomy() -> HostLimits {
        HostLimits {
            pid_max: Some(4_194_304),
            threads_max: Some(1_000_000),
            tasks: 300,
            nproc: None,
            nofile: Some(1024),
            open_fds: 4,
            max_map_count: Some(65530),
        }
    }

    #[test]
    fn an_ordinary_image_fits() {
        assert!(check_counts(&sample_metadata(), &roomy()).is_ok());
    }

    #[test]
    fn threads_beyond_pid_max_are_refused_by_count() {
        let mut meta = sample_metadata();
        let t = meta.root.threads[0].clone();
        meta.root.threads.resize(100_000, t);
        let host = HostLimits {
            pid_max: Some(32768),
            ..roomy()
        };
        let err = check_counts(&meta, &host)
            .expect_err("too many")
            .to_string();
        assert!(err.contains("100000 threads in 1 process"), "{err}");
        assert!(err.contains("kernel.pid_max 32768"), "{err}");
        let host = HostLimits {
            threads_max: Some(50_000),
            ..roomy()
        };
        let err = check_counts(&meta, &host)
            .expect_err("too many")
            .to_string();
        assert!(err.contains("kernel.threads-max 50000"), "{err}");
        let host = HostLimits {
            nproc: Some((4096, 100)),
            ..roomy()
        };
        let err = check_counts(&meta, &host)
            .expect_err("too many")
            .to_string();
        assert!(err.contains("RLIMIT_NPROC"), "{err}");
    }

    #[test]
    fn descriptors_and_mappings_beyond_the_limits_are_refused() {
        let mut meta = sample_metadata();
        let mut high = meta.root.fds[0].clone();
        high.fd = 5000;
        meta.root.fds.push(high);
        let err = check_counts(&meta, &roomy())
            .expect_err("fd 5000")
            .to_string();
        assert!(err.contains("descriptor 5000"), "{err}");
        assert!(err.contains("RLIMIT_NOFILE"), "{err}");

        let mut meta = sample_metadata();
        let v = meta.root.vmas[0].clone();
        meta.root.vmas.resize(70_000, v);
        let err = check_counts(&meta, &roomy())
            .expect_err("mappings")
            .to_string();
        assert!(err.contains("vm.max_map_count 65530"), "{err}");
    }
}
