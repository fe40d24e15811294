//! `chpox restore`: bring a checkpointed process back where it was.
//!
//! # How
//!
//! The restorer creates a child process (`clone3`, with the saved PID when
//! it is free), holds it in a ptrace stop, and then rebuilds it *from
//! inside* with remote system calls, exactly as the dump reads state it
//! cannot see from outside (`crate::remote`): the child unmaps everything
//! it inherited from chpox, maps the image's memory at the image's
//! addresses and reads the stored pages into it straight from the image
//! file, reopens files, re-installs signal handlers, sets the mm fields
//! with `PR_SET_MM_MAP`, and so on. Finally the saved registers, XSAVE area
//! and signal mask are loaded with ptrace, and the restorer detaches.
//!
//! # Why not a restorer blob
//!
//! CRIU does the last part differently: it maps a position-independent
//! "restorer blob" into the new process, jumps into it, and the blob
//! unmaps the old memory, maps the new one and ends with `rt_sigreturn`
//! onto a forged signal frame. That avoids a ptrace round trip per
//! operation, but needs a second, freestanding program and its own
//! protocol. We reuse the dump's remote-syscall engine instead: one
//! engine, tested by every dump, and no blob. The cost is a few
//! microseconds of ptrace round trip per syscall, which for the hundreds of
//! mappings of a normal process is a few milliseconds. Page contents do not
//! bounce through chpox: private anonymous memory is filled with
//! `UFFDIO_COPY` from a mapping of the image (allocation and copy in one
//! step, see [`fill`]), the rest `pread` by the child from the image file,
//! so the kernel copies the page cache straight into its memory.
//!
//! Remote syscalls need a `syscall` instruction in the child that survives
//! the rebuild: the first thing we map is a one-page trampoline
//! (`syscall`, then a spin loop where threads made by a remote `clone3`
//! wait to be seized) at an address that is free both in the child's
//! current layout and in the image's, next to a scratch area for
//! arguments (paths, structs). Both are unmapped last.
//!
//! # Order
//!
//! 1. [`validate`]: how far the image is trusted (its file's owner), the
//!    counts it asks for against this system's limits, image checksums,
//!    CPU features, credentials, files the memory needs. Nothing is
//!    started when this fails. The content of files mapped from disk is
//!    hashed on another thread meanwhile, and awaited before anything
//!    runs: a changed file then kills the processes built so far.
//!    Without `--lazy`, every page run is verified here too; with it, each
//!    run as it is first served ([`checks`]).
//!
//! `chpox restore -vv` logs each step with its microseconds and remote
//! calls ([`phases`]).
//! 2. [`spawn`]: create the child and hold it.
//! 3. [`vdso`], [`memory`]: the address space, then `PR_SET_MM_MAP`
//!    ([`process`]).
//! 4. [`process`], [`signals`], [`fds`]: cwd, umask, name, dispositions,
//!    alternate stack, descriptors, pending signals; resource limits once
//!    the threads exist.
//! 5. [`threads`]: the other threads, created by the main thread; each
//!    gets its name, alternate stack, rseq, `clear_child_tid`, and
//!    credentials (last: per thread in Linux, and dropping root ends what
//!    a thread may do for us).
//! 6. [`registers`]: registers, XSAVE area, signal mask of every thread;
//!    detach.
//!
//! # Known limits
//!
//! - A thread interrupted in a sleep that the kernel would continue through
//!   `restart_syscall` (nanosleep, poll, futex waits with a timeout…) has
//!   no restart block in the new process: the *original* syscall is run
//!   again with its original arguments (see [`registers`]), so a relative
//!   sleep without a remainder pointer starts over with its full length.
//! - With new TIDs, glibc's record of each thread's TID is rewritten, but a
//!   mutex locked at the checkpoint still names its owner by the old one.
//!   `clear_child_tid` comes from the image; for images that lack it, it is
//!   found by looking for each thread's TID in its thread-control block
//!   (see [`threads`]).

pub mod child;
pub mod inject;
pub mod lazy;
pub mod memory;
pub mod phases;
pub mod pin;
pub mod process;
pub mod registers;
pub mod signals;
pub mod spawn;
pub mod threads;
pub mod tree;
pub mod validate;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fds;
use crate::image::ImageReader;
use crate::image::model::{Metadata, ProcessImage};
use crate::ptrace::Frozen;
use crate::remote::{self, RemoteThread};
use memory::{fill, vdso};

