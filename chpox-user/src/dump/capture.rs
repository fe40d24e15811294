//! What a dump reads while the tree is frozen: each process's /proc
//! state, the remote syscalls of every process at once, its mappings and
//! pages (or the snapshot, pre-copy or held pages that stand for them).

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::debug;

use super::asfrozen::AsFrozen;
use super::descriptors::DescriptorScan;
use super::plan::{MemoryPlan, PlanPool, plan_memory};
use super::{DumpOptions, Phases};
use crate::earlymaps::EarlyMaps;
use crate::error::{Error, Result};
use crate::fds;
use crate::files::FileTable;
use crate::image::ImageWriter;
use crate::image::model::{HostInfo, Metadata, ProcessImage, SignalState, Vma, VmaKind};
use crate::incremental::{Plan, Tracking};
use crate::memory::{self, PAGE_SIZE, PageDumper};
use crate::precopy::{Planned, PreCopies};
use crate::ptrace::Frozen;
use crate::remote::RemoteThread;
use crate::snapshot::{self, Snapshot};
use crate::tree::{self, FrozenTree};
use crate::{process, registers, signals, threads};

/// A pre-copied process's plan, and its mappings if their early flags are
/// to be checked once it runs again.
type PlannedProcess = (Planned, Option<Vec<memory::MapEntry>>);

pub(super) struct Captured {
    pub(super) meta: Metadata,
    pub(super) files: FileTable,
    /// Processes whose private pages are written after they run again.
    pub(super) snapshots: Vec<Snapshot>,
    /// Pre-copied processes' pages, to be finished after they run again.
    pub(super) plans: Vec<Planned>,
    /// Processes whose mappings' early flags are checked after they run
    /// again (no snapshot to check them against).
    pub(super) verify_after: Vec<(i32, Vec<memory::MapEntry>)>,
    pub(super) pages_stored: u64,
    pub(super) resident_pages: u64,
    /// Processes whose state came from the kernel's structures.
    pub(super) state_from_kernel: usize,
}

/// What the dump gathered before the tree was frozen and while it froze.
pub(super) struct Gathered<'a> {
    /// The mappings' flags and code, read before the freeze.
    pub(super) early: &'a EarlyMaps,
    /// The pages copied while the processes ran.
    pub(super) precopies: &'a mut PreCopies,
    /// /proc and kernel state, read as each process froze.
    pub(super) as_frozen: AsFrozen,
}

