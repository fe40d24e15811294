//! The parent side of incremental images: where a registration's base is
//! kept (`FILE.base`), how an increment finds and checks its parent and
//! reads memory through it, and how a full image is made from the base
//! ([`absorb_base`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Base;
use crate::error::{Error, Result};
use crate::image::ImageReader;
use crate::image::model::{Compression, Metadata, PageRun, ParentRef, Vma};
use crate::image::writer::ImageWriter;
use crate::memory::PAGE_SIZE;

/// Where the base of the images written to `output` is kept.
pub fn base_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".base");
    output.with_file_name(name)
}

/// Make `base` a hard link to `output` (replacing an older base
/// atomically); returns its (device, inode).
pub(super) fn link_base(output: &Path, base: &Path) -> Result<(u64, u64)> {
    let err = |what: &str, e: std::io::Error| {
        Error::Other(format!(
            "cannot keep {} as the base of incremental checkpoints ({what}): {e}",
            output.display()
        ))
    };
    let mut tmp_name = base.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = base.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(output, &tmp).map_err(|e| err("link", e))?;
    if let Err(e) = std::fs::rename(&tmp, base) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("rename", e));
    }
    let m = std::fs::metadata(base).map_err(|e| err("stat", e))?;
    Ok((m.dev(), m.ino()))
}

/// Number of pages an image takes from its parent.
pub fn pages_inherited(meta: &Metadata) -> u64 {
    meta.processes()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.inherited)
        .map(|&(_, n)| n)
        .sum()
}

/// The parent of the incremental image at `image` (whose metadata is
/// `meta`), opened and checked: the path it was written from first, then
/// any image beside `image` or beside that path with the same name stem
/// (`--keep` renames). Fails naming it when it is missing or replaced.
pub fn open_parent(
    image: &Path,
    parent: &ParentRef,
) -> Result<(ImageReader, std::fs::File, PathBuf)> {
    let recorded = PathBuf::from(&parent.path);
    let mut candidates = vec![recorded.clone()];
    for dir in [image.parent(), recorded.parent()].into_iter().flatten() {
        let stem = image_stem(image);
        if let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let mut names: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p != image && image_stem(p) == stem)
                .collect();
            names.sort();
            candidates.extend(names);
        }
    }
    let mut seen_other = None;
    for path in candidates {
        let Ok((reader, file)) = ImageReader::open_file(&path) else {
            continue;
        };
        if reader.metadata().image_id.as_deref() == Some(parent.image_id.as_str()) {
            if reader.metadata().parent.is_some() {
                return Err(Error::Other(format!(
                    "{}: its parent {} is itself incremental; chpox writes no such chains (the image was altered)",
                    image.display(),
                    path.display()
                )));
            }
            return Ok((reader, file, path));
        }
        if path == recorded {
            seen_other = Some(path);
        }
    }
    Err(Error::Other(match seen_other {
        Some(p) => format!(
            "{} is incremental and its parent {} was replaced by another image; restore the newest full image instead (`chpox inspect` says which are full), or an older increment whose parent is still there",
            image.display(),
            p.display()
        ),
        None => format!(
            "{} is incremental and its parent {} is missing (not found beside it either); put the parent back, or restore a full image instead",
            image.display(),
            recorded.display()
        ),
    }))
}

/// `len` bytes of the root process's memory at `addr` (page aligned) as a
/// restore of the image would make them: stored in it, or, for an
/// incremental image, inherited from its parent (opened where it was
/// written, and checked). None if some page is in neither.
pub fn read_memory(reader: &ImageReader, addr: u64, len: usize) -> Result<Option<Vec<u8>>> {
    let meta = reader.metadata();
    let Some(parent) = &meta.parent else {
        return Ok(reader.read_memory(addr, len)?);
    };
    let parent_reader = ImageReader::open(Path::new(&parent.path))?;
    if parent_reader.metadata().image_id.as_deref() != Some(parent.image_id.as_str()) {
        return Err(Error::Other(format!(
            "{} is not this image's parent any more",
            parent.path
        )));
    }
    let mut inherited: Vec<(u64, u64)> = meta
        .root
        .vmas
        .iter()
        .flat_map(|v| &v.inherited)
        .map(|&(a, n)| (a, a + n * PAGE_SIZE))
        .collect();
    inherited.sort_unstable();
    let end = addr + len as u64;
    let mut out = Vec::with_capacity(len);
    let mut at = addr;
    while at < end {
        let next = inherited.iter().find(|&&(s, e)| e > at && s < end);
        let (from_parent, to) = match next {
            Some(&(s, e)) if s <= at => (true, e.min(end)),
            Some(&(s, _)) => (false, s),
            None => (false, end),
        };
        let part = if from_parent {
            parent_reader.read_memory(at, (to - at) as usize)?
        } else {
            reader.read_memory(at, (to - at) as usize)?
        };
        let Some(part) = part else {
            return Ok(None);
        };
        out.extend_from_slice(&part);
        at = to;
    }
    Ok(Some(out))
}