pub use spawn::PidMode;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pid: PidMode,
    /// Restore into a new PID namespace, where every saved PID is free.
    pub pid_ns: bool,
    /// Root restores an image another user owns as saved, not with that
    /// user's rights (see [`validate`]).
    pub trust_image: bool,
    /// Replacements for descriptors connected to the outside
    /// (`--inherit-fd`).
    pub inherit_fds: Vec<fds::external::InheritFd>,
    /// Run at once and fill memory on demand and in the background
    /// (userfaultfd; see [`lazy`]).
    pub lazy: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            pid: PidMode::Prefer,
            pid_ns: false,
            trust_image: false,
            inherit_fds: Vec::new(),
            lazy: false,
        }
    }
}

/// A restored process, running, a child of the calling process.
#[derive(Debug)]
pub struct Restored {
    pub pid: i32,
    /// Whether it got the PID it had at checkpoint time.
    pub same_pid: bool,
    /// Things that could not be restored exactly (each also logged).
    pub warnings: Vec<String>,
    /// The agent registration the image was taken under, if any.
    pub registration: Option<crate::image::model::SavedRegistration>,
    /// Our child to wait for, whose exit status is the root's: the root,
    /// or the init of its PID namespace.
    pub wait_pid: i32,
    /// Restored in a new PID namespace, where the root has its saved PID.
    pub in_namespace: bool,
    /// The root's PID at checkpoint time.
    pub saved_pid: i32,
    /// With `--lazy`: the page server fills memory in the background once
    /// this is dropped (it serves faults from the start; see
    /// `lazy::hold`). Drop it when done with the restore.
    pub page_server_hold: Option<lazy::hold::ServerHold>,
}

