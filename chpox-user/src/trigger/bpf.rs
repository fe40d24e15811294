//! The link to the eBPF program: mounting tracefs and bpffs, loading the
//! object with the tracepoint field offsets of this kernel, attaching, and
//! the maps: `REGISTRY` (who is registered), `STATES` (each registration's
//! checkpoint state, shared with the program through a memory mapping so
//! both sides can compare-and-swap it) and `EVENTS` (the ring buffer).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::{Lsm, TracePoint};
use aya::{Ebpf, EbpfLoader};
use chpox_common::{
    Event, ExitOffsets, MAX_REGISTRATIONS, NewTaskOffsets, Registration, SigactionOffsets,
    SignalOffsets, SlotState, TaskOffsets, TaskStateOffsets, VmaOffsets, names,
};
use tracing::{debug, info, warn};

pub mod btf;
pub mod iter;
pub mod task_iter;
pub mod vma_iter;

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";
pub const SECURITYFS: &str = "/sys/kernel/security";

/// Whether the BPF LSM guard keeps the trigger signal from reaching a
/// registered process that would not ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    Active,
    /// Why not: the process is protected by SIG_IGN alone, which it can
    /// undo.
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot mount {fs} at {path}: {source}; are you root?")]
    Mount {
        fs: &'static str,
        path: &'static str,
        source: nix::Error,
    },
    #[error(
        "eBPF object not found (looked in {0}); build it with `cargo xtask build-ebpf` or name it with --ebpf-object"
    )]
    ObjectMissing(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint}: field {field} missing from its format file")]
    FormatField {
        tracepoint: &'static str,
        field: &'static str,
    },
    #[error("loading the eBPF program: {0}")]
    Load(String),
    #[error("eBPF map {0} missing from the object")]
    MapMissing(&'static str),
    #[error("eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("memory-mapping the STATES map: {0}")]
    Mmap(nix::Error),
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut cols = l.split_whitespace();
                cols.nth(1) == Some(path) && cols.next() == Some(fstype)
            })
        })
        .unwrap_or(false)
}

/// Mount tracefs and bpffs where the kernel documents them, if missing.
/// (Some VMs boot without them; attaching tracepoints needs tracefs.)
pub fn mount_filesystems() -> Result<(), BpfError> {
    for (fs, path) in [("tracefs", TRACEFS), ("bpf", BPFFS)] {
        if is_mounted(path, fs) {
            continue;
        }
        info!(path, "mounting {fs}");
        match nix::mount::mount(
            Some("none"),
            path,
            Some(fs),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => {}
            // Another agent or tool, starting at the same moment on a
            // machine booted without it, mounted it first (seen: EBUSY
            // for the second of two agents started at once).
            Err(_) if is_mounted(path, fs) => {}
            Err(source) => return Err(BpfError::Mount { fs, path, source }),
        }
    }
    Ok(())
}

/// Offset of `field` in a tracepoint format file.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // "int sig", "char comm[16]": the name is the last word, minus [N].
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn required_offset(
    format: &str,
    tracepoint: &'static str,
    field: &'static str,
) -> Result<u32, BpfError> {
    field_offset(format, field).ok_or(BpfError::FormatField { tracepoint, field })
}

fn read_format(tracepoint: &str) -> Result<String, BpfError> {
    let path = format!("{TRACEFS}/events/{tracepoint}/format");
    std::fs::read_to_string(&path).map_err(|source| BpfError::Read { path, source })
}

/// Field offsets of this kernel's tracepoints, from their format files.
pub fn tracepoint_offsets() -> Result<(SignalOffsets, ExitOffsets, NewTaskOffsets), BpfError> {
    let signal = read_format("signal/signal_generate")?;
    let field = |name| required_offset(&signal, "signal/signal_generate", name);
    let signal_offsets = SignalOffsets {
        sig: field("sig")?,
        code: field("code")?,
        pid: field("pid")?,
        result: field("result")?,
    };
    let exit = read_format("sched/sched_process_exit")?;
    let exit_offsets = ExitOffsets {
        // Older kernels lack group_dead; the program then watches the leader.
        group_dead: field_offset(&exit, "group_dead").unwrap_or(u32::MAX),
    };
    let newtask = read_format("task/task_newtask")?;
    let newtask_field = |name| required_offset(&newtask, "task/task_newtask", name);
    let newtask_offsets = NewTaskOffsets {
        pid: newtask_field("pid")?,
        clone_flags: newtask_field("clone_flags")?,
    };
    if signal_offsets != SignalOffsets::DEFAULT {
        info!(
            ?signal_offsets,
            "this kernel lays out signal_generate differently; using its offsets"
        );
    }
    Ok((signal_offsets, exit_offsets, newtask_offsets))
}