/// Read everything while the tree is frozen; bulk data goes to `writer`.
pub(super) fn capture_tree(
    tree: &FrozenTree,
    opts: &DumpOptions,
    writer: &mut ImageWriter,
    snapshots_wanted: bool,
    mut tracking: Option<(&mut Tracking, &Plan)>,
    gathered: Gathered<'_>,
) -> Result<Captured> {
    let Gathered {
        early,
        precopies,
        as_frozen,
    } = gathered;
    let mut phase = Phases::start();
    if let Some(user) = &opts.as_user {
        tree::check_owned_by(tree, user)?;
    }
    let fs_with_parent = tree::check_unshared(tree)?;
    phase.done("owners, shared tables");
    let pids: Vec<i32> = tree.members().iter().map(Frozen::pid).collect();
    let read = as_frozen.collect(pids.len())?;
    phase.done("/proc and kernel state, read as each process froze");
    let mut texts = Vec::with_capacity(read.len());
    let mut infos = Vec::with_capacity(read.len());
    let mut kernel = Vec::with_capacity(read.len());
    for e in read {
        texts.push(e.texts);
        infos.push(e.info);
        kernel.push(e.kernel);
    }
    for (t, info) in texts.iter_mut().zip(&infos) {
        t.started = Some(info.start_time_ticks);
    }
    // The pre-copies: planned by the pool (for a pre-copied process that
    // runs on after the dump), or by `capture_process`, which drops them.
    let members = tree.members();
    let mut sleeps = Vec::with_capacity(members.len());
    let mut jobs = Vec::new();
    let mut unplanned = Vec::with_capacity(members.len());
    for (i, frozen) in members.iter().enumerate() {
        let mut precopied = precopies.take(frozen.pid());
        sleeps.push(
            precopied
                .as_mut()
                .map(crate::precopy::PreCopied::take_restarted_sleeps),
        );
        match precopied {
            Some(p) if snapshots_wanted && !frozen.was_stopped() => {
                jobs.push((i, frozen.pid(), p));
                unplanned.push(None);
            }
            other => unplanned.push(other),
        }
    }
    // What needs no ptrace is done by two threads: the descriptors, read
    // from /proc alone (0.06 ms per process here, 0.5–2.5 ms more with
    // sockets), on the other core from the start, beside the ptrace work
    // on the threads below, then on both; then the memory plans, on both.
    let scan = DescriptorScan::new(&pids, opts);
    let plans = PlanPool::new(members.len(), jobs, &texts, early);
    let mut files = FileTable::new();
    let mut shmem = memory::SharedObjects::default();
    let mut procs = Vec::with_capacity(members.len());
    let mut pages = PageDumper::new(tree.root());
    let mut snapshots = Vec::new();
    let mut plans_made = Vec::new();
    let mut verify_after = Vec::new();
    let mut resident_pages = 0;
    let texts = &texts;
    let state_from_kernel = std::thread::scope(|scope| -> Result<usize> {
        let (scan, plans) = (&scan, &plans);
        let beside = scope.spawn(move || {
            let mut phase = Phases::start();
            scan.run(texts);
            phase.done("descriptors (beside)");
            plans.run();
            phase.done("memory plans (beside)");
        });
        // Whatever ends this scope, a panic here included, the other
        // thread must not be left waiting for the plans to open.
        let _abandoned_at_the_end = plans.abandon_when_dropped();
        let heads = read_heads(tree, opts, early, texts, infos, kernel, &sleeps);
        if heads.is_err() {
            plans.abandon();
        } else {
            plans.open();
        }
        // Whatever descriptors are left, with the other thread.
        scan.run(texts);
        let scanned = scan.wait(&beside);
        phase.done("threads, remote syscalls, descriptors");
        let result = (|| {
            // The descriptors' failure first: it names what the user can
            // change.
            scanned?;
            let fds = scan.take_all()?;
            let (heads, state_from_kernel) = heads?;
            let each = members
                .iter()
                .zip(heads)
                .zip(fds)
                .zip(texts)
                .zip(unplanned)
                .enumerate();
            for (i, ((((frozen, head), fds), texts), precopied)) in each {
                let planned = plans.take(i, &beside)?;
                if !procs.is_empty() {
                    pages.next_process(frozen.pid());
                }
                let (image, resident, snapshot, plan) = capture_process(
                    frozen,
                    head,
                    planned,
                    precopied,
                    texts,
                    writer,
                    &mut pages,
                    fds,
                    &mut files,
                    &mut shmem,
                    snapshots_wanted.then_some(procs.len()),
                    tracking.as_mut().map(|(t, p)| (&mut **t, *p)),
                    early,
                    precopies,
                )?;
                resident_pages += resident;
                snapshots.extend(snapshot);
                if let Some((plan, maps)) = plan {
                    plans_made.push(plan);
                    if let Some(maps) = maps {
                        verify_after.push((frozen.pid(), maps));
                    }
                }
                let mut image = image;
                image.process.shares_fs_with_parent = fs_with_parent.contains(&frozen.pid());
                procs.push(image);
            }
            Ok(state_from_kernel)
        })();
        if result.is_err() {
            plans.abandon();
        }
        if beside.join().is_err() && result.is_ok() {
            return Err(Error::Other(
                "internal: the dump's other thread panicked".into(),
            ));
        }
        result
    })?;
    let plans = plans_made;
    let pages_stored = pages.pages_stored;
    phase.done("processes");
    fds::classify(&mut procs, opts.unsupported_fd)?;
    let reader =
        crate::files::embed_reader(opts.as_user.as_ref(), procs.first().map(|p| &p.process));
    fds::embed(&mut procs, writer, reader.as_ref())?;
    phase.done("pipes, deleted files");

    let mut procs = procs.into_iter();
    let root = procs
        .next()
        .ok_or_else(|| Error::Other("internal: a frozen tree without its root".into()))?;
    let (xfeatures, xsave_size) = registers::host_xfeatures();
    let meta = Metadata {
        chpox_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        host: HostInfo {
            hostname: process::hostname(),
            kernel_release: process::kernel_release(),
            cpu_model: process::cpu_model(),
            xfeatures,
            xsave_size,
            page_size: PAGE_SIZE,
        },
        root,
        descendants: procs.collect(),
        zombies: tree.zombies.clone(),
        children_not_saved: tree.children_left_out.clone(),
        // Filled in by `finish_files`, after the processes run again.
        files: Vec::new(),
        after_dump: opts.after,
        registration: opts.registration,
        image_id: None,
        parent: None,
    };
    Ok(Captured {
        meta,
        files,
        snapshots,
        plans,
        verify_after,
        pages_stored,
        resident_pages,
        state_from_kernel,
    })
}

