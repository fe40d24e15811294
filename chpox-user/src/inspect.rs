//! `chpox inspect`: a readable summary of an image, or all of it as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::image::ImageReader;
use crate::image::model::{FdKind, Metadata, ProcessImage, SyscallState, VmaKind};
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
    serde_json::to_string_pretty(&out).map_err(|e| crate::Error::Other(e.to_string()))
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
    let _ = writeln!(s, "after dump: {:?}", m.after_dump);
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
    for pi in m.processes() {
        process_summary(&mut s, m, pi);
    }
    s
}

/// The tree, `pstree`-like: each process with its command, state, group
/// and session, and its descriptors; zombies with their status.
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
    fn walk(s: &mut String, m: &Metadata, pid: i32, depth: usize) {
        let indent = "  ".repeat(depth + 1);
        if let Some(pi) = m.processes().find(|p| p.process.pid == pid) {
            let p = &pi.process;
            let fds: Vec<String> = pi.fds.iter().map(|f| f.fd.to_string()).collect();
            let _ = writeln!(
                s,
                "{indent}{} {} [{}] pgid {} sid {}, {} thread(s), fds {}",
                p.pid,
                p.comm,
                if p.stopped { "stopped" } else { "running" },
                p.pgid,
                p.sid,
                pi.threads.len(),
                fds.join(",")
            );
        }
        for z in m.zombies.iter().filter(|z| z.ppid == pid) {
            let _ = writeln!(
                s,
                "{indent}  {} [zombie] status {:#x} pgid {} sid {}",
                z.pid, z.status, z.pgid, z.sid
            );
        }
        let children: Vec<i32> = m
            .descendants
            .iter()
            .filter(|c| c.process.ppid == pid)
            .map(|c| c.process.pid)
            .collect();
        for c in children {
            walk(s, m, c, depth + 1);
        }
    }
    walk(s, m, m.root.process.pid, 0);
}

/// Everything about one process.
fn process_summary(s: &mut String, m: &Metadata, pi: &ProcessImage) {
    let p = &pi.process;
    let _ = writeln!(
        *s,
        "process: PID {} ({}) parent {} uid {} gid {}, exe {}, cwd {}",
        p.pid, p.comm, p.ppid, p.creds.uid[0], p.creds.gid[0], p.exe, p.cwd
    );
    let _ = writeln!(*s, "cmdline: {}", p.cmdline.join(" "));

    let _ = writeln!(*s, "threads: {}", pi.threads.len());
    for t in &pi.threads {
        let syscall = match t.syscall {
            SyscallState::None => "in user code".to_string(),
            SyscallState::Restartable { nr, restart } => {
                format!("in syscall {nr} (restart {restart:?})")
            }
            SyscallState::Completed { nr } => format!("leaving syscall {nr}"),
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
        let what = if v.kind.is_special() {
            "recorded, not copied".to_string()
        } else if v.kind == VmaKind::SharedFile {
            "content in file".to_string()
        } else if pages == 0 {
            "nothing stored (untouched or clean)".to_string()
        } else {
            format!(
                "{} stored in {} run(s)",
                human(pages * m.host.page_size),
                v.pages.len()
            )
        };
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

    let _ = writeln!(*s, "files: {}", m.files.len());
    for f in &m.files {
        let _ = writeln!(
            s,
            "  {:<50} {:?} {} blake3 {}…{}{}",
            f.path,
            f.role,
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
        };
        let _ = writeln!(
            s,
            "  {:>4} flags {:#o}{} {}",
            fd.fd,
            fd.flags,
            if fd.cloexec { " cloexec" } else { "" },
            desc
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
