//! `chpox dump` on real processes, with the image checked against what each
//! program knows to be true: page contents, registers, descriptors, signal
//! state. Every target must also keep running correctly after the dump.

mod common;

use std::path::Path;
use std::time::Duration;

use chpox::image::ImageReader;
use chpox::image::model::{Compression, FdKind, Metadata, RestartKind, SyscallState, VmaKind};
use chpox::registers::{self, component};
use common::{Target, check_pattern, chpox_ok, tempdir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Dump `pid` into `dir/name`, check `inspect` (text and JSON) accepts the
/// image with good checksums, and open it.
fn dump(pid: i32, dir: &Path, name: &str, extra: &[&str]) -> ImageReader {
    let image = dir.join(name);
    let image_str = image.to_str().expect("utf-8 path");
    let pid_str = pid.to_string();
    // Stray descriptors inherited from the test harness are not under test.
    let mut args = vec![
        "dump",
        &pid_str,
        "-o",
        image_str,
        "--unsupported-fd",
        "null",
    ];
    args.extend_from_slice(extra);
    chpox_ok(&args);
    let summary = chpox_ok(&["inspect", image_str]);
    assert!(summary.contains("checksums: ok"), "{summary}");
    let json: serde_json::Value =
        serde_json::from_str(&chpox_ok(&["inspect", image_str, "--json"])).expect("json");
    assert_eq!(json["checksums"]["ok"], true, "{json}");
    assert_eq!(json["process"]["pid"], pid);
    let reader = ImageReader::open(&image).expect("image opens");
    reader.verify_all().expect("checksums verify");
    reader
}

/// The process runs on, untraced, after a dump.
fn assert_running_untraced(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("TracerPid:"), "0", "still traced: {status}");
    let state = field("State:");
    assert!(
        state.starts_with('S') || state.starts_with('R'),
        "state {state}"
    );
}

fn vma_at(meta: &Metadata, addr: u64) -> &chpox::image::model::Vma {
    meta.root
        .vmas
        .iter()
        .find(|v| v.start <= addr && addr < v.end)
        .unwrap_or_else(|| panic!("no VMA at {addr:#x}"))
}

#[test]
fn memory_pattern_is_stored_exactly_and_the_process_runs_on() {
    let dir = tempdir();
    let mut target = Target::spawn(
        "mempattern",
        &["32", "--finish-after-rounds", "30"],
        dir.path(),
    );
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));

    let plain = dump(target.pid, dir.path(), "plain.img", &[]);
    check_pattern(&plain, addr, len);
    let vma = vma_at(plain.metadata(), addr);
    assert_eq!(vma.kind, VmaKind::Anonymous);
    assert_eq!(vma.pages.iter().map(|r| r.npages).sum::<u64>(), len / 4096);
    assert_running_untraced(target.pid);

    let compressed = dump(target.pid, dir.path(), "zstd.img", &["--compress"]);
    check_pattern(&compressed, addr, len);
    assert!(
        compressed.file_len() < plain.file_len(),
        "compressed {} vs plain {}",
        compressed.file_len(),
        plain.file_len()
    );

    // The program verifies its memory as it goes and sums it at the end.
    target.wait_success(EXIT_TIMEOUT);
    let last = target.lines_after_ready();
    assert_eq!(
        last.last().map(String::as_str),
        Some(common::mempattern_done(len).as_str()),
        "{last:?}"
    );
}

