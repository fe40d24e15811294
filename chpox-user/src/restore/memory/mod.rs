//! The address space: trampoline and scratch first, then everything the
//! child inherited goes, then each of the image's mappings comes back at
//! its address with its stored pages.
//!
//! Stored pages are read by the child itself, `pread64` from the image file
//! (which it inherited from us) into the freshly mapped range: the kernel
//! copies the page cache straight into its memory. Only compressed runs
//! pass through chpox (decompressed here, written with process_vm_writev).
//! Mappings are made read-write while they are filled, then get their
//! saved protection.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use tracing::debug;

pub mod fill;
pub mod uffd;
pub mod vdso;

use crate::error::{Error, Result};
use crate::image::model::{Compression, DataRef, Vma, VmaKind};
use crate::memory::{MapEntry, PAGE_SIZE};
use crate::remote::{self, RemoteThread};
use crate::restore::Context;
use crate::restore::child::{Child, errno_of};
use crate::restore::validate::FileSource;

/// Scratch for syscall arguments: a path, an auxv, a few structs.
pub const SCRATCH_LEN: u64 = 16 * PAGE_SIZE;
/// Room to park the vdso mappings while they move (they are a few pages).
const TEMP_LEN: u64 = 4 << 20;
/// `syscall`, then `pause; jmp .-2`: where threads created by a remote
/// clone start, spinning until the restorer seizes them.
const TRAMPOLINE_CODE: [u8; 6] = [0x0f, 0x05, 0xf3, 0x90, 0xeb, 0xfc];
/// Largest count one read/sendfile moves (MAX_RW_COUNT).
const MAX_RW: u64 = 0x7fff_f000;

/// Where the restore's own helpers live in the child.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The trampoline page and the scratch area after it.
    pub base: u64,
    pub len: u64,
    pub trampoline: u64,
    pub scratch: u64,
    pub scratch_len: u64,
    /// A free range (in both layouts) to park the vdso on its way.
    pub temp: u64,
}

/// The child's mappings now.
pub fn child_maps(pid: i32) -> Result<Vec<MapEntry>> {
    crate::memory::read_maps_lines(pid)
}

/// The lowest address from `from` where `len` bytes (plus a margin) touch
/// none of `busy`.
fn find_gap(busy: &[(u64, u64)], from: u64, len: u64) -> Option<u64> {
    const MARGIN: u64 = 1 << 20;
    const STEP: u64 = 1 << 30;
    let mut at = from;
    // User space on x86-64 (4-level paging) ends at 2^47.
    while at + len < (1u64 << 47) - STEP {
        let (lo, hi) = (at.saturating_sub(MARGIN), at + len + MARGIN);
        if busy.iter().all(|&(s, e)| e <= lo || s >= hi) {
            return Some(at);
        }
        at += STEP;
    }
    None
}