/// Where to look for the eBPF object when none is named.
pub fn default_object_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        paths.push(dir.join("chpox-ebpf.o"));
        if let Some(parent) = dir.parent() {
            // PREFIX/bin/chpox-agent → PREFIX/lib/chpox/chpox-ebpf.o, where
            // `cargo xtask install` puts it.
            paths.push(parent.join("lib/chpox/chpox-ebpf.o"));
            // target/{debug,release}/chpox-agent → target/chpox-ebpf.o
            paths.push(parent.join("chpox-ebpf.o"));
        }
    }
    paths.push(PathBuf::from("/usr/lib/chpox/chpox-ebpf.o"));
    paths
}

/// The loaded and attached program with its maps.
pub struct Bpf {
    /// Keeps programs and links alive.
    _ebpf: Ebpf,
    registry: BpfHashMap<MapData, u32, Registration>,
    /// Thread id → process id for the non-leader threads of registered
    /// processes, so a trigger aimed at a thread counts for its process.
    threads: BpfHashMap<MapData, u32, u32>,
    /// The members of registered trees (see [`TreeMembers`]).
    tree: Arc<TreeMembers>,
    states: Arc<StatesMap>,
    /// The agent takes these to poll them.
    pub events: Option<RingBuf<MapData>>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Whether the `task_kill` guard is attached.
    pub guard: Guard,
    /// Whether the agent hears of registered processes that stop ignoring
    /// their trigger signal (the `rt_sigaction` watch is attached).
    pub watch: bool,
    /// The `task_vma` iterator, for mappings' flags without smaps.
    pub vma_iter: Option<Arc<vma_iter::VmaIter>>,
    /// The `task` iterator, for what remote syscalls would ask.
    pub task_iter: Option<Arc<task_iter::TaskStateIter>>,
}