/// Restore the process in `image`. On success it runs, as a child of the
/// calling process; reap it with [`wait`] (or let it be reparented by
/// exiting).
///
/// Must be called from the thread that will wait for the process (ptrace
/// binds a tracee to the thread that attached it).
pub fn restore(image: &Path, opts: &RestoreOptions) -> Result<Restored> {
    phases::start();
    // Image errors say what they are about; no "image:" prefix.
    // The child inherits `image_file` (fork copies the table), so it reads
    // pages from the very file we validated, whatever the path resolves to
    // later.
    let (reader, image_file) =
        ImageReader::open_file(image).map_err(|e| Error::Other(e.to_string()))?;
    phases::mark("image opened");
    let trust = validate::trust(&image_file, opts.trust_image)?;
    let owner = trust.owner();
    let mut plan = validate::validate(&reader, &trust)?;
    // An incremental image: its parent, found and checked first.
    let parent = match &reader.metadata().parent {
        Some(p) => Some(fill::ParentImage::open(image, p, &trust, opts.trust_image)?),
        None => None,
    };
    phases::mark("image validated");
    // File contents are compared on the other core while the processes
    // are built; the answer is awaited before any of them runs.
    let content = std::mem::take(&mut plan.content);
    let mut hashing = Some(
        std::thread::Builder::new()
            .name("chpox-hash".into())
            .spawn(move || content.run())
            .map_err(|e| Error::Other(format!("cannot start a thread: {e}")))?,
    );
    if !opts.lazy {
        // What is not verified as it is copied (see `fill`).
        fill::verify_pages(&reader, std::os::fd::AsFd::as_fd(&image_file))?;
        if let Some(p) = &parent {
            fill::verify_every_page(&p.reader, std::os::fd::AsFd::as_fd(&p.file))?;
        }
        phases::mark("pages verified");
    }
    // Warnings wait until the memory is filled and the files compared: a
    // damaged page run or a changed file is refused in one line, without
    // warnings about a restore that does not happen.
    let mut warnings = std::mem::take(&mut plan.warnings);
    let meta = reader.metadata();
    if !meta.children_not_saved.is_empty() {
        warnings.push(format!(
            "the image holds PID {} alone: its children {:?} were not saved and do not come back",
            meta.root.process.pid, meta.children_not_saved
        ));
    }
    let early = warnings.len();
    let held = fds::restore::HeldWarnings::new();
    let tree = meta.is_tree();
    // PIDs are part of a tree's state (a shell's job table, waitpid,
    // pidfiles): all of them, or a namespace where all of them are free.
    let pid_ns = opts.pid_ns || (tree && opts.pid == PidMode::Any);
    if tree && !pid_ns {
        validate::check_pids_free(meta)?;
    }
    // Every description, made before any process exists: a file that cannot
    // be opened fails here.
    let mut descriptions =
        fds::Descriptions::prepare(meta, &reader, owner, &opts.inherit_fds, &mut warnings)?;
    descriptions
        .deleted_copies
        .make_mapped(meta, &reader, owner, &mut warnings)?;
    let injector = inject::Injector::new()?;
    phases::mark("descriptions prepared");
    let pid_mode = if tree || pid_ns {
        PidMode::Same
    } else {
        opts.pid
    };
    let root_pid = meta.root.process.pid;
    // In a namespace, its init is made first and the root forked from it.
    let init = if pid_ns {
        Some(spawn::spawn_namespace_init()?)
    } else {
        None
    };
    let init_frozen = init.as_ref().map(|i| Frozen::adopt(i.pid, vec![i.pid]));
    // What a process forked from us starts with; a namespace's init sets
    // its own, which its children inherit instead.
    let inherited_actions = (init.is_none()).then(signals::own_actions);
    let mut members: Vec<Frozen> = Vec::new();
    let mut same_pid = true;
    let shmem = RefCell::new(HashMap::new());
    let sysv = crate::memory::sysvshm::Segments::default();
    let lazy = opts.lazy.then(|| {
        lazy::Lazy::new(
            std::os::fd::AsRawFd::as_raw_fd(&image_file),
            parent
                .as_ref()
                .map(|p| std::os::fd::AsRawFd::as_raw_fd(&p.file)),
        )
    });
    let mut page_server_hold = None;
    let mut pinned = None;
    let built = (|| -> Result<()> {
        let layout = match &init_frozen {
            Some(init) => {
                let layout = prepare_root(init, meta)?;
                tree::private_proc(init, &layout)?;
                members.push(tree::fork_from(init, &layout, root_pid, libc::SIGCHLD, 0)?);
                layout
            }
            None => {
                let spawned = spawn::spawn(root_pid, pid_mode)?;
                if opts.lazy {
                    pinned = pin::Pin::new(spawned.pid);
                }
                members.push(Frozen::adopt(spawned.pid, vec![spawned.pid]));
                same_pid = spawned.same_pid;
                if !same_pid && opts.pid != PidMode::Any {
                    let w = format!(
                        "PID {root_pid} is taken; the process is restored as PID {}",
                        spawned.pid
                    );
                    warn!("{w}");
                    warnings.push(w);
                }
                prepare_root(&members[0], meta)?
            }
        };
        phases::mark("root spawned");
        tree::create(&mut members, meta, &layout)?;
        tree::join_groups(&members, meta, &layout)?;
        phases::mark("tree created");
        for (i, image) in meta.processes().enumerate() {
            let ctx = Context {
                reader: &reader,
                plan: &plan,
                image_fd: std::os::fd::AsRawFd::as_raw_fd(&image_file),
                pid_mode,
                same_pid,
                pid_ns,
                image,
                descriptions: &descriptions,
                injector: &injector,
                shmem: &shmem,
                sysv: &sysv,
                owner,
                lazy: lazy.as_ref(),
                parent: parent.as_ref(),
                inherited_actions: inherited_actions.as_deref(),
            };
            // Threads after the first, held by us as soon as they exist.
            let mut held = Vec::new();
            let built = build(&members[i], &ctx, &layout, &mut held, &mut warnings);
            members[i].add_tids(&held);
            if image.process.stopped {
                members[i].stop_on_release();
            }
            built.map_err(|e| {
                if tree {
                    Error::Other(format!("PID {}: {e}", image.process.pid))
                } else {
                    e
                }
            })?;
        }
        // Before the page server is forked (no other thread may run then)
        // and before any process runs.
        if let Some(h) = hashing.take() {
            let changed = h
                .join()
                .map_err(|_| Error::Other("the file hashing thread panicked".into()))??;
            for w in changed {
                warn!("{w}");
                warnings.push(w);
            }
            phases::mark("file contents compared");
        }
        // Before the page server is forked (it would inherit the pin) and
        // before any process runs.
        if let Some(pin) = pinned.take() {
            pin.release(members.iter().flat_map(Frozen::tids));
        }
        if let Some(lazy) = &lazy {
            let pids: Vec<i32> = members.iter().map(|m| m.pid()).collect();
            page_server_hold = lazy.finish(&pids)?;
            phases::mark("page server started");
        }
        Ok(())
    })();
    if let Err(e) = built {
        if let Some(lazy) = &lazy {
            lazy.abort();
        }
        if let Some(h) = hashing.take() {
            let _ = h.join();
        }
        debug!(error = %e, "restore failed; killing the half-built processes");
        while let Some(f) = members.pop() {
            f.kill();
        }
        if let Some(init) = init_frozen {
            init.kill();
        }
        return Err(e);
    }
    sysv.keep();
    for w in &warnings[..early] {
        warn!("{w}");
    }
    held.log();
    let pid = members[0].pid();
    // Children first, the root last (see `FrozenTree::resume`).
    while let Some(f) = members.pop() {
        f.resume();
    }
    let wait_pid = match (init, init_frozen) {
        (Some(init), Some(frozen)) => {
            let init_pid = init.pid;
            frozen.resume();
            spawn::start_init(init, root_pid)?;
            init_pid
        }
        _ => pid,
    };
    phases::mark("running");
    drop(image_file);
    for w in descriptions.later() {
        warn!("{w}");
        warnings.push(w.clone());
    }
    info!(
        pid,
        processes = 1 + meta.descendants.len(),
        pid_ns,
        "restored"
    );
    Ok(Restored {
        pid,
        same_pid,
        warnings,
        registration: meta.registration,
        wait_pid,
        in_namespace: pid_ns,
        saved_pid: root_pid,
        page_server_hold,
    })
}

