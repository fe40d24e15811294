//! What a checkpoint image says about a process.
//!
//! These structs are serialized as CBOR with named fields. To keep old images
//! readable as the schema grows: add fields only with `#[serde(default)]`,
//! never rename or repurpose a field, and add enum variants only at the end.
//! Unknown fields written by a newer chpox are ignored on read.

use serde::{Deserialize, Serialize};

pub use super::model_fds::*;
pub use super::model_sockets::{
    InFlight, InetOptions, InetSocketImage, SocketFile, TcpConnection, UnixSocketImage,
};

/// Where a piece of bulk data (pages, an embedded file) lies in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRef {
    /// Byte offset from the start of the image; always a multiple of 4096.
    pub offset: u64,
    /// Bytes as stored (after compression, if any).
    pub stored_len: u64,
    /// Bytes once decompressed.
    pub raw_len: u64,
    /// CRC-32C of the stored bytes.
    pub crc32c: u32,
    pub compression: Compression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Zstd,
}

/// Everything except bulk data.
///
/// A checkpoint holds a tree of processes: `root` (whose fields sit at the
/// top level, where single-process images of earlier versions have them),
/// then its `descendants`, each after its parent, and the `zombies` among
/// them. Kernel objects that several processes share are named by ids in
/// their entries (an open file description, a pipe's inode, a shared
/// memory object), so restore makes each once and hands it to all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "MetadataFields")]
pub struct Metadata {
    pub chpox_version: String,
    /// Wall-clock time of the checkpoint, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    pub host: HostInfo,
    #[serde(flatten)]
    pub root: ProcessImage,
    /// Every process below the root, parents before their children.
    #[serde(default)]
    pub descendants: Vec<ProcessImage>,
    /// Children that had exited and were not reaped yet.
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// Children of the root that a single-process checkpoint left out
    /// (their PIDs): restore says so.
    #[serde(default)]
    pub children_not_saved: Vec<i32>,
    /// Files the memory and the processes depend on; `Vma::file` and
    /// `ProcessInfo::exe_file` index into this.
    pub files: Vec<FileRef>,
    /// How the dump left the processes: running, stopped or killed.
    pub after_dump: AfterDump,
    /// The agent registration this checkpoint was taken under, so
    /// `chpox restore --register` can register the restored process the
    /// same way. Absent in images of `chpox dump` and of older versions.
    #[serde(default)]
    pub registration: Option<SavedRegistration>,
    /// A random identity of this image's content (32 hex digits), which an
    /// incremental image names to find its parent whatever it is called
    /// since (`--keep` renames images). Absent in images of older
    /// versions.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Set in an incremental image: the full image whose pages it
    /// inherits (see `Vma::inherited`).
    #[serde(default)]
    pub parent: Option<ParentRef>,
}

/// [`Metadata`] as decoded: the root's fields where they are, at the top
/// level. Decoding a `#[serde(flatten)]` field buffers every entry of the
/// map (each key, each page run) as generic values and decodes them again:
/// 3.5 ms for the 66 KiB of a 4 GiB process's metadata, which every
/// restore, `--lazy` ones included, reads before anything else.
#[derive(Deserialize)]
struct MetadataFields {
    chpox_version: String,
    created_unix_ns: u64,
    host: HostInfo,
    process: ProcessInfo,
    threads: Vec<ThreadState>,
    vmas: Vec<Vma>,
    fds: Vec<FdEntry>,
    signals: SignalState,
    #[serde(default)]
    descendants: Vec<ProcessImage>,
    #[serde(default)]
    zombies: Vec<Zombie>,
    #[serde(default)]
    children_not_saved: Vec<i32>,
    files: Vec<FileRef>,
    after_dump: AfterDump,
    #[serde(default)]
    registration: Option<SavedRegistration>,
    #[serde(default)]
    image_id: Option<String>,
    #[serde(default)]
    parent: Option<ParentRef>,
}

impl From<MetadataFields> for Metadata {
    fn from(m: MetadataFields) -> Metadata {
        Metadata {
            chpox_version: m.chpox_version,
            created_unix_ns: m.created_unix_ns,
            host: m.host,
            root: ProcessImage {
                process: m.process,
                threads: m.threads,
                vmas: m.vmas,
                fds: m.fds,
                signals: m.signals,
            },
            descendants: m.descendants,
            zombies: m.zombies,
            children_not_saved: m.children_not_saved,
            files: m.files,
            after_dump: m.after_dump,
            registration: m.registration,
            image_id: m.image_id,
            parent: m.parent,
        }
    }
}

