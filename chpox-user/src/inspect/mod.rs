//! `chpox inspect`: a readable summary of an image, or all of it as JSON.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::image::ImageReader;
use crate::image::model::{
    AfterDump, DataRef, FdKind, FileRole, Metadata, ProcessImage, RestartKind, SyscallState,
    VmaKind, Zombie,
};
use crate::registers;

/// Everything `inspect --json` prints: the metadata plus what was checked.
#[derive(Serialize)]
pub struct InspectJson<'a> {
    pub format_version: u32,
    pub image_bytes: u64,
    pub checksums: &'a ChecksumStatus,
    #[serde(flatten)]
    pub meta: &'a Metadata,
}

#[derive(Serialize)]
pub struct ChecksumStatus {
    pub ok: bool,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub error: Option<String>,
}

pub fn checksum_status(reader: &ImageReader) -> ChecksumStatus {
    match reader.verify_all() {
        Ok(r) => ChecksumStatus {
            ok: true,
            blobs_checked: r.blobs,
            bytes_checked: r.bytes,
            error: None,
        },
        Err(e) => ChecksumStatus {
            ok: false,
            blobs_checked: 0,
            bytes_checked: 0,
            error: Some(e.to_string()),
        },
    }
}

pub fn to_json(reader: &ImageReader, checks: &ChecksumStatus) -> Result<String> {
    let out = InspectJson {
        format_version: reader.header().format_version,
        image_bytes: reader.file_len(),
        checksums: checks,
        meta: reader.metadata(),
    };
    crate::cli::json::to_string(&out).map_err(|e| crate::Error::Other(e.to_string()))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn kind_label(kind: VmaKind) -> &'static str {
    match kind {
        VmaKind::Anonymous => "anon",
        VmaKind::SharedAnonymous => "shared-anon",
        VmaKind::PrivateFile => "file",
        VmaKind::SharedFile => "shared-file",
        VmaKind::Vdso => "vdso",
        VmaKind::Vvar => "vvar",
        VmaKind::VvarVclock => "vvar_vclock",
        VmaKind::Vsyscall => "vsyscall",
    }
}

/// Which end of a pipe a descriptor with open flags `flags` is.
fn pipe_end(flags: u32) -> &'static str {
    if crate::fds::is_read_end(flags) {
        "read"
    } else {
        "write"
    }
}

