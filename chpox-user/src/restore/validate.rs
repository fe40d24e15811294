//! Everything that can be checked before a process is created: the image's
//! integrity, the CPU, the files the memory needs, the credentials. One
//! clear line per failure; nothing has started when one is reported.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{DataRef, FdKind, FileRef, FileRole, Metadata, ThreadState};
use crate::registers;

/// Where restore takes the content of one of the image's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSource {
    /// The file on disk, unchanged since the checkpoint.
    Disk,
    /// The copy in the image (the file changed, is gone, or was deleted).
    Embedded(DataRef),
    /// Nothing in the process needs it (a library embedded on request).
    Unused,
}

/// What validation found out, for the stages after it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One entry per `Metadata::files` entry.
    pub files: Vec<FileSource>,
    /// Deviations that do not stop the restore.
    pub warnings: Vec<String>,
}

pub fn validate(reader: &ImageReader) -> Result<Plan> {
    reader
        .verify_all()
        .map_err(|e| Error::Other(e.to_string()))?;
    let meta = reader.metadata();
    for p in meta.processes() {
        check_threads(&p.threads)?;
        check_cpu(&p.threads, registers::host_xfeatures().0)?;
    }
    check_creds(meta, nix::unistd::geteuid().as_raw())?;
    let mut warnings = Vec::new();
    let files = check_files(meta, &mut warnings)?;
    check_paths(meta)?;
    Ok(Plan { files, warnings })
}

fn check_threads(threads: &[ThreadState]) -> Result<()> {
    if threads.is_empty() {
        return Err(Error::Other("the image holds no thread".into()));
    }
    Ok(())
}

/// Name of an XSAVE state component (a bit of XCR0 / XSTATE_BV).
pub fn component_name(bit: u32) -> &'static str {
    match bit {
        0 => "x87",
        1 => "SSE",
        2 => "AVX",
        3 => "MPX bound registers",
        4 => "MPX bound config",
        5 => "AVX-512 opmask",
        6 => "AVX-512 ZMM_Hi256",
        7 => "AVX-512 Hi16_ZMM",
        8 => "processor trace",
        9 => "PKRU",
        10 => "PASID",
        11 => "CET user",
        12 => "CET supervisor",
        13 => "HDC",
        14 => "UINTR",
        15 => "LBR",
        16 => "HWP",
        17 => "AMX tile config",
        18 => "AMX tile data",
        19 => "APX",
        _ => "unknown",
    }
}

/// Every XSAVE component a thread holds state in must be enabled on this
/// CPU (`host_xcr0`), or the kernel refuses the XSAVE area.
pub fn check_cpu(threads: &[ThreadState], host_xcr0: u64) -> Result<()> {
    let used = threads
        .iter()
        .fold(0u64, |acc, t| acc | registers::xstate_bv(&t.xsave));
    let missing = used & !host_xcr0;
    if missing == 0 {
        return Ok(());
    }
    let names: Vec<String> = (0..64)
        .filter(|b| missing & (1u64 << b) != 0)
        .map(|b| format!("{} (XSAVE component {b})", component_name(b)))
        .collect();
    Err(Error::Other(format!(
        "this CPU lacks features the checkpointed process uses: {}; restore on a CPU that has them",
        names.join(", ")
    )))
}

/// A user may restore only their own processes; root, any.
pub fn check_creds(meta: &Metadata, euid: u32) -> Result<()> {
    for p in meta.processes() {
        let uid = p.process.creds.uid[0];
        if euid != 0 && euid != uid {
            return Err(Error::Other(format!(
                "the image holds a process of uid {uid} (PID {}); only root or uid {uid} may restore it",
                p.process.pid
            )));
        }
    }
    Ok(())
}

/// Every PID and TID of a tree must be free: they come back as they were.
pub fn check_pids_free(meta: &Metadata) -> Result<()> {
    let ids = meta
        .processes()
        .flat_map(|p| p.threads.iter().map(|t| t.tid))
        .chain(meta.zombies.iter().map(|z| z.pid));
    for id in ids {
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{id}/comm")) {
            return Err(Error::Other(format!(
                "PID {id} of the tree is in use (by {}); stop that process, or restore with --pid-ns",
                comm.trim_end()
            )));
        }
    }
    Ok(())
}

/// Indices of the files the restored memory needs.
fn referenced_files(meta: &Metadata) -> BTreeSet<usize> {
    let mut used = BTreeSet::new();
    for p in meta.processes() {
        used.extend(p.vmas.iter().filter_map(|v| v.file));
        used.extend(p.process.exe_file);
    }
    used
}

