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
//! ([`trust`]):
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

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;

use crate::creds::{UserCreds, as_user};
use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{Credentials, DataRef, FdKind, FileRef, FileRole, Metadata, ThreadState};
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
    /// Files read from disk whose content is still to be compared with the
    /// checkpoint's (see [`ContentChecks`]).
    pub content: ContentChecks,
}

/// The content of files the processes map from disk, compared with the
/// checkpoint's hashes while the processes are rebuilt (hashing a
/// program and its libraries takes milliseconds, most of the time to
/// running of a small `--lazy` restore). Only files that exist with
/// their saved size and have no copy in the image are left for later: a
/// mismatch then has only one outcome, the restore fails, and
/// [`ContentChecks::run`] must succeed before any process runs.
#[derive(Debug, Clone, Default)]
pub struct ContentChecks {
    files: Vec<FileRef>,
}

impl ContentChecks {
    /// Compare every file; the warnings for files touched since, or the
    /// first refusal.
    pub fn run(&self) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for f in &self.files {
            check_content(f, &mut warnings).map_err(|r| r.into_error(f))?;
        }
        Ok(warnings)
    }
}

/// How far restore trusts an image: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Everything the image says, within the restorer's own rights.
    Full,
    /// Root restoring another user's image: only what that user could have.
    Owner(Owner),
}

impl Trust {
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            Trust::Full => None,
            Trust::Owner(o) => Some(o),
        }
    }
}

/// The user an image is restored as: the owner of the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// The image file's group.
    pub gid: u32,
    /// Every group id the owner may hold: the file's group (its owner may
    /// give it only a group they are in), and the owner's primary and
    /// supplementary groups in the user database. Sorted.
    pub groups: Vec<u32>,
}

impl Owner {
    /// The owner of a file of uid `uid` and group `gid`, with their groups.
    pub fn new(uid: u32, gid: u32) -> Owner {
        let mut groups = vec![gid];
        if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            groups.push(user.gid.as_raw());
            if let Ok(name) = std::ffi::CString::new(user.name.as_bytes())
                && let Ok(list) = nix::unistd::getgrouplist(&name, user.gid)
            {
                groups.extend(list.iter().map(|g| g.as_raw()));
            }
        }
        groups.sort_unstable();
        groups.dedup();
        Owner { uid, gid, groups }
    }

    /// The owner's file identity, for checks that concern the whole image.
    pub fn file_creds(&self) -> UserCreds {
        UserCreds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// The file identity of a process of the image, whose credentials
    /// [`check_owner_creds`] found to be the owner's.
    pub fn creds_of(creds: &Credentials) -> UserCreds {
        UserCreds {
            uid: creds.uid[3],
            gid: creds.gid[3],
            groups: creds.groups.clone(),
        }
    }

    fn may_have_gid(&self, gid: u32) -> bool {
        self.groups.binary_search(&gid).is_ok()
    }
}

/// The end of every refusal of something the image's owner may not have.
pub fn beyond_owner(owner: &Owner, what: &str) -> Error {
    Error::Other(format!(
        "{what}: more than uid {uid}, the owner of the image file, may have; root restores another user's image with that user's rights only (restore it as uid {uid}, or with --trust-image if you trust its content)",
        uid = owner.uid
    ))
}

/// How far to trust the image read from `image` (the file already open,
/// so what is judged is what is read).
pub fn trust(image: &File, trust_image: bool) -> Result<Trust> {
    if trust_image || !nix::unistd::geteuid().is_root() {
        return Ok(Trust::Full);
    }
    let md = image
        .metadata()
        .map_err(|e| Error::Other(format!("cannot tell who owns the image: {e}")))?;
    if md.mode() & 0o022 != 0 {
        return Err(Error::Other(format!(
            "the image file is writable by others than its owner (mode {:o}): anyone of them could have made it; make it writable by its owner only, or restore with --trust-image if you trust its content",
            md.mode() & 0o7777
        )));
    }
    if md.uid() == 0 {
        return Ok(Trust::Full);
    }
    Ok(Trust::Owner(Owner::new(md.uid(), md.gid())))
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
        let needed = super::fds::descriptions_needed(meta) as u64;
        if host.open_fds + needed + EXTRA_FDS > nofile {
            return Err(Error::Other(format!(
                "the image holds {needed} open files, pipes and sockets; with the {} this restorer has open, more than its open-file limit {nofile} (RLIMIT_NOFILE); raise it (ulimit -n) and retry",
                host.open_fds
            )));
        }
    }
    Ok(())
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