/// What a descriptor is, in a word or two.
fn fd_kind(kind: &FdKind) -> &'static str {
    match kind {
        FdKind::RegularFile { .. } => "file",
        FdKind::Directory { .. } => "directory",
        FdKind::CharDevice { .. } => "device",
        FdKind::Terminal { .. } => "terminal",
        FdKind::Pipe { internal: true, .. } => "pipe",
        FdKind::Pipe { .. } => "pipe to outside",
        FdKind::ReplacedByNull { .. } => "as /dev/null",
        FdKind::Fifo { .. } => "FIFO",
        FdKind::UnixPair { .. } => "socket pair",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// Bulk data a descriptor keeps in the image.
fn fd_data(kind: &FdKind) -> Option<&DataRef> {
    match kind {
        FdKind::RegularFile { embedded, .. } => embedded.as_ref(),
        FdKind::Pipe { data, .. } | FdKind::Fifo { data, .. } => data.as_ref(),
        FdKind::UnixPair { queued, .. } => queued.as_ref(),
        _ => None,
    }
}

/// x86-64 system call names, for the calls a checkpoint finds threads in.
fn syscall_name(nr: u64) -> String {
    const NAMES: &[(libc::c_long, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_writev, "writev"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_pwrite64, "pwrite64"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_select, "select"),
        (libc::SYS_pselect6, "pselect6"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (libc::SYS_epoll_pwait2, "epoll_pwait2"),
        (libc::SYS_nanosleep, "nanosleep"),
        (libc::SYS_clock_nanosleep, "clock_nanosleep"),
        (libc::SYS_pause, "pause"),
        (libc::SYS_rt_sigsuspend, "rt_sigsuspend"),
        (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_wait4, "wait4"),
        (libc::SYS_waitid, "waitid"),
        (libc::SYS_accept, "accept"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_msgrcv, "msgrcv"),
        (libc::SYS_semop, "semop"),
        (libc::SYS_semtimedop, "semtimedop"),
        (libc::SYS_flock, "flock"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_sched_yield, "sched_yield"),
        (libc::SYS_restart_syscall, "restart_syscall"),
        (libc::SYS_io_uring_enter, "io_uring_enter"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| u64::try_from(*n) == Ok(nr))
        .map_or_else(|| format!("system call {nr}"), |(_, name)| name.to_string())
}

/// What the kernel would have done with an interrupted system call, which
/// restore does too.
fn restart_words(restart: RestartKind) -> &'static str {
    match restart {
        RestartKind::RestartBlock => "restarts with the time left",
        RestartKind::NoIntr => "restarts",
        RestartKind::Sys => "restarts (fails with EINTR if a handler without SA_RESTART runs)",
        RestartKind::NoHand => "restarts (fails with EINTR if a handler runs)",
    }
}

/// How big each part of the image is: what the bytes on disk are.
fn parts(s: &mut String, reader: &ImageReader) {
    let m = reader.metadata();
    // A blob two entries refer to (a deleted file both mapped and open)
    // is counted once, with the first.
    let mut seen = std::collections::HashSet::new();
    let mut sum = |refs: &mut dyn Iterator<Item = &DataRef>| -> u64 {
        refs.filter(|r| seen.insert((r.offset, r.stored_len)))
            .map(|r| r.stored_len)
            .sum()
    };
    let memory = sum(&mut m
        .processes()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.pages)
        .map(|r| &r.data));
    let files = sum(&mut m.files.iter().filter_map(|f| f.embedded.as_ref()));
    let fds = sum(&mut m
        .processes()
        .flat_map(|p| &p.fds)
        .filter_map(|f| fd_data(&f.kind)));
    let meta = reader.header().meta_len;
    let total = reader.file_len();
    let other = total.saturating_sub(memory + files + fds + meta);
    let _ = writeln!(
        s,
        "image parts: memory {}, embedded files {}, descriptor contents {}, metadata {}, header and padding {}",
        human(memory),
        human(files),
        human(fds),
        human(meta),
        human(other)
    );
}

/// The human-readable summary.
pub fn summary(reader: &ImageReader, checks: &ChecksumStatus) -> String {
    let m = reader.metadata();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "chpox image, format {}, written by chpox {}, {}",
        reader.header().format_version,
        m.chpox_version,
        human(reader.file_len())
    );
    let _ = writeln!(
        s,
        "checksums: {}",
        match &checks.error {
            None => format!(
                "ok ({} blobs, {})",
                checks.blobs_checked,
                human(checks.bytes_checked)
            ),
            Some(e) => format!("FAILED: {e}"),
        }
    );
    let _ = writeln!(
        s,
        "host: {} kernel {}, CPU {} (xfeatures {:#x})",
        m.host.hostname, m.host.kernel_release, m.host.cpu_model, m.host.xfeatures
    );
    let _ = writeln!(
        s,
        "after dump: {}",
        match m.after_dump {
            AfterDump::LeaveRunning => "left running",
            AfterDump::LeaveStopped => "left stopped",
            AfterDump::Kill => "killed",
        }
    );
    parts(&mut s, reader);
    match &m.parent {
        Some(p) => {
            let _ = writeln!(
                s,
                "incremental: {} inherited from parent {} (image id {}), which a restore reads too",
                human(p.pages_inherited * m.host.page_size),
                p.path,
                p.image_id
            );
        }
        None => {
            if let Some(id) = &m.image_id {
                let _ = writeln!(s, "full image (image id {id})");
            }
        }
    }
    if let Some(r) = m.registration {
        let _ = writeln!(
            s,
            "taken by chpox-agent: signal {}, flags {} (`chpox restore --register` registers the restored process the same way)",
            r.signal, r.flags
        );
    }
    if !m.children_not_saved.is_empty() {
        let _ = writeln!(
            s,
            "children not saved: {:?} (a checkpoint of the process alone; restore brings back PID {} without them)",
            m.children_not_saved, m.root.process.pid
        );
    }
    tree(&mut s, m);
    files_summary(&mut s, m);
    for pi in m.processes() {
        process_summary(&mut s, m, pi);
    }
    s
}

