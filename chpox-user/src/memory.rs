//! The address space: which mappings exist (`/proc/PID/smaps`) and which of
//! their pages must be stored (`/proc/PID/pagemap`).
//!
//! Only pages that cannot be recovered otherwise go into the image:
//! - private anonymous memory: pages present or swapped (never-touched pages
//!   read back as zero);
//! - private file mappings: only the copy-on-write pages (pagemap says
//!   "anonymous"); clean pages come back from the file;
//! - shared anonymous memory: every page the shared memory object holds,
//!   including pages another sharer (a forked child) wrote that this
//!   process never touched; from the pagemap alone (present or swapped)
//!   where the object cannot be opened;
//! - shared file mappings and the kernel's own `[vdso]`/`[vvar]`/… : nothing.
//!
//! Pages are copied with `process_vm_readv`, many ranges per call, into one
//! reused buffer that goes straight to the image writer: one copy out of the
//! target, one into the file.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::error::{Error, Result, parse_err};
use crate::image::model::{Compression, DataRef, PageRun, VmaKind};
use crate::image::{ClosedArea, ImageWriter, MappedArea};

pub const PAGE_SIZE: u64 = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// Set for page-cache pages and shared anonymous (shmem) pages.
const PM_FILE: u64 = 1 << 61;
/// A stored run never exceeds this, so one corrupt checksum costs at most
/// this much, and a reader can verify a run in bounded memory.
const MAX_RUN_PAGES: u64 = 16 * 1024;
/// Copy buffer: large enough to amortise syscalls, small enough to stay in
/// cache-friendly territory and not double the dumper's footprint.
const COPY_BUF_BYTES: usize = 8 << 20;
/// Kernel limit on iovecs per process_vm_readv call (UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

/// One line of /proc/PID/smaps with its VmFlags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// Device as the kernel prints it, `major:minor` in hex.
    pub dev: (u32, u32),
    pub inode: u64,
    /// Path column without a " (deleted)" suffix.
    pub path: String,
    pub deleted: bool,
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    pub fn kind(&self) -> VmaKind {
        match self.path.as_str() {
            "[vdso]" => return VmaKind::Vdso,
            "[vvar]" => return VmaKind::Vvar,
            "[vvar_vclock]" => return VmaKind::VvarVclock,
            "[vsyscall]" => return VmaKind::Vsyscall,
            _ => {}
        }
        if self.inode == 0 {
            return if self.shared {
                VmaKind::SharedAnonymous
            } else {
                VmaKind::Anonymous
            };
        }
        // MAP_SHARED|MAP_ANONYMOUS shows up as a deleted /dev/zero, SysV shm
        // as /SYSV…; both are shmem whose only copy is in memory.
        if self.shared && self.is_shmem_object() {
            return VmaKind::SharedAnonymous;
        }
        if self.shared {
            VmaKind::SharedFile
        } else {
            VmaKind::PrivateFile
        }
    }

    fn is_shmem_object(&self) -> bool {
        (self.path == "/dev/zero" && self.deleted) || self.path.starts_with("/SYSV")
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The maps column, as printed by the kernel (for the image's `name`).
    pub fn display_name(&self) -> String {
        if self.deleted {
            format!("{} (deleted)", self.path)
        } else {
            self.path.clone()
        }
    }

    /// Device and I/O memory mappings (VM_IO, VM_PFNMAP) have no pages we
    /// could read or write back.
    pub fn is_device_memory(&self) -> bool {
        self.vm_flags.iter().any(|f| f == "io" || f == "pf")
    }
}

/// Parse /proc/PID/smaps (or maps: then `vm_flags` stay empty).
pub fn parse_smaps(text: &str, path_for_errors: &str) -> Result<Vec<MapEntry>> {
    let mut entries: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = entries.last_mut() {
                last.vm_flags = flags.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        // Header lines start with a hex range; detail lines with "Name:".
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        if !first.contains('-') || first.ends_with(':') {
            continue;
        }
        entries.push(parse_map_header(line).ok_or_else(|| {
            parse_err(path_for_errors, format!("unexpected mapping line {line:?}"))
        })?);
    }
    Ok(entries)
}

fn parse_map_header(line: &str) -> Option<MapEntry> {
    // start-end perms offset dev inode [path, which may contain spaces]
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        let (f, r) = rest.split_at(end);
        rest = r;
        f
    };
    let range = field();
    let perms = field().as_bytes().to_vec();
    let offset = u64::from_str_radix(field(), 16).ok()?;
    let dev = field();
    let inode: u64 = field().parse().ok()?;
    let path_col = rest.trim_start();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    if perms.len() != 4 {
        return None;
    }
    let (path, deleted) = match path_col.strip_suffix(" (deleted)") {
        Some(p) => (p.to_string(), true),
        None => (path_col.to_string(), false),
    };
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
        path,
        deleted,
        vm_flags: Vec::new(),
    })
}

pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/smaps");
    parse_smaps(&crate::error::read_proc(&path)?, &path)
}

/// About how many bytes of pages a dump of `pid` will store: its anonymous
/// and swapped-out memory (`/proc/PID/smaps_rollup`), read before the freeze
/// so the image file can be allocated while the process still runs. Zero
/// when unknown; this is only a hint.
pub fn estimate_stored_bytes(pid: i32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return 0;
    };
    let kb = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kb("Anonymous:") + kb("Swap:")) * 1024
}

/// Should a page with this pagemap entry be stored, in a mapping of `kind`?
pub fn page_needs_storing(kind: VmaKind, entry: u64) -> bool {
    let present = entry & PM_PRESENT != 0;
    let swapped = entry & PM_SWAP != 0;
    match kind {
        VmaKind::Anonymous | VmaKind::SharedAnonymous => present || swapped,
        // A present page that is not a page-cache page is our own
        // copy-on-write copy; swapped pages are always anonymous.
        VmaKind::PrivateFile => (present && entry & PM_FILE == 0) || swapped,
        VmaKind::SharedFile
        | VmaKind::Vdso
        | VmaKind::Vvar
        | VmaKind::VvarVclock
        | VmaKind::Vsyscall => false,
    }
}

/// Which pages of shared anonymous mapping `map` its shared memory object
/// holds: pages written through another process's mapping of the object
/// are not in this process's page tables, yet they are its memory. Reads
/// the object's holes and data through `/proc/PID/map_files` (which takes
/// CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE); None where it cannot be opened.
fn shmem_object_pages(pid: i32, map: &MapEntry) -> Option<Vec<bool>> {
    use nix::unistd::{Whence, lseek};
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", map.start, map.end);
    let object = File::open(&path).ok()?;
    let mut held = vec![false; (map.len() / PAGE_SIZE) as usize];
    let first = map.offset;
    let end = first + map.len();
    let mut pos = first;
    while pos < end {
        // ENXIO: no data at or after pos.
        let Ok(data) = lseek(&object, pos as i64, Whence::SeekData) else {
            break;
        };
        let data = data as u64;
        if data >= end {
            break;
        }
        let hole =
            lseek(&object, data as i64, Whence::SeekHole).map_or(end, |h| (h as u64).min(end));
        let (from, to) = (
            (data - first) / PAGE_SIZE,
            (hole - first).div_ceil(PAGE_SIZE),
        );
        held[from as usize..to as usize].fill(true);
        pos = hole.max(data + PAGE_SIZE);
    }
    Some(held)
}

/// The shared memory objects (shared anonymous memory) met so far in a
/// tree, with the ranges of each whose pages are stored: one object mapped
/// by a parent and its child is stored once.
#[derive(Debug, Default)]
pub struct SharedObjects {
    /// inode -> (offset, length) of each mapping stored
    stored: std::collections::HashMap<u64, Vec<(u64, u64)>>,
}

impl SharedObjects {
    /// Whether an earlier mapping of the same object covered all of `map`.
    pub fn stored_already(&self, map: &MapEntry) -> bool {
        let Some(ranges) = self.stored.get(&map.inode) else {
            return false;
        };
        let (from, to) = (map.offset, map.offset + map.len());
        ranges
            .iter()
            .any(|&(off, len)| off <= from && to <= off + len)
    }