/// `proc-dump` for `proc-dump`, `proc-dump.3`, `proc-dump.base`.
fn image_stem(p: &Path) -> String {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    let mut s = name.as_ref();
    loop {
        match s.rsplit_once('.') {
            Some((head, tail))
                if tail == "base"
                    || (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit())) =>
            {
                s = head
            }
            _ => return s.to_string(),
        }
    }
}

/// The parent's page runs of the process `pid` restricted to `vma`'s
/// inherited ranges, as (address, page count, file offset) pieces of the
/// parent file. The parent's runs are uncompressed (checked by the caller).
pub fn inherited_pieces(parent: &Metadata, pid: i32, vma: &Vma) -> Result<Vec<(u64, u64, u64)>> {
    if vma.inherited.is_empty() {
        return Ok(Vec::new());
    }
    let proc = parent
        .processes()
        .find(|p| p.process.pid == pid)
        .ok_or_else(|| {
            Error::Other(format!(
                "the parent image holds no process {pid}: it is not this image's parent"
            ))
        })?;
    let mut out = Vec::new();
    for pv in proc
        .vmas
        .iter()
        .filter(|v| v.start < vma.end && vma.start < v.end)
    {
        for run in &pv.pages {
            let (rs, re) = (run.addr, run.addr + run.npages * PAGE_SIZE);
            for &(a, n) in &vma.inherited {
                let (s, e) = (a.max(rs), (a + n * PAGE_SIZE).min(re));
                if s < e {
                    out.push((s, (e - s) / PAGE_SIZE, run.data.offset + (s - rs)));
                }
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Every page run `meta` stores.
pub(super) fn all_runs(meta: &Metadata) -> impl Iterator<Item = &PageRun> {
    meta.processes()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.pages)
}

/// Make the image `meta` describes, written as an increment of `base`
/// (its mappings' `inherited` runs), a full one: each inherited page is
/// copied from the base into `writer`, checked against the base's
/// checksums on the way, and stored as the image's own. Run once the
/// processes run again (see [`Plan::FromBase`](super::Plan::FromBase)).
/// One thread reads and checks the base's runs while this one writes.
/// Returns the pages copied.
pub(crate) fn absorb_base(
    meta: &mut Metadata,
    writer: &mut ImageWriter,
    base: &Base,
) -> Result<u64> {
    let (reader, file) = ImageReader::open_file(&base.path)?;
    let parent = reader.metadata();
    if parent.image_id.as_deref() != Some(base.image_id.as_str()) || parent.parent.is_some() {
        return Err(Error::Other(format!(
            "the base image {} was replaced while the checkpoint was written",
            base.path.display()
        )));
    }
    let copies = base_copies(meta, parent, base)?;
    let named =
        |what: String| Error::Other(format!("the base image {}: {what}", base.path.display()));
    // Runs of a few MiB each (see `pagecopy`): a few in flight at once.
    let (send, runs) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(4);
    let copied = std::thread::scope(|scope| -> Result<u64> {
        let copies_read = &copies;
        let named = &named;
        scope.spawn(move || {
            use std::os::unix::fs::FileExt;
            for copy in copies_read {
                let run = &copy.run;
                let mut buf = vec![0u8; run.data.stored_len as usize];
                // The whole run, to check it against its checksum: a base
                // damaged since it was written must not pass into a new
                // image as sound.
                let read = file
                    .read_exact_at(&mut buf, run.data.offset)
                    .map_err(|e| named(format!("cannot be read ({e})")))
                    .and_then(|()| {
                        if crc32c::crc32c(&buf) == run.data.crc32c {
                            Ok(buf)
                        } else {
                            Err(named(format!(
                                "is damaged (a checksum differs at byte {}): this checkpoint is not written; the next one is full",
                                run.data.offset
                            )))
                        }
                    });
                let failed = read.is_err();
                if send.send(read).is_err() || failed {
                    return;
                }
            }
        });
        // Dropped on any early return, which ends the reader's wait.
        let runs = runs;
        let mut copied = 0u64;
        for copy in &copies {
            let buf = runs
                .recv()
                .map_err(|_| Error::Other("internal: the base reader ended early".into()))??;
            let (start, end) = (copy.run.addr, copy.run.addr + copy.run.npages * PAGE_SIZE);
            let vma = meta
                .processes_mut()
                .nth(copy.process)
                .and_then(|p| p.vmas.get_mut(copy.vma))
                .ok_or_else(|| Error::Other("internal: a mapping of the image went".into()))?;
            for &(s, e) in &copy.pieces {
                let from = (s - start) as usize;
                let bytes = &buf[from..from + (e - s) as usize];
                // A whole run keeps its checksum, just verified.
                let data = if (s, e) == (start, end) && !writer.compresses() {
                    writer.add_prepared(
                        bytes,
                        copy.run.data.raw_len,
                        copy.run.data.crc32c,
                        Compression::None,
                    )?
                } else {
                    writer.add_data(bytes)?
                };
                let npages = (e - s) / PAGE_SIZE;
                vma.pages.push(PageRun {
                    addr: s,
                    npages,
                    data,
                });
                copied += npages;
            }
        }
        Ok(copied)
    })?;
    for vma in meta.processes_mut().flat_map(|p| &mut p.vmas) {
        if !vma.inherited.is_empty() {
            vma.pages.sort_unstable_by_key(|r| r.addr);
            vma.inherited.clear();
        }
    }
    meta.parent = None;
    Ok(copied)
}

/// One run of the base that holds pages a mapping of the new image
/// inherits: `pieces`, the byte ranges of it inherited.
struct BaseCopy {
    /// Index of the process in `Metadata::processes`, and of its mapping.
    process: usize,
    vma: usize,
    run: PageRun,
    pieces: Vec<(u64, u64)>,
}

/// Which runs of the uncompressed `parent` (the base) hold the pages
/// `meta`'s mappings inherit, in the image's order; refused if it does
/// not hold every one of them, or holds them compressed.
fn base_copies(meta: &Metadata, parent: &Metadata, base: &Base) -> Result<Vec<BaseCopy>> {
    let mut copies = Vec::new();
    for (process, image) in meta.processes().enumerate() {
        let pid = image.process.pid;
        for (index, vma) in image.vmas.iter().enumerate() {
            if vma.inherited.is_empty() {
                continue;
            }
            let wanted: u64 = vma.inherited.iter().map(|&(_, n)| n).sum();
            let mut found = 0u64;
            let runs = parent
                .processes()
                .filter(|p| p.process.pid == pid)
                .flat_map(|p| &p.vmas)
                .filter(|v| v.start < vma.end && vma.start < v.end)
                .flat_map(|v| &v.pages);
            for run in runs {
                let (start, end) = (run.addr, run.addr + run.npages * PAGE_SIZE);
                let pieces: Vec<(u64, u64)> = vma
                    .inherited
                    .iter()
                    .map(|&(a, n)| (a.max(start), (a + n * PAGE_SIZE).min(end)))
                    .filter(|(s, e)| s < e)
                    .collect();
                if pieces.is_empty() {
                    continue;
                }
                if run.data.compression != Compression::None {
                    return Err(Error::Other(format!(
                        "the base image {} has compressed pages: a full checkpoint cannot take them from it",
                        base.path.display()
                    )));
                }
                found += pieces.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum::<u64>();
                copies.push(BaseCopy {
                    process,
                    vma: index,
                    run: *run,
                    pieces,
                });
            }
            if found != wanted {
                return Err(Error::Other(format!(
                    "the base image {} holds {found} of the {wanted} pages process {pid} inherits at {:#x}: this checkpoint is not written; the next one is full",
                    base.path.display(),
                    vma.start
                )));
            }
        }
    }
    Ok(copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_ignore_rotation_and_base() {
        assert_eq!(image_stem(Path::new("/d/proc-dump")), "proc-dump");
        assert_eq!(image_stem(Path::new("/d/proc-dump.3")), "proc-dump");
        assert_eq!(image_stem(Path::new("/d/proc-dump.base")), "proc-dump");
        assert_eq!(image_stem(Path::new("/d/a.chpox.2")), "a.chpox");
        assert_eq!(
            base_path(Path::new("/d/a.chpox")),
            Path::new("/d/a.chpox.base")
        );
    }

    /// An increment of a sample base (inheriting part of a run, whole
    /// runs, and runs across two mappings), made full from the base.
    mod from_base {
        use super::*;
        use crate::image::testutil::{
            HEAP_VMA, PAGE, STACK_VMA, memory, sample_metadata, write_sample_image_with,
        };
        use crate::image::{ImageWriter, WriteOptions};

        const INHERITED: [(u64, u64); 3] = [
            (HEAP_VMA.0 + PAGE, 2),
            (HEAP_VMA.0 + 5 * PAGE, 3),
            (STACK_VMA.1 - 2 * PAGE, 2),
        ];

        fn base_in(dir: &Path) -> Base {
            let path = dir.join("img.base");
            write_sample_image_with(&path, false, |_, meta| meta.image_id = Some("base".into()));
            Base {
                image_id: "base".into(),
                path,
                file: (0, 0),
                pages: 9,
                compressed: false,
            }
        }

        /// The increment's metadata: the sample process with `inherited`
        /// runs and no pages of its own.
        fn increment(inherited: &[(u64, u64)]) -> Metadata {
            let mut meta = sample_metadata();
            for &(addr, n) in inherited {
                let vma = meta
                    .root
                    .vmas
                    .iter_mut()
                    .find(|v| v.start <= addr && addr < v.end)
                    .expect("a mapping");
                vma.inherited.push((addr, n));
            }
            meta
        }

        fn writer(path: &Path) -> ImageWriter {
            ImageWriter::create(
                path,
                WriteOptions {
                    compress: false,
                    owner: None,
                    keep_previous: 0,
                    as_user: None,
                    defer_compression: false,
                },
            )
            .expect("writer")
        }

        #[test]
        fn every_inherited_page_comes_into_the_image_from_the_base() {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = base_in(dir.path());
            let mut meta = increment(&INHERITED);
            let out = dir.path().join("img");
            let mut w = writer(&out);
            let copied = absorb_base(&mut meta, &mut w, &base).expect("absorbed");
            assert_eq!(copied, 7);
            assert!(meta.parent.is_none());
            assert!(meta.root.vmas.iter().all(|v| v.inherited.is_empty()));
            w.finish(&meta).expect("finished");
            let image = ImageReader::open(&out).expect("opens");
            image.verify_all().expect("checksums");
            for (addr, n) in INHERITED {
                let got = image.read_memory(addr, (n * PAGE) as usize).expect("reads");
                assert_eq!(got, Some(memory(addr, n * PAGE)), "{addr:#x}");
            }
            // Nothing beyond what was inherited.
            assert_eq!(
                image.read_memory(HEAP_VMA.0, PAGE as usize).expect("reads"),
                None
            );
        }

        #[test]
        fn a_damaged_base_or_one_without_the_pages_is_refused_by_name() {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = base_in(dir.path());
            // A page the base never stored.
            let mut meta = increment(&[(HEAP_VMA.0 + 3 * PAGE, 1)]);
            let e = absorb_base(&mut meta, &mut writer(&dir.path().join("a")), &base)
                .expect_err("refused");
            assert!(e.to_string().contains("holds 0 of the 1 pages"), "{e}");
            // One byte of a stored run changed in the base file.
            let (reader, _) = ImageReader::open_file(&base.path).expect("opens");
            let run = reader
                .metadata()
                .root
                .vmas
                .iter()
                .flat_map(|v| &v.pages)
                .last()
                .copied();
            let run = run.expect("a run");
            drop(reader);
            let mut bytes = std::fs::read(&base.path).expect("read");
            bytes[run.data.offset as usize + 5] ^= 0xff;
            std::fs::write(&base.path, bytes).expect("write");
            let mut meta = increment(&INHERITED);
            let e = absorb_base(&mut meta, &mut writer(&dir.path().join("b")), &base)
                .expect_err("refused");
            assert!(e.to_string().contains("is damaged"), "{e}");
        }
    }
}
