//! SysV shared memory segments (`shmget`/`shmat`), both halves.
//!
//! A segment is more than its pages: programs keep its id (and find it
//! again by its key) to attach, detach, inspect or remove it. So it comes
//! back as a segment, with its key, its id, its size, owner and mode, and
//! attached where it was, not as anonymous shared memory.
//!
//! Dump: each attached mapping (`/SYSV<key>` in maps, its inode the id)
//! records the segment as `/proc/sysvipc/shm` shows it. Refused by name:
//! a segment also attached by processes outside the checkpointed tree (a
//! restore could not make them share it again), a partial attachment
//! (part of it unmapped), which `shmat` cannot make, and a segment of
//! huge pages.
//!
//! Restore: the segment is made by us, with the same key and, through
//! `/proc/sys/kernel/shm_next_id`, the same id; filled from the image; and
//! attached by each process where it was, with the protection of each
//! piece. A segment of that key and id left over from the checkpointed
//! run, attached by nobody, is taken over (its content replaced by the
//! image's); one in use, or the id taken by another segment, fails the
//! restore by name. A segment marked for removal when it was dumped is
//! marked again once attached. A failed restore removes the segments it
//! made.

use std::cell::RefCell;
use std::collections::HashMap;

use tracing::debug;

use crate::error::{Error, Result};
use crate::image::model::{Metadata, SysvSegment, Vma};
use crate::memory::{MapEntry, PAGE_SIZE};
use crate::restore::Context;
use crate::restore::child::{Child, errno_of};

const SHM_DEST: u32 = 0o1000;
const SHM_TABLE: &str = "/proc/sys/kernel/shm_next_id";

/// A mapping of a SysV segment.
pub fn is_sysv(map: &MapEntry) -> bool {
    map.shared && map.path.starts_with("/SYSV")
}

/// The segment `map` attaches, as the kernel shows it now.
pub fn describe(map: &MapEntry) -> Result<SysvSegment> {
    let path = "/proc/sysvipc/shm";
    let text = std::fs::read_to_string(path).map_err(|source| Error::Proc {
        path: path.into(),
        source,
    })?;
    let id = map.inode as i32;
    parse_table(&text)
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| {
            Error::Other(format!(
                "the SysV shared memory segment {id} mapped at {:#x} is not in {path} (another IPC namespace?); chpox cannot checkpoint it",
                map.start
            ))
        })
}

/// The lines of `/proc/sysvipc/shm`: key shmid perms size cpid lpid nattch
/// uid gid cuid cgid …
fn parse_table(text: &str) -> Vec<SysvSegment> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let perms = u32::from_str_radix(f.get(2)?, 8).ok()?;
            Some(SysvSegment {
                key: f.first()?.parse().ok()?,
                id: f.get(1)?.parse().ok()?,
                mode: perms & 0o777,
                removed: perms & SHM_DEST != 0,
                size: f.get(3)?.parse().ok()?,
                attachments: f.get(6)?.parse().ok()?,
                uid: f.get(7)?.parse().ok()?,
                gid: f.get(8)?.parse().ok()?,
            })
        })
        .collect()
}