/// The parent of an incremental image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's `Metadata::image_id`.
    pub image_id: String,
    /// Where the parent was when this image was written (absolute); a
    /// restore looks there first, then beside this image.
    pub path: String,
    /// Pages this image takes from the parent, over every process.
    #[serde(default)]
    pub pages_inherited: u64,
}

impl Metadata {
    /// The root, then every descendant, parents first.
    pub fn processes(&self) -> impl Iterator<Item = &ProcessImage> {
        std::iter::once(&self.root).chain(self.descendants.iter())
    }

    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut ProcessImage> {
        std::iter::once(&mut self.root).chain(self.descendants.iter_mut())
    }

    /// Whether this is an image of more than one process.
    pub fn is_tree(&self) -> bool {
        !self.descendants.is_empty() || !self.zombies.is_empty()
    }
}

/// One live process of the checkpointed tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessImage {
    pub process: ProcessInfo,
    pub threads: Vec<ThreadState>,
    pub vmas: Vec<Vma>,
    pub fds: Vec<FdEntry>,
    pub signals: SignalState,
}

/// A child that had exited and was not reaped yet: restored as a zombie, so
/// its parent's `wait` still gets `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The wait status the parent will read (`exit_code` of /proc/PID/stat).
    pub status: i32,
}

/// How a process was registered with the agent when it was checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SavedRegistration {
    pub signal: u32,
    /// The FLAGS of the register line (`chpox_common::flags`).
    pub flags: u32,
    /// Periodic checkpoints every this many milliseconds (`--every`).
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// Earlier images kept (`--keep`), if the registration said.
    #[serde(default)]
    pub keep: Option<u32>,
    /// Descriptors chpox cannot restore were allowed to become /dev/null.
    #[serde(default)]
    pub unsupported_fd_null: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterDump {
    LeaveRunning,
    LeaveStopped,
    Kill,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub kernel_release: String,
    pub cpu_model: String,
    /// XCR0 of the dumping CPU: which XSAVE state components were enabled.
    /// A restoring CPU must enable at least the components the threads use.
    pub xfeatures: u64,
    /// Size in bytes of the XSAVE area for `xfeatures` (CPUID 0xD.0:EBX).
    pub xsave_size: u32,
    pub page_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub cmdline: Vec<String>,
    /// Path of the executable as the kernel names it (`/proc/PID/exe`).
    pub exe: String,
    /// Index into `Metadata::files` of the executable.
    pub exe_file: Option<usize>,
    pub cwd: String,
    pub umask: u32,
    pub personality: u32,
    pub creds: Credentials,
    pub rlimits: Vec<Rlimit>,
    pub sched: Scheduling,
    pub mm: MmFields,
    /// The ELF auxiliary vector as (type, value) pairs, without the AT_NULL end.
    pub auxv: Vec<(u64, u64)>,
    /// Process start time in clock ticks since boot; with the PID this
    /// identifies one incarnation of the process.
    pub start_time_ticks: u64,
    /// Process group and session (0 in images of earlier versions: the
    /// restored process then joins the restorer's).
    #[serde(default)]
    pub pgid: i32,
    #[serde(default)]
    pub sid: i32,
    /// The process was in a job-control stop (state T): it is left in one.
    #[serde(default)]
    pub stopped: bool,
    /// The signal its parent gets when it exits (SIGCHLD for a fork).
    #[serde(default = "default_exit_signal")]
    pub exit_signal: i32,
    /// `PR_SET_PDEATHSIG`: the signal it gets when its parent dies.
    #[serde(default)]
    pub pdeath_signal: i32,
    /// `PR_SET_CHILD_SUBREAPER`.
    #[serde(default)]
    pub child_subreaper: bool,
    /// Made by its parent with CLONE_FS: one working directory, root and
    /// umask for both, changed by either.
    #[serde(default)]
    pub shares_fs_with_parent: bool,
    /// Timers that are not descriptors: `setitimer` and POSIX timers.
    #[serde(default)]
    pub timers: Timers,
    /// Small per-process attributes: oom_score_adj, prctl flags, seccomp.
    #[serde(default)]
    pub attrs: ProcessAttrs,
}

