//! `chpox dump`: freeze a process, write its image, let it go.
//!
//! Order matters for three promises:
//! - nothing is touched before every check that can fail cheaply has passed
//!   (the PID, the output path, unsupported descriptors);
//! - the target is frozen only while its state is read: the image is
//!   finished (fsync, rename) after it runs again, unless it is to be killed;
//! - a target is killed only once its image is safely on disk.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::error::{Error, Result};
use crate::fds::{self, UnsupportedFd};
use crate::files::FileTable;
use crate::image::model::{AfterDump, Metadata, SavedRegistration};
use crate::image::{ImageWriter, WriteOptions};
use crate::memory::PAGE_SIZE;
use crate::precopy::{Planned, PreCopies};
use crate::process;
use crate::ptrace::Frozen;
use crate::snapshot::{self, Snapshot};
use crate::tree::{self, FrozenTree};

mod asfrozen;
mod capture;
mod descriptors;
mod heap;
mod plan;

pub use heap::warm_heap_for_one_dump;

use capture::capture_tree;

#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub output: PathBuf,
    pub after: AfterDump,
    pub compress: bool,
    pub embed_exe: bool,
    pub embed_libs: Vec<PathBuf>,
    pub embed_all_libs: bool,
    pub unsupported_fd: UnsupportedFd,
    /// Keep this many earlier images as `FILE.1` … `FILE.N`.
    pub keep_previous: u32,
    /// Write the image, and read the libraries to embed, with this user's
    /// file rights (an agent acting for a user).
    pub as_user: Option<crate::creds::UserCreds>,
    /// Recorded in the image for `chpox restore --register`.
    pub registration: Option<SavedRegistration>,
    /// Refuse the process unless it started at this time (clock ticks since
    /// boot, as in /proc/PID/stat): the PID may have been reused.
    pub expect_start_time: Option<u64>,
    /// The process and all its descendants (the default), or the process
    /// alone.
    pub children: bool,
    /// What becomes of established TCP connections.
    pub tcp: fds::inet::TcpPolicy,
    /// Where to find the descendants without scanning /proc (the agent's
    /// eBPF-kept tree members); a scan confirms the tree either way.
    pub member_hint: Option<crate::tree::MemberHint>,
    /// Copy pages while the processes run before freezing them, then only
    /// what they wrote since (`precopy`): for dumps that leave them running
    /// (compressed ones compress afterwards). The checkpoint is then the
    /// moment of the freeze after the pre-copy, not the moment of the call.
    pub precopy: Precopy,
    /// A trigger chose this instant (the agent): freeze before reading
    /// anything, so that the time from the signal to the stop does not grow
    /// with the process. No pre-copy, and the mappings' flags are read
    /// while frozen instead of before.
    pub freeze_first: bool,
    /// Where flags read while frozen come from instead of smaps (the
    /// agent's eBPF iterator, see `vmflags`).
    pub vma_flags: Option<std::sync::Arc<crate::memory::vmflags::KernelVmaFlags>>,
    /// Where what remote syscalls would ask of each frozen process comes
    /// from instead (an eBPF iterator, see `process::kernelstate`).
    pub kernel_state: Option<std::sync::Arc<crate::process::kernelstate::KernelState>>,
}

/// When a dump pre-copies (see [`DumpOptions::precopy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precopy {
    Off,
    /// For a tree of more than one process, or one process of at least
    /// `precopy::MIN_PRECOPY_BYTES` of private memory (below, the
    /// snapshot freezes as briefly); see `precopy::worth_precopying`.
    Auto,
    Always,
}

