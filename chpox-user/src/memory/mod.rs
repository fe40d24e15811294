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
//! Pages are copied by `pagecopy`: `process_vm_readv`, many ranges per
//! call, on every core, while the image is written. A dump that leaves the
//! process running copies them from a snapshot (`snapshot`) after the
//! process runs again.

// Pages to the image on every core, the copy-on-write snapshot they are
// read from while the process runs on, and the write tracking behind
// incremental images.
pub mod dirty;
pub mod earlymaps;
pub mod heldpages;
pub mod incremental;
pub mod pagecopy;
pub mod precopy;
pub mod snapshot;
pub mod sysvshm;
pub mod vmflags;

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result, parse_err};
use crate::image::ImageWriter;
use crate::image::model::{PageRun, VmaKind};

pub const PAGE_SIZE: u64 = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// Set for page-cache pages and shared anonymous (shmem) pages.
const PM_FILE: u64 = 1 << 61;
/// A stored run never exceeds this, so one corrupt checksum costs at most
/// this much, and a reader can verify a run in bounded memory.
const MAX_RUN_PAGES: u64 = 16 * 1024;

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

/// A mapping registered with userfaultfd for missing pages (`um`) has its
/// absent pages served by another process on first touch: a lazy restore
/// still filling it, or a program's own page server. The pagemap cannot
/// tell those pages from ones never touched, so an image would silently
/// hold zeros for them: refused, by name.
pub fn refuse_missing_page_handlers(pid: i32, maps: &[MapEntry]) -> Result<()> {
    match maps.iter().find(|m| m.vm_flags.iter().any(|f| f == "um")) {
        Some(m) => Err(Error::Other(format!(
            "PID {pid} has memory at {:x}-{:x} whose missing pages another process serves \
             (userfaultfd; e.g. a `chpox restore --lazy` still filling it): its absent pages \
             cannot be told from untouched ones; checkpoint it once its memory is in",
            m.start, m.end
        ))),
        None => Ok(()),
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

/// The mappings of `pid` with their VmFlags (`/proc/PID/smaps`: walks
/// every page table entry).
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/smaps");
    parse_smaps(&crate::error::read_proc(&path)?, &path)
}

/// The mappings of `pid` without flags (`/proc/PID/maps`: no page walk).
pub fn read_maps_lines(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
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

/// Swap type of a PTE marker (`SWP_PTE_MARKER`, the last of the five
/// type bits): what the pagemap shows, with PM_SWAP, for a page that is
/// not populated but carries a mark, e.g. the write-protect of a page
/// never touched in memory tracked by `dirty`. It holds no data.
const SWP_PTE_MARKER: u64 = 31;

/// Whether a pagemap entry is a PTE marker rather than a page in swap. The
/// swap type is shown only to readers with CAP_SYS_ADMIN (others see 0, a
/// real swap type, and store the page: correct, if wasteful).
pub fn is_pte_marker(entry: u64) -> bool {
    entry & PM_SWAP != 0 && entry & PM_PRESENT == 0 && entry & 0x1f == SWP_PTE_MARKER
}

/// Should a page with this pagemap entry be stored, in a mapping of `kind`?
pub fn page_needs_storing(kind: VmaKind, entry: u64) -> bool {
    let present = entry & PM_PRESENT != 0;
    let swapped = entry & PM_SWAP != 0 && !is_pte_marker(entry);
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
pub fn runs_of(start: u64, needed: impl Iterator<Item = bool>) -> Vec<(u64, u64)> {
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

/// Copies a process's pages into an image (through `pagecopy`, on every
/// core). One dumper serves every process of a tree in turn
/// ([`next_process`](Self::next_process)).
pub struct PageDumper {
    pid: i32,
    /// Opened at the first read: a pre-copied process's pages are planned
    /// without it, and a tree's every open counted while frozen.
    pagemap: Option<File>,
    pagemap_buf: Vec<u8>,
    pub pages_stored: u64,
}

/// Append the entries of `[start, end)` from `pagemap` (of `pid`) to
/// `out`, through `buf`.
fn read_pagemap(
    pid: i32,
    pagemap: &File,
    buf: &mut Vec<u8>,
    start: u64,
    end: u64,
    out: &mut Vec<u64>,
) -> Result<()> {
    let npages = ((end - start) / PAGE_SIZE) as usize;
    // 64 Ki entries (512 KiB) per read keeps memory flat for huge, sparse
    // mappings.
    const CHUNK: usize = 64 * 1024;
    let mut done = 0usize;
    while done < npages {
        let n = (npages - done).min(CHUNK);
        buf.resize(n * 8, 0);
        let offset = (start / PAGE_SIZE + done as u64) * 8;
        pagemap
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Proc {
                path: format!("/proc/{pid}/pagemap"),
                source,
            })?;
        out.extend(buf.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_ne_bytes(w)
        }));
        done += n;
    }
    Ok(())
}

fn open_proc(pid: i32, what: &str) -> Result<File> {
    let path = format!("/proc/{pid}/{what}");
    File::open(&path).map_err(|source| Error::Proc { path, source })
}

impl PageDumper {
    pub fn new(pid: i32) -> Self {
        PageDumper {
            pid,
            pagemap: None,
            pagemap_buf: Vec::new(),
            pages_stored: 0,
        }
    }

    /// Go on with the next process of the tree, `pid`.
    pub fn next_process(&mut self, pid: i32) {
        self.pagemap = None;
        self.pid = pid;
    }

    /// The pagemap entries of each window `[start, end)`, one window after
    /// the other (an increment's written pages whose state the scan did
    /// not tell: few since it tells presence in anonymous mappings).
    pub fn pagemap_windows(&mut self, windows: &[(u64, u64)]) -> Result<Vec<u64>> {
        let total = windows.iter().map(|w| (w.1 - w.0) / PAGE_SIZE).sum::<u64>();
        let mut out = Vec::with_capacity(total as usize);
        let pagemap = match self.pagemap.take() {
            Some(file) => file,
            None => open_proc(self.pid, "pagemap")?,
        };
        let pagemap = &*self.pagemap.insert(pagemap);
        for &(start, end) in windows {
            read_pagemap(
                self.pid,
                pagemap,
                &mut self.pagemap_buf,
                start,
                end,
                &mut out,
            )?;
        }
        Ok(out)
    }

    /// The pagemap entries for [start, end).
    pub fn pagemap(&mut self, start: u64, end: u64) -> Result<Vec<u64>> {
        self.pagemap_windows(&[(start, end)])
    }

    /// The process whose pages this reads now.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Store the runs (from `select_runs`) of the current process: one
    /// blob per run, runs cut to `pagecopy::CHUNK_PAGES`.
    pub fn dump_runs(
        &mut self,
        runs: &[(u64, u64)],
        writer: &mut ImageWriter,
    ) -> Result<Vec<PageRun>> {
        self.pages_stored += runs.iter().map(|r| r.1).sum::<u64>();
        let runs = crate::pagecopy::split_runs(runs);
        let refs =
            crate::pagecopy::copy_runs(self.pid, crate::pagecopy::Source::VmReadv, &runs, writer)?;
        Ok(runs
            .into_iter()
            .zip(refs)
            .map(|((addr, npages), data)| PageRun { addr, npages, data })
            .collect())
    }
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
    fn memory_whose_missing_pages_another_process_serves_is_refused() {
        let mut maps = parse_smaps(SMAPS, "test").expect("parses");
        assert!(refuse_missing_page_handlers(7, &maps).is_ok());
        // Write-protect tracking alone (`uw`) leaves every page present.
        maps[1].vm_flags.push("uw".into());
        assert!(refuse_missing_page_handlers(7, &maps).is_ok());
        maps[1].vm_flags.push("um".into());
        let e = refuse_missing_page_handlers(7, &maps)
            .expect_err("um")
            .to_string();
        assert!(
            e.contains("PID 7") && e.contains("7f1e4c000000-7f1e4c021000"),
            "{e}"
        );
    }

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
        // A write-protect marker on a page never touched holds nothing.
        assert!(!page_needs_storing(
            VmaKind::Anonymous,
            PM_SWAP | 31 | 1 << 5
        ));
        assert!(page_needs_storing(VmaKind::Anonymous, PM_SWAP | 3));
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
