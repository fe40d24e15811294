//! Process-wide state: identity, credentials, mm fields, auxv, rlimits,
//! personality, scheduling, cwd, umask.
//!
//! Most of it comes from /proc. Three things are read with remote syscalls
//! instead: the current `brk` (not in /proc at all), the rlimits (reading
//! another process's limits needs CAP_SYS_RESOURCE, which root lacks in
//! some containers; the process may always read its own), and the
//! personality.

// The rest of a process's state, one kind per file, each with its dump
// and restore halves.
pub mod creds;
pub mod heldfiles;
pub mod kernelstate;
pub mod registers;
pub mod signals;
pub mod threads;
pub mod timers;

use procfs::process::Process;

use crate::error::{Error, Result, read_proc, read_proc_bytes};
use std::os::unix::fs::MetadataExt;

use crate::image::model::{
    Credentials, MmFields, ProcessAttrs, ProcessInfo, Rlimit, Scheduling, SeccompFilter,
};
use crate::remote::{RemoteThread, read_memory};

/// PF_KTHREAD in /proc/PID/stat's flags.
const PF_KTHREAD: u32 = 0x0020_0000;

pub(crate) const RLIMIT_NAMES: [&str; 16] = [
    "cpu",
    "fsize",
    "data",
    "stack",
    "core",
    "rss",
    "nproc",
    "nofile",
    "memlock",
    "as",
    "locks",
    "sigpending",
    "msgqueue",
    "nice",
    "rtprio",
    "rttime",
];

fn proc_err(pid: i32, e: procfs::ProcError) -> Error {
    match e {
        procfs::ProcError::NotFound(_) => Error::NoSuchProcess(pid),
        procfs::ProcError::PermissionDenied(_) => Error::PermissionDenied { pid, hint: "" },
        other => Error::Other(format!("reading /proc/{pid}: {other}")),
    }
}

/// /proc/PID/NAME, whole; a process gone is named as such.
fn read_of(pid: i32, name: &str) -> Result<Vec<u8>> {
    read_proc_bytes(&format!("/proc/{pid}/{name}")).map_err(|e| match e {
        Error::Proc { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH) =>
        {
            Error::NoSuchProcess(pid)
        }
        other => other,
    })
}

/// Refuse, with a clear reason, a PID that cannot be checkpointed, before
/// touching it.
pub fn check_dumpable(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(Error::NoSuchProcess(pid));
    }
    if pid == std::process::id() as i32 {
        return Err(Error::SelfDump(pid));
    }
    let proc = Process::new(pid).map_err(|e| proc_err(pid, e))?;
    let stat = proc.stat().map_err(|e| proc_err(pid, e))?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(Error::KernelThread(pid));
    }
    if stat.state == 'Z' || stat.state == 'X' {
        return Err(Error::Zombie(pid));
    }
    // /proc/PID/task lists threads of a process; a TID of another thread
    // resolves too, but is not a process we can dump alone.
    let status = proc.status().map_err(|e| proc_err(pid, e))?;
    if status.tgid != pid {
        return Err(Error::Other(format!(
            "{pid} is a thread of process {}; checkpoint the process",
            status.tgid
        )));
    }
    let euid = nix::unistd::geteuid();
    if !euid.is_root() && status.ruid != euid.as_raw() {
        return Err(Error::PermissionDenied {
            pid,
            hint: "; run as root (sudo) or dump a process you own",
        });
    }
    Ok(())
}

/// Owner (real uid, real gid) of a process: the owner of its image. Read
/// as the rest of its status is (a dump asks it of the frozen process).
pub fn owner(pid: i32) -> Result<(u32, u32)> {
    let status = String::from_utf8_lossy(&read_of(pid, "status")?).into_owned();
    let creds = StatusCreds::of(pid, &status)?;
    Ok((creds.uid[0], creds.gid[0]))
}