impl DumpOptions {
    pub fn new(output: impl Into<PathBuf>) -> Self {
        DumpOptions {
            output: output.into(),
            after: AfterDump::LeaveRunning,
            compress: false,
            embed_exe: false,
            embed_libs: Vec::new(),
            embed_all_libs: false,
            unsupported_fd: UnsupportedFd::Fail,
            keep_previous: 0,
            as_user: None,
            registration: None,
            expect_start_time: None,
            children: true,
            tcp: fds::inet::TcpPolicy::Refuse,
            member_hint: None,
            precopy: Precopy::Off,
            freeze_first: false,
            vma_flags: None,
            kernel_state: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub comm: String,
    pub image: PathBuf,
    pub image_bytes: u64,
    pub pages_stored: u64,
    pub threads: usize,
    pub vmas: usize,
    /// Processes in the image (the root and its descendants, zombies not
    /// counted).
    pub processes: usize,
    /// Children of the process a single-process checkpoint left out.
    pub children_not_saved: Vec<i32>,
    /// Resident memory of the process at dump time (sum of present pages).
    pub resident_bytes: u64,
    pub frozen: Duration,
    pub total: Duration,
    /// CLOCK_MONOTONIC (ns) when every thread was stopped: with the
    /// tracepoint's timestamp, the latency from signal to freeze.
    pub frozen_at_monotonic_ns: u64,
    /// The longest of the brief second freezes in which each process
    /// reaped its snapshot (see `snapshot`); zero without snapshots.
    #[serde(default)]
    pub reap_pause: Duration,
    /// Processes whose pages were written from a snapshot after they ran
    /// again (the others' while frozen).
    #[serde(default)]
    pub snapshots: usize,
    /// Pages taken from the parent image (an incremental checkpoint).
    #[serde(default)]
    pub pages_inherited: u64,
    /// The parent of an incremental checkpoint.
    #[serde(default)]
    pub parent: Option<PathBuf>,
    /// Descendants frozen from `DumpOptions::member_hint` (or, without
    /// one, from the descendants listed before the freeze), and found by
    /// the scan of /proc instead (missed by the hint, or no hint).
    #[serde(default)]
    pub members_from_hint: usize,
    #[serde(default)]
    pub members_from_scan: usize,
    /// The longest brief freeze that attached write tracking to a process
    /// before its pre-copy (see `precopy`); zero without pre-copy.
    #[serde(default)]
    pub precopy_pause: Duration,
    /// Processes whose pages were copied while they ran, and only the
    /// pages written since while frozen.
    #[serde(default)]
    pub precopied: usize,
    /// Of those processes, the pages written while their pages were copied
    /// and copied again before the freeze, and the pages read while
    /// frozen.
    #[serde(default)]
    pub precopy_pages_copied_again: u64,
    #[serde(default)]
    pub precopy_pages_read_frozen: u64,
    /// Pages of an increment read before the freeze (see
    /// `incremental::preread`), and read again for being written meanwhile.
    #[serde(default)]
    pub pages_read_before_freeze: u64,
    #[serde(default)]
    pub pages_read_again_before_freeze: u64,
    /// Processes whose mappings' flags, read while frozen, came from the
    /// kernel's bits (`DumpOptions::vma_flags`) rather than smaps.
    #[serde(default)]
    pub flags_without_smaps: usize,
    /// Processes whose state was read from the kernel's structures (the
    /// agent's iterator, `DumpOptions::kernel_state`) rather than asked
    /// with remote syscalls.
    #[serde(default)]
    pub state_from_kernel: usize,
    /// Pre-copied processes whose flags were checked after the freeze from
    /// the kernel's bits rather than smaps (`EarlyMaps::verify_after`).
    #[serde(default)]
    pub flags_checked_without_smaps: usize,
}

/// Dump `pid` to `opts.output`.
pub fn dump(pid: i32, opts: &DumpOptions) -> Result<DumpReport> {
    let result = dump_inner(pid, opts, None);
    snapshot::reap_left_behind();
    result
}

/// Dump `pid` to `opts.output` as the next generation of `tracking`:
/// incremental when it can be (see `incremental`), full otherwise; the
/// processes stay tracked afterwards. A failed checkpoint makes the next
/// one full.
pub fn dump_tracked(
    pid: i32,
    opts: &DumpOptions,
    tracking: &mut crate::incremental::Tracking,
) -> Result<DumpReport> {
    let result = dump_inner(pid, opts, Some(&mut *tracking));
    snapshot::reap_left_behind();
    if let Err(e) = &result {
        tracking.reset(&format!("the last checkpoint failed ({e})"));
    }
    result
}

fn dump_inner(
    pid: i32,
    opts: &DumpOptions,
    mut tracking: Option<&mut crate::incremental::Tracking>,
) -> Result<DumpReport> {
    let started = Instant::now();
    let mut before = Phases::start();
    process::check_dumpable(pid)?;
    for lib in &opts.embed_libs {
        std::fs::metadata(lib).map_err(|source| Error::File {
            path: lib.display().to_string(),
            source,
        })?;
    }
    // Freeze first: a checkpoint is the moment the user chose, so the
    // time from the trigger to the stop must not grow with the process
    // (allocating a large image area takes long on tmpfs). The image is
    // prepared while frozen.
    // A process to be killed stays frozen until its image is written: no
    // snapshot, its pages are copied straight away.
    let snapshots_wanted = opts.after != AfterDump::Kill;
    let create_writer = |owner, spare| {
        ImageWriter::create_in(
            &opts.output,
            WriteOptions {
                compress: opts.compress,
                owner: Some(owner),
                keep_previous: opts.keep_previous,
                as_user: opts.as_user.clone(),
                // Compressed once the processes run again, or are killed,
                // not while frozen (see `image::writer::deferred`).
                defer_compression: true,
            },
            spare,
        )
    };
    let pids = if !snapshots_wanted || opts.freeze_first {
        Vec::new()
    } else if opts.children {
        tree::descendants_estimate(pid)
    } else {
        vec![pid]
    };
    if !opts.freeze_first {
        process::warm_cpu_model();
    }
    // Once per chpox process: at most microseconds after the first dump.
    crate::ptrace::warm_xstate_buffer();
    crate::dirty::warm();
    before.done("before the freeze: checks, descendants");
    // The mapped files' hashes, which the image needs only at its end, are
    // computed from here on beside the rest (see `files::warm_hashes`);
    // not when the freeze comes first (a trigger: the agent keeps its
    // hashes from one checkpoint to the next anyway).
    let warm_pids = if pids.is_empty() {
        vec![pid]
    } else {
        pids.clone()
    };
    // What is read of each process while frozen, opened now (see
    // `heldfiles`); not when the freeze comes first, which it would delay.
    let _held = (!opts.freeze_first).then(|| process::heldfiles::Held::open(&warm_pids));
    let mut warming = (!opts.freeze_first).then(|| {
        crate::ptrace::spawn_leaving_terminal_signals_to_the_freezer(|| {
            std::thread::spawn(move || crate::files::warm_hashes(&warm_pids))
        })
    });
    // Reads /proc of each process as soon as it is frozen (see
    // `asfrozen`); its thread starts before the freeze, and before the
    // pre-copy, if any, so that it is warm by the time the freeze comes.
    let as_frozen = asfrozen::AsFrozen::start(opts.kernel_state.clone(), !opts.freeze_first);
    // A pre-copy goes into the image before the freeze. Never with
    // incremental tracking: both would write-protect the same memory.
    let mut precopy_writer = None;
    let mut precopies = PreCopies::default();
    let precopy = tracking.is_none()
        && !opts.freeze_first
        && match opts.precopy {
            Precopy::Off => false,
            Precopy::Always => true,
            Precopy::Auto => crate::precopy::worth_precopying(&pids),
        };
    if snapshots_wanted && precopy {
        let mut writer = create_writer(process::owner(pid)?, None)?;
        precopies = PreCopies::run(&pids, &mut writer, opts.vma_flags.as_deref());
        precopy_writer = Some(writer);
    }
    let precopies_pause = precopies.longest_pause;
    before.done("before the freeze: pre-copy");
    // VmFlags now, so that smaps need not be read while frozen (a
    // pre-copy read them meanwhile).
    let mut early = precopies
        .take_early()
        .with_kernel_flags(opts.vma_flags.clone());
    early.refresh(&pids);
    before.done("before the freeze: smaps");
    // An increment with many pages to read while frozen has them read
    // now instead (see `incremental::preread`), unless the processes are
    // to be killed, frozen until their image is written anyway.
    let preread = match tracking.as_deref_mut() {
        Some(t) if snapshots_wanted => t.read_before_freeze(),
        _ => crate::incremental::PreRead::default(),
    };
    before.done("before the freeze: an increment's pages read");
    // From before the first thread stops, so that a tree's freeze (one
    // process after the other) counts whole.
    let boost = Boost::raise();
    let frozen_at = Instant::now();
    // Without the agent's hint, the descendants just listed are one: the
    // scan that finds a child between two stops is then made only once,
    // to confirm the tree, instead of once more to find it.
    let listed_hint = (opts.member_hint.is_none() && pids.len() > 1).then(|| {
        let listed = pids.clone();
        tree::MemberHint(std::sync::Arc::new(move |_| listed.clone()))
    });
    let hint = opts.member_hint.as_ref().or(listed_hint.as_ref());
    let frozen = FrozenTree::freeze_hinted(pid, opts.children, hint, &|pid| as_frozen.frozen(pid))?;
    let frozen_at_monotonic_ns = frozen.stopped_at_ns();
    let (members_from_hint, members_from_scan) = (frozen.from_hint, frozen.from_scan);
    let owner = process::owner(pid)?;
    // Start times only where write tracking keys its state by them: each
    // is a read of /proc/PID/stat while frozen.
    let members: Vec<(i32, u64)> = frozen
        .members()
        .iter()
        .map(|f| {
            let started = tracking
                .as_ref()
                .and_then(|_| snapshot::start_time(f.pid()))
                .unwrap_or(0);
            (f.pid(), started)
        })
        .collect();
    let plan = tracking.as_deref_mut().map(|t| t.plan(&members));
    let mut writer = match precopy_writer {
        Some(w) => w,
        // An increment is written into the file its tracking made ready.
        None => create_writer(
            owner,
            match (&plan, tracking.as_deref_mut()) {
                (Some(crate::incremental::Plan::Incremental(_)), Some(t)) => t.spare.take(),
                _ => None,
            },
        )?,
    };
    keep_from_user_unless_theirs(&frozen, owner, opts, &writer)?;
    // Connections saved in TCP repair mode stay in it until the tree is
    // killed (then they go silently) or runs again (then they leave it).
    let repair = fds::tcp_repair::RepairHold::new();
    let captured = capture_tree(
        &frozen,
        opts,
        &mut writer,
        snapshots_wanted,
        tracking.as_deref_mut().zip(plan.as_ref()),
        capture::Gathered {
            early: &early,
            precopies: &mut precopies,
            as_frozen,
        },
    )
    .map_err(|e| name_the_exit(e, &members))?;
    let copies: Vec<i32> = captured.snapshots.iter().map(|s| s.child()).collect();
    crate::memory::sysvshm::check_tree(&captured.meta, &copies)?;
    let mut meta = captured.meta;
    let image_id = crate::incremental::new_image_id();
    meta.image_id = Some(image_id.clone());
    // A full image from the base takes its inherited pages in, later.
    let pages_inherited = match &plan {
        Some(crate::incremental::Plan::Incremental(_)) => {
            crate::incremental::pages_inherited(&meta)
        }
        _ => 0,
    };
    if let Some(crate::incremental::Plan::Incremental(base)) = &plan {
        meta.parent = Some(crate::image::model::ParentRef {
            image_id: base.image_id.clone(),
            path: base.path.display().to_string(),
            pages_inherited,
        });
    }
    let files = captured.files;
    let snapshots = captured.snapshots;
    let snapshot_count = snapshots.len();
    let plans = captured.plans;
    let precopied = plans.len();
    let precopy_pages_copied_again = plans.iter().map(|p| p.pages_copied_again).sum();
    let precopy_pages_read_frozen = plans.iter().map(|p| p.pages_read_frozen).sum();
    let verify_after = captured.verify_after;
    let mut written = snapshot::Written::default();
    let mut precopy_stored = 0;
    let mut held_stored = 0;
    let mut from_base_copied = 0;
    let from_base = match &plan {
        Some(crate::incremental::Plan::FromBase(base)) => Some(base.clone()),
        _ => None,
    };
    let mut reap_pause = Duration::ZERO;
    let finish = |meta: &mut Metadata,
                  writer: ImageWriter,
                  durable: Option<&mut dyn FnMut()>|
     -> Result<u64> {
        // Before our write tracking goes: its release takes the mmap lock
        // that reading smaps needs, for as long.
        for (pid, maps) in &verify_after {
            early.verify_after(*pid, maps)?;
        }
        // The processes run again: write tracking is no longer needed.
        // Unregistering un-protects every tracked page, a page-table walk
        // (25–45 ms per GiB). With no snapshot to reap, it is left to a
        // process of its own once the image is finished, and not waited
        // for. A reap freezes its process briefly, and must not wait for
        // that walk to let go of the process's memory: with snapshots, it
        // is done on another thread, beside the rest of the image, and
        // waited for before the reaps.
        let (released, mut released_elsewhere) = if snapshots.is_empty() {
            (PreCopies::default(), std::mem::take(&mut precopies))
        } else {
            (std::mem::take(&mut precopies), PreCopies::default())
        };
        let (bytes, snapshots) = std::thread::scope(|scope| {
            // No thread to start (and wait for, on a busy machine) when
            // nothing was tracked.
            let release = (!released.is_empty()).then(|| {
                scope.spawn(move || {
                    let t = Instant::now();
                    let mut released = released;
                    released.release();
                    debug!(
                        us = t.elapsed().as_micros() as u64,
                        "after the freeze: write tracking released"
                    );
                })
            });
            let mut snapshots = snapshots;
            let result = finish_image(
                meta,
                writer,
                warming.take(),
                plans,
                &mut snapshots,
                files,
                opts,
                &mut precopy_stored,
                &mut written,
                tracking
                    .as_deref_mut()
                    .map(|t| (&mut t.held, &mut held_stored)),
                from_base.as_ref().map(|b| (b, &mut from_base_copied)),
                durable,
            );
            // Joined before the processes are frozen again (reaping their
            // snapshots): nothing of ours is left in them by then.
            if let Some(release) = release {
                let _ = release.join();
            }
            (result, snapshots)
        });
        released_elsewhere.release_elsewhere();
        let bytes = bytes?;
        reap_pause = snapshot::reap_all(snapshots);
        Ok(bytes)
    };

    let (image_bytes, frozen_for) = match opts.after {
        AfterDump::LeaveRunning => {
            repair.release();
            frozen.resume();
            let frozen_for = frozen_at.elapsed();
            drop(boost);
            (finish(&mut meta, writer, None)?, frozen_for)
        }
        AfterDump::LeaveStopped => {
            repair.release();
            frozen.leave_stopped();
            let frozen_for = frozen_at.elapsed();
            drop(boost);
            (finish(&mut meta, writer, None)?, frozen_for)
        }
        AfterDump::Kill => {
            // Killed once the image is durable (uncompressed, if it is to
            // be compressed: that goes on after the kill). If finishing
            // fails before, `frozen` is dropped on the error path and the
            // processes run on: no checkpoint, but nothing lost.
            let (mut frozen, mut boost, mut killed) = (Some(frozen), Some(boost), None);
            let mut kill = || {
                if let Some(frozen) = frozen.take() {
                    // Every process at once: each frees its memory
                    // meanwhile.
                    killed = Some((frozen.kill_nowait(), frozen_at.elapsed()));
                    drop(boost.take());
                }
            };
            let bytes = finish(&mut meta, writer, Some(&mut kill))?;
            let Some(((descendants, threads), frozen_for)) = killed else {
                return Err(Error::Other(
                    "internal: the image was finished without the kill".into(),
                ));
            };
            if descendants.is_empty() {
                // A lone process is dead from here on (SIGKILL ends its
                // stop in death) and its PID is its parent's to free:
                // nothing to wait for but its memory being freed (~80 ms
                // per GiB), which goes on without us. Our hold on its
                // threads is let go beside (or by the kernel as we exit).
                std::thread::spawn(move || crate::ptrace::collect_killed(&threads));
            } else {
                crate::ptrace::collect_killed(&threads);
                // The root is its parent's to reap; the descendants' PIDs
                // must be free for a restore right after.
                tree::wait_until_gone(&descendants);
            }
            repair.close_silently();
            (bytes, frozen_for)
        }
    };
    debug!(us = started.elapsed().as_micros() as u64, "image finished");
    let pages_stored = captured.pages_stored
        + written.pages_stored
        + precopy_stored
        + held_stored
        + from_base_copied;
    if let (Some(t), Some(plan)) = (tracking, &plan) {
        t.done(plan, &opts.output, &meta, pages_stored, &members)?;
        t.prepare_spare(&opts.output, opts.as_user.as_ref());
    }
    let report = DumpReport {
        pid,
        comm: meta.root.process.comm.clone(),
        image: opts.output.clone(),
        image_bytes,
        pages_stored,
        threads: meta.processes().map(|p| p.threads.len()).sum(),
        vmas: meta.processes().map(|p| p.vmas.len()).sum(),
        processes: 1 + meta.descendants.len(),
        children_not_saved: meta.children_not_saved.clone(),
        resident_bytes: (captured.resident_pages + written.resident_pages) * PAGE_SIZE,
        frozen: frozen_for,
        total: started.elapsed(),
        frozen_at_monotonic_ns,
        reap_pause,
        snapshots: snapshot_count,
        pages_inherited,
        parent: meta.parent.as_ref().map(|p| PathBuf::from(&p.path)),
        members_from_hint,
        members_from_scan,
        precopy_pause: precopies_pause,
        precopied,
        precopy_pages_copied_again,
        precopy_pages_read_frozen,
        pages_read_before_freeze: preread.pages,
        pages_read_again_before_freeze: preread.pages_again,
        flags_without_smaps: early.read_from_kernel(),
        state_from_kernel: captured.state_from_kernel,
        flags_checked_without_smaps: early.checked_without_smaps(),
    };
    // Callers warn about children left out, once (the agent per
    // registration, the CLI per dump).
    debug!(
        pid,
        image = %report.image.display(),
        processes = report.processes,
        children_not_saved = ?report.children_not_saved,
        bytes = report.image_bytes,
        frozen_us = report.frozen.as_micros() as u64,
        total_us = report.total.as_micros() as u64,
        "checkpoint written"
    );
    Ok(report)
}

/// Root's checkpoint of a user's process goes to that user (the image is
/// created theirs) only if the user could have checkpointed every process
/// of the tree: a setuid child's memory must not land in the user's file.
/// Otherwise the image stays root's. Checked while frozen, so no process
/// changes credentials in between.
/// A member killed while it is being captured makes the kernel answer
/// ESRCH or ENOENT at whichever step came next (a ptrace request, a /proc
/// file): the user needs to hear that the process exited, not which read
/// failed.
fn name_the_exit(e: Error, members: &[(i32, u64)]) -> Error {
    if matches!(e, Error::Exited(_) | Error::NoSuchProcess(_)) {
        return e;
    }
    // Between a fatal signal's dequeue and the exit's first step nothing
    // shows in /proc: look again shortly.
    for _ in 0..3 {
        if let Some(&(pid, _)) = members
            .iter()
            .find(|&&(pid, _)| crate::freeze::ptrace::process_is_exiting(pid))
        {
            debug!(pid, error = %e, "a member exited while being captured");
            return Error::Exited(pid);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    e
}

fn keep_from_user_unless_theirs(
    tree: &FrozenTree,
    owner: (u32, u32),
    opts: &DumpOptions,
    writer: &ImageWriter,
) -> Result<()> {
    if opts.as_user.is_some() || owner.0 == 0 || !nix::unistd::geteuid().is_root() {
        // A user's own checkpoint is refused outright by `capture_tree`;
        // a non-root dumper could not have frozen a privileged process.
        return Ok(());
    }
    let user = crate::creds::UserCreds {
        uid: owner.0,
        gid: owner.1,
        groups: Vec::new(),
    };
    if let Some(pid) = tree
        .members()
        .iter()
        .map(Frozen::pid)
        .find(|&p| crate::creds::may_checkpoint(p, &user).is_err())
    {
        tracing::warn!(
            pid,
            uid = owner.0,
            "a process of the tree runs with more privileges than its user: the image stays root's"
        );
        writer.set_owner(0, 0)?;
    }
    Ok(())
}

/// The image's second half, after the freeze (the processes may run
/// again): pre-copied and snapshot pages written, files hashed, the image
/// published.
#[allow(clippy::too_many_arguments)]
fn finish_image(
    meta: &mut Metadata,
    mut writer: ImageWriter,
    warming: Option<std::thread::JoinHandle<()>>,
    plans: Vec<Planned>,
    snapshots: &mut [Snapshot],
    files: FileTable,
    opts: &DumpOptions,
    precopy_stored: &mut u64,
    written: &mut snapshot::Written,
    held: Option<(&mut crate::memory::heldpages::HeldPages, &mut u64)>,
    from_base: Option<(&crate::incremental::Base, &mut u64)>,
    durable: Option<&mut dyn FnMut()>,
) -> Result<u64> {
    let mut phase = Phases::start();
    // The mapped files are hashed on another thread beside the pages
    // (the writer is the bound there, and hashing needs no image).
    let (files, pages) = std::thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            // What the warming already hashed is not read again.
            if let Some(w) = warming {
                let _ = w.join();
            }
            let mut files = files;
            files.hash_all().map(|()| files)
        });
        let pages = (|| -> Result<()> {
            *precopy_stored = crate::precopy::write_all(plans, meta, &mut writer)?;
            phase.done("after the freeze: pre-copied pages finished");
            // Nothing is rewritten in place from here on; the processes
            // run (a tree to be killed is still frozen: its image is
            // compressed once it is killed).
            if durable.is_none() {
                writer.compress_from_now();
            }
            *written = snapshot::write_all(snapshots, meta, &mut writer)?;
            phase.done("after the freeze: snapshot pages written");
            if let Some((held, stored)) = held {
                *stored = held.write_all(meta, &mut writer)?;
                phase.done("after the freeze: held pages written");
            }
            if let Some((base, copied)) = from_base {
                *copied = crate::incremental::absorb_base(meta, &mut writer, base)?;
                phase.done("after the freeze: unchanged pages copied from the base");
            }
            Ok(())
        })();
        let files = hashing
            .join()
            .unwrap_or_else(|_| Err(Error::Other("internal: file hashing panicked".into())));
        (files, pages)
    });
    pages?;
    finish_files(files?, opts, &mut writer, meta)?;
    phase.done("file hashes, embedded files");
    let bytes = match durable {
        Some(durable) => writer.finish_durable_first(meta, durable)?,
        None => writer.finish_updating(meta)?,
    };
    phase.done("metadata, sync, rename");
    // The hashes this dump computed, for the next dump of these files,
    // and the flag patterns it learned, for the next dump on this kernel.
    crate::files::hashcache::save();
    if let Some(flags) = &opts.vma_flags {
        flags.save();
    }
    Ok(bytes)
}