/// Shared anonymous memory is stored whole: the pages a forked child wrote
/// and the dumped process never touched are part of its memory too.
#[test]
fn shared_memory_written_by_a_child_is_stored() {
    let dir = tempdir();
    let mut target = Target::spawn("sharedanon", &["8"], dir.path());
    let (addr, len) = (target.ready_hex("addr"), target.ready_u64("len"));
    // Compressed, the pages copied while frozen are compressed after.
    for (name, extra) in [
        ("shared.img", &[][..]),
        ("zshared.img", &["--compress"][..]),
    ] {
        let reader = dump(target.pid, dir.path(), name, extra);
        let vma = vma_at(reader.metadata(), addr);
        assert_eq!(vma.kind, VmaKind::SharedAnonymous);
        let compressed = !extra.is_empty();
        assert!(
            vma.pages
                .iter()
                .all(|r| (r.data.compression == Compression::Zstd) == compressed),
            "{name}: {:?}",
            vma.pages
        );
        let bytes = reader
            .read_memory(addr, len as usize)
            .expect("read")
            .unwrap_or_else(|| panic!("not every page is stored: {:?}", vma.pages));
        for (p, page) in bytes.chunks_exact(4096).enumerate() {
            assert_eq!(&page[..8], &(p as u64).to_le_bytes(), "page {p} index word");
            assert!(
                page[8..].iter().all(|&b| b == (p as u8) ^ 0x5a),
                "page {p} content"
            );
        }
    }
    assert_running_untraced(target.pid);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["DONE ok"]);
}

#[test]
fn untouched_pages_of_a_large_allocation_are_not_stored() {
    let dir = tempdir();
    let mut target = Target::spawn("sparse", &["4"], dir.path());
    let (addr, len, stride) = (
        target.ready_hex("addr"),
        target.ready_u64("len"),
        target.ready_u64("stride"),
    );
    let untouched = target.ready_hex("untouched");
    let reader = dump(target.pid, dir.path(), "sparse.img", &[]);
    let meta = reader.metadata();

    let vma = vma_at(meta, addr);
    let stored: Vec<u64> = vma
        .pages
        .iter()
        .flat_map(|r| (0..r.npages).map(move |i| r.addr + i * 4096))
        .collect();
    let touched: Vec<u64> = (0..len / stride).map(|p| addr + p * stride).collect();
    assert_eq!(stored, touched, "exactly the touched pages are stored");
    for (p, &page) in touched.iter().enumerate() {
        let bytes = reader
            .read_memory(page, 4096)
            .expect("read")
            .expect("stored");
        assert_eq!(&bytes[..8], &page.to_le_bytes(), "page {p} address word");
        assert!(bytes[8..].iter().all(|&b| b == (p as u8).wrapping_add(1)));
    }
    assert!(vma_at(meta, untouched).pages.is_empty());
    // 4 GiB + 1 GiB mapped; 64 pages touched. The image stays small.
    assert!(
        reader.file_len() < 8 << 20,
        "image {} bytes",
        reader.file_len()
    );

    assert_running_untraced(target.pid);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["DONE ok"]);
}

#[test]
fn vector_registers_are_captured_and_survive_the_dump() {
    let dir = tempdir();
    let mut target = Target::spawn("avxregs", &[], dir.path());
    let avx512 = target.ready_value("avx512") == "1";
    // READY is printed before the registers are loaded; give the spin loop
    // a moment to start.
    std::thread::sleep(Duration::from_millis(300));
    let reader = dump(target.pid, dir.path(), "avx.img", &[]);
    let meta = reader.metadata();
    let thread = &meta.root.threads[0];
    assert_eq!(thread.regs.r12, 0x1234_5678_9ABC_DEF0);
    assert_eq!(thread.regs.r13, 0x0FED_CBA9_8765_4321);
    assert_eq!(thread.syscall, SyscallState::None, "spinning in user code");

    let xsave = &thread.xsave;
    let bv = registers::xstate_bv(xsave);
    assert_ne!(bv & (1 << component::AVX), 0, "AVX state in use");
    let xmm = registers::xsave_component(xsave, component::SSE).expect("sse");
    let ymm_hi = registers::xsave_component(xsave, component::AVX).expect("avx");
    for k in 0..16usize {
        let mut ymm = xmm[k * 16..k * 16 + 16].to_vec();
        ymm.extend_from_slice(&ymm_hi[k * 16..k * 16 + 16]);
        let want: Vec<u8> = (0..32).map(|j| ((k * 32 + j) as u8) ^ 0x5A).collect();
        assert_eq!(ymm, want, "ymm{k}");
    }
    if avx512 {
        let hi16 = registers::xsave_component(xsave, component::HI16_ZMM).expect("hi16_zmm");
        for k in 16..32usize {
            let want: Vec<u8> = (0..64).map(|j| ((k * 64 + j) as u8) ^ 0xA5).collect();
            assert_eq!(&hi16[(k - 16) * 64..(k - 15) * 64], &want[..], "zmm{k}");
        }
        let kregs = registers::xsave_component(xsave, component::OPMASK).expect("opmask");
        for k in 1..8usize {
            let got = u64::from_le_bytes(kregs[k * 8..k * 8 + 8].try_into().expect("8"));
            assert_eq!(got, 0x1111_1111_1111_1111 * k as u64, "k{k}");
        }
        assert_eq!(meta.host.xfeatures & 0xe0, 0xe0, "AVX-512 enabled on host");
    }

    assert_running_untraced(target.pid);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["REGS OK"]);
}