/// What every stage needs.
pub struct Context<'a> {
    pub reader: &'a ImageReader,
    pub plan: &'a validate::Plan,
    /// The image file's descriptor number, the same in the child.
    pub image_fd: i32,
    pub pid_mode: PidMode,
    /// The process got its saved PID.
    pub same_pid: bool,
    /// In a new PID namespace: the process sees its saved PID and TIDs,
    /// which differ from the ones we see.
    pub pid_ns: bool,
    /// The process being rebuilt.
    pub image: &'a ProcessImage,
    pub descriptions: &'a fds::Descriptions,
    pub injector: &'a inject::Injector,
    /// Shared memory objects mapped so far, for the next to share.
    pub shmem: &'a RefCell<HashMap<u64, memory::FirstMapping>>,
    /// SysV segments made or taken over so far.
    pub sysv: &'a crate::memory::sysvshm::Segments,
    /// Root restoring another user's image: the processes get only that
    /// user's rights.
    pub owner: Option<&'a validate::Owner>,
    /// With `--lazy`: where mappings filled on demand are registered.
    pub lazy: Option<&'a lazy::Lazy>,
    /// The parent of an incremental image.
    pub parent: Option<&'a fill::ParentImage>,
    /// The signal dispositions every process starts with (the restorer's),
    /// when known.
    pub inherited_actions: Option<&'a [crate::image::model::SigAction]>,
}

/// The root, still a copy of the restorer: forget its rseq, and map the
/// trampoline where no process of the image has anything (every other
/// process is forked from it and inherits the trampoline).
fn prepare_root(root: &Frozen, meta: &Metadata) -> Result<memory::Layout> {
    let pid = root.pid();
    // Until our trampoline exists, the syscall instruction comes from the
    // vdso we inherited.
    let vdso_ip = remote::find_syscall_insn(pid)?;
    let mut first = RemoteThread::borrow(root, pid, vdso_ip)?;
    // glibc registered rseq for chpox's thread, in chpox's TLS, which
    // is about to go: the kernel would write into unmapped memory and
    // kill the task.
    if let Some(rseq) = crate::ptrace::rseq_config(pid)? {
        first.checked(
            "rseq(unregister)",
            libc::SYS_rseq,
            [
                rseq.addr,
                u64::from(rseq.len),
                1, // RSEQ_FLAG_UNREGISTER
                u64::from(rseq.signature),
                0,
                0,
            ],
        )?;
    }
    let all_vmas: Vec<_> = meta
        .processes()
        .flat_map(|p| p.vmas.iter().cloned())
        .collect();
    let layout = memory::make_trampoline(&mut first, &all_vmas)?;
    first.give_back()?;
    Ok(layout)
}