    pub fn record(&mut self, map: &MapEntry) {
        self.stored
            .entry(map.inode)
            .or_default()
            .push((map.offset, map.len()));
    }
}

/// Runs of pages to store, as (address, page count), each at most
/// `MAX_RUN_PAGES` long, from the pagemap entries of mapping `map`. A
/// shared anonymous mapping also stores every page its shared memory
/// object holds, where that object can be read.
pub fn select_runs(pid: i32, map: &MapEntry, kind: VmaKind, pagemap: &[u64]) -> Vec<(u64, u64)> {
    let needed = pagemap.iter().map(|&e| page_needs_storing(kind, e));
    let object = (kind == VmaKind::SharedAnonymous)
        .then(|| shmem_object_pages(pid, map))
        .flatten();
    match object {
        Some(held) => runs_of(map.start, needed.zip(held).map(|(a, b)| a || b)),
        None => runs_of(map.start, needed),
    }
}

/// Runs of consecutive needed pages, as (address, page count), each at
/// most `MAX_RUN_PAGES` long, for pages from `start` on.
fn runs_of(start: u64, needed: impl Iterator<Item = bool>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for (i, needed) in needed.enumerate() {
        let addr = start + i as u64 * PAGE_SIZE;
        if needed {
            current = match current {
                Some((a, n)) if n < MAX_RUN_PAGES => Some((a, n + 1)),
                Some(run) => {
                    runs.push(run);
                    Some((addr, 1))
                }
                None => Some((addr, 1)),
            };
        } else if let Some(run) = current.take() {
            runs.push(run);
        }
    }
    runs.extend(current);
    runs
}

/// Copies a process's pages into an image.
///
/// Runs go into the writer's mapped area (see `ImageWriter::map_area`) while
/// it has room: `process_vm_readv` copies them straight into the image's
/// page cache. Runs that do not fit, and all runs of compressed images, are
/// copied into a buffer and streamed. One dumper serves every process of a
/// tree in turn ([`next_process`](Self::next_process)), so they all share
/// the area.
pub struct PageDumper {
    pid: i32,
    /// Which process of the tree (image order) the runs belong to.
    process: usize,
    pagemap: File,
    /// /proc/PID/mem reads pages process_vm_readv refuses (PROT_NONE,
    /// write-only), because it reads with FOLL_FORCE like a debugger.
    mem: File,
    buf: Vec<u8>,
    pagemap_buf: Vec<u8>,
    area: Option<MappedArea>,
    area_used: u64,
    /// Runs placed in the area: where they belong, offset in area, length.
    in_area: Vec<(RunPlace, u64, u64)>,
    /// The area once closed, with where each blob belongs.
    closed: Option<(ClosedArea, Vec<RunPlace>)>,
    pub pages_stored: u64,
}

fn open_proc(pid: i32, what: &str) -> Result<File> {
    let path = format!("/proc/{pid}/{what}");
    File::open(&path).map_err(|source| Error::Proc { path, source })
}

/// A run of the image: process (image order), VMA, run.
type RunPlace = (usize, usize, usize);

/// A piece of a run placed in a copy destination.
struct Piece {
    addr: u64,
    len: usize,
    first_of_run: bool,
    last_of_run: bool,
    run_addr: u64,
    run_pages: u64,
}

/// Stand-in until the mapped area is closed and checksummed.
const PENDING: DataRef = DataRef {
    offset: 0,
    stored_len: 0,
    raw_len: 0,
    crc32c: 0,
    compression: Compression::None,
};

impl PageDumper {
    pub fn new(pid: i32, area: Option<MappedArea>) -> Result<Self> {
        Ok(PageDumper {
            pid,
            process: 0,
            pagemap: open_proc(pid, "pagemap")?,
            mem: open_proc(pid, "mem")?,
            buf: Vec::new(),
            pagemap_buf: Vec::new(),
            area,
            area_used: 0,
            in_area: Vec::new(),
            closed: None,
            pages_stored: 0,
        })
    }

