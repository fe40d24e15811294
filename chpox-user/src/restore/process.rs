//! Process-wide state: the mm fields and auxv (`PR_SET_MM_MAP`, with the
//! executable), working directory, umask, resource limits, personality,
//! nice value, and credentials (last: dropping root ends what the child may
//! do for us). Names are per thread: `threads::setup`.
//!
//! Restoring another user's image as root (`validate::Trust::Owner`, see
//! `validate` for the rules), a process takes its filesystem identity
//! first ([`enter_fs_identity`]: every file it opens, maps or enters is
//! then checked by the kernel against the owner's rights, while it keeps
//! the privileges the restore needs — choosing TIDs, `PR_SET_MM_MAP`); its
//! limits and nice value are held to what that user could set without
//! privileges ([`owner_nice`], [`owner_limit`]); and it ends without
//! capabilities ([`restore_creds`]).

use tracing::{debug, warn};

use super::Context;
use super::child::{ARGS_AT, Child, errno_of};
use crate::error::{Error, Result};
use crate::image::model::{Credentials, ProcessAttrs, Rlimit, SeccompFilter, Vma};

const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
/// `sizeof(struct prctl_mm_map)`.
const PRCTL_MM_MAP_SIZE: usize = 104;
/// Bytes the kernel keeps of an auxv (`sizeof(mm->saved_auxv)` is
/// AT_VECTOR_SIZE words; 2 * (3 + 22 + 1) on x86-64 today).
const MAX_AUXV_BYTES: usize = 2 * (3 + 22 + 1) * 8;

/// Scratch offsets: the struct after the path area, the auxv after it.
const MM_MAP_AT: u64 = ARGS_AT;
const AUXV_AT: u64 = ARGS_AT + 256;

fn note(warnings: &mut Vec<String>, w: String) {
    warn!("{w}");
    warnings.push(w);
}

/// `PR_SET_MM_MAP`: code/data/brk/stack/args/env bounds, auxv, and the
/// executable (`/proc/PID/exe`) from `exe_fd`.
pub fn set_mm(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    exe_fd: Option<i32>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let info = &ctx.image.process;
    let mut auxv: Vec<u8> = Vec::new();
    for &(k, v) in &info.auxv {
        auxv.extend_from_slice(&k.to_ne_bytes());
        auxv.extend_from_slice(&v.to_ne_bytes());
    }
    auxv.extend_from_slice(&[0u8; 16]);
    if auxv.len() > MAX_AUXV_BYTES {
        note(
            warnings,
            format!(
                "the auxiliary vector has {} entries, more than the kernel keeps; the rest is dropped",
                info.auxv.len()
            ),
        );
        auxv.truncate(MAX_AUXV_BYTES - 16);
        auxv.extend_from_slice(&[0u8; 16]);
    }
    let auxv_addr = c.put(AUXV_AT, &auxv)?;
    let mm = &info.mm;
    let build = |exe: u32| {
        let mut s = Vec::with_capacity(PRCTL_MM_MAP_SIZE);
        for w in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv_addr,
        ] {
            s.extend_from_slice(&w.to_ne_bytes());
        }
        s.extend_from_slice(&(auxv.len() as u32).to_ne_bytes());
        s.extend_from_slice(&exe.to_ne_bytes());
        s
    };
    let exe = exe_fd.map_or(u32::MAX, |fd| fd as u32);
    let addr = c.put(MM_MAP_AT, &build(exe))?;
    let args = [
        PR_SET_MM,
        PR_SET_MM_MAP,
        addr,
        PRCTL_MM_MAP_SIZE as u64,
        0,
        0,
    ];
    let ret = c.raw(libc::SYS_prctl, args)?;
    if ret == 0 {
        return Ok(());
    }
    if exe != u32::MAX {
        // The kernel may refuse the executable (a memfd of an embedded
        // one, say) but accept the rest.
        c.put(MM_MAP_AT, &build(u32::MAX))?;
        if c.raw(libc::SYS_prctl, args)? == 0 {
            note(
                warnings,
                format!(
                    "the kernel refused to set the executable ({}); /proc/PID/exe names chpox",
                    errno_of(ret)
                ),
            );
            return Ok(());
        }
    }
    Err(Error::Other(format!(
        "prctl(PR_SET_MM_MAP) failed: {}",
        errno_of(ret)
    )))
}