/// What /proc tells about the process. `brk`, rlimits and personality are
/// filled in by `dump_remote_state` (or `kernelstate::apply`).
/// `status`: its /proc/PID/status, read already (while frozen).
pub fn dump_proc_info(pid: i32, status: &str) -> Result<ProcessInfo> {
    // Read as /proc's texts are (held open while frozen, `heldfiles`),
    // parsed as procfs parses them.
    let stat = read_of(pid, "stat")?;
    let stat = <procfs::process::Stat as procfs::FromRead>::from_read(&stat[..])
        .map_err(|e| proc_err(pid, e))?;
    let creds = StatusCreds::of(pid, status)?;
    let cmdline = String::from_utf8(read_of(pid, "cmdline")?)
        .map_err(|_| Error::Other(format!("/proc/{pid}/cmdline is not UTF-8")))?
        .split('\0')
        .filter(|arg| !arg.is_empty())
        .map(str::to_string)
        .collect();
    let exe = read_link(&format!("/proc/{pid}/exe"))?;
    let cwd = read_link(&format!("/proc/{pid}/cwd"))?;
    let cwd_deleted = cwd.ends_with(" (deleted)")
        && std::fs::metadata(format!("/proc/{pid}/cwd")).is_ok_and(|m| m.nlink() == 0);
    let cwd_mode = if cwd_deleted {
        std::fs::metadata(format!("/proc/{pid}/cwd")).map_or(0o755, |m| m.mode() & 0o7777)
    } else {
        0
    };
    let cwd = if cwd_deleted {
        cwd.trim_end_matches(" (deleted)").to_string()
    } else {
        cwd
    };
    let auxv = parse_auxv(&read_proc_bytes(&format!("/proc/{pid}/auxv"))?);
    let mut sched_param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getparam writes one sched_param into the struct we own.
    let priority = if unsafe { libc::sched_getparam(pid, &mut sched_param) } == 0 {
        sched_param.sched_priority
    } else {
        0
    };
    Ok(ProcessInfo {
        pid,
        ppid: stat.ppid,
        comm: stat.comm.clone(),
        cmdline,
        exe,
        exe_file: None,
        cwd,
        umask: creds.umask,
        personality: 0,
        creds: Credentials {
            uid: creds.uid,
            gid: creds.gid,
            groups: creds.groups,
        },
        rlimits: Vec::new(),
        sched: Scheduling {
            nice: stat.nice as i32,
            policy: stat.policy.unwrap_or(0) as i32,
            priority,
        },
        mm: MmFields {
            start_code: stat.startcode,
            end_code: stat.endcode,
            start_data: stat.start_data.unwrap_or(0),
            end_data: stat.end_data.unwrap_or(0),
            start_brk: stat.start_brk.unwrap_or(0),
            brk: 0,
            start_stack: stat.startstack,
            arg_start: stat.arg_start.unwrap_or(0),
            arg_end: stat.arg_end.unwrap_or(0),
            env_start: stat.env_start.unwrap_or(0),
            env_end: stat.env_end.unwrap_or(0),
        },
        auxv,
        start_time_ticks: stat.starttime,
        pgid: stat.pgrp,
        sid: stat.session,
        stopped: false,
        exit_signal: stat.exit_signal.unwrap_or(libc::SIGCHLD),
        pdeath_signal: 0,
        child_subreaper: false,
        shares_fs_with_parent: false,
        timers: Default::default(),
        attrs: ProcessAttrs {
            cwd_deleted,
            cwd_mode,
            ..Default::default()
        },
    })
}

/// Fill in what only the process itself can tell: brk, rlimits,
/// personality, parent-death signal, subreaper flag.
pub async fn dump_remote_state(
    info: &mut ProcessInfo,
    thread: &mut RemoteThread<'_>,
    scratch: u64,
) -> Result<()> {
    let mut word = [0u8; 4];
    for (option, name) in [
        (libc::PR_GET_PDEATHSIG, "prctl(PR_GET_PDEATHSIG)"),
        (
            libc::PR_GET_CHILD_SUBREAPER,
            "prctl(PR_GET_CHILD_SUBREAPER)",
        ),
    ] {
        thread
            .call(name, libc::SYS_prctl, [option as u64, scratch, 0, 0, 0, 0])
            .await?;
        read_memory(thread.pid(), scratch, &mut word)?;
        let value = i32::from_ne_bytes(word);
        if option == libc::PR_GET_PDEATHSIG {
            info.pdeath_signal = value;
        } else {
            info.child_subreaper = value != 0;
        }
    }
    // brk(0) cannot succeed in moving the break, so it just reports it.
    info.mm.brk = thread.call("brk", libc::SYS_brk, [0; 6]).await?;
    // /proc/PID/personality prints the value personality(0xffffffff)
    // returns (one remote call less); the call where it cannot be read.
    let from_proc = read_proc(&format!("/proc/{}/personality", thread.pid()))
        .ok()
        .and_then(|t| u32::from_str_radix(t.trim(), 16).ok());
    info.personality = match from_proc {
        Some(p) => p,
        // personality(0xffffffff) queries without changing.
        None => {
            thread
                .call(
                    "personality",
                    libc::SYS_personality,
                    [0xffff_ffff, 0, 0, 0, 0, 0],
                )
                .await? as u32
        }
    };
    // From /proc: 16 remote prlimit64 calls cost more frozen time than
    // everything else here together on a busy machine.
    info.rlimits = read_rlimits(thread.pid())?;
    Ok(())
}