fn check_files(meta: &Metadata, warnings: &mut Vec<String>) -> Result<Vec<FileSource>> {
    let used = referenced_files(meta);
    let mut out = Vec::with_capacity(meta.files.len());
    for (i, f) in meta.files.iter().enumerate() {
        if !used.contains(&i) {
            out.push(FileSource::Unused);
            continue;
        }
        let source = match (f.deleted, check_file(f, warnings)) {
            (false, Ok(())) => FileSource::Disk,
            (_, result) => match (f.embedded, result) {
                (Some(data), _) => FileSource::Embedded(data),
                (None, Err(e)) => return Err(e),
                // Deleted at dump time but not embedded: should not happen
                // (the dump embeds deleted files), and the path names
                // another file now.
                (None, Ok(())) => {
                    return Err(Error::Other(format!(
                        "{} was deleted at checkpoint time and is not in the image",
                        crate::image::error::one_line(&f.path)
                    )));
                }
            },
        };
        out.push(source);
    }
    Ok(out)
}

fn refusal(f: &FileRef, what: String) -> Error {
    let option = if f.role == FileRole::Executable {
        "--embed-exe"
    } else {
        "--embed-all-libs"
    };
    Error::Other(format!(
        "{} {what}; restore with an image that embeds it (chpox dump {option})",
        crate::image::error::one_line(&f.path)
    ))
}

/// Whether the file at `f.path` is the one the checkpoint saw.
fn check_file(f: &FileRef, warnings: &mut Vec<String>) -> Result<()> {
    let md = match std::fs::metadata(&f.path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refusal(f, "no longer exists".into()));
        }
        Err(e) => return Err(refusal(f, format!("cannot be read ({e})"))),
    };
    if !md.is_file() {
        return Err(refusal(f, "is no longer a regular file".into()));
    }
    if md.size() != f.size {
        return Err(refusal(
            f,
            format!(
                "changed since the checkpoint (size {} → {})",
                f.size,
                md.size()
            ),
        ));
    }
    let hash = hash_path(&f.path).map_err(|e| refusal(f, format!("cannot be read ({e})")))?;
    if hash != f.blake3 {
        return Err(refusal(
            f,
            "changed since the checkpoint (same size, different content)".into(),
        ));
    }
    let mtime_ns = crate::files::mtime_ns(&md);
    if mtime_ns != f.mtime_ns {
        // Same bytes (the hash says so), touched or copied since: the memory
        // it backs is the same.
        warnings.push(format!(
            "{} has a new modification time but the same content as at the checkpoint",
            crate::image::error::one_line(&f.path)
        ));
    }
    Ok(())
}

fn hash_path(path: &str) -> std::io::Result<String> {
    File::open(path).and_then(crate::files::hash_reader)
}

/// The working directory and the files descriptors name must exist.
fn check_paths(meta: &Metadata) -> Result<()> {
    for p in meta.processes() {
        let cwd = &p.process.cwd;
        if !std::path::Path::new(cwd).is_dir() {
            return Err(Error::Other(format!(
                "the working directory {} no longer exists",
                crate::image::error::one_line(cwd)
            )));
        }
    }
    for fd in meta.processes().flat_map(|p| &p.fds) {
        let (path, what) = match &fd.kind {
            FdKind::RegularFile {
                path,
                embedded: None,
                ..
            } => (path, "file"),
            FdKind::Directory { path } => (path, "directory"),
            FdKind::CharDevice { path, .. } => (path, "device"),
            FdKind::Fifo { path, .. } => (path, "FIFO"),
            _ => continue,
        };
        if std::fs::metadata(path).is_err() {
            return Err(Error::Other(format!(
                "{what} {} (descriptor {}) no longer exists",
                crate::image::error::one_line(path),
                fd.fd
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::{GpRegs, SyscallState};

    fn thread_with_bv(bv: u64) -> ThreadState {
        let mut xsave = vec![0u8; 1024];
        xsave[512..520].copy_from_slice(&bv.to_le_bytes());
        ThreadState {
            tid: 1,
            regs: GpRegs::default(),
            xsave,
            sigmask: 0,
            syscall: SyscallState::None,
            sigaltstack: None,
            pending: Vec::new(),
            rseq: None,
            comm: "t".into(),
            clear_child_tid: None,
            robust_list: None,
        }
    }

    #[test]
    fn cpu_features_the_host_has_pass() {
        assert!(check_cpu(&[thread_with_bv(0b111)], 0b111).is_ok());
    }

    #[test]
    fn missing_cpu_features_are_named() {
        let threads = [thread_with_bv(0b11), thread_with_bv((1 << 17) | (1 << 18))];
        let err = check_cpu(&threads, 0b111)
            .expect_err("AMX missing")
            .to_string();
        assert!(
            err.contains("AMX tile config (XSAVE component 17)"),
            "{err}"
        );
        assert!(err.contains("AMX tile data (XSAVE component 18)"), "{err}");
    }
}