/// Timers a process holds without a descriptor (`crate::timers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timers {
    /// The armed `setitimer` timers.
    pub itimers: Vec<ITimer>,
    /// Every POSIX timer (`timer_create`), armed or not.
    pub posix: Vec<PosixTimer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ITimer {
    /// ITIMER_REAL, ITIMER_VIRTUAL or ITIMER_PROF.
    pub which: i32,
    pub interval_ns: u64,
    /// Time left at the checkpoint.
    pub value_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    /// The timer ID the process knows it by (`timer_t`).
    pub id: i32,
    pub clock: i32,
    /// `sigev_notify`: SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID (glibc's
    /// SIGEV_THREAD timers are SIGEV_THREAD_ID to a helper thread).
    pub notify: i32,
    pub signo: i32,
    /// `sigev_value`, handed to the handler in `si_value`.
    pub value: u64,
    /// For SIGEV_THREAD_ID: the thread signalled (its TID at the
    /// checkpoint).
    pub tid: i32,
    pub interval_ns: u64,
    /// Time left at the checkpoint; 0 when disarmed.
    pub value_ns: u64,
    /// `timer_getoverrun` at the checkpoint (not settable: recorded).
    pub overrun: i32,
}

/// Small per-process attributes (`crate::process` dumps them,
/// `restore::process` sets them back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAttrs {
    /// `/proc/PID/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
    /// `PR_GET_DUMPABLE`.
    pub dumpable: Option<u32>,
    /// `PR_GET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// `PR_GET_THP_DISABLE`: 0, 1 (disabled), 3 (disabled except where
    /// madvised, PR_THP_DISABLE_EXCEPT_ADVISED).
    pub thp_disable: u32,
    /// Seccomp filters, oldest first, as classic BPF
    /// (`PTRACE_SECCOMP_GET_FILTER`): 8-byte `sock_filter` instructions.
    pub seccomp_filters: Vec<SeccompFilter>,
    /// The working directory had been removed: restore makes one, enters
    /// it and removes it again.
    pub cwd_deleted: bool,
    /// Its permission bits.
    pub cwd_mode: u32,
    /// `mlockall` flags that outlive the call: MCL_FUTURE, MCL_ONFAULT.
    pub mlockall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    #[serde(with = "serde_bytes")]
    pub program: Vec<u8>,
    /// `SECCOMP_FILTER_FLAG_*` the kernel reports (`PTRACE_SECCOMP_GET_METADATA`).
    pub flags: u64,
}