/// Every resource limit of `pid`, from `/proc/PID/limits` (one line per
/// resource, in resource order; "unlimited" is RLIM_INFINITY).
fn read_rlimits(pid: i32) -> Result<Vec<Rlimit>> {
    let path = format!("/proc/{pid}/limits");
    parse_rlimits(&read_proc(&path)?, &path)
}

/// Resource limits from their (soft, hard) values in resource order.
pub fn rlimits_from(values: &[(u64, u64)]) -> Vec<Rlimit> {
    RLIMIT_NAMES
        .iter()
        .zip(values)
        .enumerate()
        .map(|(resource, (name, &(soft, hard)))| Rlimit {
            resource: resource as u32,
            name: (*name).to_string(),
            soft,
            hard,
        })
        .collect()
}

fn parse_rlimits(text: &str, path: &str) -> Result<Vec<Rlimit>> {
    let value = |v: Option<&str>| -> Option<u64> {
        match v? {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    };
    let lines: Vec<&str> = text.lines().skip(1).collect();
    if lines.len() < RLIMIT_NAMES.len() {
        return Err(crate::error::parse_err(path, "fewer limits than resources"));
    }
    RLIMIT_NAMES
        .iter()
        .zip(lines)
        .enumerate()
        .map(|(resource, (name, line))| {
            // The description column is 25 characters wide, then soft, hard
            // and (for most) the unit.
            let mut fields = line.get(25..).unwrap_or("").split_whitespace();
            match (value(fields.next()), value(fields.next())) {
                (Some(soft), Some(hard)) => Ok(Rlimit {
                    resource: resource as u32,
                    name: (*name).to_string(),
                    soft,
                    hard,
                }),
                _ => Err(crate::error::parse_err(
                    path,
                    format!("unexpected limit line {line:?}"),
                )),
            }
        })
        .collect()
}

/// `PTRACE_SECCOMP_GET_FILTER` and `PTRACE_SECCOMP_GET_METADATA`.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
/// The most instructions a classic BPF program may have (`BPF_MAXINSNS`).
const BPF_MAXINSNS: usize = 4096;

/// The credentials and umask a /proc/PID/status tells. Parsed here rather
/// than by `procfs`, which builds a map of every line: 25–65 us a process
/// while the tree is frozen, against ~1 us for these four lines.
#[derive(Debug, PartialEq, Eq)]
struct StatusCreds {
    umask: u32,
    /// Real, effective, saved and filesystem.
    uid: [u32; 4],
    gid: [u32; 4],
    groups: Vec<u32>,
}

impl StatusCreds {
    /// Those of `status`, process `pid`'s.
    fn of(pid: i32, status: &str) -> Result<StatusCreds> {
        StatusCreds::parse(status).ok_or_else(|| {
            Error::Other(format!(
                "/proc/{pid}/status lacks the Umask, Uid, Gid or Groups line chpox reads"
            ))
        })
    }

    fn parse(status: &str) -> Option<StatusCreds> {
        let (mut umask, mut uid, mut gid, mut groups) = (None, None, None, None);
        let four = |v: &str| -> Option<[u32; 4]> {
            let mut ids = v.split_whitespace().map(|x| x.parse::<u32>());
            let mut out = [0u32; 4];
            for slot in &mut out {
                *slot = ids.next()?.ok()?;
            }
            Some(out)
        };
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key {
                "Umask" => umask = u32::from_str_radix(value.trim(), 8).ok(),
                "Uid" => uid = four(value),
                "Gid" => gid = four(value),
                "Groups" => {
                    groups = value
                        .split_whitespace()
                        .map(|g| g.parse::<u32>().ok())
                        .collect::<Option<Vec<u32>>>()
                }
                _ => {}
            }
            if umask.is_some() && uid.is_some() && gid.is_some() && groups.is_some() {
                break;
            }
        }
        Some(StatusCreds {
            // Kernels before 4.7 have no Umask line: the usual default.
            umask: umask.unwrap_or(0o022),
            uid: uid?,
            gid: gid?,
            groups: groups?,
        })
    }
}

