//! How a process's pages are read out of it: `process_vm_readv` or
//! `/proc/PID/mem` (see [`Source`]), many runs per call.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::memory::PAGE_SIZE;

/// Kernel limit on iovecs per process_vm_readv call (UIO_MAXIOV).
pub(super) const MAX_IOVECS: usize = 1024;

/// How pages are read out of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `process_vm_readv`: one copy, but it pins the pages (FOLL_PIN), and
    /// pinning a page shared copy-on-write makes the kernel copy it first
    /// ("unshare"): right for a frozen process's own pages, ruinous for a
    /// snapshot, whose pages are all shared with the running process.
    VmReadv,
    /// `/proc/PID/mem`: reads through a kernel page, a reference without a
    /// pin, so a shared page stays shared.
    ProcMem,
    /// A process that runs meanwhile, whose changed pages are copied
    /// again later (a pre-copy, `precopy`): `process_vm_readv` where its
    /// pages are its own alone, `/proc/PID/mem` where it shares them
    /// (see [`mapped_alone`]). A run it
    /// unmapped in the meantime is stored as zeros rather than failing
    /// the copy (a page unmapped is never taken from it: mapped again, it
    /// is a new mapping, not tracked).
    Running,
}

/// Read `runs` of frozen process `pid` into `dest` (laid out in order,
/// exactly as long as the runs), without writing them anywhere.
pub(crate) fn read_frozen(pid: i32, runs: &[(u64, u64)], dest: &mut [u8]) -> Result<()> {
    read_into(pid, Source::VmReadv, runs, dest)
}

/// [`read_frozen`] of a process that runs meanwhile (see
/// [`Source::Running`]): a run it unmapped meanwhile reads as zeros, a
/// page it shares copy-on-write stays shared.
pub(crate) fn read_running(pid: i32, runs: &[(u64, u64)], dest: &mut [u8]) -> Result<()> {
    read_into(pid, Source::Running, runs, dest)
}

/// [`read_running`] of `pieces` (address, pages, offset in `dest`), each
/// into its own place: one opening of the process's files for all.
pub(crate) fn read_running_to(
    pid: i32,
    pieces: &[(u64, u64, usize)],
    dest: &mut [u8],
) -> Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    let mem = Memory::open(pid, Source::Running)?;
    for &(addr, pages, at) in pieces {
        let place = dest
            .get_mut(at..at + (pages * PAGE_SIZE) as usize)
            .ok_or_else(|| Error::Other("internal: pages read past their buffer".into()))?;
        read_runs(pid, Source::Running, &mem, &[(addr, pages)], place)?;
    }
    Ok(())
}

fn read_into(pid: i32, source: Source, runs: &[(u64, u64)], dest: &mut [u8]) -> Result<()> {
    // Most mappings of an increment hold no written page: opening
    // /proc/PID/mem for nothing cost ~5 us per mapping, frozen.
    if runs.is_empty() {
        return Ok(());
    }
    let mem = Memory::open(pid, source)?;
    let read = |runs: &[(u64, u64)], dest: &mut [u8]| -> Result<()> {
        let mut at = 0usize;
        for batch in runs.chunks(MAX_IOVECS) {
            let len: usize = batch.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
            let dest = dest
                .get_mut(at..at + len)
                .ok_or_else(|| Error::Other("internal: pages read past their buffer".into()))?;
            read_runs(pid, source, &mem, batch, dest)?;
            at += len;
        }
        Ok(())
    };
    // Scattered pages (an increment's) are read at about 2 GB/s, the
    // kernel's walk to each page being the bound, not the copy: on two
    // threads, half each, while the tree is frozen and nothing else of
    // ours runs.
    const SPLIT_FROM: usize = 4 << 20;
    if dest.len() < SPLIT_FROM || runs.len() < 2 {
        return read(runs, dest);
    }
    let (mut split, mut half) = (0, 0usize);
    while split < runs.len() && half < dest.len() / 2 {
        half += (runs[split].1 * PAGE_SIZE) as usize;
        split += 1;
    }
    let ((first, second), (to_first, to_second)) = (
        runs.split_at(split),
        dest.split_at_mut(half.min(dest.len())),
    );
    std::thread::scope(|scope| {
        let other = scope.spawn(|| read(second, to_second));
        let mine = read(first, to_first);
        let theirs = other
            .join()
            .map_err(|_| Error::Other("internal: a page read panicked".into()))?;
        mine.and(theirs)
    })
}

/// Where a process's pages are read from: /proc/PID/mem, and for a
/// process that runs meanwhile its pagemap, which tells whether
/// `process_vm_readv` may read them (see [`mapped_alone`]).
pub(super) struct Memory {
    mem: File,
    pagemap: Option<File>,
}

