//! `chpox dump`: freeze a process, write its image, let it go.
//!
//! Order matters for three promises:
//! - nothing is touched before every check that can fail cheaply has passed
//!   (the PID, the output path, unsupported descriptors);
//! - the target is frozen only while its state is read: the image is
//!   finished (fsync, rename) after it runs again, unless it is to be killed;
//! - a target is killed only once its image is safely on disk.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::fds::{self, UnsupportedFd};
use crate::files::FileTable;
use crate::image::model::{
    AfterDump, HostInfo, Metadata, SavedRegistration, SignalState, Vma, VmaKind,
};
use crate::image::{ImageWriter, MappedArea, WriteOptions};
use crate::memory::{self, PAGE_SIZE, PageDumper};
use crate::ptrace::Frozen;
use crate::remote::{self, RemoteThread};
use crate::{process, registers, signals, threads};

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
    /// Resident memory of the process at dump time (sum of present pages).
    pub resident_bytes: u64,
    pub frozen: Duration,
    pub total: Duration,
    /// CLOCK_MONOTONIC (ns) when every thread was stopped: with the
    /// tracepoint's timestamp, the latency from signal to freeze.
    pub frozen_at_monotonic_ns: u64,
}

/// Dump `pid` to `opts.output`.
pub fn dump(pid: i32, opts: &DumpOptions) -> Result<DumpReport> {
    let started = Instant::now();
    process::check_dumpable(pid)?;
    for lib in &opts.embed_libs {
        std::fs::metadata(lib).map_err(|source| Error::File {
            path: lib.display().to_string(),
            source,
        })?;
    }
    let owner = process::owner(pid)?;
    let mut writer = ImageWriter::create(
        &opts.output,
        WriteOptions {
            compress: opts.compress,
            owner: Some(owner),
            keep_previous: opts.keep_previous,
            as_user: opts.as_user.clone(),
        },
    )?;

    // Allocate and map the image's page area while the process still runs:
    // on tmpfs, allocating pages costs more than filling them, and the
    // frozen phase is then one copy per page. A little headroom covers
    // memory the process touches between now and the freeze.
    let estimate = memory::estimate_stored_bytes(pid);
    let area = writer.map_area(estimate + estimate / 16 + (4 << 20))?;
    debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        estimate, "image area mapped"
    );

    let frozen = Frozen::freeze(pid)?;
    let frozen_at = Instant::now();
    let frozen_at_monotonic_ns = crate::process::monotonic_ns();
    let captured = capture(&frozen, opts, &mut writer, area)?;
    let mut meta = captured.meta;
    let checksums = captured.checksums;
    let files = captured.files;

    let (image_bytes, frozen_for) = match opts.after {
        AfterDump::LeaveRunning => {
            frozen.resume();
            let frozen_for = frozen_at.elapsed();
            checksums.apply(&mut meta.vmas);
            finish_files(files, opts, &mut writer, &mut meta)?;
            (writer.finish(&meta)?, frozen_for)
        }
        AfterDump::LeaveStopped => {
            frozen.leave_stopped();
            let frozen_for = frozen_at.elapsed();
            checksums.apply(&mut meta.vmas);
            finish_files(files, opts, &mut writer, &mut meta)?;
            (writer.finish(&meta)?, frozen_for)
        }
        AfterDump::Kill => {
            // If finishing fails, `frozen` is dropped on the error path and
            // the process runs on: no checkpoint, but nothing lost.
            checksums.apply(&mut meta.vmas);
            finish_files(files, opts, &mut writer, &mut meta)?;
            let bytes = writer.finish(&meta)?;
            frozen.kill();
            (bytes, frozen_at.elapsed())
        }
    };
    debug!(ms = started.elapsed().as_secs_f64() * 1e3, "image finished");
    let report = DumpReport {
        pid,
        comm: meta.process.comm.clone(),
        image: opts.output.clone(),
        image_bytes,
        pages_stored: captured.pages_stored,
        threads: meta.threads.len(),
        vmas: meta.vmas.len(),
        resident_bytes: captured.resident_pages * PAGE_SIZE,
        frozen: frozen_for,
        total: started.elapsed(),
        frozen_at_monotonic_ns,
    };
    info!(
        pid,
        image = %report.image.display(),
        bytes = report.image_bytes,
        frozen_ms = report.frozen.as_secs_f64() * 1e3,
        total_ms = report.total.as_secs_f64() * 1e3,
        "checkpoint written"
    );
    Ok(report)
}

/// What needs the files but not the frozen process: content hashes, and
/// the files to embed (read through descriptors opened while frozen).
fn finish_files(
    mut files: FileTable,
    opts: &DumpOptions,
    writer: &mut ImageWriter,
    meta: &mut Metadata,
) -> Result<()> {
    for lib in &opts.embed_libs {
        let index = match files.find(lib) {
            Some(i) => i,
            None => files.add_library(lib, opts.as_user.as_ref())?,
        };
        files.embed(index, writer)?;
    }
    files.embed_requested(writer, opts.embed_exe, opts.embed_all_libs)?;
    files.hash_all()?;
    meta.files = files.files;
    Ok(())
}