/// Root restoring another user's image: every process must have only
/// credentials that user could have.
pub fn check_owner_creds(meta: &Metadata, owner: &Owner) -> Result<()> {
    let ids = |ids: &[u32; 4]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join("/");
    for p in meta.processes() {
        let c = &p.process.creds;
        let pid = p.process.pid;
        if c.uid.iter().any(|&u| u != owner.uid) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "PID {pid} of the image claims uids {} (real/effective/saved/filesystem)",
                    ids(&c.uid)
                ),
            ));
        }
        if c.gid.iter().any(|&g| !owner.may_have_gid(g)) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "PID {pid} of the image claims gids {} (real/effective/saved/filesystem)",
                    ids(&c.gid)
                ),
            ));
        }
        if let Some(g) = c.groups.iter().find(|&&g| !owner.may_have_gid(g)) {
            return Err(beyond_owner(
                owner,
                &format!("PID {pid} of the image claims supplementary group {g}"),
            ));
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

/// Files mapped `MAP_SHARED` by a process that may write them (`mw` in
/// the mapping's VmFlags; a shared mapping gets it only when the file was
/// opened for writing): their content is state the processes share with
/// the file (a JVM's `/tmp/hsperfdata_USER/PID`, a database file), written
/// on after the checkpoint, not a library that must be unchanged. For each,
/// the length the mappings need it to have.
pub fn shared_state_files(meta: &Metadata) -> std::collections::BTreeMap<usize, u64> {
    let mut out = std::collections::BTreeMap::new();
    for v in meta.processes().flat_map(|p| p.vmas.iter()) {
        let may_write = if v.vm_flags.is_empty() {
            v.write
        } else {
            v.vm_flags.iter().any(|f| f == "mw")
        };
        if let (crate::image::model::VmaKind::SharedFile, Some(i), true) =
            (v.kind, v.file, may_write)
        {
            let needed = v.offset.saturating_add(v.end.saturating_sub(v.start));
            let len = out.entry(i).or_insert(0);
            *len = needed.max(*len);
        }
    }
    out
}

/// A shared-state file (see [`shared_state_files`]) is used as it is now,
/// whatever its content, if it still is a regular file long enough for its
/// mappings (a shorter one would kill the process with SIGBUS).
fn check_shared_state(f: &FileRef, needed: u64) -> std::result::Result<(), Refusal> {
    let md = match std::fs::metadata(&f.path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::Other(
                "(mapped shared and writable) no longer exists".into(),
            ));
        }
        Err(e) => return Err(read_error(e)),
    };
    if !md.is_file() {
        return Err(Refusal::Other("is no longer a regular file".into()));
    }
    if md.size() < needed {
        return Err(Refusal::Other(format!(
            "(mapped shared and writable) is now {} bytes, shorter than the {needed} its mappings reach",
            md.size()
        )));
    }
    Ok(())
}

/// With `later`, the content of files that can only be read from disk is
/// left to it.
fn check_files(
    meta: &Metadata,
    owner: Option<&Owner>,
    mut later: Option<&mut ContentChecks>,
    warnings: &mut Vec<String>,
) -> Result<Vec<FileSource>> {
    let used = referenced_files(meta);
    let shared_state = shared_state_files(meta);
    let mut out = Vec::with_capacity(meta.files.len());
    for (i, f) in meta.files.iter().enumerate() {
        if !used.contains(&i) {
            out.push(FileSource::Unused);
            continue;
        }
        let checked = match (shared_state.get(&i), later.as_deref_mut()) {
            (Some(&needed), _) if !f.deleted => check_shared_state(f, needed),
            (None, Some(later)) if !f.deleted && f.embedded.is_none() => {
                let quick = check_kind_and_size(f);
                if quick.is_ok() {
                    later.files.push(f.clone());
                }
                quick
            }
            _ => check_file(f, warnings),
        };
        // A copy in the image is the owner's own content; a file on disk
        // they may not read is not.
        if let (Some(owner), Err(Refusal::Denied(e)), None) = (owner, &checked, f.embedded) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "the memory of the image maps {}, which cannot be read ({e})",
                    crate::image::error::one_line(&f.path)
                ),
            ));
        }
        let source = match (f.deleted, checked.map_err(|r| r.into_error(f))) {
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

/// Why a file of the image cannot be used from disk.
enum Refusal {
    /// Access denied (to the image's owner, when restoring as them).
    Denied(std::io::Error),
    /// Gone, changed, unreadable for another reason.
    Other(String),
}

impl Refusal {
    fn into_error(self, f: &FileRef) -> Error {
        match self {
            Refusal::Denied(e) => refusal(f, format!("cannot be read ({e})")),
            Refusal::Other(what) => refusal(f, what),
        }
    }
}

fn read_error(e: std::io::Error) -> Refusal {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Refusal::Denied(e)
    } else {
        Refusal::Other(format!("cannot be read ({e})"))
    }
}

/// Whether the file at `f.path` is the one the checkpoint saw.
fn check_file(f: &FileRef, warnings: &mut Vec<String>) -> std::result::Result<(), Refusal> {
    check_kind_and_size(f)?;
    check_content(f, warnings)
}