impl Memory {
    pub(super) fn open(pid: i32, source: Source) -> Result<Memory> {
        let open = |what: &str| {
            let path = format!("/proc/{pid}/{what}");
            File::open(&path).map_err(|source| Error::Proc { path, source })
        };
        Ok(Memory {
            mem: open("mem")?,
            pagemap: if source == Source::Running {
                Some(open("pagemap")?)
            } else {
                None
            },
        })
    }
}

/// Whether every present page of `runs` is mapped by this process alone
/// (pagemap's PM_MMAP_EXCLUSIVE). `process_vm_readv` pins what it reads,
/// and pinning a page still shared copy-on-write with a parent or child
/// makes the kernel give the process its own copy first: a pre-copy
/// would grow a forked tree's memory by all it shares. /proc/PID/mem reads
/// such pages without a pin, at 2/3 of the speed (two copies through a
/// kernel page; measured 15 against 10 ms for 64 MiB), which slowed the
/// copy's workers to near the writer's pace. A fork between this check
/// and the read costs the copy of what the pin touches, nothing more.
pub(super) fn mapped_alone(pagemap: &File, runs: &[(u64, u64)]) -> bool {
    const PRESENT: u64 = 1 << 63;
    const EXCLUSIVE: u64 = 1 << 56;
    // Entries of `npages` pages from `addr`: whether all of them are ours.
    let mut entries = Vec::new();
    let mut alone = |addr: u64, npages: u64| {
        entries.resize(npages as usize * 8, 0);
        pagemap
            .read_exact_at(&mut entries, addr / PAGE_SIZE * 8)
            .is_ok()
            && entries.chunks_exact(8).all(|e| {
                let e = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                e & PRESENT == 0 || e & EXCLUSIVE != 0
            })
    };
    // Many small runs close together (a fragmented heap): one read of the
    // whole span rather than one per run; what lies between the runs is
    // checked too, which only errs towards /proc/PID/mem.
    let start = runs.iter().map(|r| r.0).min().unwrap_or(0);
    let end = runs
        .iter()
        .map(|r| r.0 + r.1 * PAGE_SIZE)
        .max()
        .unwrap_or(0);
    if runs.len() > 1 && end - start <= MAPPED_ALONE_SPAN {
        return alone(start, (end - start) / PAGE_SIZE);
    }
    runs.iter().all(|&(addr, npages)| alone(addr, npages))
}

/// Most address space [`mapped_alone`] reads the pagemap of in one go
/// (2048 entries, 16 KiB).
const MAPPED_ALONE_SPAN: u64 = 8 << 20;

/// Copy `runs` of the process's memory into `dest` (laid out in order):
/// one process_vm_readv for all of them, and /proc/PID/mem for whatever it
/// refuses (it stops at the first range it may not read: PROT_NONE,
/// write-only; /proc/PID/mem reads those like a debugger).
pub(super) fn read_runs(
    pid: i32,
    source: Source,
    memory: &Memory,
    runs: &[(u64, u64)],
    dest: &mut [u8],
) -> Result<()> {
    let mem = &memory.mem;
    let remote: Vec<RemoteIoVec> = runs
        .iter()
        .map(|&(addr, n)| RemoteIoVec {
            base: addr as usize,
            len: (n * PAGE_SIZE) as usize,
        })
        .collect();
    let total = dest.len();
    let pinning_is_harmless = match source {
        Source::VmReadv => true,
        Source::ProcMem => false,
        Source::Running => memory
            .pagemap
            .as_ref()
            .is_some_and(|pagemap| mapped_alone(pagemap, runs)),
    };
    let got = if !pinning_is_harmless {
        0
    } else {
        let mut local = [IoSliceMut::new(dest)];
        process_vm_readv(Pid::from_raw(pid), &mut local, &remote).unwrap_or(0)
    };
    if got == total {
        return Ok(());
    }
    let mut from = got;
    let mut run_start = 0usize;
    for &(addr, n) in runs {
        let run_end = run_start + (n * PAGE_SIZE) as usize;
        if run_end > from {
            let at = addr + (from - run_start) as u64;
            match mem.read_exact_at(&mut dest[from..run_end], at) {
                Ok(()) => {}
                // Page by page: only what is gone reads as zeros.
                Err(_) if source == Source::Running => {
                    let pages = dest[from..run_end].chunks_mut(PAGE_SIZE as usize);
                    for (i, page) in pages.enumerate() {
                        if mem.read_exact_at(page, at + i as u64 * PAGE_SIZE).is_err() {
                            page.fill(0);
                        }
                    }
                }
                Err(e) => {
                    return Err(Error::Memory {
                        pid,
                        addr: at,
                        source: e,
                    });
                }
            }
            from = run_end;
        }
        run_start = run_end;
    }
    Ok(())
}
