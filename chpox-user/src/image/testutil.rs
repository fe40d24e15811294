//! Realistic metadata and small sample images for tests across the crate.
//!
//! `sample_metadata()` describes a small x86-64 process and holds no
//! `DataRef`s, so it is valid in any image. `write_sample_image()` writes an
//! image whose page runs, embedded file and fd content are real blobs with
//! content from [`memory_byte`], laid out so that some runs touch each other
//! (within a VMA and across two adjacent VMAs) and others leave gaps.

use std::path::Path;

use super::model::*;
use super::{ImageWriter, WriteOptions};

pub(crate) const PAGE: u64 = 4096;

/// `.data` of the executable: one page, stored whole.
pub(crate) const DATA_VMA: (u64, u64) = (0x5555_5555_c000, 0x5555_5555_d000);
/// `[heap]`, right after `.data`.
pub(crate) const HEAP_VMA: (u64, u64) = (0x5555_5555_d000, 0x5555_5557_e000);
/// `[stack]`.
pub(crate) const STACK_VMA: (u64, u64) = (0x7fff_fffd_e000, 0x7fff_ffff_f000);

/// Page runs of the sample image as (address, pages). The first three are
/// contiguous (crossing from `.data` into `[heap]`), then a gap.
pub(crate) const SAMPLE_RUNS: [(u64, u64); 5] = [
    (DATA_VMA.0, 1),
    (HEAP_VMA.0, 2),
    (HEAP_VMA.0 + 2 * PAGE, 1),
    (HEAP_VMA.0 + 5 * PAGE, 3),
    (STACK_VMA.1 - 2 * PAGE, 2),
];

/// Content of the embedded deleted file and of fd 3.
pub(crate) const EMBEDDED_FILE: &[u8] = b"scratch data of a deleted file\n";
pub(crate) const FD_CONTENT: &[u8] = b"log line 1\nlog line 2\n";

/// The byte at `addr` in the sample process's stored memory. Half of each
/// page is zero, so compression has something to do.
pub(crate) fn memory_byte(addr: u64) -> u8 {
    if addr & 0x800 != 0 {
        0
    } else {
        (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
    }
}

/// `len` bytes of sample memory from `addr`.
pub(crate) fn memory(addr: u64, len: u64) -> Vec<u8> {
    (addr..addr + len).map(memory_byte).collect()
}

/// A written sample image.
pub(crate) struct SampleImage {
    /// The metadata as written, DataRefs included.
    pub meta: Metadata,
    /// What `finish` returned.
    pub size: u64,
}

/// Writes the sample image to `path`.
pub(crate) fn write_sample_image(path: &Path, compress: bool) -> SampleImage {
    write_sample_image_with(path, compress, |_, _| {})
}

/// Writes the sample image to `path`, letting `extra` add blobs and
/// metadata before `finish`.
pub(crate) fn write_sample_image_with(
    path: &Path,
    compress: bool,
    extra: impl FnOnce(&mut ImageWriter, &mut Metadata),
) -> SampleImage {
    let mut meta = sample_metadata();
    let mut w = ImageWriter::create(
        path,
        WriteOptions {
            compress,
            owner: None,
            keep_previous: 0,
            as_user: None,
            defer_compression: false,
        },
    )
    .expect("create sample image");
    for (addr, npages) in SAMPLE_RUNS {
        let data = w
            .add_data(&memory(addr, npages * PAGE))
            .expect("write page run");
        let vma = meta
            .root
            .vmas
            .iter_mut()
            .find(|v| v.start <= addr && addr < v.end)
            .expect("sample run inside a VMA");
        vma.pages.push(PageRun { addr, npages, data });
    }
    let file = w.add_data(EMBEDDED_FILE).expect("write embedded file");
    meta.files[2].embedded = Some(file);
    let fd = w.add_data(FD_CONTENT).expect("write fd content");
    if let FdKind::RegularFile { embedded, .. } = &mut meta.root.fds[3].kind {
        *embedded = Some(fd);
    }
    extra(&mut w, &mut meta);
    let size = w.finish(&meta).expect("finish sample image");
    SampleImage { meta, size }
}

/// The sample image's bytes, written through a temporary directory.
pub(crate) fn sample_image_bytes(compress: bool) -> (Vec<u8>, Metadata) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sample.img");
    let s = write_sample_image(&path, compress);
    (std::fs::read(&path).expect("read sample image"), s.meta)
}