/// /proc first (the /proc/PID texts of every process, and what else /proc
/// says of those after the first `infos_beside`, whose part the other
/// thread reads and sends as `infos`), then what only the processes can
/// tell, all of them at once (`overlap`: each remote call waits for its tracee to be
/// scheduled, and the waits of different processes overlap); their memory
/// is read after, one after the other.
fn read_heads(
    tree: &FrozenTree,
    opts: &DumpOptions,
    early: &EarlyMaps,
    texts: &[ProcTexts],
    infos: Vec<crate::image::model::ProcessInfo>,
    kernel: Vec<KernelFields>,
    sleeps: &[Option<crate::precopy::RestartedSleeps>],
) -> Result<(Vec<ProcessHead>, usize)> {
    let mut phase = Phases::start();
    let mut threads = Vec::with_capacity(texts.len());
    let each = tree.members().iter().zip(&kernel).zip(sleeps);
    for ((frozen, kernel), sleeps) in each {
        let fields = kernel.as_ref().map(|(fields, _)| fields);
        threads.push(read_threads(frozen, sleeps.as_ref(), fields)?);
    }
    let mut heads = Vec::with_capacity(texts.len());
    let each = tree.members().iter().zip(infos).zip(threads).zip(kernel);
    for (((frozen, mut info), threads), kernel) in each {
        // Only the root's start time is known to the caller.
        let expect_start = heads.is_empty().then_some(opts.expect_start_time).flatten();
        if expect_start.is_some_and(|t| t != info.start_time_ticks) {
            return Err(Error::Other(format!(
                "PID {} is no longer the registered process",
                frozen.pid()
            )));
        }
        info.stopped = frozen.was_stopped();
        heads.push(ProcessHead {
            info,
            threads,
            actions: Vec::new(),
            kernel,
        });
    }
    phase.done("threads");
    let from_kernel = remote_state_all(tree.members(), &mut heads, texts, early)?;
    phase.done("remote syscalls");
    Ok((heads, from_kernel))
}

/// A frozen process's /proc/PID/maps and /proc/PID/status, read once,
/// before its remote calls, whose scratch page they leave out (see
/// `capture_process`); what else the status tells (dispositions,
/// no_new_privs, shadow stack) only the process itself changes.
pub(super) struct ProcTexts {
    pub(super) maps: String,
    pub(super) status: String,
    /// Its start time, once /proc/PID/stat has been read (by
    /// `dump_proc_info`).
    pub(super) started: Option<u64>,
}

impl ProcTexts {
    pub(super) fn read(pid: i32) -> Result<ProcTexts> {
        Ok(ProcTexts {
            maps: crate::error::read_proc(&format!("/proc/{pid}/maps"))?,
            status: crate::error::read_proc(&format!("/proc/{pid}/status"))?,
            started: None,
        })
    }
}

/// What one frozen process's /proc and threads say, and, once
/// [`remote_state_all`] has run, what only it can tell.
struct ProcessHead {
    info: crate::image::model::ProcessInfo,
    threads: ThreadsHead,
    actions: Vec<crate::image::model::SigAction>,
    /// What the kernel holds of it, read while frozen, if it could be.
    kernel: KernelFields,
}

/// A process's [`process::kernelstate::ProcessFields`], and whether it has
/// POSIX timers (which only remote calls read), when the dump has the
/// iterator.
pub(super) type KernelFields = Option<(process::kernelstate::ProcessFields, bool)>;

/// What a frozen process's threads say (ptrace), and its shared pending
/// signals: its [`ProcessHead`] but for /proc's part.
struct ThreadsHead {
    tids: Vec<i32>,
    thread_states: Vec<crate::image::model::ThreadState>,
    shared_pending: Vec<crate::image::model::PendingSignal>,
    /// Its code that remote calls run, once [`code_of`] found it.
    code: Option<Code>,
}

/// A process's `syscall` instruction, and its gadgets if it has any (see
/// `safe_return`): what a remote call needs.
type Code = (u64, Option<crate::safe_return::Gadgets>);