/// Map the trampoline and scratch area where neither the child's present
/// layout nor the image's has anything, and find a parking range for the
/// vdso. Runs on a syscall instruction of the inherited vdso.
pub fn make_trampoline(thread: &mut RemoteThread<'_>, image: &[Vma]) -> Result<Layout> {
    let pid = thread.pid();
    let mut busy: Vec<(u64, u64)> = child_maps(pid)?.iter().map(|m| (m.start, m.end)).collect();
    busy.extend(image.iter().map(|v| (v.start, v.end)));
    let len = PAGE_SIZE + SCRATCH_LEN;
    // Far from where programs and the kernel put things (executables near
    // 0x5555…, mmaps and stacks near 0x7fff…), so a free spot is found at
    // once.
    let from = 0x10_0000_0000;
    let no_room = || Error::Other("no free address range for the restore trampoline".into());
    let base = find_gap(&busy, from, len).ok_or_else(no_room)?;
    busy.push((base, base + len));
    let temp = find_gap(&busy, base, TEMP_LEN).ok_or_else(no_room)?;
    let got = thread.checked(
        "mmap(trampoline)",
        libc::SYS_mmap,
        [
            base,
            len,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;
    if got != base {
        return Err(Error::Other(format!(
            "the kernel placed the restore trampoline at {got:#x}, not {base:#x}"
        )));
    }
    remote::write_memory(pid, base, &TRAMPOLINE_CODE)?;
    thread.checked(
        "mprotect(trampoline)",
        libc::SYS_mprotect,
        [
            base,
            PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            0,
            0,
            0,
        ],
    )?;
    debug!(base, temp, "trampoline mapped");
    Ok(Layout {
        base,
        len,
        trampoline: base,
        scratch: base + PAGE_SIZE,
        scratch_len: SCRATCH_LEN,
        temp,
    })
}

/// Unmap everything the child inherited from chpox: all but our
/// trampoline and scratch, and the kernel's vdso mappings (already moved
/// to the image's addresses).
pub fn unmap_inherited(c: &mut Child<'_>, layout: &Layout) -> Result<()> {
    let maps = child_maps(c.pid())?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for m in &maps {
        let ours = m.start < layout.base + layout.len && m.end > layout.base;
        if ours || m.kind().is_special() {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.1 == m.start => last.1 = m.end,
            _ => ranges.push((m.start, m.end)),
        }
    }
    for (start, end) in ranges {
        c.call("munmap", libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// Descriptors the mapping stage opened in the child.
pub struct Mapped {
    /// Per file index, its descriptor in the child.
    files: HashMap<usize, i32>,
    /// The executable's descriptor, for `PR_SET_MM_MAP`.
    pub exe_fd: Option<i32>,
}

impl Mapped {
    /// Close the descriptors: the mappings keep their files.
    pub fn close(self, c: &mut Child<'_>) -> Result<()> {
        // The executable's descriptor is among them (`file_fd` made it).
        for fd in self.files.into_values() {
            c.close(fd)?;
        }
        Ok(())
    }
}

fn prot_of(v: &Vma) -> u64 {
    let mut p = 0;
    if v.read {
        p |= libc::PROT_READ;
    }
    if v.write {
        p |= libc::PROT_WRITE;
    }
    if v.exec {
        p |= libc::PROT_EXEC;
    }
    p as u64
}

fn has_flag(v: &Vma, flag: &str) -> bool {
    v.vm_flags.iter().any(|f| f == flag)
}

/// Map every mapping of the image and fill its stored pages.
pub fn map_all(c: &mut Child<'_>, ctx: &Context<'_>) -> Result<Mapped> {
    let meta = ctx.image;
    let mut mapped = Mapped {
        files: HashMap::new(),
        exe_fd: None,
    };
    // Files mapped shared and writable must be opened for writing.
    let mut writable: Vec<usize> = meta
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::SharedFile && v.write)
        .filter_map(|v| v.file)
        .collect();
    writable.sort_unstable();
    let mut on_demand: Vec<&Vma> = Vec::new();
    // Without --lazy, private anonymous memory is filled by copy (see
    // `fill::Copier`) once every mapping is made.
    let copier = match ctx.lazy {
        Some(_) => None,
        None => fill::Copier::new(c)?,
    };
    for vma in &meta.vmas {
        if vma.kind.is_special() {
            continue;
        }
        let deferred = match (ctx.lazy, &copier) {
            (Some(_), _) => crate::restore::lazy::eligible(vma),
            (None, Some(_)) => fill::Copier::takes(vma),
            (None, None) => false,
        };
        if deferred {
            map_one(c, ctx, vma, None, false)?;
            on_demand.push(vma);
            continue;
        }
        if crate::memory::sysvshm::restore_piece(c, ctx, vma)? {
            continue;
        }
        let fd = match (vma.kind, vma.file) {
            (VmaKind::PrivateFile | VmaKind::SharedFile, Some(i)) => Some(file_fd(
                c,
                ctx,
                &mut mapped,
                i,
                writable.binary_search(&i).is_ok(),
            )?),
            (VmaKind::PrivateFile | VmaKind::SharedFile, None) => {
                return Err(Error::Other(format!(
                    "the image's mapping at {:#x} names no file",
                    vma.start
                )));
            }
            _ => None,
        }
        .map(|fd| (fd, vma.offset));
        if let Some(object) = shared_object(c, ctx, vma)? {
            map_one(c, ctx, vma, Some(object), true)?;
            c.close(object.0)?;
            continue;
        }
        map_one(c, ctx, vma, fd, true)?;
        if let (VmaKind::SharedAnonymous, Some(id)) = (vma.kind, vma.shmem_id) {
            ctx.shmem.borrow_mut().entry(id).or_insert(FirstMapping {
                pid: c.pid(),
                start: vma.start,
                end: vma.end,
                saved_offset: vma.offset,
            });
        }
    }
    crate::restore::phases::mark("mappings made");
    if let Some(lazy) = ctx.lazy {
        // Before anything of the restore may touch them: a page touched
        // while unregistered would be zero-filled and its content lost.
        lazy.register(c, &on_demand, ctx.parent, ctx.image.process.pid)?;
    }
    if let Some(copier) = copier {
        copier.fill(ctx, &on_demand)?;
    }
    if let Some(i) = meta.process.exe_file {
        mapped.exe_fd = Some(file_fd(c, ctx, &mut mapped, i, false)?);
    }
    Ok(mapped)
}

/// Where a shared memory object was mapped first in the restored tree.
#[derive(Debug, Clone, Copy)]
pub struct FirstMapping {
    /// Our PID of the process that maps it.
    pub pid: i32,
    pub start: u64,
    pub end: u64,
    /// The offset into the object the image gives that mapping.
    pub saved_offset: u64,
}

/// For a mapping of a shared memory object that an earlier mapping of the
/// image (in this process or another) has brought back already: that
/// object, reached through the earlier mapping (`/proc/PID/map_files`,
/// which takes root) and handed to the child, with the offset to map it
/// at. None for the first mapping of an object.
fn shared_object(c: &mut Child<'_>, ctx: &Context<'_>, vma: &Vma) -> Result<Option<(i32, u64)>> {
    let (VmaKind::SharedAnonymous, Some(id)) = (vma.kind, vma.shmem_id) else {
        return Ok(None);
    };
    let Some(FirstMapping {
        pid,
        start,
        end,
        saved_offset: first_offset,
    }) = ctx.shmem.borrow().get(&id).copied()
    else {
        return Ok(None);
    };
    let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let object = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| Error::File {
            path: format!("{path} (shared memory of {:#x}-{:#x}, which needs root to share between processes)", vma.start, vma.end),
            source,
        })?;
    let offset = vma.offset.checked_sub(first_offset).ok_or_else(|| {
        Error::Other(format!(
            "shared memory at {:#x}-{:#x} lies before the part of its object restored first; chpox cannot share it",
            vma.start, vma.end
        ))
    })?;
    let fd = ctx.injector.give(
        c,
        ctx.injector.receive_fd(),
        std::os::fd::AsFd::as_fd(&object),
    )?;
    Ok(Some((fd, offset)))
}

/// The child's descriptor for file `index`, opened on first use.
fn file_fd(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    mapped: &mut Mapped,
    index: usize,
    write: bool,
) -> Result<i32> {
    if let Some(&fd) = mapped.files.get(&index) {
        return Ok(fd);
    }
    let meta = ctx.reader.metadata();
    let file = meta
        .files
        .get(index)
        .ok_or_else(|| Error::Other(format!("the image names file {index}, which it lacks")))?;
    // A memfd the descriptors hold too: the same one.
    if let Some(fd) = crate::fds::memfd::for_mapping(c, meta, file, ctx.descriptions, ctx.injector)?
    {
        mapped.files.insert(index, fd);
        return Ok(fd);
    }
    let source = ctx
        .plan
        .files
        .get(index)
        .copied()
        .unwrap_or(FileSource::Unused);
    let copy = file
        .deleted
        .then(|| ctx.descriptions.deleted_copies.find((file.dev, file.ino)))
        .flatten();
    let fd = match source {
        // One copy for every process and descriptor of a deleted file.
        FileSource::Embedded(_) if let Some(copy) = copy => {
            let flags = if write {
                nix::fcntl::OFlag::O_RDWR
            } else {
                nix::fcntl::OFlag::O_RDONLY
            };
            let ours = crate::deleted::Copies::open(copy, flags | nix::fcntl::OFlag::O_CLOEXEC)?;
            ctx.injector.give(
                c,
                ctx.injector.receive_fd(),
                std::os::fd::AsFd::as_fd(&ours),
            )?
        }
        FileSource::Embedded(data) => {
            let name = std::path::Path::new(&file.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "chpox".into());
            let fd = memfd(c, &name)?;
            fill_fd(c, ctx, ctx.image_fd, fd, &data)?;
            // The file's permission bits, not a memfd's 0777 (best effort:
            // they only show in /proc).
            let bits = u64::from(file.mode & 0o7777);
            c.raw(libc::SYS_fchmod, [fd as u64, bits, 0, 0, 0, 0])?;
            fd
        }
        FileSource::Disk | FileSource::Unused => {
            let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
            c.open(&file.path, mode | libc::O_CLOEXEC, 0)?
        }
    };
    mapped.files.insert(index, fd);
    Ok(fd)
}

/// A new memfd in the child.
pub fn memfd(c: &mut Child<'_>, name: &str) -> Result<i32> {
    // memfd names are at most 249 bytes.
    let name: String = name.chars().filter(|&ch| ch != '\0').take(200).collect();
    let addr = c.put_path(&name)?;
    let fd = c.call(
        "memfd_create",
        libc::SYS_memfd_create,
        [addr, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
    )?;
    Ok(fd as i32)
}

/// Fill the child's descriptor `fd` (a fresh memfd) with blob `data`.
/// Uncompressed blobs are copied by the child itself (`sendfile` from the
/// image, descriptor `image_fd` in the child); compressed ones are
/// decompressed here and written through `/proc/PID/fd`.
pub fn fill_fd(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    image_fd: i32,
    fd: i32,
    data: &DataRef,
) -> Result<()> {
    if data.compression == Compression::None {
        // The offset sendfile advances lives in the child's memory.
        let off_addr = c.put(crate::restore::child::INOUT_AT, &data.offset.to_ne_bytes())?;
        let mut left = data.raw_len;
        while left > 0 {
            let n = c.call(
                "sendfile",
                libc::SYS_sendfile,
                [fd as u64, image_fd as u64, off_addr, left.min(MAX_RW), 0, 0],
            )?;
            if n == 0 {
                return Err(Error::Other(
                    "the image file ended while copying an embedded file".into(),
                ));
            }
            left -= n;
        }
        return Ok(());
    }
    let bytes = ctx.reader.read_data(data)?;
    let path = format!("/proc/{}/fd/{fd}", c.pid());
    // Non-blocking: a pipe too small for the bytes must fail, not hang.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
    f.write_all(&bytes)
        .map_err(|source| Error::File { path, source })
}

/// Map `vma`, from descriptor and offset `fd` if given, and fill its pages
/// if `fill` (else they come lazily, see `crate::restore::lazy`).
fn map_one(
    c: &mut Child<'_>,
    ctx: &Context<'_>,
    vma: &Vma,
    fd: Option<(i32, u64)>,
    fill: bool,
) -> Result<()> {
    let len = vma.end - vma.start;
    let prot = prot_of(vma);
    let fill = fill && (!vma.pages.is_empty() || !vma.inherited.is_empty());
    let map_prot = if fill {
        prot | (libc::PROT_READ | libc::PROT_WRITE) as u64
    } else {
        prot
    };
    let mut flags = libc::MAP_FIXED;
    flags |= if vma.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if fd.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    if has_flag(vma, "gd") {
        flags |= libc::MAP_GROWSDOWN;
    }
    if has_flag(vma, "nr") {
        flags |= libc::MAP_NORESERVE;
    }
    let (fd_arg, offset) = match fd {
        Some((fd, offset)) => (fd as u64, offset),
        None => (u64::MAX, 0),
    };
    let got = c.raw(
        libc::SYS_mmap,
        [vma.start, len, map_prot, flags as u64, fd_arg, offset],
    )?;
    if got < 0 || got as u64 != vma.start {
        return Err(Error::Other(format!(
            "cannot map {:#x}-{:#x} {}: {}",
            vma.start,
            vma.end,
            crate::image::error::one_line(&vma.name),
            if got < 0 {
                errno_of(got).to_string()
            } else {
                format!("placed at {got:#x}")
            }
        )));
    }
    if fill && has_flag(vma, "hg") {
        // Before the fill, so the pages come as huge pages, as they could
        // for the original: faster to fill, and the same memory.
        let _ = c.raw(
            libc::SYS_madvise,
            [vma.start, len, libc::MADV_HUGEPAGE as u64, 0, 0, 0],
        )?;
    }
    if fill {
        fill::fill_runs(c, ctx, vma)?;
    }
    if map_prot != prot {
        c.call(
            "mprotect",
            libc::SYS_mprotect,
            [vma.start, len, prot, 0, 0, 0],
        )?;
    }
    for (flag, advice) in [
        ("dd", libc::MADV_DONTDUMP),
        ("dc", libc::MADV_DONTFORK),
        ("wf", libc::MADV_WIPEONFORK),
        ("hg", libc::MADV_HUGEPAGE),
        ("nh", libc::MADV_NOHUGEPAGE),
    ] {
        if has_flag(vma, flag) {
            // Advice only: a kernel that refuses it changes nothing that
            // matters to the program.
            let _ = c.raw(libc::SYS_madvise, [vma.start, len, advice as u64, 0, 0, 0])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_avoids_busy_ranges() {
        let from = 0x10_0000_0000;
        let busy = [(from - 4096, from + 4096)];
        let at = find_gap(&busy, from, 8192).expect("gap");
        assert!(at >= from + (1 << 30));
        assert_eq!(find_gap(&[], from, 8192), Some(from));
    }
}
