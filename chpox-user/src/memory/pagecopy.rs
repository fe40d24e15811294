//! Copying runs of a process's pages into an image on every core.
//!
//! An image is written by one writer, and a file takes one write at a time
//! (tmpfs and most filesystems hold the inode lock across a write), so the
//! write itself is the bound: `dd` of the same bytes. Everything else runs
//! beside it on the other cores: worker threads copy the pages out of the
//! process (`process_vm_readv`, many runs per call), checksum them, and
//! compress them when the image is compressed, chunk by chunk, while the
//! calling thread writes the chunks in order (and, when none is ready,
//! allocates the file's next pages, see `image::writer::ahead`, so that
//! its later writes only copy, or else reads the next chunk itself). A
//! run is one blob; runs are
//! at most [`CHUNK_PAGES`] long so a compressed run is one zstd frame
//! compressed on one core.
//!
//! Uncompressed, the write is the bound and the copy out of the process
//! is faster, so the writer keeps a core of its own: one worker fewer than
//! cores, and pieces of at most [`PIECE_BYTES`] (a run is cut into
//! pieces, each checksummed by the worker and the CRCs combined by the
//! writer), so a worker's buffers stay in cache until the writer copies
//! them into the file. Measured on 2 cores, 64 MiB from a forked copy into
//! tmpfs: one reader with 1 MiB pieces 22 ms, two readers with 8 MiB
//! chunks and fresh buffers 40 ms, `dd` of the same bytes 25 ms.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSliceMut;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{Compression, DataRef};
use crate::memory::PAGE_SIZE;

/// Longest run, and most bytes per chunk: 8 MiB keeps two buffers per
/// worker small and a chunk's copy long enough to amortise the syscall.
pub const CHUNK_PAGES: u64 = 2048;
const CHUNK_BYTES: usize = (CHUNK_PAGES * PAGE_SIZE) as usize;
/// Kernel limit on iovecs per process_vm_readv call (UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Most bytes a worker reads at a time for an uncompressed image (see the
/// module documentation); a multiple of the page size.
pub const PIECE_BYTES: usize = 1 << 20;
/// Buffers per worker: one being filled, the others queued or being
/// written.
const BUFFERS_PER_WORKER: usize = 3;

/// `runs` (address, page count) cut so that none is longer than
/// [`CHUNK_PAGES`].
pub fn split_runs(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(runs.len());
    for &(addr, npages) in runs {
        let mut done = 0;
        while done < npages {
            let n = (npages - done).min(CHUNK_PAGES);
            out.push((addr + done * PAGE_SIZE, n));
            done += n;
        }
    }
    out
}

/// Part of a run, read into a worker's buffer in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// Index of its run.
    run: usize,
    addr: u64,
    npages: u64,
    /// The run's first piece: a blob starts here.
    first: bool,
    /// The run's last piece: the blob ends here.
    last: bool,
}

/// `runs` as pieces of at most `max_bytes` (a run longer than that is cut;
/// `max_bytes` a multiple of the page size), and the pieces grouped into
/// chunks of at most `max_bytes`, each read by one worker in one go.
fn pieces_of(runs: &[(u64, u64)], max_bytes: usize) -> (Vec<Piece>, Vec<Range<usize>>) {
    let max_pages = (max_bytes as u64 / PAGE_SIZE).max(1);
    let mut pieces = Vec::with_capacity(runs.len());
    for (run, &(addr, npages)) in runs.iter().enumerate() {
        let mut done = 0;
        while done < npages {
            let n = (npages - done).min(max_pages);
            pieces.push(Piece {
                run,
                addr: addr + done * PAGE_SIZE,
                npages: n,
                first: done == 0,
                last: done + n == npages,
            });
            done += n;
        }
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut pages = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        if i > start && pages + p.npages > max_pages {
            chunks.push(start..i);
            start = i;
            pages = 0;
        }
        pages += p.npages;
    }
    if start < pieces.len() {
        chunks.push(start..pieces.len());
    }
    (pieces, chunks)
}