/// Refuse a tree whose segments a restore could not bring back as they
/// were: attached also outside the tree (the kernel counts one attachment
/// per mapping, so the mappings of the tree and of our snapshot `copies`
/// of its processes must be all of them), or attached in part.
pub fn check_tree(meta: &Metadata, copies: &[i32]) -> Result<()> {
    if !meta
        .processes()
        .flat_map(|p| &p.vmas)
        .any(|v| v.sysv.is_some())
    {
        return Ok(());
    }
    let mut mappings: HashMap<i32, (u64, &SysvSegment)> = HashMap::new();
    for p in meta.processes() {
        for (base, seg, pieces) in attachments(&p.vmas) {
            if pieces.iter().any(|v| v.vm_flags.iter().any(|f| f == "ht")) {
                return Err(Error::Other(format!(
                    "PID {} has SysV shared memory segment {} (key {:#x}) of huge pages (SHM_HUGETLB); chpox cannot checkpoint it yet",
                    p.process.pid, seg.id, seg.key
                )));
            }
            let covered: u64 = pieces.iter().map(|v| v.end - v.start).sum();
            let contiguous = pieces.windows(2).all(|w| w[0].end == w[1].start);
            if pieces[0].offset != 0
                || !contiguous
                || covered != seg.size.div_ceil(PAGE_SIZE) * PAGE_SIZE
            {
                return Err(Error::Other(format!(
                    "PID {} has SysV shared memory segment {} (key {:#x}) attached at {base:#x} only in part (a piece was unmapped); chpox can bring back whole attachments only",
                    p.process.pid, seg.id, seg.key
                )));
            }
            debug!(
                pid = p.process.pid,
                id = seg.id,
                base,
                pieces = pieces.len(),
                "SysV attachment"
            );
            mappings.entry(seg.id).or_insert((0, seg)).0 += pieces.len() as u64;
        }
    }
    for &copy in copies {
        for map in crate::memory::read_maps(copy).unwrap_or_default() {
            if is_sysv(&map)
                && let Some((ours, _)) = mappings.get_mut(&(map.inode as i32))
            {
                *ours += 1;
            }
        }
    }
    // Counted now: the attachments recorded with each mapping were read
    // while the copies were being made.
    let now = std::fs::read_to_string("/proc/sysvipc/shm")
        .map(|t| parse_table(&t))
        .unwrap_or_default();
    for (id, (in_tree, seg)) in mappings {
        let attachments = now
            .iter()
            .find(|s| s.id == id)
            .map_or(seg.attachments, |s| s.attachments);
        if attachments > in_tree {
            return Err(Error::Other(format!(
                "SysV shared memory segment {id} (key {:#x}) is attached by {} process mapping(s) outside the checkpointed tree; a restore could not make them share it again: checkpoint them together (a common parent) or detach them",
                seg.key,
                attachments - in_tree
            )));
        }
    }
    Ok(())
}

/// The SysV mappings of one process grouped by attachment (segment and
/// the address it starts at), each in address order.
fn attachments(vmas: &[Vma]) -> Vec<(u64, &SysvSegment, Vec<&Vma>)> {
    let mut by_base: Vec<(u64, &SysvSegment, Vec<&Vma>)> = Vec::new();
    for v in vmas {
        let Some(seg) = &v.sysv else {
            continue;
        };
        let base = v.start.wrapping_sub(v.offset);
        match by_base
            .iter_mut()
            .find(|(b, s, _)| *b == base && s.id == seg.id)
        {
            Some((_, _, pieces)) => pieces.push(v),
            None => by_base.push((base, seg, vec![v])),
        }
    }
    for (_, _, pieces) in &mut by_base {
        pieces.sort_by_key(|v| v.start);
    }
    by_base
}

// ---------------------------------------------------------------------------
// Restore

/// The segments a restore made or took over: saved id → id now (the same
/// unless the kernel gave another, which fails the restore). Those it made
/// are removed again if the restore fails.
#[derive(Debug, Default)]
pub struct Segments {
    ids: RefCell<HashMap<i32, i32>>,
    made: RefCell<Vec<i32>>,
    kept: std::cell::Cell<bool>,
}

impl Segments {
    /// The restore succeeded: the segments stay.
    pub fn keep(&self) {
        self.kept.set(true);
    }
}