/// What needs the files but not the frozen process: content hashes, and
/// the files to embed (read through descriptors opened while frozen).
fn finish_files(
    mut files: FileTable,
    opts: &DumpOptions,
    writer: &mut ImageWriter,
    meta: &mut Metadata,
) -> Result<()> {
    // Embedded content goes to the image's user: read with their rights.
    let reader = crate::files::embed_reader(opts.as_user.as_ref(), Some(&meta.root.process));
    for lib in &opts.embed_libs {
        let index = match files.find(lib) {
            Some(i) => i,
            None => files.add_library(lib, reader.as_ref())?,
        };
        files.embed(index, writer, reader.as_ref())?;
    }
    files.embed_requested(writer, opts.embed_exe, opts.embed_all_libs, reader.as_ref())?;
    // Only what was added since the hashing beside the pages (libraries to
    // embed that no process maps).
    files.hash_all()?;
    meta.files = files.files;
    Ok(())
}

/// Debug-level timing of the frozen phase, to see where a freeze goes.
struct Phases(Instant, Option<Duration>);

/// The calling thread's CPU time: beside a phase's wall time in the debug
/// log, it tells work from waiting.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we own and pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

impl Phases {
    fn start() -> Self {
        Phases(Instant::now(), Self::cpu())
    }

    /// Read only when logged: it is a syscall, and phases run frozen.
    fn cpu() -> Option<Duration> {
        tracing::enabled!(tracing::Level::DEBUG)
            .then(thread_cpu_time)
            .flatten()
    }

    fn done(&mut self, what: &str) {
        let cpu = Self::cpu();
        debug!(
            phase = what,
            us = self.0.elapsed().as_micros() as u64,
            cpu_us = cpu
                .zip(self.1)
                .map(|(now, then)| now.saturating_sub(then).as_micros() as u64),
            "frozen phase"
        );
        self.0 = Instant::now();
        self.1 = cpu;
    }
}

/// The calling thread's scheduling priority raised (nice -20) while the
/// tree is frozen, and set back after: every remote call and ptrace stop
/// waits for this thread to be scheduled, and on a busy machine those
/// waits, not the work, make most of the freeze. Only ours is raised (the
/// target's is never touched), and only where allowed (root).
pub(crate) struct Boost(Option<i32>);

impl Boost {
    pub(crate) fn raise() -> Boost {
        // SAFETY: plain syscalls on the calling thread (who 0).
        unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, 0);
            if *libc::__errno_location() != 0 || old <= -20 {
                return Boost(None);
            }
            if libc::setpriority(libc::PRIO_PROCESS, 0, -20) != 0 {
                return Boost(None);
            }
            Boost(Some(old))
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: a plain syscall on the calling thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, old) };
        }
    }
}