/// One piece, ready to be written.
struct Prepared {
    /// Compressed bytes (a whole run); None: the piece's bytes in the
    /// chunk buffer.
    zstd: Option<Vec<u8>>,
    range: Range<usize>,
    /// CRC-32C of what is stored: of the piece alone when uncompressed
    /// (the writer combines a run's pieces).
    crc: u32,
}

/// A chunk a worker finished, with the buffer it goes back to the worker in.
struct Done {
    index: usize,
    worker: usize,
    buf: Vec<u8>,
    runs: Result<Vec<Prepared>>,
}

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

/// Copy every run (each at most [`CHUNK_PAGES`], see [`split_runs`]) of
/// process `pid` into `writer`, one blob per run; returns their `DataRef`s
/// in order. `pid` must stay as it is meanwhile: frozen, or a snapshot.
pub fn copy_runs(
    pid: i32,
    source: Source,
    runs: &[(u64, u64)],
    writer: &mut ImageWriter,
) -> Result<Vec<DataRef>> {
    copy_runs_then(pid, source, runs, writer, &|| {})
}

/// [`copy_runs`], calling `read_done` (on whichever thread read last) as
/// soon as every page is read out of `pid`, while the last ones may still
/// be on their way into the file: `pid` is not needed any more from then
/// on (a snapshot can go, see `snapshot`).
pub fn copy_runs_then(
    pid: i32,
    source: Source,
    runs: &[(u64, u64)],
    writer: &mut ImageWriter,
    read_done: &(dyn Fn() + Sync),
) -> Result<Vec<DataRef>> {
    copy_with_workers(pid, source, runs, writer, read_done, None)
}