/// Deepest indentation of the tree; a deeper process is shown at this
/// depth with its depth said, so a long chain of processes cannot make the
/// summary grow with the square of its length.
const MAX_INDENT: usize = 32;

/// The tree, `pstree`-like: each process with its command, state, group
/// and session, and its descriptors; zombies with their status.
///
/// Walked without recursion, each process once: an image may claim any
/// parent for any process (a cycle, a chain as long as the image), and
/// this must still end, in bounded stack. Processes whose parent is not in
/// the tree are listed after it.
fn tree(s: &mut String, m: &Metadata) {
    let _ = writeln!(
        s,
        "process tree: {} process(es){}",
        1 + m.descendants.len(),
        if m.zombies.is_empty() {
            String::new()
        } else {
            format!(", {} zombie(s)", m.zombies.len())
        }
    );
    let all: Vec<&ProcessImage> = m.processes().collect();
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, p) in all.iter().enumerate().skip(1) {
        children.entry(p.process.ppid).or_default().push(i);
    }
    let mut zombies: HashMap<i32, Vec<&Zombie>> = HashMap::new();
    for z in &m.zombies {
        zombies.entry(z.ppid).or_default().push(z);
    }
    let mut shown = vec![false; all.len()];
    let mut apart = false;
    let line = |s: &mut String, depth: usize, text: String| {
        let indent = "  ".repeat(depth.min(MAX_INDENT) + 1);
        let deep = if depth > MAX_INDENT {
            format!(" (depth {depth})")
        } else {
            String::new()
        };
        let _ = writeln!(s, "{indent}{text}{deep}");
    };
    // The root first, then whatever a walk from it does not reach.
    for start in 0..all.len() {
        if shown[start] {
            continue;
        }
        if start > 0 && !std::mem::replace(&mut apart, true) {
            let _ = writeln!(s, "  not under the root:");
        }
        let mut stack = vec![(start, 0usize)];
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut shown[i], true) {
                continue;
            }
            let pi = all[i];
            let p = &pi.process;
            let fds: Vec<String> = pi
                .fds
                .iter()
                .map(|f| format!("{} {}", f.fd, fd_kind(&f.kind)))
                .collect();
            line(
                s,
                depth,
                format!(
                    "{} {} [{}] pgid {} sid {}, {} thread(s), fds: {}",
                    p.pid,
                    p.comm,
                    if p.stopped { "stopped" } else { "running" },
                    p.pgid,
                    p.sid,
                    pi.threads.len(),
                    if fds.is_empty() {
                        "none".to_string()
                    } else {
                        fds.join(", ")
                    }
                ),
            );
            // Zombies of a PID are shown under its first process only.
            for z in zombies.remove(&p.pid).unwrap_or_default() {
                line(
                    s,
                    depth + 1,
                    format!(
                        "{} [zombie] status {:#x} pgid {} sid {}",
                        z.pid, z.status, z.pgid, z.sid
                    ),
                );
            }
            if let Some(kids) = children.get(&p.pid) {
                stack.extend(kids.iter().rev().map(|&c| (c, depth + 1)));
            }
        }
    }
    let mut orphans: Vec<&Zombie> = zombies.into_values().flatten().collect();
    if !orphans.is_empty() {
        orphans.sort_by_key(|z| (z.ppid, z.pid));
        let _ = writeln!(s, "  zombies whose parent is not in the image:");
        for z in orphans {
            line(
                s,
                1,
                format!(
                    "{} [zombie] parent {} status {:#x} pgid {} sid {}",
                    z.pid, z.ppid, z.status, z.pgid, z.sid
                ),
            );
        }
    }
}