/// A number after `key` in a /proc status file.
fn status_number(status: &str, key: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Small per-process attributes: those of [`dump_proc_attrs`], and the
/// prctl flags with remote prctl calls.
pub async fn dump_attrs(
    info: &mut ProcessInfo,
    thread: &mut RemoteThread<'_>,
    tids: &[i32],
    status: &str,
) -> Result<()> {
    dump_proc_attrs(info, thread.pid(), tids, status)?;
    let attrs = &mut info.attrs;
    // These prctl calls return the value itself.
    attrs.dumpable = Some(
        thread
            .call(
                "prctl(PR_GET_DUMPABLE)",
                libc::SYS_prctl,
                [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
            )
            .await? as u32,
    );
    // 1, or 3 with PR_THP_DISABLE_EXCEPT_ADVISED, which status does not show.
    attrs.thp_disable = thread
        .call(
            "prctl(PR_GET_THP_DISABLE)",
            libc::SYS_prctl,
            [libc::PR_GET_THP_DISABLE as u64, 0, 0, 0, 0, 0],
        )
        .await? as u32;
    Ok(())
}

/// The attributes /proc and ptrace tell of frozen `pid`: oom_score_adj,
/// no_new_privs, and the seccomp filters of every thread (`tids`), which
/// must be one chain for all (they are reinstalled with
/// SECCOMP_FILTER_FLAG_TSYNC).
/// `status` is the text of its /proc/PID/status, read while it has been
/// frozen (no_new_privs is set only by the process).
pub fn dump_proc_attrs(info: &mut ProcessInfo, pid: i32, tids: &[i32], status: &str) -> Result<()> {
    let attrs = &mut info.attrs;
    attrs.oom_score_adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .ok()
        .and_then(|v| v.trim().parse().ok());
    attrs.no_new_privs = no_new_privs(status);
    let mut chains = Vec::with_capacity(tids.len());
    for &tid in tids {
        let status = read_proc(&format!("/proc/{pid}/task/{tid}/status"))?;
        match status_number(&status, "Seccomp:") {
            None | Some(0) => chains.push(Vec::new()),
            Some(2) => chains.push(seccomp_filters(tid)?),
            Some(mode) => {
                return Err(Error::Other(format!(
                    "thread {tid} of PID {pid} runs in strict seccomp mode {mode} (SECCOMP_SET_MODE_STRICT), which chpox cannot restore"
                )));
            }
        }
    }
    if chains.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Other(format!(
            "the threads of PID {pid} have different seccomp filters, which chpox cannot restore (only one chain for all threads)"
        )));
    }
    attrs.seccomp_filters = chains.into_iter().next().unwrap_or_default();
    Ok(())
}

/// `NoNewPrivs:` of `status`, the text of a /proc/PID/status.
pub fn no_new_privs(status: &str) -> bool {
    status_number(status, "NoNewPrivs:").is_some_and(|v| v != 0)
}

/// `mlockall(MCL_FUTURE)` leaves no mark in /proc but on the mappings made
/// after it: the scratch mapping the dump has just made in the process
/// (at `scratch`) is locked exactly when it is in force, and locked on
/// fault with MCL_ONFAULT. smaps is read only when some memory is locked
/// (`status`: its /proc/PID/status, read while frozen).
pub fn dump_mlockall(info: &mut ProcessInfo, pid: i32, scratch: u64, status: &str) -> Result<()> {
    const MCL_FUTURE: u32 = 2;
    const MCL_ONFAULT: u32 = 4;
    if !memory_locked(status) {
        return Ok(());
    }
    let smaps = read_proc(&format!("/proc/{pid}/smaps"))?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if inside {
                let has = |f: &str| flags.split_whitespace().any(|x| x == f);
                if has("lo") {
                    info.attrs.mlockall = MCL_FUTURE | if has("lf") { MCL_ONFAULT } else { 0 };
                }
                return Ok(());
            }
            continue;
        }
        let range = line.split(' ').next().unwrap_or("");
        if let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            inside = (start..end).contains(&scratch);
        }
    }
    Ok(())
}

/// Whether a process whose /proc/PID/status reads `status` has locked
/// memory (VmLck): a fresh mapping may then be locked by
/// mlockall(MCL_FUTURE) (see [`dump_mlockall`]); without any, it is not
/// in force. Unreadable counts as locked.
pub fn memory_locked(status: &str) -> bool {
    locked_bytes_in(status).is_none_or(|bytes| bytes != 0)
}