    /// Go on with the next process of the tree, `pid`.
    pub fn next_process(&mut self, pid: i32) -> Result<()> {
        self.pagemap = open_proc(pid, "pagemap")?;
        self.mem = open_proc(pid, "mem")?;
        self.pid = pid;
        self.process += 1;
        Ok(())
    }

    /// The pagemap entries for [start, end).
    pub fn pagemap(&mut self, start: u64, end: u64) -> Result<Vec<u64>> {
        let npages = ((end - start) / PAGE_SIZE) as usize;
        let mut out = Vec::with_capacity(npages);
        // 64 Ki entries (512 KiB) per read keeps memory flat for huge, sparse
        // mappings.
        const CHUNK: usize = 64 * 1024;
        let mut done = 0usize;
        while done < npages {
            let n = (npages - done).min(CHUNK);
            self.pagemap_buf.resize(n * 8, 0);
            let offset = (start / PAGE_SIZE + done as u64) * 8;
            self.pagemap
                .read_exact_at(&mut self.pagemap_buf, offset)
                .map_err(|source| Error::Proc {
                    path: format!("/proc/{}/pagemap", self.pid),
                    source,
                })?;
            out.extend(self.pagemap_buf.chunks_exact(8).map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_ne_bytes(w)
            }));
            done += n;
        }
        Ok(out)
    }

    /// Store the runs (from `select_runs`) of VMA number `vma_index`.
    /// Returned runs placed in the mapped area carry their final `DataRef`
    /// only after `finish`.
    pub fn dump_runs(
        &mut self,
        vma_index: usize,
        runs: &[(u64, u64)],
        writer: &mut ImageWriter,
    ) -> Result<Vec<PageRun>> {
        self.pages_stored += runs.iter().map(|r| r.1).sum::<u64>();
        let total: u64 = runs.iter().map(|r| r.1 * PAGE_SIZE).sum();
        let fits = self
            .area
            .as_ref()
            .is_some_and(|a| self.area_used + total <= a.len() as u64);
        if fits {
            return self.copy_into_area(vma_index, runs);
        }
        // Out of reserved room (the estimate was low): streaming needs the
        // writer back.
        self.close_area(writer)?;
        self.stream(runs, writer)
    }

    fn copy_into_area(&mut self, vma_index: usize, runs: &[(u64, u64)]) -> Result<Vec<PageRun>> {
        let mut pieces = Vec::new();
        let first_offset = self.area_used;
        let mut offset = first_offset;
        let mut out = Vec::with_capacity(runs.len());
        for (i, &(addr, npages)) in runs.iter().enumerate() {
            let len = npages * PAGE_SIZE;
            self.in_area
                .push(((self.process, vma_index, i), offset, len));
            out.push(PageRun {
                addr,
                npages,
                data: PENDING,
            });
            pieces.push(Piece {
                addr,
                len: len as usize,
                first_of_run: true,
                last_of_run: true,
                run_addr: addr,
                run_pages: npages,
            });
            offset += len;
        }
        let Some(area) = self.area.as_mut() else {
            return Ok(out);
        };
        let dest = &mut area.as_mut_slice()[first_offset as usize..offset as usize];
        copy_parallel(self.pid, &self.mem, dest, &pieces)?;
        self.area_used = offset;
        Ok(out)
    }

    fn stream(&mut self, runs: &[(u64, u64)], writer: &mut ImageWriter) -> Result<Vec<PageRun>> {
        if self.buf.len() < COPY_BUF_BYTES {
            self.buf.resize(COPY_BUF_BYTES, 0);
        }
        let mut stored = Vec::with_capacity(runs.len());
        let mut pieces: Vec<Piece> = Vec::new();
        let mut filled = 0usize;
        for &(run_addr, run_pages) in runs {
            let run_len = (run_pages * PAGE_SIZE) as usize;
            let mut done = 0usize;
            while done < run_len {
                if filled == self.buf.len() || pieces.len() == MAX_IOVECS {
                    self.flush(&pieces, filled, writer, &mut stored)?;
                    pieces.clear();
                    filled = 0;
                }
                let len = (run_len - done).min(self.buf.len() - filled);
                pieces.push(Piece {
                    addr: run_addr + done as u64,
                    len,
                    first_of_run: done == 0,
                    last_of_run: done + len == run_len,
                    run_addr,
                    run_pages,
                });
                filled += len;
                done += len;
            }
        }
        self.flush(&pieces, filled, writer, &mut stored)?;
        Ok(stored)
    }

    /// Copy the pieces out of the target, then hand them to the writer run
    /// by run.
    fn flush(
        &mut self,
        pieces: &[Piece],
        filled: usize,
        writer: &mut ImageWriter,
        stored: &mut Vec<PageRun>,
    ) -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        copy_pieces(self.pid, &self.mem, &mut self.buf[..filled], pieces)?;
        let mut at = 0usize;
        for p in pieces {
            if p.first_of_run {
                writer.begin_data()?;
            }
            writer.write_data(&self.buf[at..at + p.len])?;
            at += p.len;
            if p.last_of_run {
                stored.push(PageRun {
                    addr: p.run_addr,
                    npages: p.run_pages,
                    data: writer.end_data()?,
                });
            }
        }
        Ok(())
    }

    fn close_area(&mut self, writer: &mut ImageWriter) -> Result<()> {
        let Some(area) = self.area.take() else {
            return Ok(());
        };
        let blobs: Vec<(u64, u64)> = self.in_area.iter().map(|r| (r.1, r.2)).collect();
        let closed = writer.close_area(area, blobs)?;
        let placed = self.in_area.drain(..).map(|r| r.0).collect();
        self.closed = Some((closed, placed));
        Ok(())
    }

    /// Close the mapped area (the writer streams again); the runs copied
    /// into it get their `DataRef`s from `PageChecksums::apply`.
    pub fn finish(mut self, writer: &mut ImageWriter) -> Result<PageChecksums> {
        self.close_area(writer)?;
        Ok(PageChecksums {
            closed: self.closed,
        })
    }
}