/// Process `pid`'s [`Code`], found at the first need (13–25 us each of a
/// tree's processes here, while frozen, and not needed at all where the
/// kernel's state is read and nothing is snapshotted or tracked).
fn code_of<'c>(
    code: &'c mut Option<Code>,
    early: &EarlyMaps,
    pid: i32,
    texts: &ProcTexts,
) -> Result<&'c Code> {
    Ok(match code {
        Some(found) => found,
        None => code.insert(early.code_in(pid, &texts.maps, &texts.status)?),
    })
}

/// The threads of one frozen process (their names from `kernel` where the
/// kernel's structures were read; `sleeps`: those its pre-copy's attach
/// pause restarted, if it had one).
fn read_threads(
    frozen: &Frozen,
    sleeps: Option<&crate::precopy::RestartedSleeps>,
    kernel: Option<&process::kernelstate::ProcessFields>,
) -> Result<ThreadsHead> {
    let pid = frozen.pid();
    let mut phase = Phases::start();
    let tids = frozen.tids();
    let mut thread_states = tids
        .iter()
        .map(|&tid| {
            let comm = kernel.and_then(|k| process::kernelstate::comm(k, tid));
            threads::dump_thread(pid, tid, comm)
        })
        .collect::<Result<Vec<_>>>()?;
    let shared_pending = signals::dump_shared_pending(pid)?;
    if let Some(sleeps) = sleeps {
        sleeps.fix(&tids, &mut thread_states);
    }
    phase.done("threads of a process");
    Ok(ThreadsHead {
        tids,
        thread_states,
        shared_pending,
        code: None,
    })
}

/// The remote syscalls of every process of the tree, overlapped (see
/// `overlap`). Each process's sequence runs to its end (its threads given
/// back) even when another's failed; then the first failure is returned.
fn remote_state_all(
    members: &[Frozen],
    heads: &mut [ProcessHead],
    texts: &[ProcTexts],
    early: &EarlyMaps,
) -> Result<usize> {
    let seqs: Vec<crate::overlap::Sequence<'_, Result<bool>>> = members
        .iter()
        .zip(heads.iter_mut())
        .zip(texts)
        .map(|((frozen, head), texts)| {
            Box::pin(remote_state(frozen, head, texts, early))
                as crate::overlap::Sequence<'_, Result<bool>>
        })
        .collect();
    let from_kernel = crate::overlap::run_all(seqs)
        .into_iter()
        .collect::<Result<Vec<bool>>>()?;
    Ok(from_kernel.into_iter().filter(|&k| k).count())
}