/// `VmLck:` of `status`, the text of a /proc/PID/status, in bytes.
pub fn locked_bytes_in(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// One line for `chpox inspect`, if any attribute differs from a new
/// process's.
pub fn describe_attrs(a: &ProcessAttrs) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(adj) = a.oom_score_adj.filter(|&v| v != 0) {
        parts.push(format!("oom_score_adj {adj}"));
    }
    if a.dumpable.is_some_and(|d| d != 1) {
        parts.push(format!("dumpable {}", a.dumpable.unwrap_or(1)));
    }
    if a.no_new_privs {
        parts.push("no_new_privs".into());
    }
    match a.thp_disable {
        0 => {}
        1 => parts.push("THP disabled".into()),
        _ => parts.push("THP disabled except where advised".into()),
    }
    if !a.seccomp_filters.is_empty() {
        let insns: Vec<String> = a
            .seccomp_filters
            .iter()
            .map(|f| (f.program.len() / 8).to_string())
            .collect();
        parts.push(format!(
            "seccomp filters of {} instructions",
            insns.join("+")
        ));
    }
    if a.mlockall != 0 {
        parts.push(format!("mlockall {:#x}", a.mlockall));
    }
    if a.cwd_deleted {
        parts.push(format!("cwd removed (mode {:o})", a.cwd_mode));
    }
    (!parts.is_empty()).then(|| format!("attributes: {}", parts.join(", ")))
}

/// The seccomp filters of traced thread `tid`, oldest first (the kernel
/// counts filter indices from the oldest, whatever ptrace(2) says).
fn seccomp_filters(tid: i32) -> Result<Vec<SeccompFilter>> {
    let mut filters = Vec::new();
    for index in 0.. {
        let mut prog = vec![0u8; BPF_MAXINSNS * 8];
        // SAFETY: the kernel writes at most BPF_MAXINSNS 8-byte
        // instructions into `prog`, which has room for them.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as libc::c_ulong,
                prog.as_mut_ptr(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(Error::Other(format!(
                "cannot read seccomp filter {index} of thread {tid} (PTRACE_SECCOMP_GET_FILTER: {e})"
            )));
        }
        prog.truncate(n as usize * 8);
        // struct seccomp_metadata { u64 filter_off; u64 flags; }
        let mut meta = [index as u64, 0u64];
        // SAFETY: the kernel reads filter_off and writes the 16-byte struct.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_METADATA,
                tid,
                std::mem::size_of_val(&meta) as libc::c_ulong,
                meta.as_mut_ptr(),
            )
        };
        let flags = if ret < 0 { 0 } else { meta[1] };
        filters.push(SeccompFilter {
            program: prog,
            flags,
        });
    }
    Ok(filters)
}

pub fn read_link(path: &str) -> Result<String> {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| Error::Proc {
            path: path.to_string(),
            source,
        })
}

/// The auxv as (type, value) pairs, up to AT_NULL.
pub fn parse_auxv(bytes: &[u8]) -> Vec<(u64, u64)> {
    let word = |c: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_ne_bytes(w)
    };
    bytes
        .chunks_exact(16)
        .map(|pair| (word(&pair[..8]), word(&pair[8..])))
        .take_while(|&(kind, _)| kind != 0)
        .collect()
}

/// Name of each thread (`/proc/PID/task/TID/comm`).
pub fn thread_comm(pid: i32, tid: i32) -> Result<String> {
    Ok(read_proc(&format!("/proc/{pid}/task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string())
}

/// Best-effort host description for the image header.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The CPU's model name, read once per process: /proc/cpuinfo takes
/// 40–100 µs to read (the kernel asks every CPU its frequency), and the
/// image's host description is made while the processes are frozen. See
/// also [`warm_cpu_model`].
pub fn cpu_model() -> String {
    static MODEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("model name"))
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
                .unwrap_or_default()
        })
        .clone()
}