/// cwd, umask, personality, nice, parent-death signal, subreaper flag.
pub fn restore_state(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let info = &ctx.image.process;
    if info.attrs.cwd_deleted {
        enter_deleted_cwd(c, &info.cwd, info.attrs.cwd_mode, info.pid, warnings)?;
    } else {
        let cwd = c.put_path(&info.cwd)?;
        let ret = c.raw(libc::SYS_chdir, [cwd, 0, 0, 0, 0, 0])?;
        if ret < 0 {
            return Err(Error::File {
                path: info.cwd.clone(),
                source: errno_of(ret),
            });
        }
    }
    c.call(
        "umask",
        libc::SYS_umask,
        [u64::from(info.umask), 0, 0, 0, 0, 0],
    )?;
    let ret = c.raw(
        libc::SYS_personality,
        [u64::from(info.personality), 0, 0, 0, 0, 0],
    )?;
    if ret < 0 {
        note(
            warnings,
            format!(
                "cannot set personality {:#x}: {}",
                info.personality,
                errno_of(ret)
            ),
        );
    }
    let nice = match ctx.owner {
        None => info.sched.nice,
        Some(owner) => {
            let nice = owner_nice(info.sched.nice, nice_limit(&info.rlimits));
            if nice != info.sched.nice {
                note(
                    warnings,
                    format!(
                        "nice value {} needs a privilege uid {}, the owner of the image, lacks; the process runs at nice {nice}",
                        info.sched.nice, owner.uid
                    ),
                );
            }
            nice
        }
    };
    let ret = c.raw(
        libc::SYS_setpriority,
        [libc::PRIO_PROCESS as u64, 0, nice as i64 as u64, 0, 0, 0],
    )?;
    if ret < 0 {
        note(
            warnings,
            format!("cannot set nice value {nice}: {}", errno_of(ret)),
        );
    }
    // The restorer's parent-death signal goes; the process's own comes back.
    c.call(
        "prctl(PR_SET_PDEATHSIG)",
        libc::SYS_prctl,
        [
            libc::PR_SET_PDEATHSIG as u64,
            info.pdeath_signal.max(0) as u64,
            0,
            0,
            0,
            0,
        ],
    )?;
    if info.child_subreaper {
        c.call(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            libc::SYS_prctl,
            [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// A working directory that had been removed comes back removed: a new
/// directory with the saved mode is made, entered and removed again. It
/// takes the saved path when that is free (so /proc/PID/cwd reads as it
/// did), else a fresh name beside it, else in /tmp.
fn enter_deleted_cwd(
    c: &mut Child<'_>,
    path: &str,
    mode: u32,
    pid: i32,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let parent = std::path::Path::new(path)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let candidates = [
        path.to_string(),
        format!("{}/.chpox-cwd-{pid}", parent.trim_end_matches('/')),
        format!("/tmp/.chpox-cwd-{pid}"),
    ];
    for (i, dir) in candidates.iter().enumerate() {
        let addr = c.put_path(dir)?;
        if c.raw(libc::SYS_mkdir, [addr, 0o700, 0, 0, 0, 0])? < 0 {
            continue;
        }
        // mkdir's mode passes through the umask; chmod's does not.
        c.raw(
            libc::SYS_chmod,
            [addr, u64::from(mode & 0o7777), 0, 0, 0, 0],
        )?;
        let entered = c.raw(libc::SYS_chdir, [addr, 0, 0, 0, 0, 0])?;
        let removed = c.raw(libc::SYS_rmdir, [addr, 0, 0, 0, 0, 0])?;
        if entered < 0 {
            continue;
        }
        if removed < 0 {
            note(
                warnings,
                format!(
                    "the removed working directory {path} was made again as {dir} but cannot be removed: {}",
                    errno_of(removed)
                ),
            );
        } else if i > 0 {
            note(
                warnings,
                format!("the removed working directory {path} comes back removed, named {dir}"),
            );
        }
        return Ok(());
    }
    Err(Error::Other(format!(
        "cannot make a working directory to stand for the removed {path}"
    )))
}

/// The nice value a process of an unprivileged user gets for its `saved`
/// one: no lower than its `RLIMIT_NICE` lets it go (`20 - limit`, the
/// kernel's `can_nice`), but never forced above 0, where a login starts.
pub fn owner_nice(saved: i32, rlimit_nice: u64) -> i32 {
    let floor = 20 - rlimit_nice.min(40) as i32;
    saved.max(floor.min(0)).clamp(-20, 19)
}

/// The `RLIMIT_NICE` (soft) the process will have, its saved one held
/// below the restorer's hard limit (see [`owner_limit`]).
fn nice_limit(limits: &[Rlimit]) -> u64 {
    let ours =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE).unwrap_or((0, 0));
    limits
        .iter()
        .find(|l| l.resource == libc::RLIMIT_NICE)
        .map_or(ours.0, |l| owner_limit(l.soft, l.hard, ours.1).0)
}

/// A saved limit (`soft`, `hard`) as an unprivileged process that inherited
/// hard limit `current_hard` may set it: the hard limit may only go down,
/// the soft one stays within it.
pub fn owner_limit(soft: u64, hard: u64, current_hard: u64) -> (u64, u64) {
    let hard = hard.min(current_hard);
    (soft.min(hard), hard)
}

/// Resource limits, once every descriptor, mapping and thread exists (a
/// lowered limit could refuse them: the process got them before lowering
/// it). With `owner` (root restoring another user's image), no hard limit
/// is raised above what the process inherited.
pub fn restore_rlimits(
    c: &mut Child<'_>,
    limits: &[Rlimit],
    owner: Option<&super::validate::Owner>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    const NEW_AT: u64 = ARGS_AT;
    let pair = |soft: u64, hard: u64| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&soft.to_ne_bytes());
        b[8..].copy_from_slice(&hard.to_ne_bytes());
        b
    };
    for l in limits {
        let (mut soft, mut hard) = (l.soft, l.hard);
        if let Some(owner) = owner {
            let current = current_hard(c, l.resource)?;
            (soft, hard) = owner_limit(l.soft, l.hard, current);
            if hard != l.hard {
                note(
                    warnings,
                    format!(
                        "uid {}, the owner of the image, may not raise the hard limit {} to {}; keeping {}",
                        owner.uid,
                        l.name,
                        show_limit(l.hard),
                        show_limit(hard)
                    ),
                );
            }
        }
        let new_addr = c.put(NEW_AT, &pair(soft, hard))?;
        let args = [0, u64::from(l.resource), new_addr, 0, 0, 0];
        let ret = c.raw(libc::SYS_prlimit64, args)?;
        if ret == 0 {
            continue;
        }
        if ret != -(libc::EPERM as i64) {
            note(
                warnings,
                format!("cannot set limit {}: {}", l.name, errno_of(ret)),
            );
            continue;
        }
        // Raising a hard limit needs CAP_SYS_RESOURCE: keep the current
        // hard limit, and the soft one within it.
        let current = current_hard(c, l.resource)?;
        c.put(NEW_AT, &pair(soft.min(current), current))?;
        let ret = c.raw(
            libc::SYS_prlimit64,
            [0, u64::from(l.resource), new_addr, 0, 0, 0],
        )?;
        note(
            warnings,
            format!(
                "cannot raise the hard limit {} to {} (no CAP_SYS_RESOURCE); keeping {}{}",
                l.name,
                show_limit(hard),
                show_limit(current),
                if ret < 0 {
                    format!(" (and setting the soft limit failed: {})", errno_of(ret))
                } else {
                    String::new()
                }
            ),
        );
    }
    Ok(())
}

/// The hard limit `resource` of the process now.
fn current_hard(c: &mut Child<'_>, resource: u32) -> Result<u64> {
    const OLD_AT: u64 = ARGS_AT + 16;
    let old_addr = c.put(OLD_AT, &[0u8; 16])?;
    c.call(
        "prlimit64",
        libc::SYS_prlimit64,
        [0, u64::from(resource), 0, old_addr, 0, 0],
    )?;
    let mut old = [0u8; 16];
    c.get(OLD_AT, &mut old)?;
    let mut hard = [0u8; 8];
    hard.copy_from_slice(&old[8..]);
    Ok(u64::from_ne_bytes(hard))
}

fn show_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Take the filesystem identity of `creds` (fsuid, fsgid, supplementary
/// groups) in the calling thread of the child, before it opens anything:
/// from then on the kernel checks every path it opens, maps or enters
/// against that user's rights. The thread keeps its other privileges, and
/// the threads it makes inherit the identity.
pub fn enter_fs_identity(c: &mut Child<'_>, creds: &Credentials) -> Result<()> {
    set_groups(c, &creds.groups)?;
    let [_, _, _, fsuid] = creds.uid;
    let [_, _, _, fsgid] = creds.gid;
    // setfsuid and setfsgid return the previous id, never an error; -1
    // changes nothing and tells the current one.
    c.raw(libc::SYS_setfsgid, [fsgid.into(), 0, 0, 0, 0, 0])?;
    c.raw(libc::SYS_setfsuid, [fsuid.into(), 0, 0, 0, 0, 0])?;
    let now_gid = c.raw(libc::SYS_setfsgid, [u64::from(u32::MAX), 0, 0, 0, 0, 0])?;
    let now_uid = c.raw(libc::SYS_setfsuid, [u64::from(u32::MAX), 0, 0, 0, 0, 0])?;
    if now_uid != i64::from(fsuid) || now_gid != i64::from(fsgid) {
        return Err(Error::Other(format!(
            "the restored process cannot take the file identity of uid {fsuid} gid {fsgid}"
        )));
    }
    Ok(())
}

/// Groups, gids, uids as saved, if they differ from the child's (the
/// restorer's). Then the process is made dumpable again (a uid change
/// clears it), as an ordinary process of that user is. A process that
/// keeps no uid 0 keeps no capability either: the kernel drops them with
/// the uids, and the inheritable ones (and any a `SECBIT_KEEP_CAPS`
/// restorer would keep) are cleared here.
pub fn restore_creds(c: &mut Child<'_>, creds: &Credentials) -> Result<()> {
    let (mut ruid, mut euid, mut suid) = (0, 0, 0);
    let (mut rgid, mut egid, mut sgid) = (0, 0, 0);
    // SAFETY: each writes three integers we own.
    unsafe {
        libc::getresuid(&mut ruid, &mut euid, &mut suid);
        libc::getresgid(&mut rgid, &mut egid, &mut sgid);
    }
    let mut groups = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<u32>>())
        .unwrap_or_default();
    groups.sort_unstable();
    let mut want_groups = creds.groups.clone();
    want_groups.sort_unstable();
    let same_uids = [ruid, euid, suid] == creds.uid[..3];
    let same_gids = [rgid, egid, sgid] == creds.gid[..3];
    if same_uids && same_gids && groups == want_groups {
        debug!("credentials are the restorer's already");
        return Ok(());
    }
    if groups != want_groups {
        set_groups(c, &creds.groups)?;
    }
    // Groups before users: setresuid ends the right to change either.
    let steps = [
        (
            creds.gid,
            ("setresgid", libc::SYS_setresgid),
            ("setfsgid", libc::SYS_setfsgid),
        ),
        (
            creds.uid,
            ("setresuid", libc::SYS_setresuid),
            ("setfsuid", libc::SYS_setfsuid),
        ),
    ];
    for ([r, e, s, fs], (set_res, set_res_nr), (set_fs, set_fs_nr)) in steps {
        c.call(set_res, set_res_nr, [r.into(), e.into(), s.into(), 0, 0, 0])?;
        if fs != e {
            c.call(set_fs, set_fs_nr, [fs.into(), 0, 0, 0, 0, 0])?;
        }
    }
    if creds.uid.iter().all(|&u| u != 0) {
        drop_capabilities(c)?;
    }
    c.call(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// `capset` with every set empty (which needs no privilege): the thread
/// ends with no permitted, effective, inheritable or ambient capability.
fn drop_capabilities(c: &mut Child<'_>) -> Result<()> {
    /// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&VERSION_3.to_ne_bytes());
    // pid 0: the calling thread.
    let header_addr = c.put(ARGS_AT, &header)?;
    let data_addr = c.put(ARGS_AT + 8, &[0u8; 24])?;
    c.call(
        "capset",
        libc::SYS_capset,
        [header_addr, data_addr, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// `setgroups(groups)` in the child.
fn set_groups(c: &mut Child<'_>, groups: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let addr = c.put(ARGS_AT, &bytes)?;
    c.call(
        "setgroups",
        libc::SYS_setgroups,
        [groups.len() as u64, addr, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// The madvise and mlock state of each mapping, from its VmFlags: what
/// `madvise` (dontfork, wipeonfork, hugepage, nohugepage, dontdump,
/// mergeable) and `mlock`/`mlock2(MLOCK_ONFAULT)` set. Once the memory is
/// in place; a flag the kernel refuses here is a warning.
pub fn apply_vma_flags(c: &mut Child<'_>, vmas: &[Vma], warnings: &mut Vec<String>) -> Result<()> {
    const MADVISE: [(&str, i32, &str); 6] = [
        ("dc", libc::MADV_DONTFORK, "MADV_DONTFORK"),
        ("wf", libc::MADV_WIPEONFORK, "MADV_WIPEONFORK"),
        ("hg", libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
        ("nh", libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
        ("dd", libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
        ("mg", libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
    ];
    const MLOCK_ONFAULT: u64 = 1;
    for v in vmas.iter().filter(|v| !v.kind.is_special()) {
        let has = |f: &str| v.vm_flags.iter().any(|x| x == f);
        let len = v.end - v.start;
        for (flag, advice, name) in MADVISE {
            // Device memory is "dd" by the kernel's doing, not the program's.
            if !has(flag) || (flag == "dd" && (has("io") || has("pf"))) {
                continue;
            }
            let ret = c.raw(libc::SYS_madvise, [v.start, len, advice as u64, 0, 0, 0])?;
            if ret < 0 {
                note(
                    warnings,
                    format!(
                        "cannot set {name} on {:#x}-{:#x}: {}",
                        v.start,
                        v.end,
                        errno_of(ret)
                    ),
                );
            }
        }
        let ret = if has("lf") {
            c.raw(libc::SYS_mlock2, [v.start, len, MLOCK_ONFAULT, 0, 0, 0])?
        } else if has("lo") {
            c.raw(libc::SYS_mlock, [v.start, len, 0, 0, 0, 0])?
        } else {
            0
        };
        if ret < 0 {
            note(
                warnings,
                format!(
                    "cannot lock {:#x}-{:#x} in memory: {}",
                    v.start,
                    v.end,
                    errno_of(ret)
                ),
            );
        }
    }
    Ok(())
}

/// What must come last, once credentials are set (which reset
/// dumpability): oom_score_adj, THP disabling, dumpability, no_new_privs,
/// and the seccomp filters (after them, the filter judges every syscall we
/// run in the process).
pub fn restore_attrs(
    c: &mut Child<'_>,
    attrs: &ProcessAttrs,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if let Some(adj) = attrs.oom_score_adj {
        let path = format!("/proc/{}/oom_score_adj", c.pid());
        if let Err(e) = std::fs::write(&path, adj.to_string()) {
            // Lowering it takes CAP_SYS_RESOURCE.
            note(warnings, format!("cannot set oom_score_adj {adj}: {e}"));
        }
    }
    if attrs.thp_disable & 1 != 0 {
        // Bit 1 is PR_THP_DISABLE_EXCEPT_ADVISED, passed in arg3.
        let ret = c.raw(
            libc::SYS_prctl,
            [
                libc::PR_SET_THP_DISABLE as u64,
                1,
                u64::from(attrs.thp_disable & !1),
                0,
                0,
                0,
            ],
        )?;
        if ret < 0 {
            note(
                warnings,
                format!(
                    "cannot disable transparent huge pages (mode {}): {}",
                    attrs.thp_disable,
                    errno_of(ret)
                ),
            );
        }
    }
    match attrs.dumpable {
        Some(d @ (0 | 1)) => {
            c.call(
                "prctl(PR_SET_DUMPABLE)",
                libc::SYS_prctl,
                [libc::PR_SET_DUMPABLE as u64, u64::from(d), 0, 0, 0, 0],
            )?;
        }
        Some(d) => note(
            warnings,
            format!("dumpable mode {d} (suid_dumpable) cannot be set; the process keeps 1"),
        ),
        None => {}
    }
    if attrs.mlockall != 0 {
        let ret = c.raw(
            libc::SYS_mlockall,
            [u64::from(attrs.mlockall), 0, 0, 0, 0, 0],
        )?;
        if ret < 0 {
            note(
                warnings,
                format!(
                    "cannot lock the memory mapped from now on (mlockall {:#x}): {}",
                    attrs.mlockall,
                    errno_of(ret)
                ),
            );
        }
    }
    if attrs.no_new_privs {
        c.call(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        )?;
    }
    install_seccomp(c, &attrs.seccomp_filters)
}

/// Install `filters` (oldest first) on every thread of the child
/// (SECCOMP_FILTER_FLAG_TSYNC from the calling thread).
fn install_seccomp(c: &mut Child<'_>, filters: &[SeccompFilter]) -> Result<()> {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    const FLAG_TSYNC: u64 = 1;
    /// The flags a filter keeps that mean the same when set again: LOG,
    /// SPEC_ALLOW.
    const KEPT_FLAGS: u64 = 2 | 4;
    if filters.is_empty() {
        return Ok(());
    }
    // Each program, then its sock_fprog, in one mapping of the child.
    let mut blob = Vec::new();
    let mut progs = Vec::new();
    for f in filters {
        if f.program.is_empty() || f.program.len() % 8 != 0 || f.program.len() > 4096 * 8 {
            return Err(Error::Other(format!(
                "a seccomp filter of the image is {} bytes, not a BPF program",
                f.program.len()
            )));
        }
        progs.push((blob.len() as u64, (f.program.len() / 8) as u64));
        blob.extend_from_slice(&f.program);
    }
    let fprogs_at = blob.len() as u64;
    blob.resize(blob.len() + 16 * filters.len(), 0);
    let len = (blob.len() as u64).next_multiple_of(4096);
    let base = c.call(
        "mmap",
        libc::SYS_mmap,
        [
            0,
            len,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    for (i, &(off, n)) in progs.iter().enumerate() {
        let at = (fprogs_at + 16 * i as u64) as usize;
        blob[at..at + 2].copy_from_slice(&(n as u16).to_ne_bytes());
        blob[at + 8..at + 16].copy_from_slice(&(base + off).to_ne_bytes());
    }
    crate::remote::write_memory(c.pid(), base, &blob)?;
    for (i, f) in filters.iter().enumerate() {
        let fprog = base + fprogs_at + 16 * i as u64;
        let flags = FLAG_TSYNC | (f.flags & KEPT_FLAGS);
        let ret = c.raw(
            libc::SYS_seccomp,
            [SECCOMP_SET_MODE_FILTER, flags, fprog, 0, 0, 0],
        )?;
        if ret != 0 {
            return Err(Error::Other(format!(
                "cannot reinstall seccomp filter {} of {}: {}",
                i + 1,
                filters.len(),
                if ret > 0 {
                    format!("thread {ret} cannot take it")
                } else {
                    errno_of(ret).to_string()
                }
            )));
        }
    }
    // Under the filters now: a refused munmap leaves a page behind, no more.
    let _ = c.raw(libc::SYS_munmap, [base, len, 0, 0, 0, 0])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_no_nice_value_below_what_rlimit_nice_allows() {
        // The usual RLIMIT_NICE of 0: nothing below 0.
        assert_eq!(owner_nice(-20, 0), 0);
        assert_eq!(owner_nice(-1, 0), 0);
        assert_eq!(owner_nice(0, 0), 0);
        assert_eq!(owner_nice(10, 0), 10);
        // RLIMIT_NICE 25 allows down to 20 - 25 = -5.
        assert_eq!(owner_nice(-20, 25), -5);
        assert_eq!(owner_nice(-3, 25), -3);
        // 40 and more allow everything.
        assert_eq!(owner_nice(-20, 40), -20);
        assert_eq!(owner_nice(-20, u64::MAX), -20);
    }

    #[test]
    fn a_user_may_lower_hard_limits_but_not_raise_them() {
        let inf = u64::MAX;
        assert_eq!(owner_limit(inf, inf, 8 << 20), (8 << 20, 8 << 20));
        assert_eq!(owner_limit(1024, 4096, 1 << 20), (1024, 4096));
        assert_eq!(owner_limit(4096, 4096, 1024), (1024, 1024));
        assert_eq!(owner_limit(10, inf, inf), (10, inf));
    }
}
