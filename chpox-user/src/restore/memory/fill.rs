//! Stored pages into a mapping, with both cores.
//!
//! Filling fresh anonymous memory is bounded by allocating its pages (the
//! first-touch rate), not by copying: on this kind of machine a page fault
//! costs more than copying its 4 KiB. Faults on different pages of one
//! mapping run in parallel (per-VMA locks), so a large fill is split in
//! two: the child `pread`s the first part from the image into its own
//! memory (one copy, page cache to its pages, faults on its CPU), while a
//! thread of the restorer copies the second part with `process_vm_writev`
//! from a read-only mapping of the image (also one copy, faults taken on
//! the restorer's CPU). Small fills are not worth a thread and are read by
//! the child alone.
//!
//! Runs the copier takes are verified as they are copied, from the same
//! bytes (one read of the image instead of two): a bad one fails the
//! restore before the process runs. The others are verified before any
//! process exists ([`verify_pages`], from a mapping of the image, both
//! cores); with `--lazy`, each run as it is first served (`checks`).

use std::os::fd::BorrowedFd;

use crate::error::{Error, Result};
use crate::image::model::{Compression, PageRun, Vma};
use crate::memory::PAGE_SIZE;
use crate::remote;
use crate::restore::Context;
use crate::restore::child::{Child, errno_of};

/// Largest count one read moves (MAX_RW_COUNT).
const MAX_RW: u64 = 0x7fff_f000;
/// Below this many bytes, a second thread costs more than it saves.
const SPLIT_MIN: u64 = 8 << 20;
/// Bytes per `process_vm_writev`: the image mapping is made and dropped
/// piece by piece, so the restorer never maps more than this at once.
const WRITE_PIECE: u64 = 64 << 20;

/// One uncompressed stretch: `len` bytes of the image at `file_off` go to
/// `addr` in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub addr: u64,
    pub file_off: u64,
    pub len: u64,
}

/// Split `pieces` into two lists of about equal bytes, cutting at page
/// boundaries; the first keeps the lower addresses.
pub fn split_halves(pieces: &[Piece]) -> (Vec<Piece>, Vec<Piece>) {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let half = (total / 2) / PAGE_SIZE * PAGE_SIZE;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut seen = 0u64;
    for &p in pieces {
        if seen >= half {
            second.push(p);
        } else if seen + p.len <= half {
            first.push(p);
        } else {
            let cut = half - seen;
            first.push(Piece { len: cut, ..p });
            second.push(Piece {
                addr: p.addr + cut,
                file_off: p.file_off + cut,
                len: p.len - cut,
            });
        }
        seen += p.len;
    }
    (first, second)
}

/// Fill the child's memory with the stored runs of `vma` (mapped and
/// writable now), each verified first.
pub fn fill_runs(c: &mut Child<'_>, ctx: &Context<'_>, vma: &Vma) -> Result<()> {
    let runs: &[PageRun] = &vma.pages;
    // SAFETY: the image's descriptor is open for the whole restore.
    let image = unsafe { BorrowedFd::borrow_raw(ctx.image_fd) };
    // Without --lazy, runs of mappings the copier does not take were
    // verified before the process existed (`verify_pages`); those it takes
    // are verified as they are copied, so here (the copier was not
    // available) they are verified first, as is everything with --lazy.
    let verify = ctx.lazy.is_some() || Copier::takes(vma);
    for run in runs.iter().filter(|_| verify) {
        if run.data.compression == Compression::None && run.data.raw_len > 0 {
            let map = ImageMap::new(image, run.data.offset, run.data.raw_len)?;
            let bytes = map
                .bytes(run.data.offset, run.data.raw_len)
                .ok_or_else(|| Error::Other("internal: page run outside its mapping".into()))?;
            if crc32c::crc32c(bytes) != run.data.crc32c {
                return Err(Error::Other(format!(
                    "checksum mismatch in page data of VMA {:x}-{:x} (run at {:x}): the image is corrupt",
                    vma.start, vma.end, run.addr
                )));
            }
        }
    }
    let mut pieces = Vec::with_capacity(runs.len());
    for run in runs {
        if run.data.compression != Compression::None {
            // Compressed runs pass through chpox, decompressed here.
            let bytes = ctx.reader.read_data(&run.data)?;
            remote::write_memory(c.pid(), run.addr, &bytes)?;
        } else if run.data.raw_len > 0 {
            pieces.push(Piece {
                addr: run.addr,
                file_off: run.data.offset,
                len: run.data.raw_len,
            });
        }
    }
    // Pages of an incremental image's parent, from our mapping of it.
    if let Some(parent) = ctx.parent {
        let inherited = parent.pieces(ctx.image.process.pid, vma)?;
        if ctx.lazy.is_some() {
            // Not verified up front with --lazy (see `lazy::parent`).
            crate::restore::lazy::parent::verify_pieces(parent, &inherited)?;
        }
        write_from_image(c.pid(), parent.fd(), &inherited)?;
    }
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    if total < SPLIT_MIN {
        return child_reads(c, ctx.image_fd, &pieces);
    }
    let (mine, theirs) = split_halves(&pieces);
    let pid = c.pid();
    // SAFETY: `image_fd` is the image file's descriptor, open in the
    // restorer for the whole restore (`restore` holds its `File`).
    let image = unsafe { BorrowedFd::borrow_raw(ctx.image_fd) };
    std::thread::scope(|s| {
        let helper = s.spawn(move || write_from_image(pid, image, &theirs));
        let read = child_reads(c, ctx.image_fd, &mine);
        let written = helper
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the page copying thread panicked".into())));
        read.and(written)
    })
}