impl Drop for Segments {
    fn drop(&mut self) {
        if self.kept.get() {
            return;
        }
        for &id in self.made.borrow().iter() {
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

/// Attach, in the child, the segment of `vma` if it is the first piece of
/// its attachment, then give the piece its protection. True if `vma` is a
/// SysV mapping (handled here).
pub fn restore_piece(c: &mut Child<'_>, ctx: &Context<'_>, vma: &Vma) -> Result<bool> {
    let Some(seg) = &vma.sysv else {
        return Ok(false);
    };
    let base = vma.start - vma.offset;
    if vma.offset == 0 {
        let id = segment(ctx, seg)?;
        // The attachment may write if any piece may (mprotect cannot give
        // it more later), and execute likewise.
        let pieces: Vec<&Vma> = ctx
            .image
            .vmas
            .iter()
            .filter(|v| v.sysv.as_ref().map(|s| s.id) == Some(seg.id) && v.start - v.offset == base)
            .collect();
        let may = |f: &str| pieces.iter().any(|v| v.vm_flags.iter().any(|x| x == f));
        let mut flags = 0;
        if !may("mw") {
            flags |= libc::SHM_RDONLY;
        }
        if may("me") {
            flags |= libc::SHM_EXEC;
        }
        let got = c.raw(libc::SYS_shmat, [id as u64, base, flags as u64, 0, 0, 0])?;
        if got < 0 || got as u64 != base {
            return Err(Error::Other(format!(
                "cannot attach SysV shared memory segment {} at {base:#x}: {}",
                seg.id,
                if got < 0 {
                    errno_of(got).to_string()
                } else {
                    format!("attached at {got:#x}")
                }
            )));
        }
        if seg.removed {
            // Marked once attached (with no attachment it would go at
            // once). Linux lets a segment marked for removal be attached
            // by its id until the last detach: the other processes of the
            // tree still can.
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
    let prot = (if vma.read { libc::PROT_READ } else { 0 })
        | (if vma.write { libc::PROT_WRITE } else { 0 })
        | (if vma.exec { libc::PROT_EXEC } else { 0 });
    c.call(
        "mprotect",
        libc::SYS_mprotect,
        [vma.start, vma.end - vma.start, prot as u64, 0, 0, 0],
    )?;
    Ok(true)
}

/// The segment for saved `seg` in this restore: made (and filled) on first
/// use.
fn segment(ctx: &Context<'_>, seg: &SysvSegment) -> Result<i32> {
    if let Some(&id) = ctx.sysv.ids.borrow().get(&seg.id) {
        return Ok(id);
    }
    let (id, made) = make_or_take_over(seg)?;
    if made {
        ctx.sysv.made.borrow_mut().push(id);
    }
    ctx.sysv.ids.borrow_mut().insert(seg.id, id);
    fill(ctx, seg, id)?;
    debug!(
        saved = seg.id,
        id,
        key = seg.key,
        made,
        "SysV segment ready"
    );
    Ok(id)
}

fn named(seg: &SysvSegment) -> String {
    format!("SysV shared memory segment {} (key {:#x})", seg.id, seg.key)
}

/// Make the segment with its key and id, or take over the one left from
/// the checkpointed run. Returns the id and whether it was made.
fn make_or_take_over(seg: &SysvSegment) -> Result<(i32, bool)> {
    let key = if seg.removed {
        libc::IPC_PRIVATE
    } else {
        seg.key
    };
    let existing = std::fs::read_to_string("/proc/sysvipc/shm")
        .map(|t| parse_table(&t))
        .unwrap_or_default();
    if let Some(old) = existing.iter().find(|s| s.id == seg.id) {
        let same = old.key == key && key != libc::IPC_PRIVATE && old.size == seg.size;
        if same && old.attachments == 0 {
            set_owner(seg, seg.id)?;
            return Ok((seg.id, false));
        }
        return Err(Error::Other(if same {
            format!(
                "{} exists and is attached by {} mapping(s): stop the processes using it (ipcs -m -p) before restoring",
                named(seg),
                old.attachments
            )
        } else {
            format!(
                "the id of {} is taken by another segment: remove it (ipcrm -m {}) or restore where it is free",
                named(seg),
                seg.id
            )
        }));
    }
    if key != libc::IPC_PRIVATE && existing.iter().any(|s| s.key == key) {
        return Err(Error::Other(format!(
            "a SysV shared memory segment with the key {key:#x} of {} exists under another id: remove it (ipcrm -M {key:#x}) before restoring",
            named(seg)
        )));
    }
    std::fs::write(SHM_TABLE, seg.id.to_string()).map_err(|source| Error::File {
        path: format!("{SHM_TABLE} (to give {} its id back)", named(seg)),
        source,
    })?;
    // SAFETY: shmget takes integers only.
    let id = unsafe {
        libc::shmget(
            key,
            seg.size as usize,
            libc::IPC_CREAT | libc::IPC_EXCL | seg.mode as i32,
        )
    };
    if id < 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::write(SHM_TABLE, "-1");
        return Err(Error::Other(format!("cannot make {}: {e}", named(seg))));
    }
    if id != seg.id {
        // SAFETY: IPC_RMID takes no buffer; the segment is ours, unused.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        return Err(Error::Other(format!(
            "{} came back as id {id}: another segment took its id meanwhile; restore again",
            named(seg)
        )));
    }
    set_owner(seg, id)?;
    Ok((id, true))
}

fn set_owner(seg: &SysvSegment, id: i32) -> Result<()> {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it, IPC_SET reads it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: see above; `ds` outlives both calls.
    let ok = unsafe {
        libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0 && {
            ds.shm_perm.uid = seg.uid;
            ds.shm_perm.gid = seg.gid;
            ds.shm_perm.mode = seg.mode as libc::c_ushort;
            libc::shmctl(id, libc::IPC_SET, &mut ds) == 0
        }
    };
    if !ok {
        return Err(Error::Other(format!(
            "cannot give {} its owner and mode: {}",
            named(seg),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Write the image's pages of segment `seg` (stored with whichever mapping
/// of the tree held them) into segment `id`, through an attachment of our
/// own; everything else of it is zero.
fn fill(ctx: &Context<'_>, seg: &SysvSegment, id: i32) -> Result<()> {
    let len = (seg.size.div_ceil(PAGE_SIZE) * PAGE_SIZE) as usize;
    // SAFETY: the kernel picks a free address; we detach it below.
    let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if at as isize == -1 {
        return Err(Error::Other(format!(
            "cannot attach {} to fill it: {}",
            named(seg),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `at` is a fresh attachment of `len` bytes, ours alone until
    // the shmdt below, and no other reference to it exists.
    let memory = unsafe { std::slice::from_raw_parts_mut(at.cast::<u8>(), len) };
    let result = (|| -> Result<()> {
        memory.fill(0);
        let meta = ctx.reader.metadata();
        for v in meta
            .processes()
            .flat_map(|p| &p.vmas)
            .filter(|v| v.sysv.as_ref().map(|s| s.id) == Some(seg.id))
        {
            if !v.inherited.is_empty() {
                return Err(Error::Other(format!(
                    "the image's pages of {} point into its parent image; chpox stores shared memory whole and cannot restore this image",
                    named(seg)
                )));
            }
            let base = v.start - v.offset;
            for run in &v.pages {
                let from = (run.addr - base) as usize;
                let to = from + (run.npages * PAGE_SIZE) as usize;
                let dest = memory.get_mut(from..to).ok_or_else(|| {
                    Error::Other(format!(
                        "the image's pages of {} lie outside it",
                        named(seg)
                    ))
                })?;
                ctx.reader.read_data_into(&run.data, dest)?;
            }
        }
        Ok(())
    })();
    // SAFETY: detaches our own attachment made above.
    unsafe { libc::shmdt(at) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_table_is_read_with_removal_and_signed_keys() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
 305441741     131098   640                 12388 24955 24955      3     0     0     0     0 1795741468          0 1795741468                  4096                     0
         0     131099  1600                  4096 24955 24955      1  1000  1000     0     0 1795741468          0 1795741468                  4096                     0
-559038737          5   666                  8192     1     1      0     0     0     0     0 0 0 0 0 0
";
        let t = parse_table(text);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            SysvSegment {
                key: 0x1234abcd,
                id: 131098,
                size: 12388,
                mode: 0o640,
                uid: 0,
                gid: 0,
                removed: false,
                attachments: 3,
            }
        );
        assert!(t[1].removed && t[1].mode == 0o600 && t[1].uid == 1000);
        assert_eq!(t[2].key, 0xdeadbeefu32 as i32);
    }
}