#[test]
fn open_files_are_recorded_with_offsets_and_flags() {
    let dir = tempdir();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("mkdir");
    let mut target = Target::spawn("openfiles", &[files.to_str().expect("utf-8")], dir.path());
    let reader = dump(target.pid, dir.path(), "fds.img", &[]);
    let meta = reader.metadata();
    let fd = |n: i32| {
        meta.root
            .fds
            .iter()
            .find(|f| f.fd == n)
            .unwrap_or_else(|| panic!("fd {n} missing"))
    };
    let file_at = |n: i32| match &fd(n).kind {
        FdKind::RegularFile { path, pos, .. } => (path.clone(), *pos),
        other => panic!("fd {n} is {other:?}"),
    };
    let a = file_at(10);
    assert_eq!(a, (files.join("a.txt").display().to_string(), 123));
    assert_eq!(fd(10).flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
    assert!(!fd(10).cloexec);
    assert_eq!(file_at(11).1, 77);
    assert_ne!(fd(11).flags & libc::O_APPEND as u32, 0, "b.log is O_APPEND");
    assert_eq!(fd(11).flags & libc::O_ACCMODE as u32, libc::O_WRONLY as u32);
    assert_eq!(file_at(12).1, 4096);
    assert!(fd(12).cloexec, "c.bin is O_CLOEXEC");
    for (n, dev) in [(13, "/dev/null"), (14, "/dev/zero"), (15, "/dev/urandom")] {
        match &fd(n).kind {
            FdKind::CharDevice { path, .. } => assert_eq!(path, dev),
            other => panic!("fd {n} is {other:?}"),
        }
    }
    match &fd(16).kind {
        FdKind::RegularFile {
            path,
            pos,
            embedded: Some(data),
            ..
        } => {
            assert!(path.ends_with("deleted.dat"), "{path}");
            assert_eq!(*pos, 50);
            let content = reader.read_data(data).expect("embedded content");
            assert_eq!(content, "still here\n".repeat(100).as_bytes());
        }
        other => panic!("fd 16 is {other:?}"),
    }
    assert_eq!(fd(0).kind_name(), "CharDevice", "stdin is /dev/null");

    assert_running_untraced(target.pid);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    let out = target.lines_after_ready();
    assert_eq!(out[0], "A=tuvwxyzabc");
    assert_eq!(out[1], "POS=133");
}

trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for chpox::image::model::FdEntry {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            FdKind::RegularFile { .. } => "RegularFile",
            FdKind::Directory { .. } => "Directory",
            FdKind::CharDevice { .. } => "CharDevice",
            FdKind::Terminal { .. } => "Terminal",
            FdKind::Pipe { .. } => "Pipe",
            FdKind::ReplacedByNull { .. } => "ReplacedByNull",
            FdKind::Fifo { .. } => "Fifo",
            FdKind::UnixPair { .. } => "UnixPair",
            FdKind::Unix(_) => "Unix",
            FdKind::Inet(_) => "Inet",
            FdKind::External { .. } => "External",
            _ => "Other",
        }
    }
}