/// The child `pread`s each piece from its copy of the image descriptor
/// straight into its memory.
fn child_reads(c: &mut Child<'_>, image_fd: i32, pieces: &[Piece]) -> Result<()> {
    for p in pieces {
        let mut done = 0u64;
        while done < p.len {
            let n = (p.len - done).min(MAX_RW);
            let got = c.raw(
                libc::SYS_pread64,
                [image_fd as u64, p.addr + done, n, p.file_off + done, 0, 0],
            )?;
            if got <= 0 {
                return Err(Error::Other(format!(
                    "reading pages for {:#x} from the image: {}",
                    p.addr + done,
                    if got == 0 {
                        "unexpected end of file".to_string()
                    } else {
                        errno_of(got).to_string()
                    }
                )));
            }
            done += got as u64;
        }
    }
    Ok(())
}

/// A read-only mapping of part of the image file, unmapped on drop.
pub struct ImageMap {
    ptr: *mut libc::c_void,
    len: usize,
    /// Where `ptr` points in the file.
    file_off: u64,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for ImageMap {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Map `[file_off, file_off + len)` of `image` (rounded out to pages).
    pub fn new(image: BorrowedFd<'_>, file_off: u64, len: u64) -> Result<ImageMap> {
        let start = file_off / PAGE_SIZE * PAGE_SIZE;
        let len = usize::try_from(file_off - start + len)
            .map_err(|_| Error::Other("image range too large to map".into()))?;
        // SAFETY: a fresh read-only shared mapping of a file we hold open;
        // the kernel picks the address, so nothing of ours is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&image),
                start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Other(format!(
                "cannot map the image file: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(ImageMap {
            ptr,
            len: len.max(1),
            file_off: start,
        })
    }

    /// The whole of `first` at offsets `[0, its length)` and the whole of
    /// `second` from the returned offset on, as one range of our memory
    /// (an incremental image and its parent, for `--lazy`): offsets past
    /// the first file name the second's bytes.
    pub fn pair(first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> Result<(ImageMap, u64)> {
        let size = |fd: BorrowedFd<'_>| -> Result<u64> {
            Ok(nix::sys::stat::fstat(fd)
                .map_err(|e| Error::Other(format!("cannot stat an image file: {e}")))?
                .st_size as u64)
        };
        let (len1, len2) = (size(first)?, size(second)?);
        let base = len1.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let total = usize::try_from(base + len2.max(1))
            .map_err(|_| Error::Other("image range too large to map".into()))?;
        // SAFETY: a fresh inaccessible reservation at an address the kernel
        // picks; nothing of ours is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Other(format!(
                "cannot reserve room to map the images: {}",
                std::io::Error::last_os_error()
            )));
        }
        // Owned from here: a failure below unmaps the whole reservation.
        let map = ImageMap {
            ptr,
            len: total,
            file_off: 0,
        };
        for (fd, at, len) in [(first, 0, len1), (second, base, len2)] {
            if len == 0 {
                continue;
            }
            // SAFETY: replaces part of our own reservation (inside `total`)
            // with a read-only shared mapping of a file we hold open.
            let got = unsafe {
                libc::mmap(
                    ptr.cast::<u8>().add(at as usize).cast(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    0,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(Error::Other(format!(
                    "cannot map an image file: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok((map, base))
    }

    /// The bytes of the file at `[off, off + len)`, which must lie in the
    /// mapped range.
    pub fn bytes(&self, off: u64, len: u64) -> Option<&[u8]> {
        let from = usize::try_from(off.checked_sub(self.file_off)?).ok()?;
        let to = from.checked_add(usize::try_from(len).ok()?)?;
        if to > self.len {
            return None;
        }
        // SAFETY: [from, to) lies inside the live read-only mapping, which
        // lives as long as `self`. The image file is not truncated while we
        // restore from it (a truncation would be a SIGBUS, not a wrong
        // byte).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>().add(from), to - from) })
    }

    /// The address of file offset `off` in our memory.
    pub fn addr_of(&self, off: u64) -> Option<u64> {
        let from = off.checked_sub(self.file_off)?;
        (from < self.len as u64).then(|| self.ptr as u64 + from)
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Copy `pieces` from the image into process `pid` with
/// `process_vm_writev`, a piece of at most [`WRITE_PIECE`] at a time.
fn write_from_image(pid: i32, image: BorrowedFd<'_>, pieces: &[Piece]) -> Result<()> {
    for p in pieces {
        let mut done = 0u64;
        while done < p.len {
            let n = (p.len - done).min(WRITE_PIECE);
            let map = ImageMap::new(image, p.file_off + done, n)?;
            let bytes = map
                .bytes(p.file_off + done, n)
                .ok_or_else(|| Error::Other("internal: image piece outside its mapping".into()))?;
            remote::write_memory(pid, p.addr + done, bytes)?;
            done += n;
        }
    }
    Ok(())
}

/// Fills private anonymous mappings with `UFFDIO_COPY` instead of faults.
///
/// A copy through userfaultfd allocates each page and copies into it in
/// one step: no page fault, and no zeroing of a page about to be
/// overwritten. On this kind of machine that is twice as fast as reading
/// into fresh memory, and faster than first touch. The mappings are
/// registered only while they are filled, by a userfaultfd the process
/// made (see `super::uffd::from_child`); closing it unregisters them, and
/// the process never sees it.
/// Two threads share the work.
pub struct Copier {
    uffd: std::os::fd::OwnedFd,
}

/// Bytes checksummed or copied at a time.
const FUSED_CHUNK: u64 = 1 << 20;

/// A stored page run as the copier sees it.
struct Run {
    addr: u64,
    file_off: u64,
    len: u64,
    crc: u32,
    vma: (u64, u64),
}

/// The checksum of `len` bytes of run `run` from byte `at` of it.
struct Part {
    run: usize,
    at: u64,
    len: u64,
    crc: u32,
}

impl Copier {
    /// None if the process cannot have a userfaultfd (an older kernel,
    /// a seccomp filter): its memory is then filled the ordinary way.
    pub fn new(c: &mut Child<'_>) -> Result<Option<Copier>> {
        let uffd = match super::uffd::from_child(c)? {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "no userfaultfd; memory is filled by reading");
                return Ok(None);
            }
        };
        if let Err(e) = super::uffd::api(std::os::fd::AsFd::as_fd(&uffd), 0) {
            tracing::debug!(error = %e, "userfaultfd API refused; memory is filled by reading");
            return Ok(None);
        }
        Ok(Some(Copier { uffd }))
    }

    /// Whether `vma` is filled by copy: private anonymous, uncompressed,
    /// and not huge-page advised (those get huge pages from a read).
    pub fn takes(vma: &Vma) -> bool {
        let flag = |f: &str| vma.vm_flags.iter().any(|x| x == f);
        // Of an incremental image: a mapping whose pages all come from
        // the parent (uncompressed, checked when it was opened).
        let inherited_only = vma.pages.is_empty()
            && !vma.inherited.is_empty()
            && vma.kind == crate::image::model::VmaKind::Anonymous
            && !vma.shared
            && !flag("wf")
            && !flag("ht");
        (crate::restore::lazy::eligible(vma) || inherited_only) && !flag("hg")
    }

    /// Fill `vmas` (mapped, empty) from the image.
    pub fn fill(self, ctx: &Context<'_>, vmas: &[&Vma]) -> Result<()> {
        use std::os::fd::AsFd;
        let fd = self.uffd.as_fd();
        let mut runs = Vec::new();
        for vma in vmas {
            super::uffd::register(fd, vma.start, vma.end - vma.start).map_err(|e| {
                Error::Other(format!(
                    "cannot register {:#x}-{:#x} with userfaultfd: {e}",
                    vma.start, vma.end
                ))
            })?;
            runs.extend(
                vma.pages
                    .iter()
                    .filter(|r| r.data.raw_len > 0)
                    .map(|r| Run {
                        addr: r.addr,
                        file_off: r.data.offset,
                        len: r.data.raw_len,
                        crc: r.data.crc32c,
                        vma: (vma.start, vma.end),
                    }),
            );
        }
        // SAFETY: the image's descriptor is open for the whole restore.
        let image = unsafe { BorrowedFd::borrow_raw(ctx.image_fd) };
        // Verified as they are copied, from the same bytes: one read of
        // the image instead of two. A bad run fails the restore before the
        // process runs.
        copy_from(fd, image, runs, true)?;
        // An incremental image's unchanged pages, from its parent.
        if let Some(parent) = ctx.parent {
            let mut runs = Vec::new();
            for vma in vmas {
                runs.extend(
                    parent
                        .pieces(ctx.image.process.pid, vma)?
                        .into_iter()
                        .map(|p| Run {
                            addr: p.addr,
                            file_off: p.file_off,
                            len: p.len,
                            crc: 0,
                            vma: (vma.start, vma.end),
                        }),
                );
            }
            // Verified whole before any process existed (see `restore`).
            copy_from(fd, parent.fd(), runs, false)?;
        }
        Ok(())
    }
}

/// `UFFDIO_COPY` `runs` of file `image` through `uffd` (registered),
/// checking each against its checksum if `verify`.
fn copy_from(
    uffd: BorrowedFd<'_>,
    image: BorrowedFd<'_>,
    mut runs: Vec<Run>,
    verify: bool,
) -> Result<()> {
    runs.sort_by_key(|r| r.file_off);
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Ok(());
    };
    let (lo, hi) = (first.file_off, last.file_off + last.len);
    let map = ImageMap::new(image, lo, hi - lo)?;
    let mut parts = copy_runs(Some(uffd), verify, &map, &runs)?;
    if verify {
        check_parts(&runs, &mut parts)?;
    }
    Ok(())
}

/// The parent of an incremental image (see `crate::incremental`): its
/// pages fill what the image inherits. Opened, checked and verified before
/// any process exists.
pub struct ParentImage {
    pub reader: crate::image::ImageReader,
    pub file: std::fs::File,
    pub path: std::path::PathBuf,
}

impl ParentImage {
    /// Find and check the parent `parent` of the image at `image`.
    pub fn open(
        image: &std::path::Path,
        parent: &crate::image::model::ParentRef,
        trust: &crate::restore::validate::Trust,
        trust_image: bool,
    ) -> Result<ParentImage> {
        let (reader, file, path) = crate::incremental::open_parent(image, parent)?;
        // The parent's pages become the process's memory as the image's
        // do: it must be as trustworthy (root's, or the same user's).
        let theirs = crate::restore::validate::trust(&file, trust_image)?;
        if let Some(o) = theirs.owner()
            && trust.owner().map(|t| t.uid) != Some(o.uid)
        {
            return Err(Error::Other(format!(
                "{}: its parent {} belongs to another user (uid {}) than the image; restore with --trust-image if you trust it",
                image.display(),
                path.display(),
                o.uid
            )));
        }
        let compressed = reader
            .metadata()
            .processes()
            .flat_map(|p| &p.vmas)
            .flat_map(|v| &v.pages)
            .any(|r| r.data.compression != Compression::None);
        if compressed {
            return Err(Error::Other(format!(
                "{}: its parent {} has compressed pages, which an increment cannot take from; restore the parent itself",
                image.display(),
                path.display()
            )));
        }
        tracing::debug!(image = %image.display(), parent = %path.display(), "incremental image: reading its parent");
        Ok(ParentImage { reader, file, path })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// The parent's stored pages that `vma` (of process `pid`) inherits.
    pub(in crate::restore) fn pieces(&self, pid: i32, vma: &Vma) -> Result<Vec<Piece>> {
        Ok(
            crate::incremental::inherited_pieces(self.reader.metadata(), pid, vma)?
                .into_iter()
                .map(|(addr, npages, file_off)| Piece {
                    addr,
                    file_off,
                    len: npages * PAGE_SIZE,
                })
                .collect(),
        )
    }
}

/// Every run's checksum from its parts' against the one stored.
fn check_parts(runs: &[Run], parts: &mut [Part]) -> Result<()> {
    parts.sort_by_key(|p| (p.run, p.at));
    let mut crcs: Vec<Option<(u64, u32)>> = (0..runs.len()).map(|_| None).collect();
    for p in parts.iter() {
        let slot = &mut crcs[p.run];
        *slot = Some(match *slot {
            None if p.at == 0 => (p.len, p.crc),
            Some((len, crc)) if len == p.at => {
                (len + p.len, crate::image::crc::combine(crc, p.crc, p.len))
            }
            _ => {
                return Err(Error::Other(
                    "internal: page run copied out of order".into(),
                ));
            }
        });
    }
    for (run, got) in runs.iter().zip(crcs) {
        if got != Some((run.len, run.crc)) {
            return Err(Error::Other(format!(
                "checksum mismatch in page data of VMA {:x}-{:x} (run at {:x}): the image is corrupt",
                run.vma.0, run.vma.1, run.addr
            )));
        }
    }
    Ok(())
}

/// Checksum each piece (each inside one of `runs`, which are sorted by
/// file offset) from the image mapping, or `UFFDIO_COPY` it through `copy`
/// into the registered memory, or both; the checksums of the parts (none
/// when not asked to `checksum`).
fn copy_pieces(
    copy: Option<BorrowedFd<'_>>,
    checksum: bool,
    map: &ImageMap,
    runs: &[Run],
    pieces: &[Piece],
) -> Result<Vec<Part>> {
    let mut parts = Vec::with_capacity(pieces.len());
    for p in pieces {
        let run = runs.partition_point(|r| r.file_off + r.len <= p.file_off);
        let at = runs
            .get(run)
            .and_then(|r| p.file_off.checked_sub(r.file_off))
            .ok_or_else(|| Error::Other("internal: a piece outside its run".into()))?;
        let mut crc = 0;
        let mut done = 0u64;
        while done < p.len {
            let n = (p.len - done).min(FUSED_CHUNK);
            let bytes = map
                .bytes(p.file_off + done, n)
                .ok_or_else(|| Error::Other("internal: page run outside its mapping".into()))?;
            if checksum {
                crc = crc32c::crc32c_append(crc, bytes);
            }
            if let Some(fd) = copy {
                uffd_copy_all(fd, p.addr + done, bytes.as_ptr() as u64, n)?;
            }
            done += n;
        }
        if checksum {
            parts.push(Part {
                run,
                at,
                len: p.len,
                crc,
            });
        }
    }
    Ok(parts)
}

/// `copy_pieces` over `runs`, split between this thread and another when
/// there is enough to do.
fn copy_runs(
    copy: Option<BorrowedFd<'_>>,
    checksum: bool,
    map: &ImageMap,
    runs: &[Run],
) -> Result<Vec<Part>> {
    let pieces: Vec<Piece> = runs
        .iter()
        .map(|r| Piece {
            addr: r.addr,
            file_off: r.file_off,
            len: r.len,
        })
        .collect();
    if pieces.iter().map(|p| p.len).sum::<u64>() < SPLIT_MIN {
        return copy_pieces(copy, checksum, map, runs, &pieces);
    }
    let (mine, theirs) = split_halves(&pieces);
    std::thread::scope(|s| {
        let helper = s.spawn(|| copy_pieces(copy, checksum, map, runs, &theirs));
        let done = copy_pieces(copy, checksum, map, runs, &mine);
        let other = helper
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the page copying thread panicked".into())));
        let (mut a, b) = (done?, other?);
        a.extend(b);
        Ok(a)
    })
}

/// Verify the page runs of the image that are not verified as they are
/// copied (those of mappings the [`Copier`] takes), before any process
/// exists, with both cores: each run is checksummed straight from a
/// mapping of the image (no copy into a buffer). Images with compressed
/// runs are verified whole by the reader, which decompresses them.
pub fn verify_pages(reader: &crate::image::ImageReader, image: BorrowedFd<'_>) -> Result<()> {
    verify_runs(reader, image, |v| !Copier::takes(v))
}

/// Verify every page run of the image (an incremental image's parent:
/// its runs are copied in parts, which no stored checksum covers).
pub fn verify_every_page(reader: &crate::image::ImageReader, image: BorrowedFd<'_>) -> Result<()> {
    verify_runs(reader, image, |_| true)
}

fn verify_runs(
    reader: &crate::image::ImageReader,
    image: BorrowedFd<'_>,
    which: impl Fn(&Vma) -> bool,
) -> Result<()> {
    let meta = reader.metadata();
    let mut runs = Vec::new();
    for vma in meta.processes().flat_map(|p| &p.vmas).filter(|v| which(v)) {
        for r in &vma.pages {
            if r.data.compression != Compression::None {
                return reader
                    .verify_pages()
                    .map(|_| ())
                    .map_err(|e| Error::Other(e.to_string()));
            }
            if r.data.raw_len > 0 {
                runs.push(Run {
                    addr: r.addr,
                    file_off: r.data.offset,
                    len: r.data.raw_len,
                    crc: r.data.crc32c,
                    vma: (vma.start, vma.end),
                });
            }
        }
    }
    runs.sort_by_key(|r| r.file_off);
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Ok(());
    };
    let map = ImageMap::new(
        image,
        first.file_off,
        last.file_off + last.len - first.file_off,
    )?;
    let mut parts = copy_runs(None, true, &map, &runs)?;
    check_parts(&runs, &mut parts)
}

/// `UFFDIO_COPY` of `len` bytes from our `src` to `dst`, all of them.
fn uffd_copy_all(fd: BorrowedFd<'_>, dst: u64, src: u64, len: u64) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        match super::uffd::copy(fd, dst + done, src + done, len - done) {
            super::uffd::Copied::All => return Ok(()),
            super::uffd::Copied::Part { done: n, errno } => {
                done += n;
                match errno {
                    // Interrupted or briefly contended: go on.
                    libc::EAGAIN | libc::EINTR => {}
                    _ if n > 0 => {}
                    e => {
                        return Err(Error::Other(format!(
                            "copying pages to {:#x}: {}",
                            dst + done,
                            std::io::Error::from_raw_os_error(e)
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(addr: u64, len: u64) -> Piece {
        Piece {
            addr,
            file_off: addr + 0x1000_0000,
            len,
        }
    }

    #[test]
    fn halves_cover_everything_once_at_page_boundaries() {
        let pieces = [piece(0x10000, 3 * PAGE_SIZE), piece(0x40000, 8 * PAGE_SIZE)];
        let (a, b) = split_halves(&pieces);
        let bytes = |v: &[Piece]| v.iter().map(|p| p.len).sum::<u64>();
        assert_eq!(bytes(&a) + bytes(&b), 11 * PAGE_SIZE);
        assert_eq!(bytes(&a), 5 * PAGE_SIZE);
        // The second piece is cut after two pages; both halves keep the
        // file offset in step with the address.
        assert_eq!(a.last(), Some(&piece(0x40000, 2 * PAGE_SIZE)));
        assert_eq!(b, vec![piece(0x42000, 6 * PAGE_SIZE)]);
        for p in a.iter().chain(&b) {
            assert_eq!(p.file_off - p.addr, 0x1000_0000);
            assert_eq!(p.len % PAGE_SIZE, 0);
        }
    }

    #[test]
    fn a_run_cut_in_two_is_checked_whole() {
        let data: Vec<u8> = (0..3 * PAGE_SIZE as usize).map(|i| (i * 7) as u8).collect();
        let cut = PAGE_SIZE as usize;
        let run = |crc| Run {
            addr: 0x10000,
            file_off: 0x1000,
            len: data.len() as u64,
            crc,
            vma: (0x10000, 0x20000),
        };
        // The second part first: threads finish in any order.
        let parts = || {
            vec![
                Part {
                    run: 0,
                    at: cut as u64,
                    len: (data.len() - cut) as u64,
                    crc: crc32c::crc32c(&data[cut..]),
                },
                Part {
                    run: 0,
                    at: 0,
                    len: cut as u64,
                    crc: crc32c::crc32c(&data[..cut]),
                },
            ]
        };
        assert!(check_parts(&[run(crc32c::crc32c(&data))], &mut parts()).is_ok());
        let err = check_parts(&[run(crc32c::crc32c(&data) ^ 1)], &mut parts()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        // A part missing is a mismatch too, not a pass.
        let mut half = parts();
        half.truncate(1);
        assert!(check_parts(&[run(crc32c::crc32c(&data))], &mut half).is_err());
    }

    #[test]
    fn one_page_goes_to_one_side() {
        let (a, b) = split_halves(&[piece(0x10000, PAGE_SIZE)]);
        assert!(a.is_empty());
        assert_eq!(b, vec![piece(0x10000, PAGE_SIZE)]);
    }
}