impl Bpf {
    pub fn load(object: Option<&Path>) -> Result<Bpf, BpfError> {
        mount_filesystems()?;
        let candidates = match object {
            Some(p) => vec![p.to_path_buf()],
            None => default_object_paths(),
        };
        let path = candidates.iter().find(|p| p.exists()).ok_or_else(|| {
            BpfError::ObjectMissing(
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
        let bytes = std::fs::read(path).map_err(|source| BpfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let (signal_offsets, exit_offsets, newtask_offsets) = tracepoint_offsets()?;
        // The guard needs the BPF LSM and the kernel's BTF; without either
        // the agent works as before, with SIG_IGN as the only protection.
        let kernel_btf = btf::Btf::from_sys_fs();
        let task_offsets = bpf_lsm_enabled().and_then(|()| {
            kernel_btf
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|b| b.task_offsets().map_err(|e| e.to_string()))
        });
        let vma_offsets = kernel_btf
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|b| b.vma_offsets().map_err(|e| e.to_string()));
        let task_state_offsets = kernel_btf
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|b| b.task_state_offsets().map_err(|e| e.to_string()));
        let sigaction_offsets = read_format(SIGACTION_TRACEPOINT).and_then(|format| {
            let field = |name| required_offset(&format, SIGACTION_TRACEPOINT, name);
            Ok(SigactionOffsets {
                sig: field("sig")?,
                act: field("act")?,
            })
        });
        let mut ebpf = EbpfLoader::new()
            .override_global(
                names::GLOBAL_SIGACTION_OFFSETS,
                sigaction_offsets
                    .as_ref()
                    .unwrap_or(&SigactionOffsets::DEFAULT),
                true,
            )
            .override_global(names::GLOBAL_SIGNAL_OFFSETS, &signal_offsets, true)
            .override_global(names::GLOBAL_EXIT_OFFSETS, &exit_offsets, true)
            .override_global(names::GLOBAL_NEWTASK_OFFSETS, &newtask_offsets, true)
            .override_global(
                names::GLOBAL_VMA_OFFSETS,
                vma_offsets.as_ref().unwrap_or(&VmaOffsets::DEFAULT),
                true,
            )
            .override_global(
                names::GLOBAL_TASK_OFFSETS,
                task_offsets.as_ref().unwrap_or(&TaskOffsets::DEFAULT),
                true,
            )
            .override_global(
                names::GLOBAL_TASK_STATE_OFFSETS,
                task_state_offsets
                    .as_ref()
                    .unwrap_or(&TaskStateOffsets::DEFAULT),
                true,
            )
            .load(&bytes)
            .map_err(|e| BpfError::Load(e.to_string()))?;
        // The logger must exist before the programs load (they reference
        // its map) and live as long as they do.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!(error = %e, "eBPF logging unavailable");
                None
            }
        };
        for (program, category, name) in [
            (names::SIGNAL_PROGRAM, "signal", "signal_generate"),
            (names::EXIT_PROGRAM, "sched", "sched_process_exit"),
            (names::NEWTASK_PROGRAM, "task", "task_newtask"),
        ] {
            attach_tracepoint(&mut ebpf, program, category, name)?;
        }
        // Without syscall tracepoints (CONFIG_FTRACE_SYSCALLS) the agent
        // does not hear of a disposition change; everything else works.
        let watch = match sigaction_offsets {
            Ok(_) => match attach_tracepoint(
                &mut ebpf,
                names::SIGACTION_PROGRAM,
                "syscalls",
                "sys_enter_rt_sigaction",
            ) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "not watching registered processes' rt_sigaction");
                    false
                }
            },
            Err(e) => {
                warn!(error = %e, "not watching registered processes' rt_sigaction");
                false
            }
        };
        // Without it, flags read while frozen come from smaps, as before.
        let vma_iter = match vma_offsets.and_then(|_| load_vma_iter(&mut ebpf)) {
            Ok(i) => Some(Arc::new(i)),
            Err(e) => {
                warn!(error = %e, "no task_vma iterator: frozen processes' memory flags are read from smaps");
                None
            }
        };
        let task_iter = match task_state_offsets.and_then(|_| load_task_iter(&mut ebpf)) {
            Ok(i) => Some(Arc::new(i)),
            Err(e) => {
                warn!(error = %e, "no task iterator: frozen processes are asked with remote syscalls");
                None
            }
        };
        let guard = match task_offsets {
            Ok(_) => match attach_guard(&mut ebpf) {
                Ok(()) => Guard::Active,
                Err(e) => Guard::Unavailable(e),
            },
            Err(e) => Guard::Unavailable(e),
        };
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| BpfError::Map {
                map,
                reason: e.to_string(),
            }
        };
        let registry = BpfHashMap::try_from(
            ebpf.take_map(names::REGISTRY)
                .ok_or(BpfError::MapMissing(names::REGISTRY))?,
        )
        .map_err(map_err(names::REGISTRY))?;
        let threads = BpfHashMap::try_from(
            ebpf.take_map(names::THREADS)
                .ok_or(BpfError::MapMissing(names::THREADS))?,
        )
        .map_err(map_err(names::THREADS))?;
        let tree = BpfHashMap::try_from(
            ebpf.take_map(names::TREE)
                .ok_or(BpfError::MapMissing(names::TREE))?,
        )
        .map_err(map_err(names::TREE))?;
        let events = RingBuf::try_from(
            ebpf.take_map(names::EVENTS)
                .ok_or(BpfError::MapMissing(names::EVENTS))?,
        )
        .map_err(map_err(names::EVENTS))?;
        let states_map = ebpf
            .take_map(names::STATES)
            .ok_or(BpfError::MapMissing(names::STATES))?;
        let states = Arc::new(StatesMap::new(states_map)?);
        info!(object = %path.display(), "eBPF program loaded and attached");
        Ok(Bpf {
            _ebpf: ebpf,
            registry,
            threads,
            tree: Arc::new(TreeMembers(std::sync::Mutex::new(tree))),
            states,
            events: Some(events),
            logger,
            guard,
            watch,
            vma_iter,
            task_iter,
        })
    }

    pub fn register(&mut self, tgid: u32, reg: Registration) -> Result<(), BpfError> {
        self.states.reset(reg.slot);
        self.registry
            .insert(tgid, reg, 0)
            .map_err(|e| BpfError::Map {
                map: names::REGISTRY,
                reason: e.to_string(),
            })?;
        // The threads that exist already; from now on the program adds new
        // ones itself (it watches thread creation in registered processes).
        for tid in threads_of(tgid) {
            if let Err(e) = self.threads.insert(tid, tgid, 0) {
                tracing::warn!(tgid, tid, error = %e, "a trigger aimed at this thread will not count");
            }
        }
        if reg.flags & chpox_common::flags::INCLUDE_CHILDREN != 0 {
            self.tree.seed(tgid);
        }
        Ok(())
    }

    pub fn unregister(&mut self, tgid: u32) {
        // Absent already when the program saw the process exit.
        let _ = self.registry.remove(&tgid);
        for tid in threads_of(tgid) {
            let _ = self.threads.remove(&tid);
        }
        self.tree.forget(tgid);
    }

    /// The members of registered trees, for freezing them without a scan.
    pub fn tree(&self) -> Arc<TreeMembers> {
        Arc::clone(&self.tree)
    }

    pub fn states(&self) -> Arc<StatesMap> {
        Arc::clone(&self.states)
    }
}