/// [`copy_runs_then`] with `workers` worker threads instead of as many
/// as the cores allow (tests: none, so that the writer reads every chunk).
fn copy_with_workers(
    pid: i32,
    source: Source,
    runs: &[(u64, u64)],
    writer: &mut ImageWriter,
    read_done: &(dyn Fn() + Sync),
    workers: Option<usize>,
) -> Result<Vec<DataRef>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    if runs.iter().any(|&(_, n)| n > CHUNK_PAGES) {
        return Err(Error::Other(
            "internal: a page run longer than a chunk".into(),
        ));
    }
    let mem = Memory::open(pid, source)?;
    let compress = writer.compresses();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Compressed: a run is one frame, read whole, and compressing is the
    // work, on every core. Plain: the writer's core is left to it.
    let (piece_bytes, default_workers, buffers) = if compress {
        (CHUNK_BYTES, cores.clamp(1, 8), 2)
    } else {
        (
            PIECE_BYTES,
            cores.saturating_sub(1).clamp(1, 3),
            BUFFERS_PER_WORKER,
        )
    };
    let (pieces, chunks) = pieces_of(runs, piece_bytes);
    if let [only] = chunks.as_slice() {
        // A small mapping (most are): starting threads would cost more
        // than the copy (0.1–4 ms each measured, a dozen per process).
        let mut buf = Vec::new();
        let prepared = prepare(pid, source, &mem, &pieces[only.clone()], &mut buf, compress)?;
        read_done();
        let mut refs = Vec::with_capacity(runs.len());
        write_chunk(&pieces[only.clone()], prepared, &buf, writer, &mut refs)?;
        return Ok(refs);
    }
    let workers = workers.unwrap_or(default_workers).min(chunks.len());
    let next = AtomicUsize::new(0);
    // Chunks read so far: `read_done` once all are.
    let read = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    // Claim the next chunk nobody has claimed and read it into `buf`: the
    // workers' loop, and the writer's when it would otherwise wait.
    let claim_and_read = |buf: &mut Vec<u8>| -> Option<(usize, Result<Vec<Prepared>>)> {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let chunk = chunks.get(index)?;
        let prepared = prepare(pid, source, &mem, &pieces[chunk.clone()], buf, compress);
        if prepared.is_ok() && read.fetch_add(1, Ordering::AcqRel) + 1 == chunks.len() {
            read_done();
        }
        Some((index, prepared))
    };
    let (done_tx, done_rx) = mpsc::sync_channel::<Done>((buffers * workers).max(1));
    std::thread::scope(|scope| {
        let mut back = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
            back.push(back_tx);
            let done_tx = done_tx.clone();
            let (abort, claim_and_read) = (&abort, &claim_and_read);
            scope.spawn(move || {
                // One being filled while the others are written.
                let mut spare = vec![Vec::new(); buffers];
                while !abort.load(Ordering::Relaxed) {
                    let Some(mut buf) = spare.pop().or_else(|| back_rx.recv().ok()) else {
                        break;
                    };
                    let Some((index, runs)) = claim_and_read(&mut buf) else {
                        break;
                    };
                    let done = Done {
                        index,
                        worker,
                        buf,
                        runs,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let result = write_in_order(
            &pieces,
            &chunks,
            runs.len(),
            done_rx,
            &back,
            writer,
            compress,
            &claim_and_read,
        );
        if result.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        // Dropping the receivers (with `back`) wakes every waiting worker.
        drop(back);
        result
    })
}

/// Claim the next unclaimed chunk and read it into the buffer given:
/// its index and its pieces, or None once every chunk is claimed.
type ClaimAndRead<'a> = dyn Fn(&mut Vec<u8>) -> Option<(usize, Result<Vec<Prepared>>)> + Sync + 'a;

/// Buffers of the writer's own, for the chunks it reads itself: one
/// being written while another waits for the chunks before it.
const WRITER_BUFFERS: usize = 2;

/// The calling thread's half: write the chunks in order as they come.
/// While the next one is not ready it allocates the file's next pages
/// (its own work, done ahead), and once those are allocated it reads the
/// next unclaimed chunk itself (`claim_and_read`) rather than wait: a
/// worker's reading and checksumming (1 GiB: 0.22–0.31 s to read alone)
/// is nearly as slow as the write here (0.38–0.45 s), and falls behind it
/// whenever the VM slows its core (the writer waited 140 ms of a 590 ms
/// dump). 1 GiB leaving the process running, 30 alternated dumps each:
/// median 487 ms without, 466 ms with (dd 372 ms).
#[allow(clippy::too_many_arguments)]
fn write_in_order(
    pieces: &[Piece],
    chunks: &[Range<usize>],
    nruns: usize,
    done_rx: mpsc::Receiver<Done>,
    back: &[mpsc::Sender<Vec<u8>>],
    writer: &mut ImageWriter,
    compress: bool,
    claim_and_read: &ClaimAndRead,
) -> Result<Vec<DataRef>> {
    let mut refs = Vec::with_capacity(nruns);
    let mut waiting: BTreeMap<usize, Done> = BTreeMap::new();
    let mut next = 0;
    // How far the file will reach once every piece is written (blobs
    // start page-aligned: pages are whole, so nothing else is added).
    let until = writer.position() + pieces.iter().map(|p| p.npages * PAGE_SIZE).sum::<u64>();
    // Where the writer's time goes: waiting for workers (allocating the
    // file's next pages or reading a chunk itself meanwhile), or writing.
    let (mut waited, mut allocated, mut wrote) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut read_itself, mut read_chunks) = (Duration::ZERO, 0usize);
    // Once every chunk is claimed, there is nothing left to read.
    let mut all_claimed = false;
    let mut own: Vec<Vec<u8>> = vec![Vec::new(); WRITER_BUFFERS];
    let stopped = || Error::Other("internal: a page copy worker stopped early".into());
    while next < chunks.len() {
        let t = Instant::now();
        let done = match done_rx.try_recv() {
            Ok(done) => done,
            Err(nothing_yet) => {
                if writer.allocate_while_waiting(until) {
                    allocated += t.elapsed();
                    continue;
                }
                let workers_gone = nothing_yet == mpsc::TryRecvError::Disconnected;
                // Compressing is the workers' work, on every core: the
                // writer takes it up only once they are gone.
                let may_read = !all_claimed && (!compress || workers_gone);
                match own.pop() {
                    Some(mut buf) if may_read => match claim_and_read(&mut buf) {
                        Some((index, runs)) => {
                            read_itself += t.elapsed();
                            read_chunks += 1;
                            Done {
                                index,
                                worker: WRITER,
                                buf,
                                runs,
                            }
                        }
                        None => {
                            all_claimed = true;
                            own.push(buf);
                            continue;
                        }
                    },
                    spare => {
                        own.extend(spare);
                        // Gone, with the next chunk claimed and not sent.
                        if workers_gone {
                            return Err(stopped());
                        }
                        let done = done_rx.recv().map_err(|_| stopped())?;
                        waited += t.elapsed();
                        done
                    }
                }
            }
        };
        let t = Instant::now();
        waiting.insert(done.index, done);
        while let Some(done) = waiting.remove(&next) {
            write_chunk(
                &pieces[chunks[next].clone()],
                done.runs?,
                &done.buf,
                writer,
                &mut refs,
            )?;
            if done.worker == WRITER {
                own.push(done.buf);
            } else {
                // The worker may have finished already; the buffer is then freed.
                let _ = back.get(done.worker).map(|b| b.send(done.buf));
            }
            next += 1;
        }
        wrote += t.elapsed();
    }
    tracing::debug!(
        chunks = chunks.len(),
        compress,
        waited_us = waited.as_micros() as u64,
        allocated_us = allocated.as_micros() as u64,
        read_itself_us = read_itself.as_micros() as u64,
        read_chunks,
        wrote_us = wrote.as_micros() as u64,
        "pages written"
    );
    Ok(refs)
}

/// The `worker` of a chunk the writer read itself.
const WRITER: usize = usize::MAX;

/// Write one chunk's prepared pieces, in order, into `writer`; each run
/// finished adds its `DataRef` to `refs`.
fn write_chunk(
    pieces: &[Piece],
    prepared: Vec<Prepared>,
    buf: &[u8],
    writer: &mut ImageWriter,
    refs: &mut Vec<DataRef>,
) -> Result<()> {
    for (piece, p) in pieces.iter().zip(prepared) {
        match &p.zstd {
            Some(z) => {
                let raw_len = p.range.len() as u64;
                refs.push(writer.add_prepared(z, raw_len, p.crc, Compression::Zstd)?);
            }
            None => {
                let bytes = buf.get(p.range.clone()).unwrap_or(&[]);
                if piece.first {
                    writer.begin_data()?;
                }
                writer.write_checksummed(bytes, p.crc)?;
                if piece.last {
                    refs.push(writer.end_data()?);
                }
            }
        }
        debug_assert_eq!(refs.len(), piece.run + usize::from(piece.last));
    }
    Ok(())
}

/// A worker's half: copy a chunk's pieces into `buf`, then checksum (and
/// compress: pieces are whole runs then) each.
fn prepare(
    pid: i32,
    source: Source,
    mem: &Memory,
    pieces: &[Piece],
    buf: &mut Vec<u8>,
    compress: bool,
) -> Result<Vec<Prepared>> {
    let total: usize = pieces.iter().map(|p| (p.npages * PAGE_SIZE) as usize).sum();
    // A buffer is reused as it is: zeroing it again would cost a pass over
    // memory that the copy overwrites anyway.
    if buf.len() < total {
        buf.resize(total, 0);
    }
    let runs: Vec<(u64, u64)> = pieces.iter().map(|p| (p.addr, p.npages)).collect();
    let mut at = 0usize;
    for batch in runs.chunks(MAX_IOVECS) {
        let len: usize = batch.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
        read_runs(pid, source, mem, batch, &mut buf[at..at + len])?;
        at += len;
    }
    let mut out = Vec::with_capacity(runs.len());
    let mut at = 0usize;
    for &(_, npages) in &runs {
        let range = at..at + (npages * PAGE_SIZE) as usize;
        at = range.end;
        let raw = &buf[range.clone()];
        let prepared = if compress {
            let z = crate::image::writer::compress_blob(raw)
                .map_err(|e| Error::Other(format!("compressing pages: {e}")))?;
            Prepared {
                crc: crc32c::crc32c(&z),
                zstd: Some(z),
                range,
            }
        } else {
            Prepared {
                crc: crc32c::crc32c(raw),
                zstd: None,
                range,
            }
        };
        out.push(prepared);
    }
    Ok(out)
}

/// Read `runs` of frozen process `pid` into `dest` (laid out in order,
/// exactly as long as the runs), without writing them anywhere.
pub(crate) fn read_frozen(pid: i32, runs: &[(u64, u64)], dest: &mut [u8]) -> Result<()> {
    // Most mappings of an increment hold no written page: opening
    // /proc/PID/mem for nothing cost ~5 us per mapping, frozen.
    if runs.is_empty() {
        return Ok(());
    }
    let mem = Memory::open(pid, Source::VmReadv)?;
    let read = |runs: &[(u64, u64)], dest: &mut [u8]| -> Result<()> {
        let mut at = 0usize;
        for batch in runs.chunks(MAX_IOVECS) {
            let len: usize = batch.iter().map(|r| (r.1 * PAGE_SIZE) as usize).sum();
            let dest = dest
                .get_mut(at..at + len)
                .ok_or_else(|| Error::Other("internal: pages read past their buffer".into()))?;
            read_runs(pid, Source::VmReadv, &mem, batch, dest)?;
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
struct Memory {
    mem: File,
    pagemap: Option<File>,
}

impl Memory {
    fn open(pid: i32, source: Source) -> Result<Memory> {
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
fn mapped_alone(pagemap: &File, runs: &[(u64, u64)]) -> bool {
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
fn read_runs(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_shared_with_a_child_are_not_ours_alone() {
        const PAGES: u64 = 64;
        let len = (PAGES * PAGE_SIZE) as usize;
        // SAFETY: a fresh private anonymous mapping of ours; checked.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        // SAFETY: the mapping just made, `len` bytes.
        unsafe { std::ptr::write_bytes(at.cast::<u8>(), 7, len) };
        let addr = at as u64;
        let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
        let whole = [(addr, PAGES)];
        // Every other page: read as one span.
        let scattered: Vec<(u64, u64)> = (0..PAGES / 2)
            .map(|i| (addr + 2 * i * PAGE_SIZE, 1))
            .collect();
        assert!(mapped_alone(&pagemap, &whole));
        assert!(mapped_alone(&pagemap, &scattered));
        // SAFETY: the child only waits to be killed (async-signal-safe).
        let child = unsafe { libc::fork() };
        if child == 0 {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
        assert!(child > 0, "fork");
        let (shared_whole, shared_scattered) = (
            mapped_alone(&pagemap, &whole),
            mapped_alone(&pagemap, &scattered),
        );
        // SAFETY: our own child, killed and reaped.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::munmap(at, len);
        }
        assert!(!shared_whole && !shared_scattered);
    }

    #[test]
    fn runs_are_cut_to_chunks_and_chunks_hold_whole_runs() {
        let runs = split_runs(&[(0, CHUNK_PAGES * 2 + 3), (1 << 40, 1)]);
        assert_eq!(
            runs,
            vec![
                (0, CHUNK_PAGES),
                (CHUNK_PAGES * PAGE_SIZE, CHUNK_PAGES),
                (2 * CHUNK_PAGES * PAGE_SIZE, 3),
                (1 << 40, 1)
            ]
        );
        // Compressed: whole runs, grouped up to a chunk.
        let (pieces, chunks) = pieces_of(&runs, CHUNK_BYTES);
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| p.first && p.last));
        assert_eq!(chunks, vec![0..1, 1..2, 2..4]);
        let small = vec![(0, 1); 5000];
        let (_, chunks) = pieces_of(&small, CHUNK_BYTES);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.len() as u64 <= CHUNK_PAGES));
    }

    #[test]
    fn long_runs_are_cut_into_pieces_that_fill_chunks() {
        let piece_pages = PIECE_BYTES as u64 / PAGE_SIZE;
        let runs = [(0, 2 * piece_pages + 3), (1 << 40, 1), (1 << 41, 2)];
        let (pieces, chunks) = pieces_of(&runs, PIECE_BYTES);
        let summary: Vec<(usize, u64, bool, bool)> = pieces
            .iter()
            .map(|p| (p.run, p.npages, p.first, p.last))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, piece_pages, true, false),
                (0, piece_pages, false, false),
                (0, 3, false, true),
                (1, 1, true, true),
                (2, 2, true, true),
            ]
        );
        assert_eq!(pieces[1].addr, piece_pages * PAGE_SIZE);
        assert_eq!(chunks, vec![0..1, 1..2, 2..5]);
    }

    /// Our own memory stands in for a target; plain and compressed images
    /// read back exactly.
    #[test]
    fn runs_copied_on_all_cores_read_back_exactly() {
        use crate::image::model::{Vma, VmaKind};
        use crate::image::testutil::sample_metadata;
        use crate::image::{ImageReader, WriteOptions};

        let pages = 3 * CHUNK_PAGES + 5;
        let source: Vec<u8> = (0..(pages + 1) * PAGE_SIZE)
            .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
            .collect();
        let base = source.as_ptr() as u64;
        let aligned = base.next_multiple_of(PAGE_SIZE);
        // A hole after the first page: two runs, cut into chunk-sized ones.
        let runs = split_runs(&[(aligned, 1), (aligned + 2 * PAGE_SIZE, pages - 2)]);
        // No worker: the writer reads every chunk itself, as it does
        // whenever the workers are behind.
        let cases = [false, true]
            .into_iter()
            .flat_map(|compress| [None, Some(1), Some(0)].map(|workers| (compress, workers)));
        for (compress, workers) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("img");
            let opts = WriteOptions {
                compress,
                ..WriteOptions::default()
            };
            let mut writer = ImageWriter::create(&path, opts).expect("create");
            let how = if compress {
                Source::ProcMem
            } else {
                Source::VmReadv
            };
            let read_all = AtomicUsize::new(0);
            let refs = copy_with_workers(
                std::process::id() as i32,
                how,
                &runs,
                &mut writer,
                &|| {
                    read_all.fetch_add(1, Ordering::Relaxed);
                },
                workers,
            )
            .expect("copy");
            assert_eq!(read_all.load(Ordering::Relaxed), 1, "{workers:?}");
            let mut meta = sample_metadata();
            meta.root.vmas = vec![Vma {
                start: aligned,
                end: aligned + pages * PAGE_SIZE,
                read: true,
                write: true,
                exec: false,
                shared: false,
                offset: 0,
                name: String::new(),
                kind: VmaKind::Anonymous,
                file: None,
                vm_flags: Vec::new(),
                pages: runs
                    .iter()
                    .zip(refs)
                    .map(|(&(addr, npages), data)| crate::image::model::PageRun {
                        addr,
                        npages,
                        data,
                    })
                    .collect(),
                shmem_id: None,
                sysv: None,
                inherited: Vec::new(),
            }];
            writer.finish(&meta).expect("finish");
            let reader = ImageReader::open(&path).expect("open");
            reader.verify_all().expect("checksums");
            let off = (aligned - base) as usize;
            let first = reader
                .read_memory(aligned, PAGE_SIZE as usize)
                .expect("read")
                .expect("stored");
            assert_eq!(first, &source[off..off + PAGE_SIZE as usize]);
            let len = ((pages - 2) * PAGE_SIZE) as usize;
            let rest = reader
                .read_memory(aligned + 2 * PAGE_SIZE, len)
                .expect("read")
                .expect("stored");
            let from = off + 2 * PAGE_SIZE as usize;
            assert!(
                rest == source[from..from + len],
                "compress={compress} workers={workers:?}"
            );
        }
    }
}