/// Whether `f.path` is a regular file of the saved size.
fn check_kind_and_size(f: &FileRef) -> std::result::Result<(), Refusal> {
    let md = match std::fs::metadata(&f.path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::Other("no longer exists".into()));
        }
        Err(e) => return Err(read_error(e)),
    };
    if !md.is_file() {
        return Err(Refusal::Other("is no longer a regular file".into()));
    }
    if md.size() != f.size {
        return Err(Refusal::Other(format!(
            "changed since the checkpoint (size {} → {})",
            f.size,
            md.size()
        )));
    }
    Ok(())
}

/// Whether `f.path` has the saved content (a new modification time alone
/// is a warning).
fn check_content(f: &FileRef, warnings: &mut Vec<String>) -> std::result::Result<(), Refusal> {
    let md = std::fs::metadata(&f.path).map_err(read_error)?;
    if md.size() != f.size {
        return Err(Refusal::Other(format!(
            "changed since the checkpoint (size {} → {})",
            f.size,
            md.size()
        )));
    }
    let hash = hash_path(&f.path).map_err(read_error)?;
    if hash != f.blake3 {
        return Err(Refusal::Other(
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

/// The working directory and the files descriptors name must exist (and,
/// restoring as the image's owner, be theirs to reach).
fn check_paths(meta: &Metadata, owner: Option<&Owner>) -> Result<()> {
    let denied = |what: String, e: &std::io::Error| match owner {
        Some(o) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Some(beyond_owner(o, &format!("{what} ({e})")))
        }
        _ => None,
    };
    for p in meta.processes().filter(|p| !p.process.attrs.cwd_deleted) {
        let cwd = &p.process.cwd;
        let shown = crate::image::error::one_line(cwd);
        let gone = || Error::Other(format!("the working directory {shown} no longer exists"));
        match std::fs::metadata(cwd) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(gone()),
            Err(e) => {
                let reach = format!(
                    "PID {} of the image works in {shown}, which cannot be reached",
                    p.process.pid
                );
                return Err(denied(reach, &e).unwrap_or_else(gone));
            }
        }
    }
    for (p, fd) in meta
        .processes()
        .flat_map(|p| p.fds.iter().map(move |fd| (p, fd)))
    {
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
        let shown = crate::image::error::one_line(path);
        if let Err(e) = std::fs::metadata(path) {
            let reach = format!(
                "descriptor {} of PID {} names the {what} {shown}, which cannot be reached",
                fd.fd, p.process.pid
            );
            return Err(denied(reach, &e).unwrap_or_else(|| {
                Error::Other(format!(
                    "{what} {shown} (descriptor {}) no longer exists",
                    fd.fd
                ))
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::{GpRegs, SyscallState};
    use crate::image::testutil::sample_metadata;

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

    fn nobody() -> Owner {
        Owner {
            uid: 65534,
            gid: 65534,
            groups: vec![100, 65534],
        }
    }

    fn with_creds(uid: [u32; 4], gid: [u32; 4], groups: Vec<u32>) -> Metadata {
        let mut meta = sample_metadata();
        meta.root.process.creds = Credentials { uid, gid, groups };
        meta
    }

    #[test]
    fn files_mapped_shared_and_writable_are_state_not_libraries() {
        let mut meta = sample_metadata();
        let state = shared_state_files(&meta);
        // The rw-s mapping of file 2 (one page); the libraries mapped
        // private are not state, though they may be written (mw).
        assert_eq!(state.into_iter().collect::<Vec<_>>(), [(2, 0x1000)]);
        // A shared mapping of a file opened read-only has no mw.
        for v in &mut meta.root.vmas {
            if v.kind == crate::image::model::VmaKind::SharedFile {
                v.vm_flags.retain(|f| f != "mw");
                v.write = false;
            }
        }
        assert!(shared_state_files(&meta).is_empty());
    }

    #[test]
    fn a_users_image_may_claim_only_the_users_ids() {
        let owner = nobody();
        let ok = with_creds([65534; 4], [65534, 100, 100, 65534], vec![100]);
        assert!(check_owner_creds(&ok, &owner).is_ok());
        for (meta, shown) in [
            (
                with_creds([65534, 0, 0, 0], [65534; 4], vec![]),
                "uids 65534/0/0/0",
            ),
            (
                with_creds([65534; 4], [65534, 0, 65534, 65534], vec![]),
                "gids 65534/0/65534/65534",
            ),
            (
                with_creds([65534; 4], [65534; 4], vec![100, 0]),
                "supplementary group 0",
            ),
        ] {
            let err = check_owner_creds(&meta, &owner)
                .expect_err(shown)
                .to_string();
            assert!(err.contains(shown), "{err}");
            assert!(err.contains("--trust-image"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
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