/// Load iterator `program` of the object for the kernel's iterator
/// `target` (`task`, `task_vma`); its descriptor, which keeps it loaded.
fn load_iter(ebpf: &mut Ebpf, program: &str, target: &str) -> Result<OwnedFd, String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
    let iter: &mut aya::programs::Iter = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    iter.load(target, &btf)
        .map_err(|e| format!("{program}: {e}"))?;
    iter.fd()
        .map_err(|e| e.to_string())?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())
}

fn load_vma_iter(ebpf: &mut Ebpf) -> Result<vma_iter::VmaIter, String> {
    load_iter(ebpf, names::VMA_FLAGS_PROGRAM, "task_vma").map(vma_iter::VmaIter::new)
}

fn load_task_iter(ebpf: &mut Ebpf) -> Result<task_iter::TaskStateIter, String> {
    load_iter(ebpf, names::TASK_STATE_PROGRAM, "task").map(task_iter::TaskStateIter::new)
}

/// For `chpox dump`: the iterator program `name` a running agent loaded,
/// found among the kernel's loaded programs by its name (which carries the
/// layout of its records). Without an agent, or unless root, none: nothing
/// is loaded here (loading takes ~60 ms of CPU, more than a small dump's
/// whole work).
fn agent_iterator(name: &str) -> Option<OwnedFd> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    match iter::find_loaded(name) {
        Ok(Some(prog)) => Some(prog),
        Ok(None) => {
            debug!(name, "no agent's iterator loaded");
            None
        }
        Err(e) => {
            debug!(name, error = %e, "cannot look for the agent's iterator");
            None
        }
    }
}

/// For `chpox dump`: the agent's `task` iterator, or none (then remote
/// syscalls ask).
pub fn kernel_state_from_agent() -> Option<Arc<crate::process::kernelstate::KernelState>> {
    let iter = task_iter::TaskStateIter::new(agent_iterator(names::TASK_STATE_PROGRAM)?);
    Some(crate::process::kernelstate::KernelState::new(Box::new(
        move |pid| iter.read(pid),
    )))
}

/// For `chpox dump`: the agent's `task_vma` iterator, or none (then
/// smaps tells every flag).
pub fn vma_flags_from_agent() -> Option<Arc<crate::memory::vmflags::KernelVmaFlags>> {
    let iter = vma_iter::VmaIter::new(agent_iterator(names::VMA_FLAGS_PROGRAM)?);
    Some(crate::memory::vmflags::KernelVmaFlags::from_cache(
        Box::new(move |pid| iter.read(pid)),
    ))
}

const SIGACTION_TRACEPOINT: &str = "syscalls/sys_enter_rt_sigaction";

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<(), BpfError> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| BpfError::Load(format!("program {program} missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| BpfError::Load(e.to_string()))?;
    tp.load()
        .map_err(|e| BpfError::Load(format!("{program}: {e}")))?;
    tp.attach(category, name)
        .map_err(|e| BpfError::Load(format!("attaching {category}/{name}: {e}")))?;
    Ok(())
}

/// Whether the running kernel has the BPF LSM active (it is listed in
/// securityfs's `lsm`; securityfs is mounted if missing).
fn bpf_lsm_enabled() -> Result<(), String> {
    let lsm = format!("{SECURITYFS}/lsm");
    if !Path::new(&lsm).exists() && !is_mounted(SECURITYFS, "securityfs") {
        info!(path = SECURITYFS, "mounting securityfs");
        if let Err(e) = nix::mount::mount(
            Some("none"),
            SECURITYFS,
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            return Err(format!("cannot mount securityfs at {SECURITYFS}: {e}"));
        }
    }
    let active = std::fs::read_to_string(&lsm).map_err(|e| format!("reading {lsm}: {e}"))?;
    if active.trim().split(',').any(|m| m == "bpf") {
        Ok(())
    } else {
        Err(format!(
            "the BPF LSM is not active (the kernel's LSMs are {}; boot with lsm=...,bpf)",
            active.trim()
        ))
    }
}

/// Load and attach the `task_kill` guard.
fn attach_guard(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("reading the kernel's BTF: {e}"))?;
    let program: &mut Lsm = ebpf
        .program_mut(names::GUARD_PROGRAM)
        .ok_or_else(|| format!("program {} missing from the object", names::GUARD_PROGRAM))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program
        .load(names::GUARD_HOOK, &btf)
        .map_err(|e| format!("loading the LSM program: {e}"))?;
    program
        .attach()
        .map_err(|e| format!("attaching the LSM program: {e}"))?;
    Ok(())
}