/// Everything between creating a process and letting it go.
fn build(
    frozen: &Frozen,
    ctx: &Context<'_>,
    layout: &memory::Layout,
    held: &mut Vec<i32>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let pid = frozen.pid();
    let image = ctx.image;
    let layout = *layout;
    let thread = RemoteThread::borrow(frozen, pid, layout.trampoline)?;
    let mut c = child::Child::new(thread, layout.scratch, layout.scratch_len);
    if ctx.owner.is_some() {
        // Before it opens or maps anything.
        process::enter_fs_identity(&mut c, &image.process.creds)?;
    }

    vdso::move_vdso(&mut c, &image.vmas, layout.temp)?;
    memory::unmap_inherited(&mut c, &layout)?;
    phases::mark("inherited memory unmapped");
    let mapped = memory::map_all(&mut c, ctx)?;
    phases::mark("memory mapped and filled");
    process::set_mm(&mut c, ctx, mapped.exe_fd, warnings)?;
    process::apply_vma_flags(&mut c, ctx, warnings)?;
    mapped.close(&mut c)?;
    phases::mark("mm set");
    process::restore_state(&mut c, ctx, warnings)?;
    signals::restore_actions(&mut c, &image.signals.actions, ctx.inherited_actions)?;
    let (main, others) = image
        .threads
        .split_first()
        .ok_or_else(|| Error::Other("the image holds no thread".into()))?;
    signals::restore_altstack(&mut c, main.sigaltstack.as_ref())?;
    fds::restore_fds(
        &mut c,
        image.process.pid,
        &image.fds,
        ctx.image_fd,
        ctx.descriptions,
        ctx.injector,
    )?;
    phases::mark("descriptors restored");

    // The other threads: created while the main thread still has the
    // privileges to choose their TIDs, each then drops its own.
    threads::create(
        &mut c,
        others,
        ctx.pid_mode,
        ctx.same_pid,
        ctx.pid_ns,
        held,
        warnings,
    )?;
    // New TIDs, in the image's thread order, as the process sees them.
    let tids: Vec<i32> = if ctx.pid_ns {
        image.threads.iter().map(|t| t.tid).collect()
    } else {
        std::iter::once(pid).chain(held.iter().copied()).collect()
    };
    signals::restore_pending(&mut c, image, &tids, warnings)?;
    process::restore_rlimits(&mut c, &image.process.rlimits, ctx.owner, warnings)?;
    let tid_pairs: Vec<(i32, i32)> = image
        .threads
        .iter()
        .map(|t| t.tid)
        .zip(tids.iter().copied())
        .collect();
    crate::timers::restore(&mut c, &image.process.timers, &tid_pairs)?;
    let tid_offset = threads::tid_offset(pid, &image.threads);
    if tid_offset.is_none() && !others.is_empty() {
        let w = "cannot tell where the threads keep their IDs; a pthread_join may never return"
            .to_string();
        warn!("{w}");
        warnings.push(w);
    }
    if let Some(offset) = tid_offset {
        threads::renumber(pid, tids.iter().copied().zip(&image.threads), offset)?;
    }
    let creds = &image.process.creds;
    threads::finish(frozen, &layout, held, others, tid_offset, creds)?;
    threads::setup(&mut c, main, tid_offset, creds)?;
    process::restore_attrs(&mut c, ctx, warnings)?;
    phases::mark("threads, signals, limits, timers");

    // Last remote call: the trampoline goes too. The thread stops at the
    // syscall exit, and never runs on the unmapped page: its registers are
    // replaced below.
    c.call(
        "munmap(trampoline)",
        libc::SYS_munmap,
        [layout.base, layout.len, 0, 0, 0, 0],
    )?;
    c.into_thread().give_back()?;
    registers::load(pid, main)?;
    if ctx.lazy.is_none() {
        registers::step_into_syscalls(
            held.iter()
                .copied()
                .zip(others)
                .chain(std::iter::once((pid, main))),
        )?;
    }
    phases::mark("registers loaded");
    Ok(())
}

/// Wait for a restored process to end. Returns the shell-style exit
/// status: its exit code, or 128 + the signal that killed it.
pub fn wait(pid: i32) -> Result<i32> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(source) => {
                return Err(Error::Ptrace {
                    op: "waitpid",
                    tid: pid,
                    source,
                });
            }
        }
    }
}