fn default_exit_signal() -> i32 {
    libc::SIGCHLD
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    pub name: String,
    /// `u64::MAX` is RLIM_INFINITY.
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scheduling {
    pub nice: i32,
    pub policy: i32,
    pub priority: i32,
}

/// The memory-map fields the kernel keeps per process; `PR_SET_MM_MAP` sets
/// them back on restore.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    pub regs: GpRegs,
    /// The XSAVE area from `PTRACE_GETREGSET NT_X86_XSTATE`, exactly as the
    /// kernel gave it (legacy FXSAVE region, header, extended components).
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    /// Blocked signals, bit N-1 for signal N.
    pub sigmask: u64,
    pub syscall: SyscallState,
    pub sigaltstack: Option<AltStack>,
    /// Signals queued for this thread alone, as raw 128-byte siginfo.
    pub pending: Vec<PendingSignal>,
    pub rseq: Option<Rseq>,
    pub comm: String,
    /// The thread's `clear_child_tid` (set_tid_address): the kernel zeroes
    /// this word and wakes its futex when the thread exits, which is how
    /// `pthread_join` learns of it. Absent in images of chpox 0.1.0 early
    /// builds.
    #[serde(default)]
    pub clear_child_tid: Option<u64>,
    /// The thread's robust-futex list (`set_robust_list`): how the kernel
    /// marks the robust mutexes a dying thread held as owner-died. Absent
    /// in older images.
    #[serde(default)]
    pub robust_list: Option<RobustList>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobustList {
    pub head: u64,
    pub len: u64,
}

/// The general registers, in the kernel's `user_regs_struct` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// Whether a thread was stopped inside a system call, and how the kernel
/// would have continued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyscallState {
    /// Stopped in user code.
    None,
    /// Inside syscall `nr`, which the kernel would restart on resume.
    /// `restart` is the `-ERESTART*` code found in rax.
    Restartable { nr: u64, restart: RestartKind },
    /// Inside syscall `nr` that already has its result in rax.
    Completed { nr: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartKind {
    /// -ERESTARTSYS (512): restart unless a handler without SA_RESTART ran.
    Sys,
    /// -ERESTARTNOINTR (513): always restart.
    NoIntr,
    /// -ERESTARTNOHAND (514): restart if no handler ran.
    NoHand,
    /// -ERESTART_RESTARTBLOCK (516): continue through `restart_syscall`
    /// (sleeps that track their remaining time: nanosleep, poll, futex…).
    RestartBlock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSignal {
    pub signo: i32,
    pub code: i32,
    #[serde(with = "serde_bytes")]
    pub siginfo: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub flags: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalState {
    /// One entry per signal 1..=64 except SIGKILL and SIGSTOP.
    pub actions: Vec<SigAction>,
    /// Signals queued for the whole process.
    pub shared_pending: Vec<PendingSignal>,
}

/// A `struct sigaction` as the kernel holds it (`kernel_sigaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: i32,
    /// 0 = SIG_DFL, 1 = SIG_IGN, else a handler address.
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// MAP_SHARED rather than MAP_PRIVATE.
    pub shared: bool,
    /// Offset into the backing file (0 for anonymous memory).
    pub offset: u64,
    /// The path column of `/proc/PID/maps` (`[heap]`, `/usr/lib/…`, empty).
    pub name: String,
    pub kind: VmaKind,
    /// Index into `Metadata::files` for file-backed mappings.
    pub file: Option<usize>,
    /// `VmFlags` from smaps (`rd wr mr mw me ac sd gd …`).
    pub vm_flags: Vec<String>,
    /// Pages whose content is in the image. Pages not covered were never
    /// touched (read back as zero), or are clean pages of the backing file.
    pub pages: Vec<PageRun>,
    /// Of shared anonymous memory: the shared memory object (its inode).
    /// Mappings with the same id are one object: restore maps it once and
    /// shares it, and its pages are stored with the first mapping only.
    #[serde(default)]
    pub shmem_id: Option<u64>,
    /// In an incremental image: runs (address, page count) of this
    /// mapping whose content is the parent image's (same process, same
    /// address): pages neither written nor discarded since the parent was
    /// taken. Empty in a full image.
    #[serde(default)]
    pub inherited: Vec<(u64, u64)>,
    /// Of a SysV shared memory mapping: the segment it attaches.
    #[serde(default)]
    pub sysv: Option<SysvSegment>,
}

/// A SysV shared memory segment (`shmget`), as `/proc/sysvipc/shm` showed
/// it at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvSegment {
    /// Its key (IPC_PRIVATE, 0, for a private or removed segment).
    pub key: i32,
    pub id: i32,
    /// Bytes, as given to `shmget`; attachments span it rounded up to
    /// whole pages.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Marked for removal (IPC_RMID) while still attached.
    pub removed: bool,
    /// Mappings attaching it, system-wide (the kernel's nattch).
    pub attachments: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private anonymous memory (includes `[heap]` and `[stack]`).
    Anonymous,
    /// MAP_SHARED anonymous memory (or SysV shm / memfd-backed shared map).
    SharedAnonymous,
    /// MAP_PRIVATE of a file: clean pages come from the file, pages the
    /// process wrote (copy-on-write) are in the image.
    PrivateFile,
    /// MAP_SHARED of a file: the content lives in the file.
    SharedFile,
    /// Kernel-provided: `[vdso]`, `[vvar]`, `[vvar_vclock]`. Recorded, not copied;
    /// restore moves the new kernel's copies here.
    Vdso,
    Vvar,
    VvarVclock,
    /// `[vsyscall]`: fixed by the kernel, nothing to restore.
    Vsyscall,
}

impl VmaKind {
    /// Kernel-provided mappings whose content is never stored.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Self::Vdso | Self::Vvar | Self::VvarVclock | Self::Vsyscall
        )
    }
}

/// A run of consecutive pages stored contiguously in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub addr: u64,
    pub npages: u64,
    pub data: DataRef,
}

/// A file the process depends on, with enough identity to notice if it
/// changed after the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
    /// The file had been deleted at dump time (its content is then embedded).
    pub deleted: bool,
    pub role: FileRole,
    /// The whole content, when embedded in the image.
    pub embedded: Option<DataRef>,
    /// A deleted file still linked under another name: a named POSIX
    /// semaphore (sem_open makes it under a temporary name, maps it, links
    /// it under its own name and removes the temporary one). Restore links
    /// its copy there again, so that a process opening the name after the
    /// restore shares it with the restored ones.
    #[serde(default)]
    pub linked_as: Option<LinkedName>,
}

/// The other name of a deleted file, and the file's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedName {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRole {
    Executable,
    /// Mapped into memory (shared library, mapped data file).
    Mapped,
    /// Named explicitly to embed (`--embed-lib`, `chpoxctl addlib`) but not
    /// mapped at dump time.
    Library,
}
