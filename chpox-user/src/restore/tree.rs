//! The tree: every process of the image is made by its parent, with a
//! remote `clone3` (a fork, with the saved PID), as the original was, so
//! that `wait`, `getppid` and the parent-death signal see what they saw.
//! All of them are made before any is rebuilt, while each is still a copy
//! of the restorer: a process that drops root or maps its own memory can
//! no longer choose PIDs or run our trampoline.
//!
//! Sessions and process groups follow from the order: a session leader
//! calls `setsid` as soon as it exists, before it makes its children, so
//! they are born in its session; a group leader makes its group at once;
//! the other members join their group once everyone exists. A session or
//! group whose leader is outside the image is the restorer's (as a shell
//! job's is its shell's).
//!
//! Zombies are made by their parent too and then exit with their saved
//! status: the parent's `wait` gets it.

use nix::sys::ptrace;
use nix::unistd::Pid;
use tracing::debug;

use super::child::{ARGS_AT, Child};
use super::memory::Layout;
use super::spawn::seize;
use super::threads::clone3;
use crate::error::{Error, Result};
use crate::image::model::{Metadata, Zombie};
use crate::ptrace::{Frozen, Stop, wait_stop};
use crate::remote::RemoteThread;

/// Run `f` in the main thread of `frozen`, on the trampoline.
pub fn in_process<T>(
    frozen: &Frozen,
    layout: &Layout,
    f: impl FnOnce(&mut Child<'_>) -> Result<T>,
) -> Result<T> {
    let thread = RemoteThread::borrow(frozen, frozen.pid(), layout.trampoline)?;
    let mut c = Child::new(thread, layout.scratch, layout.scratch_len);
    let out = f(&mut c)?;
    c.into_thread().give_back()?;
    Ok(out)
}

/// A process's own session and group, taken as soon as it exists.
fn lead(c: &mut Child<'_>, pid: i32, pgid: i32, sid: i32) -> Result<()> {
    if sid == pid {
        c.call("setsid", libc::SYS_setsid, [0; 6])?;
    } else if pgid == pid {
        c.call("setpgid", libc::SYS_setpgid, [0, 0, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// Fork `pid` from the process held in `parent`; the new process is held
/// too, in the trampoline's spin loop.
pub fn fork_from(
    parent: &Frozen,
    layout: &Layout,
    pid: i32,
    exit_signal: i32,
    flags: u64,
) -> Result<Frozen> {
    let ret = in_process(parent, layout, |c| {
        clone3(c, flags, exit_signal as u64, Some(pid))
    })?;
    if ret == -(libc::EEXIST as i64) {
        return Err(Error::Other(format!(
            "PID {pid} of the tree is in use; restore with --pid-ns to restore the tree in a new PID namespace"
        )));
    }
    if ret < 0 {
        return Err(Error::Other(format!(
            "cannot create process {pid}: {}{}",
            super::child::errno_of(ret),
            if ret == -(libc::EPERM as i64) {
                " (a tree keeps its PIDs, and choosing them needs root or CAP_CHECKPOINT_RESTORE)"
            } else {
                ""
            }
        )));
    }
    // The PID the parent was told is ours too, unless the parent lives in
    // a PID namespace of its own (--pid-ns).
    let got = if !in_own_namespace(parent) {
        ret as i32
    } else {
        crate::process::host_pid_of_child(parent.pid(), ret as i32).ok_or_else(|| {
            Error::Other(format!("cannot find process {pid} in its PID namespace"))
        })?
    };
    seize(got)?;
    debug!(pid = got, parent = parent.pid(), "process created");
    Ok(Frozen::adopt(got, vec![got]))
}

/// Where the process the image calls `pid` is in `members` (which follow
/// the image's order; in a PID namespace their PIDs are not the image's).
/// Whether `frozen`'s process lives in a PID namespace below ours: it
/// has more than one PID (NSpid).
fn in_own_namespace(frozen: &Frozen) -> bool {
    crate::process::ns_pids(&format!("/proc/{}/status", frozen.pid())).len() > 1
}

fn index_of(members: &[Frozen], meta: &Metadata, pid: i32) -> Result<usize> {
    meta.processes()
        .take(members.len())
        .position(|p| p.process.pid == pid)
        .ok_or_else(|| Error::Other(format!("the image names parent {pid}, which it lacks")))
}

/// In the namespace's init, before the tree is forked from it: a mount
/// namespace of its own with a /proc of the new PID namespace, so that the
/// restored processes find themselves at /proc/PID under their own PIDs.
pub fn private_proc(init: &Frozen, layout: &Layout) -> Result<()> {
    in_process(init, layout, |c| {
        c.call(
            "unshare(CLONE_NEWNS)",
            libc::SYS_unshare,
            [libc::CLONE_NEWNS as u64, 0, 0, 0, 0, 0],
        )?;
        let root = c.put(ARGS_AT, b"/\0")?;
        let proc_type = c.put(ARGS_AT + 16, b"proc\0")?;
        let proc_dir = c.put(ARGS_AT + 32, b"/proc\0")?;
        // Nothing we mount may leak back into the restorer's namespace.
        c.call(
            "mount(/, MS_REC|MS_PRIVATE)",
            libc::SYS_mount,
            [0, root, 0, libc::MS_REC | libc::MS_PRIVATE, 0, 0],
        )?;
        c.call(
            "mount(proc)",
            libc::SYS_mount,
            [
                proc_type,
                proc_dir,
                proc_type,
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                0,
                0,
            ],
        )?;
        Ok(())
    })
}

/// Make every descendant of the image (after the root, `members[0]`),
/// each from its parent, in image order (parents first), and the zombies.
/// Created processes are pushed to `members` as soon as they exist, so an
/// error path can kill them.
pub fn create(members: &mut Vec<Frozen>, meta: &Metadata, layout: &Layout) -> Result<()> {
    let root = &meta.root.process;
    in_process(&members[0], layout, |c| {
        lead(c, root.pid, root.pgid, root.sid)
    })?;
    for d in &meta.descendants {
        let p = &d.process;
        let parent = index_of(members, meta, p.ppid)?;
        let exit_signal = if p.exit_signal > 0 {
            p.exit_signal
        } else {
            libc::SIGCHLD
        };
        let flags = if p.shares_fs_with_parent {
            libc::CLONE_FS as u64
        } else {
            0
        };
        let made = fork_from(&members[parent], layout, p.pid, exit_signal, flags)?;
        in_process(&made, layout, |c| lead(c, p.pid, p.pgid, p.sid))?;
        members.push(made);
    }
    for z in &meta.zombies {
        let parent = index_of(members, meta, z.ppid)?;
        let made = fork_from(&members[parent], layout, z.pid, libc::SIGCHLD, 0)?;
        become_zombie(made, layout, z, meta)?;
    }
    Ok(())
}

/// Join process groups led by another process of the image, once all exist.
pub fn join_groups(members: &[Frozen], meta: &Metadata, layout: &Layout) -> Result<()> {
    let in_image = |pgid: i32| {
        meta.processes().any(|p| p.process.pid == pgid)
            || meta.zombies.iter().any(|z| z.pid == pgid)
    };
    for (frozen, p) in members.iter().zip(meta.processes()) {
        let p = &p.process;
        if p.pgid == p.pid || p.pgid == 0 || !in_image(p.pgid) {
            continue;
        }
        in_process(frozen, layout, |c| {
            c.call("setpgid", libc::SYS_setpgid, [0, p.pgid as u64, 0, 0, 0, 0])
        })
        .map_err(|e| {
            Error::Other(format!(
                "PID {} cannot join process group {}: {e}",
                p.pid, p.pgid
            ))
        })?;
    }
    Ok(())
}

/// Make the held process `made` exit with the zombie's status, leaving it
/// a zombie for its parent to wait for.
fn become_zombie(made: Frozen, layout: &Layout, z: &Zombie, meta: &Metadata) -> Result<()> {
    let pid = made.pid();
    let signal = z.status & 0x7f;
    in_process(&made, layout, |c| {
        lead(c, z.pid, z.pgid, z.sid)?;
        let group_in_image = meta.processes().any(|p| p.process.pid == z.pgid);
        if z.pgid != z.pid && z.sid != z.pid && group_in_image {
            c.call("setpgid", libc::SYS_setpgid, [0, z.pgid as u64, 0, 0, 0, 0])?;
        }
        if signal != 0 && signal != libc::SIGKILL {
            // Default action, unblocked: the signal kills it.
            let addr = c.put(ARGS_AT, &[0u8; 32])?;
            c.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [signal as u64, addr, 0, 8, 0, 0],
            )?;
        }
        Ok(())
    })?;
    let p = Pid::from_raw(pid);
    let err = |op| {
        move |source| Error::Ptrace {
            op,
            tid: pid,
            source,
        }
    };
    if signal == 0 {
        // exit_group(code) on the trampoline's syscall instruction.
        let mut regs = crate::ptrace::get_regs(pid)?;
        regs.rip = layout.trampoline;
        regs.rax = libc::SYS_exit_group as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = ((z.status >> 8) & 0xff) as u64;
        crate::ptrace::set_regs(pid, regs)?;
        crate::ptrace::set_sigmask(pid, 0)?;
    } else {
        crate::ptrace::set_sigmask(pid, 0)?;
        nix::sys::signal::kill(
            p,
            nix::sys::signal::Signal::try_from(signal).map_err(err("kill"))?,
        )
        .map_err(err("kill"))?;
    }
    ptrace::cont(p, None).map_err(err("cont"))?;
    loop {
        match wait_stop(pid)? {
            Stop::Exited => break,
            Stop::Signal(sig) => ptrace::cont(p, Some(sig)).map_err(err("cont"))?,
            Stop::Event | Stop::Syscall => ptrace::cont(p, None).map_err(err("cont"))?,
        }
    }
    // Gone already: releasing it finds nothing to detach.
    drop(made);
    debug!(pid, status = z.status, "zombie made");
    Ok(())
}
