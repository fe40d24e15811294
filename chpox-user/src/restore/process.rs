//! Process-wide state: the mm fields and auxv (`PR_SET_MM_MAP`, with the
//! executable), working directory, umask, resource limits, personality,
//! nice value, and credentials (last: dropping root ends what the child may
//! do for us). Names are per thread: `threads::setup`.

use tracing::{debug, warn};

use super::Context;
use super::child::{ARGS_AT, Child, errno_of};
use crate::error::{Error, Result};
use crate::image::model::Credentials;

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
    let cwd = c.put_path(&info.cwd)?;
    let ret = c.raw(libc::SYS_chdir, [cwd, 0, 0, 0, 0, 0])?;
    if ret < 0 {
        return Err(Error::File {
            path: info.cwd.clone(),
            source: errno_of(ret),
        });
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
    let ret = c.raw(
        libc::SYS_setpriority,
        [
            libc::PRIO_PROCESS as u64,
            0,
            info.sched.nice as i64 as u64,
            0,
            0,
            0,
        ],
    )?;
    if ret < 0 {
        note(
            warnings,
            format!(
                "cannot set nice value {}: {}",
                info.sched.nice,
                errno_of(ret)
            ),
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

/// Resource limits, once every descriptor, mapping and thread exists (a
/// lowered limit could refuse them: the process got them before lowering
/// it).
pub fn restore_rlimits(
    c: &mut Child<'_>,
    limits: &[crate::image::model::Rlimit],
    warnings: &mut Vec<String>,
) -> Result<()> {
    const NEW_AT: u64 = ARGS_AT;
    const OLD_AT: u64 = ARGS_AT + 16;
    for l in limits {
        let mut new = [0u8; 16];
        new[..8].copy_from_slice(&l.soft.to_ne_bytes());
        new[8..].copy_from_slice(&l.hard.to_ne_bytes());
        let new_addr = c.put(NEW_AT, &new)?;
        let old_addr = c.put(OLD_AT, &[0u8; 16])?;
        let args = [0, u64::from(l.resource), new_addr, old_addr, 0, 0];
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
        c.call(
            "prlimit64",
            libc::SYS_prlimit64,
            [0, u64::from(l.resource), 0, old_addr, 0, 0],
        )?;
        let mut old = [0u8; 16];
        c.get(OLD_AT, &mut old)?;
        let mut hard = [0u8; 8];
        hard.copy_from_slice(&old[8..]);
        let hard = u64::from_ne_bytes(hard);
        new[..8].copy_from_slice(&l.soft.min(hard).to_ne_bytes());
        new[8..].copy_from_slice(&hard.to_ne_bytes());
        c.put(NEW_AT, &new)?;
        let ret = c.raw(
            libc::SYS_prlimit64,
            [0, u64::from(l.resource), new_addr, 0, 0, 0],
        )?;
        note(
            warnings,
            format!(
                "cannot raise the hard limit {} to {} (no CAP_SYS_RESOURCE); keeping {}{}",
                l.name,
                show_limit(l.hard),
                show_limit(hard),
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

fn show_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Groups, gids, uids as saved, if they differ from the child's (the
/// restorer's). Then the process is made dumpable again (a uid change
/// clears it), as an ordinary process of that user is.
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
        let mut bytes = Vec::with_capacity(want_groups.len() * 4);
        for g in &creds.groups {
            bytes.extend_from_slice(&g.to_ne_bytes());
        }
        let addr = c.put(ARGS_AT, &bytes)?;
        c.call(
            "setgroups",
            libc::SYS_setgroups,
            [creds.groups.len() as u64, addr, 0, 0, 0, 0],
        )?;
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
    c.call(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0],
    )?;
    Ok(())
}