#[test]
fn every_thread_is_captured_with_its_own_state() {
    let dir = tempdir();
    let mut target = Target::spawn("threads", &["4"], dir.path());
    let tids: Vec<i32> = target
        .ready_value("tids")
        .split(',')
        .map(|t| t.parse().expect("tid"))
        .collect();
    let counters = target.ready_hex("counters");
    let reader = dump(target.pid, dir.path(), "threads.img", &[]);
    let meta = reader.metadata();
    assert_eq!(meta.root.threads.len(), 5, "main + 4 workers");
    assert_eq!(meta.root.threads[0].tid, target.pid, "leader first");
    for (t, tid) in tids.iter().enumerate() {
        let state = meta
            .root
            .threads
            .iter()
            .find(|s| s.tid == *tid)
            .unwrap_or_else(|| panic!("thread {tid} missing"));
        assert_eq!(state.comm, format!("worker-{t}"));
        assert!(!state.xsave.is_empty());
        // The kernel clears this word when the thread exits (pthread_join
        // waits on it); the thread library keeps the thread's TID there.
        let tid_word = state.clear_child_tid.expect("clear_child_tid recorded");
        let bytes = reader
            .read_memory(tid_word, 4)
            .expect("read")
            .expect("the thread block is stored");
        assert_eq!(i32::from_ne_bytes(bytes.try_into().expect("4")), *tid);
    }
    let mut bases: Vec<u64> = meta.root.threads.iter().map(|t| t.regs.fs_base).collect();
    bases.sort_unstable();
    bases.dedup();
    assert_eq!(bases.len(), 5, "each thread has its own TLS");
    // The counters live in the image, and every worker had counted.
    let bytes = reader
        .read_memory(counters, 4 * 8)
        .expect("read")
        .expect("stored");
    for (t, c) in bytes.chunks_exact(8).enumerate() {
        assert!(u64::from_le_bytes(c.try_into().expect("8")) > 0, "T{t}");
    }

    assert_running_untraced(target.pid);
    target.signal(libc::SIGUSR1);
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(
        target.lines_after_ready(),
        ["DONE", "T0=ok", "T1=ok", "T2=ok", "T3=ok"]
    );
}

#[test]
fn signal_handlers_masks_and_altstack_are_recorded() {
    let dir = tempdir();
    let mut target = Target::spawn("sighandler", &[], dir.path());
    let reader = dump(target.pid, dir.path(), "sig.img", &[]);
    let meta = reader.metadata();
    let action = |sig: i32| {
        *meta
            .root
            .signals
            .actions
            .iter()
            .find(|a| a.signo == sig)
            .expect("action")
    };
    let usr1 = action(libc::SIGUSR1);
    assert_eq!(usr1.handler, target.ready_hex("handler"));
    let flags = libc::SA_RESTART as u64 | libc::SA_ONSTACK as u64;
    assert_eq!(usr1.flags & flags, flags);
    assert_ne!(
        usr1.mask & (1 << (libc::SIGUSR2 - 1)),
        0,
        "USR2 blocked in handler"
    );
    assert_eq!(action(libc::SIGPIPE).handler, 1, "SIGPIPE ignored");
    assert_eq!(action(libc::SIGTERM).handler, 0, "SIGTERM default");
    assert_eq!(meta.root.signals.actions.len(), 62, "all but KILL and STOP");
    let main = &meta.root.threads[0];
    assert_ne!(
        main.sigmask & (1 << (libc::SIGHUP - 1)),
        0,
        "SIGHUP blocked"
    );
    let alt = main.sigaltstack.expect("altstack");
    assert_eq!(alt.sp, target.ready_hex("altstack"));
    assert_eq!(alt.size, 65536);
    assert!(main.rseq.is_some(), "glibc registers rseq");

    // Mask and handlers are intact after the dump: three USR1, then USR2.
    assert_running_untraced(target.pid);
    for _ in 0..3 {
        target.signal(libc::SIGUSR1);
        target.wait_not_pending(libc::SIGUSR1, EXIT_TIMEOUT);
        std::thread::sleep(Duration::from_millis(50));
    }
    target.signal(libc::SIGUSR2);
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["COUNT=3"]);
}