/// `uid 1000` when the real, effective, saved and filesystem ids are the
/// same, else all four by name: a setuid process must not pass for its
/// real user's.
fn ids(kind: &str, ids: [u32; 4]) -> String {
    let [real, effective, saved, fs] = ids;
    if ids.iter().all(|&id| id == real) {
        format!("{kind} {real}")
    } else {
        format!("{kind}s real {real} effective {effective} saved {saved} fs {fs}")
    }
}

/// The files the tree depends on (one table for all its processes).
fn files_summary(s: &mut String, m: &Metadata) {
    let _ = writeln!(*s, "files: {}", m.files.len());
    for f in &m.files {
        let _ = writeln!(
            s,
            "  {:<50} {} {} blake3 {}…{}{}",
            f.path,
            match f.role {
                FileRole::Executable => "executable",
                FileRole::Mapped => "mapped",
                FileRole::Library => "to embed",
            },
            human(f.size),
            &f.blake3.get(..12).unwrap_or(""),
            if f.deleted { " (deleted)" } else { "" },
            if f.embedded.is_some() {
                " [embedded]"
            } else {
                ""
            }
        );
    }
}

/// Everything about one process.
fn process_summary(s: &mut String, m: &Metadata, pi: &ProcessImage) {
    let p = &pi.process;
    let _ = writeln!(
        *s,
        "process: PID {} ({}) parent {} {} {}, exe {}, cwd {}",
        p.pid,
        p.comm,
        p.ppid,
        ids("uid", p.creds.uid),
        ids("gid", p.creds.gid),
        p.exe,
        p.cwd
    );
    let _ = writeln!(*s, "cmdline: {}", p.cmdline.join(" "));
    for line in crate::timers::describe(&p.timers)
        .into_iter()
        .chain(crate::process::describe_attrs(&p.attrs))
    {
        let _ = writeln!(*s, "{line}");
    }

    let _ = writeln!(*s, "threads: {}", pi.threads.len());
    for t in &pi.threads {
        let syscall = match t.syscall {
            SyscallState::None => "in user code".to_string(),
            SyscallState::Restartable { nr, restart } => {
                format!("in {}, {}", syscall_name(nr), restart_words(restart))
            }
            SyscallState::Completed { nr } => {
                format!("returning from {}", syscall_name(nr))
            }
        };
        let _ = writeln!(
            s,
            "  tid {:<8} {:<16} rip {:#014x} rsp {:#014x} fs_base {:#x} xstate {} B (components {:#x}) {}",
            t.tid,
            t.comm,
            t.regs.rip,
            t.regs.rsp,
            t.regs.fs_base,
            t.xsave.len(),
            registers::xstate_bv(&t.xsave),
            syscall
        );
    }

    let stored: u64 = pi
        .vmas
        .iter()
        .flat_map(|v| &v.pages)
        .map(|r| r.npages)
        .sum();
    let _ = writeln!(
        *s,
        "memory: {} mappings, {} stored",
        pi.vmas.len(),
        human(stored * m.host.page_size)
    );
    for v in &pi.vmas {
        let pages: u64 = v.pages.iter().map(|r| r.npages).sum();
        let inherited: u64 = v.inherited.iter().map(|&(_, n)| n).sum();
        let mut what = if v.kind.is_special() {
            "recorded, not copied".to_string()
        } else if v.kind == VmaKind::SharedFile {
            "content in file".to_string()
        } else if pages == 0 && inherited == 0 {
            "nothing stored (untouched or clean)".to_string()
        } else {
            format!(
                "{} stored in {} run(s)",
                human(pages * m.host.page_size),
                v.pages.len()
            )
        };
        if inherited > 0 {
            what.push_str(&format!(
                ", {} from the parent",
                human(inherited * m.host.page_size)
            ));
        }
        if let Some(seg) = &v.sysv {
            what.push_str(&format!(
                "; SysV segment {} key {:#x}{}",
                seg.id,
                seg.key,
                if seg.removed { " (removed)" } else { "" }
            ));
        }
        let _ = writeln!(
            s,
            "  {:012x}-{:012x} {}{}{}{} {:>10} {:<11} {:<40} {}",
            v.start,
            v.end,
            if v.read { 'r' } else { '-' },
            if v.write { 'w' } else { '-' },
            if v.exec { 'x' } else { '-' },
            if v.shared { 's' } else { 'p' },
            human(v.end - v.start),
            kind_label(v.kind),
            v.name,
            what
        );
    }

    let _ = writeln!(*s, "fds: {}", pi.fds.len());
    for fd in &pi.fds {
        let desc = match &fd.kind {
            FdKind::RegularFile {
                path,
                pos,
                embedded,
                ..
            } => format!(
                "file {path} at offset {pos}{}",
                if embedded.is_some() {
                    " (deleted, content embedded)"
                } else {
                    ""
                }
            ),
            FdKind::Directory { path } => format!("directory {path}"),
            FdKind::CharDevice { path, .. } => format!("device {path}"),
            FdKind::Terminal { path, .. } => format!("terminal {path}"),
            FdKind::Pipe {
                inode,
                internal: true,
                data,
                ..
            } => format!(
                "pipe:[{inode}] {} end, both ends held, {} unread bytes stored",
                pipe_end(fd.flags),
                data.as_ref().map_or(0, |d| d.raw_len)
            ),
            FdKind::Pipe { inode, .. } => format!(
                "pipe:[{inode}] {} end to another process; restored as the restorer's fd {}",
                pipe_end(fd.flags),
                fd.fd
            ),
            FdKind::ReplacedByNull { was } => format!("{was}, restored as /dev/null"),
            FdKind::UnixPair {
                inode,
                peer,
                sock_type,
                queued,
                ..
            } => format!(
                "UNIX socket pair socket:[{inode}] (type {sock_type}) to socket:[{peer}]{}",
                queued.map_or(String::new(), |d| format!(", {} unread bytes", d.raw_len))
            ),
            FdKind::Fifo { path, data, .. } => format!(
                "FIFO {path}{}",
                data.map_or(String::new(), |d| format!(", {} unread bytes", d.raw_len))
            ),
            other => crate::fds::describe(other),
        };
        let _ = writeln!(
            s,
            "  {:>4} {:<10} {} (flags {:#o}{}{})",
            fd.fd,
            match fd.flags & libc::O_ACCMODE as u32 {
                0 => "read",
                1 => "write",
                _ => "read-write",
            },
            desc,
            fd.flags,
            if fd.cloexec { ", close-on-exec" } else { "" },
            crate::fds::locks::describe(&fd.locks),
        );
    }
    let handled: Vec<String> = pi
        .signals
        .actions
        .iter()
        .filter(|a| a.handler != 0)
        .map(|a| {
            format!(
                "{}:{}",
                a.signo,
                if a.handler == 1 { "ign" } else { "handler" }
            )
        })
        .collect();
    let _ = writeln!(
        *s,
        "signals: non-default {}; pending (process) {}",
        if handled.is_empty() {
            "none".to_string()
        } else {
            handled.join(" ")
        },
        pi.signals.shared_pending.len()
    );
    let _ = writeln!(
        *s,
        "mm: code {:#x}-{:#x} data {:#x}-{:#x} brk {:#x}-{:#x} stack {:#x}",
        p.mm.start_code,
        p.mm.end_code,
        p.mm.start_data,
        p.mm.end_data,
        p.mm.start_brk,
        p.mm.brk,
        p.mm.start_stack
    );
}

#[cfg(test)]
mod tests;