/// The `STATES` array, memory-mapped so that the agent changes a slot's
/// state with the same atomic compare-and-swap the eBPF program uses. (A
/// map update syscall would overwrite the value wholesale and could lose a
/// request the program recorded in between.)
pub struct StatesMap {
    /// Keeps the map (and so the mapping's backing) alive.
    _map: aya::maps::Map,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for StatesMap {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for StatesMap {}

const SLOT_SIZE: usize = std::mem::size_of::<SlotState>();

impl StatesMap {
    fn new(map: aya::maps::Map) -> Result<StatesMap, BpfError> {
        let len = (SLOT_SIZE * MAX_REGISTRATIONS as usize).next_multiple_of(4096);
        let fd = match &map {
            aya::maps::Map::Array(data) => data.fd().as_fd().try_clone_to_owned(),
            _ => {
                return Err(BpfError::Map {
                    map: names::STATES,
                    reason: "is not an array".into(),
                });
            }
        }
        .map_err(|e| BpfError::Map {
            map: names::STATES,
            reason: e.to_string(),
        })?;
        // SAFETY: mapping a BPF_F_MMAPABLE array map shared, read-write,
        // from offset 0 for at most its size: the kernel's documented way
        // to share array values with user space. The fd is kept alive by
        // `map`, and the mapping by `self` until Drop unmaps it.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).ok_or(BpfError::Mmap(nix::Error::EINVAL))?,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(BpfError::Mmap)?;
        Ok(StatesMap {
            _map: map,
            base: base.as_ptr().cast(),
            len,
        })
    }

    fn slot_ptr(&self, slot: u32) -> Option<*mut u8> {
        let offset = slot as usize * SLOT_SIZE;
        (offset + SLOT_SIZE <= self.len).then(|| self.base.wrapping_add(offset))
    }

    fn state(&self, slot: u32) -> Option<&AtomicU32> {
        // SAFETY: slot_ptr is in bounds of our live mapping and 8-aligned
        // (SLOT_SIZE is 32 and the base is page-aligned); `state` is the
        // first field of the #[repr(C)] SlotState.
        self.slot_ptr(slot)
            .map(|p| unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    fn counter(&self, slot: u32, field_offset: usize) -> u64 {
        self.slot_ptr(slot)
            .map(|p| {
                // SAFETY: as in `state`; the counters are the u64 fields at
                // offsets 8, 16 and 24, 8-aligned.
                unsafe { AtomicU64::from_ptr(p.wrapping_add(field_offset).cast()) }
                    .load(Ordering::Acquire)
            })
            .unwrap_or(0)
    }

    pub fn load(&self, slot: u32) -> SlotState {
        SlotState {
            state: self
                .state(slot)
                .map(|s| s.load(Ordering::Acquire))
                .unwrap_or(0),
            _pad: 0,
            signals: self.counter(slot, 8),
            coalesced: self.counter(slot, 16),
            again_ns: self.counter(slot, 24),
        }
    }

    /// Record when `slot` is about to become RUNNING_AGAIN (as the eBPF
    /// program does for a signal).
    pub fn set_again_ns(&self, slot: u32, ns: u64) {
        if let Some(p) = self.slot_ptr(slot) {
            // SAFETY: in bounds of the mapping, as in `state`; again_ns is
            // the u64 at offset 24, 8-aligned.
            unsafe { AtomicU64::from_ptr(p.wrapping_add(24).cast()) }.store(ns, Ordering::Release);
        }
    }

    /// Atomically move `slot` from `from` to `to`; false if it was not `from`.
    pub fn transition(&self, slot: u32, from: u32, to: u32) -> bool {
        self.state(slot).is_some_and(|s| {
            s.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Start a new registration in `slot` with clean counters.
    pub fn reset(&self, slot: u32) {
        if let Some(p) = self.slot_ptr(slot) {
            // SAFETY: in bounds of the mapping, as in `state`; the slot is not
            // in REGISTRY yet, so the program does not touch it.
            unsafe {
                AtomicU32::from_ptr(p.cast()).store(chpox_common::STATE_IDLE, Ordering::Release);
                AtomicU64::from_ptr(p.wrapping_add(8).cast()).store(0, Ordering::Release);
                AtomicU64::from_ptr(p.wrapping_add(16).cast()).store(0, Ordering::Release);
                AtomicU64::from_ptr(p.wrapping_add(24).cast()).store(0, Ordering::Release);
            }
        }
    }
}

impl Drop for StatesMap {
    fn drop(&mut self) {
        if let Some(ptr) = std::ptr::NonNull::new(self.base.cast()) {
            // SAFETY: unmapping exactly the mapping `new` created; no
            // reference into it outlives `self`.
            let _ = unsafe { nix::sys::mman::munmap(ptr, self.len) };
        }
    }
}

/// The threads of `tgid` other than its leader (none if it is gone).
/// The `TREE` map: the processes descended from each process registered
/// with its children, which the eBPF program keeps up to date as they
/// fork and exit. A hint, never the truth: the freeze checks each
/// member's parent in /proc and confirms with a scan (see
/// `tree::FrozenTree::freeze_hinted`).
pub struct TreeMembers(std::sync::Mutex<BpfHashMap<MapData, u32, u32>>);

impl TreeMembers {
    fn map(&self) -> std::sync::MutexGuard<'_, BpfHashMap<MapData, u32, u32>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The processes of `root`'s tree the program has seen forked.
    pub fn members_of(&self, root: i32) -> Vec<i32> {
        let map = self.map();
        map.iter()
            .filter_map(Result::ok)
            .filter(|&(_, r)| r == root as u32)
            .map(|(pid, _)| pid as i32)
            .collect()
    }

    /// Add the descendants `root` has now; those it forks from now on
    /// the program adds. Repeated until a scan finds nobody new, so a
    /// child forked by a descendant not yet in the map is not missed.
    fn seed(&self, root: u32) {
        let mut known = std::collections::HashSet::new();
        for _ in 0..8 {
            let found: Vec<i32> = crate::tree::descendants_now(root as i32)
                .into_iter()
                .filter(|&p| p != root as i32 && known.insert(p))
                .collect();
            if found.is_empty() {
                return;
            }
            let mut map = self.map();
            for pid in found {
                if let Err(e) = map.insert(pid as u32, root, 0) {
                    // The confirming scan of each freeze still finds it.
                    warn!(root, pid, error = %e, "TREE map full; this child is found by a scan");
                    return;
                }
            }
        }
    }

    /// Drop `root`'s tree (unregistered; its members' exits would too).
    fn forget(&self, root: u32) {
        let mut map = self.map();
        let members: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, r)| r == root)
            .map(|(pid, _)| pid)
            .collect();
        for pid in members {
            let _ = map.remove(&pid);
        }
    }
}

fn threads_of(tgid: u32) -> Vec<u32> {
    crate::ptrace::list_threads(tgid as i32)
        .unwrap_or_default()
        .into_iter()
        .map(|tid| tid as u32)
        .filter(|&tid| tid != tgid)
        .collect()
}

/// Decode a ring buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above, read_unaligned copes with any
    // alignment, and Event is #[repr(C)] plain integers valid for any bits.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: signal_generate
ID: 261
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int code;\toffset:16;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:36;\tsize:4;\tsigned:1;
\tfield:int group;\toffset:40;\tsize:4;\tsigned:1;
\tfield:int result;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn offsets_come_from_the_format_file() {
        assert_eq!(field_offset(FORMAT, "sig"), Some(8));
        assert_eq!(field_offset(FORMAT, "pid"), Some(36));
        assert_eq!(field_offset(FORMAT, "comm"), Some(20));
        assert_eq!(field_offset(FORMAT, "result"), Some(44));
        assert_eq!(field_offset(FORMAT, "common_pid"), Some(4));
        assert_eq!(field_offset(FORMAT, "nope"), None);
    }

    #[test]
    fn short_records_are_not_events() {
        assert!(parse_event(&[0u8; 10]).is_none());
        let e = parse_event(&[0u8; 48]).expect("full record");
        assert_eq!(e.kind, 0);
    }
}