#[test]
fn a_sleeping_process_is_recorded_mid_syscall_and_sleeps_on() {
    let dir = tempdir();
    let mut target = Target::spawn("sleeper", &[], dir.path());
    std::thread::sleep(Duration::from_millis(300));
    let reader = dump(target.pid, dir.path(), "sleep.img", &[]);
    match reader.metadata().root.threads[0].syscall {
        SyscallState::Restartable {
            nr,
            restart: RestartKind::RestartBlock,
        } => assert!(
            nr == libc::SYS_nanosleep as u64 || nr == libc::SYS_clock_nanosleep as u64,
            "nr {nr}"
        ),
        other => panic!("sleeper is in {other:?}"),
    }
    // Our remote syscalls borrowed this very thread: its sleep must go on
    // and end normally, not with EINTR.
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["DONE slept"]);
}

#[test]
fn a_process_blocked_in_read_is_recorded_and_reads_on() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut target = Target::spawn("reader", &[fifo.to_str().expect("utf-8")], dir.path());
    std::thread::sleep(Duration::from_millis(300));
    let reader = dump(target.pid, dir.path(), "read.img", &[]);
    match reader.metadata().root.threads[0].syscall {
        SyscallState::Restartable { nr, .. } => assert_eq!(nr, libc::SYS_read as u64),
        other => panic!("reader is in {other:?}"),
    }
    std::fs::write(&fifo, b"hello").expect("write fifo");
    target.wait_success(EXIT_TIMEOUT);
    assert_eq!(target.lines_after_ready(), ["GOT hello"]);
}

#[test]
fn mapped_files_are_identified_and_embedded_on_request() {
    let dir = tempdir();
    let target = Target::spawn("mempattern", &["4"], dir.path());
    let plain = dump(target.pid, dir.path(), "plain.img", &[]);
    let meta = plain.metadata();
    let exe = &meta.files[meta.root.process.exe_file.expect("exe recorded")];
    assert!(exe.path.ends_with("/mempattern"), "{}", exe.path);
    assert_eq!(
        exe.blake3,
        blake3_hex(Path::new(&exe.path)),
        "content hash of the executable"
    );
    assert!(exe.embedded.is_none());
    assert!(
        meta.files.iter().any(|f| f.path.contains("libc.so")),
        "libc is a mapped file"
    );

    let libc_path = meta
        .files
        .iter()
        .find(|f| f.path.contains("libc.so"))
        .map(|f| f.path.clone())
        .expect("libc");
    let embedded = dump(
        target.pid,
        dir.path(),
        "embed.img",
        &["--embed-exe", "--embed-lib", &libc_path],
    );
    let meta = embedded.metadata();
    let exe = &meta.files[meta.root.process.exe_file.expect("exe")];
    let data = embedded
        .read_data(&exe.embedded.expect("exe embedded"))
        .expect("read");
    assert_eq!(data, std::fs::read(&exe.path).expect("read exe"));
    let libc_ref = meta
        .files
        .iter()
        .find(|f| f.path == libc_path)
        .expect("libc");
    assert!(libc_ref.embedded.is_some(), "libc embedded");

    let all = dump(target.pid, dir.path(), "all.img", &["--embed-all-libs"]);
    assert!(
        all.metadata().files.iter().all(|f| f.embedded.is_some()),
        "every mapped file embedded"
    );
    assert_running_untraced(target.pid);
}

fn blake3_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read");
    chpox::files::hash_bytes(&bytes)
}

#[test]
fn kill_after_dump_ends_a_multithreaded_process() {
    let dir = tempdir();
    let mut target = Target::spawn("threads", &["3"], dir.path());
    let reader = dump(target.pid, dir.path(), "kill.img", &["--kill"]);
    assert_eq!(reader.metadata().root.threads.len(), 4);
    let status = target.wait_exit(EXIT_TIMEOUT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}