/// Metadata canonically encoded, to compare two `Metadata` values.
pub(crate) fn cbor(meta: &Metadata) -> Vec<u8> {
    let mut v = Vec::new();
    ciborium::into_writer(meta, &mut v).expect("encode metadata");
    v
}

fn vma(start: u64, end: u64, perms: &str, name: &str, kind: VmaKind, file: Option<usize>) -> Vma {
    let b = perms.as_bytes();
    Vma {
        start,
        end,
        read: b.first() == Some(&b'r'),
        write: b.get(1) == Some(&b'w'),
        exec: b.get(2) == Some(&b'x'),
        shared: b.get(3) == Some(&b's'),
        offset: 0,
        name: name.into(),
        kind,
        file,
        vm_flags: ["rd", "mr", "mw", "me", "ac", "sd"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        pages: Vec::new(),
        shmem_id: None,
        sysv: None,
        inherited: Vec::new(),
    }
}

fn file(path: &str, role: FileRole, size: u64, deleted: bool) -> FileRef {
    FileRef {
        path: path.into(),
        dev: 0xfd01,
        ino: 1_234_567 + size,
        size,
        mtime_ns: 1_700_000_000_123_456_789,
        mode: 0o100755,
        blake3: blake3::hash(path.as_bytes()).to_hex().to_string(),
        deleted,
        role,
        embedded: None,
        linked_as: None,
    }
}

fn thread(tid: i32, rip: u64) -> ThreadState {
    ThreadState {
        tid,
        regs: GpRegs {
            rip,
            rsp: STACK_VMA.1 - 0x1f8,
            rax: (-516i64) as u64,
            orig_rax: 230, // clock_nanosleep
            cs: 0x33,
            ss: 0x2b,
            eflags: 0x246,
            fs_base: 0x7fff_f7d7_e740,
            ..GpRegs::default()
        },
        xsave: (0..832u32).map(|i| (i % 251) as u8).collect(),
        sigmask: 1 << (libc::SIGCHLD - 1),
        syscall: SyscallState::Restartable {
            nr: 230,
            restart: RestartKind::RestartBlock,
        },
        sigaltstack: None,
        pending: vec![PendingSignal {
            signo: libc::SIGUSR1,
            code: 0,
            siginfo: vec![0xa5; 128],
        }],
        rseq: Some(Rseq {
            addr: 0x7fff_f7d7_ee00 + tid as u64,
            len: 32,
            flags: 0,
            signature: 0x5305_3053,
        }),
        comm: "sleeper".into(),
        clear_child_tid: Some(0x7fff_f7d7_e9d0 + tid as u64),
        robust_list: Some(RobustList {
            head: 0x7fff_f7d7_e9e0 + tid as u64,
            len: 24,
        }),
    }
}

/// A small, realistic process: an executable, libc, heap, stack, vdso, two
/// threads in `clock_nanosleep`, a few fds. No DataRefs.
pub(crate) fn sample_metadata() -> Metadata {
    let exe = "/usr/local/bin/sleeper";
    let libc_path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let mut text = vma(
        0x5555_5555_6000,
        0x5555_5555_a000,
        "r-xp",
        exe,
        VmaKind::PrivateFile,
        Some(0),
    );
    text.offset = 0x2000;
    let mut data = vma(
        DATA_VMA.0,
        DATA_VMA.1,
        "rw-p",
        exe,
        VmaKind::PrivateFile,
        Some(0),
    );
    data.offset = 0x7000;
    let vmas = vec![
        vma(
            0x5555_5555_4000,
            0x5555_5555_6000,
            "r--p",
            exe,
            VmaKind::PrivateFile,
            Some(0),
        ),
        text,
        data,
        vma(
            HEAP_VMA.0,
            HEAP_VMA.1,
            "rw-p",
            "[heap]",
            VmaKind::Anonymous,
            None,
        ),
        vma(
            0x7fff_f7d7_e000,
            0x7fff_f7d8_1000,
            "rw-p",
            "",
            VmaKind::Anonymous,
            None,
        ),
        vma(
            0x7fff_f7d8_1000,
            0x7fff_f7da_9000,
            "r--p",
            libc_path,
            VmaKind::PrivateFile,
            Some(1),
        ),
        vma(
            0x7fff_f7da_9000,
            0x7fff_f7f3_1000,
            "r-xp",
            libc_path,
            VmaKind::PrivateFile,
            Some(1),
        ),
        vma(
            0x7fff_f7fb_0000,
            0x7fff_f7fb_1000,
            "rw-s",
            "/tmp/scratch (deleted)",
            VmaKind::SharedFile,
            Some(2),
        ),
        vma(
            0x7fff_f7fc_1000,
            0x7fff_f7fc_5000,
            "r--p",
            "[vvar]",
            VmaKind::Vvar,
            None,
        ),
        vma(
            0x7fff_f7fc_5000,
            0x7fff_f7fc_7000,
            "r-xp",
            "[vdso]",
            VmaKind::Vdso,
            None,
        ),
        vma(
            STACK_VMA.0,
            STACK_VMA.1,
            "rw-p",
            "[stack]",
            VmaKind::Anonymous,
            None,
        ),
        vma(
            0xffff_ffff_ff60_0000,
            0xffff_ffff_ff60_1000,
            "--xp",
            "[vsyscall]",
            VmaKind::Vsyscall,
            None,
        ),
    ];
    let actions = (1..=64)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .map(|signo| SigAction {
            signo,
            handler: if signo == libc::SIGUSR1 {
                0x5555_5555_7130
            } else {
                0
            },
            flags: if signo == libc::SIGUSR1 {
                (libc::SA_RESTART as u64) | 0x0400_0000 // SA_RESTORER
            } else {
                0
            },
            restorer: if signo == libc::SIGUSR1 {
                0x7fff_f7dc_3050
            } else {
                0
            },
            mask: 0,
        })
        .collect();
    Metadata {
        chpox_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ns: 1_732_480_000_000_000_000,
        host: HostInfo {
            hostname: "builder".into(),
            kernel_release: "6.8.0-49-generic".into(),
            cpu_model: "AMD EPYC 7B13".into(),
            xfeatures: 0x7,
            xsave_size: 832,
            page_size: PAGE,
        },
        root: ProcessImage {
            process: ProcessInfo {
                pid: 4242,
                ppid: 4200,
                comm: "sleeper".into(),
                cmdline: vec![exe.into(), "--interval".into(), "1".into()],
                exe: exe.into(),
                exe_file: Some(0),
                cwd: "/home/user".into(),
                umask: 0o022,
                personality: 0,
                creds: Credentials {
                    uid: [1000; 4],
                    gid: [1000; 4],
                    groups: vec![4, 24, 27, 1000],
                },
                rlimits: vec![
                    Rlimit {
                        resource: libc::RLIMIT_NOFILE,
                        name: "RLIMIT_NOFILE".into(),
                        soft: 1024,
                        hard: 524_288,
                    },
                    Rlimit {
                        resource: libc::RLIMIT_STACK,
                        name: "RLIMIT_STACK".into(),
                        soft: 8 << 20,
                        hard: u64::MAX,
                    },
                ],
                sched: Scheduling {
                    nice: 0,
                    policy: libc::SCHED_OTHER,
                    priority: 0,
                },
                mm: MmFields {
                    start_code: 0x5555_5555_6000,
                    end_code: 0x5555_5555_9f3d,
                    start_data: DATA_VMA.0,
                    end_data: DATA_VMA.0 + 0x6a0,
                    start_brk: HEAP_VMA.0,
                    brk: HEAP_VMA.1,
                    start_stack: STACK_VMA.1 - 0x1000,
                    arg_start: STACK_VMA.1 - 0x600,
                    arg_end: STACK_VMA.1 - 0x5d0,
                    env_start: STACK_VMA.1 - 0x5d0,
                    env_end: STACK_VMA.1 - 0x20,
                },
                auxv: vec![
                    (33, 0x7fff_f7fc_5000),
                    (6, PAGE),
                    (9, 0x5555_5555_7040),
                    (23, 0),
                ],
                start_time_ticks: 987_654,
                pgid: 4242,
                sid: 4200,
                stopped: false,
                exit_signal: libc::SIGCHLD,
                pdeath_signal: 0,
                child_subreaper: false,
                shares_fs_with_parent: false,
                timers: Default::default(),
                attrs: Default::default(),
            },
            threads: vec![
                thread(4242, 0x7fff_f7e0_a8b5),
                thread(4243, 0x7fff_f7e0_a8b5),
            ],
            vmas,
            fds: vec![
                FdEntry {
                    fd: 0,
                    flags: libc::O_RDWR as u32,
                    cloexec: false,
                    kind: FdKind::Terminal {
                        path: "/dev/pts/3".into(),
                        rdev: 0x8803,
                    },
                    description: 0,
                    locks: Vec::new(),
                },
                FdEntry {
                    fd: 1,
                    flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
                    cloexec: false,
                    kind: FdKind::RegularFile {
                        path: "/home/user/out.log".into(),
                        pos: 4096,
                        embedded: None,
                        dev: 0xfd01,
                        ino: 777,
                        mode: None,
                        stamp: None,
                    },
                    description: 0,
                    locks: Vec::new(),
                },
                FdEntry {
                    fd: 2,
                    flags: libc::O_WRONLY as u32,
                    cloexec: false,
                    kind: FdKind::CharDevice {
                        path: "/dev/null".into(),
                        rdev: 0x103,
                    },
                    description: 0,
                    locks: Vec::new(),
                },
                FdEntry {
                    fd: 3,
                    flags: libc::O_RDWR as u32,
                    cloexec: true,
                    kind: FdKind::RegularFile {
                        path: "/tmp/log (deleted)".into(),
                        pos: FD_CONTENT.len() as u64,
                        embedded: None,
                        dev: 0xfd01,
                        ino: 778,
                        mode: None,
                        stamp: None,
                    },
                    description: 0,
                    locks: Vec::new(),
                },
                FdEntry {
                    fd: 4,
                    flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
                    cloexec: true,
                    kind: FdKind::Directory {
                        path: "/home/user".into(),
                    },
                    description: 0,
                    locks: Vec::new(),
                },
                FdEntry {
                    fd: 5,
                    flags: libc::O_RDWR as u32,
                    cloexec: true,
                    kind: FdKind::ReplacedByNull {
                        was: "socket:[123456]".into(),
                    },
                    description: 0,
                    locks: Vec::new(),
                },
            ],
            signals: SignalState {
                actions,
                shared_pending: vec![PendingSignal {
                    signo: libc::SIGTERM,
                    code: 0,
                    siginfo: vec![0x5a; 128],
                }],
            },
        },
        descendants: Vec::new(),
        zombies: Vec::new(),
        children_not_saved: Vec::new(),
        files: vec![
            file(exe, FileRole::Executable, 36_864, false),
            file(libc_path, FileRole::Mapped, 2_125_328, false),
            file(
                "/tmp/scratch",
                FileRole::Mapped,
                EMBEDDED_FILE.len() as u64,
                true,
            ),
        ],
        after_dump: AfterDump::LeaveRunning,
        registration: None,
        image_id: None,
        parent: None,
    }
}