/// Read [`cpu_model`] now, before a freeze, rather than while frozen.
pub fn warm_cpu_model() {
    let _ = cpu_model();
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The PIDs a task has, outermost (ours) first, innermost (its own
/// namespace's) last: the NSpid line of the status file at `path`.
pub fn ns_pids(path: &str) -> Vec<i32> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|status| {
            let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            Some(
                line.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// The PID by which we know a task that a process of ours created inside a
/// PID namespace and was told to be `id` there: its innermost PID is `id`.
/// `candidates` are the PIDs (or TIDs) that may be it.
fn host_id_among(
    id: i32,
    candidates: impl Iterator<Item = i32>,
    path: impl Fn(i32) -> String,
) -> Option<i32> {
    candidates
        .into_iter()
        .find(|&c| ns_pids(&path(c)).last() == Some(&id))
}

/// Our PID of the child that `parent` (our PID of it) made as `id` in its
/// namespace.
pub fn host_pid_of_child(parent: i32, id: i32) -> Option<i32> {
    let children = procfs::process::all_processes()
        .ok()?
        .filter_map(|p| {
            let stat = p.ok()?.stat().ok()?;
            (stat.ppid == parent).then_some(stat.pid)
        })
        .collect::<Vec<_>>();
    host_id_among(id, children.into_iter(), |c| format!("/proc/{c}/status"))
}

/// Our TID of the thread of process `pid` (our PID) that is `id` in its
/// namespace.
pub fn host_tid_in(pid: i32, id: i32) -> Option<i32> {
    let tids = crate::ptrace::list_threads(pid).ok()?;
    host_id_among(id, tids.into_iter(), |t| {
        format!("/proc/{pid}/task/{t}/status")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auxv_stops_at_at_null() {
        let mut bytes = Vec::new();
        for (k, v) in [(6u64, 4096u64), (25, 0x7ffd_0000), (0, 0), (7, 7)] {
            bytes.extend_from_slice(&k.to_ne_bytes());
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&bytes), vec![(6, 4096), (25, 0x7ffd_0000)]);
    }

    #[test]
    fn status_creds_are_read_as_procfs_reads_them() {
        let own = std::fs::read_to_string("/proc/self/status").expect("own status");
        let parsed = StatusCreds::parse(&own).expect("own status parses");
        let procfs = Process::myself().and_then(|p| p.status()).expect("procfs");
        assert_eq!(
            parsed.uid,
            [procfs.ruid, procfs.euid, procfs.suid, procfs.fuid]
        );
        assert_eq!(
            parsed.gid,
            [procfs.rgid, procfs.egid, procfs.sgid, procfs.fgid]
        );
        let groups: Vec<u32> = procfs.groups.iter().map(|&g| g as u32).collect();
        assert_eq!(parsed.groups, groups);
        assert_eq!(Some(parsed.umask), procfs.umask);
    }

    #[test]
    fn status_creds_need_every_id_line() {
        let text = "Name:\tx\nUmask:\t0027\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\nGroups:\t4 24 100 \n";
        assert_eq!(
            StatusCreds::parse(text),
            Some(StatusCreds {
                umask: 0o027,
                uid: [1000, 1001, 1002, 1003],
                gid: [5, 6, 7, 8],
                groups: vec![4, 24, 100],
            })
        );
        let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(
            StatusCreds::parse(no_groups).map(|c| c.groups),
            Some(vec![])
        );
        assert_eq!(StatusCreds::parse(no_groups).map(|c| c.umask), Some(0o022));
        assert_eq!(
            StatusCreds::parse("Uid:\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n"),
            None
        );
        assert_eq!(StatusCreds::parse("Uid:\t0\t0\t0\t0\nGroups:\n"), None);
    }

    #[test]
    fn own_process_is_refused() {
        let me = std::process::id() as i32;
        assert!(matches!(check_dumpable(me), Err(Error::SelfDump(_))));
    }

    #[test]
    fn kernel_threads_are_refused() {
        // PID 2 is kthreadd on every Linux system.
        assert!(matches!(check_dumpable(2), Err(Error::KernelThread(2))));
    }

    #[test]
    fn limits_from_proc_match_getrlimit() {
        let me = std::process::id() as i32;
        let limits = read_rlimits(me).unwrap();
        assert_eq!(limits.len(), RLIMIT_NAMES.len());
        for l in &limits {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: r is a valid out-pointer for the call.
            let rc = unsafe { libc::getrlimit(l.resource as _, &mut r) };
            assert_eq!(rc, 0);
            assert_eq!((l.soft, l.hard), (r.rlim_cur, r.rlim_max), "{}", l.name);
        }
    }

    #[test]
    fn a_short_limits_file_is_an_error() {
        assert!(parse_rlimits("Limit  Soft Limit  Hard Limit  Units\n", "x").is_err());
    }
}
