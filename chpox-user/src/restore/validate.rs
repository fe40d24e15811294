//! Everything that can be checked before a process is created: the image's
//! integrity, the resources it needs, the CPU, the credentials, the files
//! the memory needs. One clear line per failure; nothing has started when
//! one is reported.
//!
//! # How far an image is trusted
//!
//! An image is checksummed, not signed: whoever can write the file can
//! change anything in it and seal it again. Restore therefore trusts an
//! image only as far as the owner of the image file could have made it
//! ([`trust()`]):
//!
//! - A restorer that is not root restores with its own rights, as before:
//!   it may restore only processes of its own uid, and the kernel refuses
//!   it every file, limit and credential it does not have.
//! - Root restoring an image root owns restores it as saved.
//! - Root restoring an image another user owns restores it **as that
//!   user** ([`Trust::Owner`]): the result is what the user would get by
//!   restoring the image themselves.
//!   - Credentials: every uid of every process must be the owner's, every
//!     gid and supplementary group one the owner has (the file's group, or
//!     one of the owner's groups in the user database). An image that
//!     claims more is refused, in one line naming the process and the ids,
//!     and mentioning `--trust-image`: forcing the ids down would silently
//!     change a program that relies on them. The restored processes end
//!     with no capabilities (`process::restore_creds`).
//!   - Files: every file is read, checked and opened with the owner's file
//!     rights — the files the memory maps (opened by the restored process
//!     itself, which takes the owner's filesystem identity before it opens
//!     anything: `process::enter_fs_identity`), its working directory, and
//!     every file, directory, device and FIFO a descriptor names (opened by
//!     the restorer under `crate::creds::as_user`, `fds`). One the owner may
//!     not open is refused in one line mentioning `--trust-image`.
//!   - Limits and scheduling: a hard limit is never raised above the one
//!     the restored process inherits from the restorer, and the nice value
//!     goes no lower than `RLIMIT_NICE` lets an unprivileged process set
//!     (never below 0 with the usual limit of 0), `oom_score_adj` is never
//!     lowered, and no more memory is locked than the process's
//!     `RLIMIT_MEMLOCK` allows (`process::apply_vma_flags`); each
//!     adjustment is a warning, as for a restorer that is not root. The
//!     scheduling policy is not restored at all (the process keeps the
//!     restorer's).
//!   - PIDs: chosen with `clone3`'s `set_tid` as for any image; that needs
//!     root, and gives the user nothing.
//! - An image file that users other than its owner may write (group or
//!   other write permission) could have been made by any of them: root
//!   refuses it.
//! - `--trust-image` restores as saved, whoever owns the file: root says
//!   it trusts the content.
//!
//! # Resources
//!
//! Before anything else, the counts the image asks for are checked against
//! what this system and the restorer may have ([`check_counts`]): tasks
//! (threads, processes and zombies) against `kernel.pid_max`,
//! `kernel.threads-max` and, for a restorer that is not root,
//! `RLIMIT_NPROC`; descriptors against `RLIMIT_NOFILE`; mappings against
//! `vm.max_map_count`. An image of 100 000 threads is refused here, not
//! after thousands of threads were made.

use crate::creds::as_user;
use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{DataRef, Metadata, ThreadState};
use crate::registers;

mod files;
mod limits;
mod trust;

pub use files::{ContentChecks, shared_state_files};
use files::{check_files, check_paths};
pub use limits::{HostLimits, check_counts};
pub use trust::{Owner, Trust, beyond_owner, check_owner_creds, trust};

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
    /// Files read from disk whose content is still to be compared with the
    /// checkpoint's (see [`ContentChecks`]).
    pub content: ContentChecks,
}

pub fn validate(reader: &ImageReader, trust: &Trust) -> Result<Plan> {
    let meta = reader.metadata();
    check_counts(meta, &HostLimits::read())?;
    // Page runs are verified while memory is filled (see `restore`).
    reader
        .verify_except_pages()
        .map_err(|e| Error::Other(e.to_string()))?;
    for p in meta.processes() {
        check_threads(&p.threads)?;
        check_cpu(&p.threads, registers::host_xfeatures().0)?;
    }
    let owner = trust.owner();
    match owner {
        None => check_creds(meta, nix::unistd::geteuid().as_raw())?,
        Some(owner) => check_owner_creds(meta, owner)?,
    }
    let mut warnings = Vec::new();
    let mut content = ContentChecks::default();
    // Restoring as the image's owner, files are read with their rights,
    // which only the check here has.
    let later = owner.is_none().then_some(&mut content);
    let files = with_rights(owner, || check_files(meta, owner, later, &mut warnings))?;
    with_rights(owner, || check_paths(meta, owner))?;
    Ok(Plan {
        files,
        warnings,
        content,
    })
}

/// Run `f` with the owner's file rights, or ours when there is no owner.
fn with_rights<R: Send>(owner: Option<&Owner>, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    match owner {
        None => f(),
        Some(o) => as_user(&o.file_creds(), f).map_err(|e| {
            Error::Other(format!(
                "cannot take the file rights of uid {}, the owner of the image: {e}",
                o.uid
            ))
        })?,
    }
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