/// What only the process can tell (remote syscalls): dispositions, brk,
/// personality, timers, prctl values in the leader; the alternate stack
/// and clear_child_tid in every thread. Without any remote syscall where
/// what the kernel holds of it was read and says it all
/// (`process::kernelstate`): then true.
async fn remote_state(
    frozen: &Frozen,
    head: &mut ProcessHead,
    texts: &ProcTexts,
    early: &EarlyMaps,
) -> Result<bool> {
    let pid = frozen.pid();
    let status = texts.status.as_str();
    let ProcessHead {
        info,
        threads:
            ThreadsHead {
                tids,
                thread_states,
                code,
                ..
            },
        actions,
        kernel,
    } = head;
    if let Some((fields, posix_timers)) = kernel.take()
        && let Some(from_kernel) =
            process::kernelstate::apply(&fields, info, tids, thread_states, status, posix_timers)
    {
        *actions = from_kernel;
        if process::kernelstate::no_seccomp(&fields, tids) {
            info.attrs.no_new_privs = process::no_new_privs(status);
            info.attrs.seccomp_filters = Vec::new();
        } else {
            process::dump_proc_attrs(info, pid, tids, status)?;
        }
        debug!(pid, "state read from the kernel: no remote syscall");
        return Ok(true);
    }
    let (syscall_ip, gadgets) = code_of(code, early, pid, texts)?;
    let (gadgets, syscall_ip) = (gadgets.as_ref(), *syscall_ip);
    // Each thread is borrowed once, here, first since the freeze: what
    // `read_process` read of it is what it has.
    fn saved(state: &crate::image::model::ThreadState) -> Option<crate::remote::Saved<'_>> {
        Some(crate::remote::Saved {
            regs: crate::restore::registers::user_regs(&state.regs),
            mask: state.sigmask,
            xsave: &state.xsave,
        })
    }
    let leader_saved = tids
        .iter()
        .zip(thread_states.iter())
        .find(|(tid, _)| **tid == pid)
        .and_then(|(_, state)| saved(state));
    let mut leader =
        RemoteThread::borrow_guarded_saved_async(frozen, pid, gadgets, syscall_ip, leader_saved)
            .await?;
    // Results go to the leader's return frame, unless it has none or some
    // memory is locked: only a fresh mapping tells mlockall(MCL_FUTURE).
    let scratch_len = PAGE_SIZE;
    let mut mapped = None;
    let scratch = match leader.frame_scratch() {
        Some(in_frame) if !process::memory_locked(status) => in_frame,
        _ => {
            let at = leader.map_scratch_async(scratch_len).await?;
            mapped = Some(at);
            process::dump_mlockall(info, pid, at, status)?;
            at
        }
    };
    *actions = signals::dump_actions(&mut leader, scratch, status).await?;
    process::dump_remote_state(info, &mut leader, scratch).await?;
    info.timers = crate::timers::dump(pid, &mut leader, scratch).await?;
    process::dump_attrs(info, &mut leader, tids, status).await?;
    for (tid, state) in tids.iter().zip(thread_states.iter_mut()) {
        if *tid == pid {
            state.sigaltstack = signals::dump_altstack(&mut leader, scratch).await?;
            state.clear_child_tid = threads::dump_clear_child_tid(&mut leader, scratch).await?;
        } else {
            let thread_saved = saved(state);
            let mut thread = RemoteThread::borrow_guarded_saved_async(
                frozen,
                *tid,
                gadgets,
                syscall_ip,
                thread_saved,
            )
            .await?;
            let thread_scratch = match (thread.frame_scratch(), mapped) {
                (Some(in_frame), _) => in_frame,
                (None, Some(at)) => at,
                (None, None) => {
                    let at = leader.map_scratch_async(scratch_len).await?;
                    mapped = Some(at);
                    at
                }
            };
            state.sigaltstack = signals::dump_altstack(&mut thread, thread_scratch).await?;
            state.clear_child_tid =
                threads::dump_clear_child_tid(&mut thread, thread_scratch).await?;
            thread.give_back()?;
        }
    }
    if let Some(at) = mapped {
        leader.unmap_async(at, scratch_len).await?;
    }
    leader.give_back()?;
    Ok(false)
}

/// A pre-copied process with fewer resident pages has its mappings' flags
/// read while frozen (smaps walks its pages: ~25 ms per GiB here, so
/// ~0.2 ms at 8 MiB) rather than checked once it runs again.
const FLAGS_WHILE_FROZEN_BELOW_PAGES: u64 = (8 << 20) / crate::memory::PAGE_SIZE;

