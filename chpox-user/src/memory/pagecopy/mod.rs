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
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crate::image::model::{Compression, DataRef};
use crate::memory::PAGE_SIZE;

mod source;
#[cfg(test)]
mod tests;

pub use source::Source;
use source::{MAX_IOVECS, Memory, read_runs};
pub(crate) use source::{read_frozen, read_running, read_running_to};

/// Longest run, and most bytes per chunk: 8 MiB keeps two buffers per
/// worker small and a chunk's copy long enough to amortise the syscall.
pub const CHUNK_PAGES: u64 = 2048;
const CHUNK_BYTES: usize = (CHUNK_PAGES * PAGE_SIZE) as usize;
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