/// Checksums of the pages copied into the mapped area, still to compute.
/// They need the copy, not the process: the dump computes them after the
/// process runs again.
pub struct PageChecksums {
    closed: Option<(ClosedArea, Vec<RunPlace>)>,
}

impl PageChecksums {
    /// Give every run copied into the mapped area its final `DataRef`.
    pub fn apply(self, meta: &mut crate::image::model::Metadata) {
        let Some((closed, placed)) = self.closed else {
            return;
        };
        let mut procs: Vec<&mut crate::image::model::ProcessImage> = meta.processes_mut().collect();
        for ((process, vma, run), data) in placed.into_iter().zip(closed.data_refs()) {
            if let Some(r) = procs
                .get_mut(process)
                .and_then(|p| p.vmas.get_mut(vma))
                .and_then(|v| v.pages.get_mut(run))
            {
                r.data = data;
            }
        }
    }
}

/// Copy `pieces` into `dest` (laid out in order) on several threads.
///
/// Copying out of another process is bound by the kernel pinning each page
/// as much as by memcpy itself; with the target frozen, every core we have
/// shortens the freeze. Pieces are split into byte-balanced shares at piece
/// boundaries (runs are at most MAX_RUN_PAGES, so shares stay even).
fn copy_parallel(pid: i32, mem: &File, dest: &mut [u8], pieces: &[Piece]) -> Result<()> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    // Below a few MiB, thread start-up costs more than it saves.
    if threads == 1 || total < (8 << 20) {
        return copy_batches(pid, mem, dest, pieces);
    }
    let share = total.div_ceil(threads);
    let mut jobs: Vec<(&mut [u8], &[Piece])> = Vec::with_capacity(threads);
    let mut rest_dest = dest;
    let mut rest_pieces = pieces;
    while !rest_pieces.is_empty() {
        let mut bytes = 0usize;
        let mut n = 0usize;
        while n < rest_pieces.len() && (bytes < share || n == 0) {
            bytes += rest_pieces[n].len;
            n += 1;
        }
        let (d, dr) = std::mem::take(&mut rest_dest).split_at_mut(bytes);
        let (p, pr) = rest_pieces.split_at(n);
        jobs.push((d, p));
        rest_dest = dr;
        rest_pieces = pr;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(d, p)| scope.spawn(move || copy_batches(pid, mem, d, p)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Other("page copy thread panicked".into())))
        })
    })
}