/// Debug-level timing of the frozen phase, to see where a freeze goes.
struct Phases(Instant);

impl Phases {
    fn start() -> Self {
        Phases(Instant::now())
    }

    fn done(&mut self, what: &str) {
        debug!(
            phase = what,
            ms = self.0.elapsed().as_secs_f64() * 1e3,
            "frozen phase"
        );
        self.0 = Instant::now();
    }
}

struct Captured {
    meta: Metadata,
    files: FileTable,
    checksums: memory::PageChecksums,
    pages_stored: u64,
    resident_pages: u64,
}

/// Read everything while the process is frozen; bulk data goes to `writer`.
fn capture(
    frozen: &Frozen,
    opts: &DumpOptions,
    writer: &mut ImageWriter,
    area: Option<MappedArea>,
) -> Result<Captured> {
    let pid = frozen.pid();
    let mut phase = Phases::start();
    // Descriptors first: an unsupported one fails the dump before the
    // expensive part. Content of deleted files is copied after the pages,
    // once the writer streams again.
    let mut fds = fds::scan_fds(pid, opts.unsupported_fd)?;
    let mut info = process::dump_proc_info(pid)?;
    if opts
        .expect_start_time
        .is_some_and(|t| t != info.start_time_ticks)
    {
        return Err(Error::Other(format!(
            "PID {pid} is no longer the registered process"
        )));
    }
    let tids = frozen.tids();
    let mut thread_states = tids
        .iter()
        .map(|&tid| threads::dump_thread(pid, tid))
        .collect::<Result<Vec<_>>>()?;
    let shared_pending = signals::dump_shared_pending(pid)?;
    phase.done("fds, /proc, threads");

    // Remote syscalls: dispositions, brk, rlimits, personality in the
    // leader; the alternate stack in every thread.
    let syscall_ip = remote::find_syscall_insn(pid)?;
    let actions = {
        let mut leader = RemoteThread::borrow(frozen, pid, syscall_ip)?;
        let scratch_len = PAGE_SIZE;
        let scratch = leader.map_scratch(scratch_len)?;
        let actions = signals::dump_actions(&mut leader, scratch)?;
        process::dump_remote_state(&mut info, &mut leader, scratch)?;
        for (tid, state) in tids.iter().zip(thread_states.iter_mut()) {
            // What only the thread itself can say: its alternate signal
            // stack and its clear_child_tid.
            if *tid == pid {
                state.sigaltstack = signals::dump_altstack(&mut leader, scratch)?;
                state.clear_child_tid = threads::dump_clear_child_tid(&mut leader, scratch)?;
            } else {
                let mut thread = RemoteThread::borrow(frozen, *tid, syscall_ip)?;
                state.sigaltstack = signals::dump_altstack(&mut thread, scratch)?;
                state.clear_child_tid = threads::dump_clear_child_tid(&mut thread, scratch)?;
                thread.give_back()?;
            }
        }
        leader.unmap(scratch, scratch_len)?;
        leader.give_back()?;
        actions
    };

    phase.done("remote syscalls");
    // The address space, now that our scratch page is gone again.
    let maps = memory::read_maps(pid)?;
    phase.done("smaps");
    let mut files = FileTable::new(pid);
    // add_exe learns from the " (deleted)" mark that the file must be
    // embedded; the image records the name without it.
    info.exe_file = Some(files.add_exe(&info.exe)?);
    info.exe = info.exe.trim_end_matches(" (deleted)").to_string();
    let mut pages = PageDumper::new(pid, area)?;
    let mut vmas = Vec::with_capacity(maps.len());
    let mut resident_pages = 0u64;
    for map in &maps {
        let kind = map.kind();
        let file = match kind {
            VmaKind::PrivateFile | VmaKind::SharedFile => Some(files.add_mapping(map)?),
            _ => None,
        };
        let stored = if kind.is_special() || map.is_device_memory() {
            Vec::new()
        } else {
            let pagemap = pages.pagemap(map.start, map.end)?;
            resident_pages += pagemap.iter().filter(|&&e| e >> 63 != 0).count() as u64;
            let runs = memory::select_runs(pid, map, kind, &pagemap);
            pages.dump_runs(vmas.len(), &runs, writer)?
        };
        debug!(
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
        });
    }

    phase.done("pagemap, files, page copy");
    let pages_stored = pages.pages_stored;
    let checksums = pages.finish(writer)?;
    fds::embed_deleted(pid, &mut fds, writer)?;
    fds::embed_pipe_data(pid, &mut fds, writer)?;

    phase.done("deleted files");

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
        process: info,
        threads: thread_states,
        vmas,
        // Filled in by `finish_files`, after the process runs again.
        files: Vec::new(),
        fds,
        signals: SignalState {
            actions,
            shared_pending,
        },
        after_dump: opts.after,
        registration: opts.registration,
    };
    Ok(Captured {
        meta,
        files,
        checksums,
        pages_stored,
        resident_pages,
    })
}