/// Read the rest of one frozen process, whose `head` is read: its memory
/// (through `pages`, set to it). Returns
/// its image, how many of its pages were resident, and, given its index in
/// the image as `snapshot_as`, a snapshot of it whose private pages are
/// still to be written (they are then not in the image yet).
#[allow(clippy::too_many_arguments)]
fn capture_process(
    frozen: &Frozen,
    head: ProcessHead,
    planned: Option<MemoryPlan>,
    precopied: Option<crate::precopy::PreCopied>,
    texts: &ProcTexts,
    writer: &mut ImageWriter,
    pages: &mut PageDumper,
    fds: Vec<crate::image::model::FdEntry>,
    files: &mut FileTable,
    shmem: &mut memory::SharedObjects,
    snapshot_as: Option<usize>,
    tracking: Option<(&mut Tracking, &Plan)>,
    early: &EarlyMaps,
    precopies: &mut PreCopies,
) -> Result<(ProcessImage, u64, Option<Snapshot>, Option<PlannedProcess>)> {
    let pid = frozen.pid();
    let mut phase = Phases::start();
    let ProcessHead {
        mut info,
        threads:
            ThreadsHead {
                thread_states,
                shared_pending,
                mut code,
                ..
            },
        actions,
        ..
    } = head;
    let MemoryPlan {
        mut maps,
        early_flags,
        claimed,
        plan,
        precopied,
    } = match planned {
        Some(planned) => planned,
        None => plan_memory(
            pid,
            frozen.was_stopped(),
            precopied,
            texts,
            snapshot_as,
            early,
        )?,
    };
    phase.done("maps, pre-copy scan");
    // A process in a job-control stop does not run on after the dump, so
    // copying its pages now costs it nothing; and the brief freeze that
    // reaps a snapshot would meet the SIGSTOP that keeps it stopped.
    // Our own write tracking is no userfaultfd of the process's; an
    // increment copies its few pages while frozen.
    // Only where a snapshot may be taken (a pre-copied process has its
    // plan): the copy is not free for a tree's every process.
    let fork_maps = || match &tracking {
        Some((_, Plan::Incremental(_) | Plan::FromBase(_))) => None,
        Some((t, Plan::Full)) => Some(t.hide_own(pid, &maps)),
        None => Some(maps.clone()),
    };
    let mut snapshot = match snapshot_as {
        Some(index)
            if plan.is_none()
                && !frozen.was_stopped()
                && fork_maps().is_some_and(|m| snapshot::may_fork(pid, &m)) =>
        {
            let (syscall_ip, gadgets) = code_of(&mut code, early, pid, texts)?;
            let mut leader =
                RemoteThread::borrow_guarded(frozen, pid, gadgets.as_ref(), *syscall_ip)?;
            let taken = Snapshot::take(&mut leader, index, *syscall_ip, gadgets.clone());
            leader.give_back()?;
            taken?
        }
        _ => None,
    };
    // Where the early flags are checked once the processes run again,
    // `maps` goes there when the mappings are stored (not a copy of every
    // mapping's flags, while frozen).
    let mut verify = EarlyFlags::Checked;
    if early_flags {
        match snapshot.as_mut() {
            Some(_) => verify = EarlyFlags::BySnapshot,
            // Checked against the process itself once it runs again; a
            // small one (a tree's shell, a short-lived child) is read
            // now instead, in a fraction of a millisecond: one that
            // exits right after the freeze could not be checked.
            None if plan
                .as_ref()
                .is_some_and(|p| p.resident > FLAGS_WHILE_FROZEN_BELOW_PAGES) =>
            {
                verify = EarlyFlags::ByProcess
            }
            // Nothing to check the early flags against: read them now.
            None => {
                maps = early.read_now(pid)?;
                if let Some(p) = &precopied {
                    maps.iter_mut().for_each(|m| {
                        p.claim(m);
                    });
                }
                memory::refuse_missing_page_handlers(pid, &maps)?;
            }
        }
    }
    phase.done("snapshot");
    // Write tracking, while still frozen: a full checkpoint protects every
    // page (writes from now on are the next increment's); an incremental
    // one learns what was written since the base; a full one from the
    // base does both, in that order.
    let mut held = None;
    // Only a process tracked for the first time is attached to, and only
    // then is its code wanted.
    let attach = || {
        let (syscall_ip, gadgets) = code_of(&mut code, early, pid, texts)?;
        let mut leader = RemoteThread::borrow_guarded(frozen, pid, gadgets.as_ref(), *syscall_ip)?;
        let tracker = crate::dirty::Tracker::attach(&mut leader);
        leader.give_back()?;
        tracker
    };
    let written = match tracking {
        Some((t, Plan::Full)) => {
            t.protect(pid, info.start_time_ticks, &maps, attach, false)?;
            None
        }
        Some((t, plan @ (Plan::Incremental(_) | Plan::FromBase(_)))) => {
            let from_base = matches!(plan, Plan::FromBase(_));
            let written = t.written(pid, info.start_time_ticks, &maps, from_base)?;
            if from_base {
                t.protect(pid, info.start_time_ticks, &maps, attach, true)?;
            }
            // Written after the processes run again (`heldpages`), when
            // they do before the image is finished.
            held = snapshot_as.map(|index| (index, &mut t.held));
            written
        }
        None => None,
    };
    phase.done("write tracking");
    // add_exe learns from the " (deleted)" mark that the file must be
    // embedded; the image records the name without it.
    info.exe_file = Some(files.add_exe(pid, &info.exe)?);
    info.exe = info.exe.trim_end_matches(" (deleted)").to_string();
    let mut vmas = Vec::with_capacity(maps.len());
    let mut resident_pages = 0u64;
    for (map_index, map) in maps.iter().enumerate() {
        let kind = map.kind();
        let mut inherited = Vec::new();
        let file = match kind {
            VmaKind::PrivateFile | VmaKind::SharedFile => Some(files.add_mapping(pid, map)?),
            _ => None,
        };
        let shmem_id = (kind == VmaKind::SharedAnonymous).then_some(map.inode);
        let claimed = claimed.get(vmas.len()).copied().unwrap_or(false);
        let stored = if kind.is_special() || map.is_device_memory() || claimed {
            // Claimed: its pages come from the pre-copy plan.
            Vec::new()
        } else if shmem.stored_already(map) {
            // Another mapping of the tree holds these pages of the object.
            Vec::new()
        } else if let Some(s) = snapshot
            .as_mut()
            .filter(|_| snapshot::fork_copies(map, kind))
        {
            s.defer(vmas.len(), map, kind);
            Vec::new()
        } else if let Some((w, base)) = written
            .as_ref()
            .and_then(|w| Some((w.regions.get(&map_index)?, &w.base_runs)))
        {
            // Tracked since the base: what was written is stored, the rest
            // comes from the base (no pagemap walk).
            let (scanned, earlier) = written.as_ref().map_or((&[][..], &[][..]), |w| {
                (
                    w.earlier_scanned
                        .get(&map_index)
                        .map_or(&[][..], |r| &r[..]),
                    &w.earlier[..],
                )
            });
            let (runs, from_base) = crate::incremental::split_tracked(
                map,
                kind,
                w,
                scanned,
                earlier,
                base,
                |windows| pages.pagemap_windows(windows),
            )?;
            inherited = from_base;
            store_runs(&runs, Some(w), &mut held, vmas.len(), pages, writer)?
        } else {
            let pagemap = pages.pagemap(map.start, map.end)?;
            resident_pages += pagemap.iter().filter(|&&e| e >> 63 != 0).count() as u64;
            let runs = memory::select_runs(pid, map, kind, &pagemap);
            store_runs(&runs, None, &mut held, vmas.len(), pages, writer)?
        };
        if kind == VmaKind::SharedAnonymous {
            shmem.record(map);
        }
        // Not debug: a line per mapping of every process, while frozen.
        tracing::trace!(
            start = map.start,
            end = map.end,
            ?kind,
            runs = stored.len(),
            "vma"
        );
        vmas.push(Vma {
            start: map.start,
            end: map.end,
            read: map.read,
            write: map.write,
            exec: map.exec,
            shared: map.shared,
            offset: map.offset,
            name: map.display_name(),
            kind,
            file,
            vm_flags: map.vm_flags.clone(),
            pages: stored,
            shmem_id,
            inherited,
            sysv: if crate::memory::sysvshm::is_sysv(map) {
                Some(crate::memory::sysvshm::describe(map)?)
            } else {
                None
            },
        });
    }

    let mut verify_later = None;
    match verify {
        EarlyFlags::Checked => {}
        EarlyFlags::BySnapshot => {
            if let Some(s) = snapshot.as_mut() {
                s.verify_flags_later(maps);
            }
        }
        EarlyFlags::ByProcess => verify_later = Some(maps),
    }
    phase.done("pagemap, files, page copy");
    let image = ProcessImage {
        process: info,
        threads: thread_states,
        vmas,
        fds,
        signals: SignalState {
            actions,
            shared_pending,
        },
    };
    if let Some(p) = precopied {
        precopies.keep(p);
    }
    Ok((
        image,
        resident_pages + plan.as_ref().map_or(0, |p| p.resident),
        snapshot,
        plan.map(|p| (p, verify_later)),
    ))
}

/// Where the flags of a process's mappings, read before the freeze, are
/// checked (see `earlymaps`).
enum EarlyFlags {
    /// Not early, or read again while frozen.
    Checked,
    /// Against its snapshot, once its pages are written.
    BySnapshot,
    /// Against the process itself, once it runs again.
    ByProcess,
}

/// Store `runs` of the frozen process `pages` is set to, its mapping
/// number `vma`: held until the processes run again where an increment
/// holds its pages (`heldpages`), else written now. `fresh`: of a mapping
/// tracked since the base, what its tracker reports written.
fn store_runs(
    runs: &[(u64, u64)],
    fresh: Option<&[crate::dirty::Region]>,
    held: &mut Option<(usize, &mut crate::memory::heldpages::HeldPages)>,
    vma: usize,
    pages: &mut PageDumper,
    writer: &mut ImageWriter,
) -> Result<Vec<crate::image::model::PageRun>> {
    if let Some((process, h)) = held
        && h.hold(pages.pid(), *process, vma, runs, fresh)?
    {
        return Ok(Vec::new());
    }
    pages.dump_runs(runs, writer)
}