/// `copy_pieces` in batches of at most MAX_IOVECS pieces.
fn copy_batches(pid: i32, mem: &File, mut dest: &mut [u8], pieces: &[Piece]) -> Result<()> {
    for batch in pieces.chunks(MAX_IOVECS) {
        let batch_len: usize = batch.iter().map(|p| p.len).sum();
        let (head, rest) = std::mem::take(&mut dest).split_at_mut(batch_len);
        copy_pieces(pid, mem, head, batch)?;
        crate::progress::add(batch_len as u64);
        dest = rest;
    }
    Ok(())
}

/// Copy `pieces` of the target's memory into `dest` (laid out in order):
/// one process_vm_readv for all of them, and /proc/PID/mem for whatever it
/// refuses (it stops at the first range it may not read).
fn copy_pieces(pid: i32, mem: &File, dest: &mut [u8], pieces: &[Piece]) -> Result<()> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let remote: Vec<RemoteIoVec> = pieces
        .iter()
        .map(|p| RemoteIoVec {
            base: p.addr as usize,
            len: p.len,
        })
        .collect();
    let got = {
        let mut local = [IoSliceMut::new(&mut dest[..total])];
        process_vm_readv(Pid::from_raw(pid), &mut local, &remote).unwrap_or(0)
    };
    if got == total {
        return Ok(());
    }
    let mut from = got;
    let mut piece_start = 0usize;
    for p in pieces {
        let piece_end = piece_start + p.len;
        if piece_end > from {
            let addr = p.addr + (from - piece_start) as u64;
            mem.read_exact_at(&mut dest[from..piece_end], addr)
                .map_err(|source| Error::Memory { pid, addr, source })?;
            from = piece_end;
        }
        piece_start = piece_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 fe:00 1315038                    /usr/bin/cat
Size:                  8 kB
VmFlags: rd mr mw me dw sd
7f1e4c000000-7f1e4c021000 rw-p 00000000 00:00 0 
Size:                132 kB
VmFlags: rd wr mr mw me nr sd
7f1e4d000000-7f1e4d100000 rw-s 00000000 00:01 2049                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f1e4e000000-7f1e4e001000 r--p 00000000 fe:00 42                         /tmp/a file with spaces (deleted)
VmFlags: rd mr mw me sd
7ffd1a5f0000-7ffd1a5f4000 r--p 00000000 00:00 0                          [vvar]
7ffd1a5f4000-7ffd1a5f6000 r--p 00000000 00:00 0                          [vvar_vclock]
7ffd1a5f6000-7ffd1a5f8000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
";

    #[test]
    fn smaps_lines_parse_with_flags_and_kinds() {
        let maps = parse_smaps(SMAPS, "test").expect("parses");
        assert_eq!(maps.len(), 8);
        assert_eq!(maps[0].path, "/usr/bin/cat");
        assert_eq!(maps[0].kind(), VmaKind::PrivateFile);
        assert_eq!(maps[0].dev, (0xfe, 0));
        assert_eq!(maps[0].vm_flags, ["rd", "mr", "mw", "me", "dw", "sd"]);
        assert_eq!(maps[1].kind(), VmaKind::Anonymous);
        assert_eq!(maps[1].path, "");
        assert_eq!(maps[2].kind(), VmaKind::SharedAnonymous);
        assert_eq!(maps[3].path, "/tmp/a file with spaces");
        assert!(maps[3].deleted);
        assert_eq!(maps[4].kind(), VmaKind::Vvar);
        assert_eq!(maps[5].kind(), VmaKind::VvarVclock);
        assert_eq!(maps[6].kind(), VmaKind::Vdso);
        assert_eq!(maps[7].kind(), VmaKind::Vsyscall);
        assert_eq!(maps[7].start, 0xffff_ffff_ff60_0000);
    }

    #[test]
    fn garbage_header_is_an_error() {
        assert!(parse_smaps("1000-zz r--p 0 0:0 0\n", "t").is_err());
    }

    #[test]
    fn only_unrecoverable_pages_are_selected() {
        let file_page = PM_PRESENT | PM_FILE;
        let cow_page = PM_PRESENT;
        assert!(!page_needs_storing(VmaKind::PrivateFile, file_page));
        assert!(page_needs_storing(VmaKind::PrivateFile, cow_page));
        assert!(page_needs_storing(VmaKind::PrivateFile, PM_SWAP));
        assert!(!page_needs_storing(VmaKind::Anonymous, 0));
        assert!(page_needs_storing(VmaKind::SharedAnonymous, file_page));
        assert!(!page_needs_storing(VmaKind::SharedFile, cow_page));
        assert!(!page_needs_storing(VmaKind::Vdso, cow_page));
    }

    /// Runs that fit go through the mapped area, the rest streams after
    /// the area closes; all of it reads back exactly.
    #[test]
    fn pages_overflowing_the_mapped_area_are_streamed() {
        use crate::image::model::Vma;
        use crate::image::testutil::sample_metadata;
        use crate::image::{ImageReader, WriteOptions};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let mut writer = ImageWriter::create(&path, WriteOptions::default()).expect("create");
        let area = writer
            .map_area(2 * PAGE_SIZE)
            .expect("map")
            .expect("tmp maps");
        // Our own memory stands in for a target: 5 pages of a known pattern.
        let source: Vec<u8> = (0..5 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let base = source.as_ptr() as u64;
        let aligned = base.next_multiple_of(PAGE_SIZE);
        let runs_a = [(aligned, 1)]; // fits the 2-page area
        let runs_b = [(aligned + PAGE_SIZE, 2)]; // does not fit what is left
        let pid = std::process::id() as i32;
        let mut dumper = PageDumper::new(pid, Some(area)).expect("dumper");
        let mut meta = sample_metadata();
        meta.root.vmas.clear();
        for (i, runs) in [&runs_a[..], &runs_b[..]].into_iter().enumerate() {
            let pages = dumper.dump_runs(i, runs, &mut writer).expect("dump");
            meta.root.vmas.push(Vma {
                start: runs[0].0,
                end: runs[0].0 + runs[0].1 * PAGE_SIZE,
                read: true,
                write: true,
                exec: false,
                shared: false,
                offset: 0,
                name: String::new(),
                kind: VmaKind::Anonymous,
                file: None,
                vm_flags: Vec::new(),
                pages,
                shmem_id: None,
            });
        }
        dumper
            .finish(&mut writer)
            .expect("finish pages")
            .apply(&mut meta);
        writer.finish(&meta).expect("finish image");

        let reader = ImageReader::open(&path).expect("open");
        reader.verify_all().expect("checksums");
        let got = reader
            .read_memory(aligned, 3 * PAGE_SIZE as usize)
            .expect("read")
            .expect("stored");
        let offset = (aligned - base) as usize;
        assert_eq!(got, &source[offset..offset + 3 * PAGE_SIZE as usize]);
    }

    fn select_runs(kind: VmaKind, start: u64, pagemap: &[u64]) -> Vec<(u64, u64)> {
        runs_of(start, pagemap.iter().map(|&e| page_needs_storing(kind, e)))
    }

    #[test]
    fn runs_merge_neighbours_and_split_when_long() {
        let p = PM_PRESENT;
        let runs = select_runs(VmaKind::Anonymous, 0x1000, &[p, p, 0, p, 0, 0]);
        assert_eq!(runs, vec![(0x1000, 2), (0x4000, 1)]);
        let long = vec![p; (MAX_RUN_PAGES + 3) as usize];
        let runs = select_runs(VmaKind::Anonymous, 0, &long);
        assert_eq!(
            runs,
            vec![(0, MAX_RUN_PAGES), (MAX_RUN_PAGES * PAGE_SIZE, 3)]
        );
    }
}
