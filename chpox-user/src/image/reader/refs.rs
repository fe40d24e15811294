//! The blobs the metadata refers to: naming them for messages, visiting
//! them all, and checking at open that each lies in the data area and
//! that page runs fit their VMAs.

use std::fmt;

use super::RunSpan;
use crate::image::error::{ImageError, one_line};
use crate::image::format::{self, ALIGN};
use crate::image::model::{Compression, DataRef, FdEntry, FdKind, FileRef, Metadata, PageRun, Vma};

/// Where a DataRef sits in the metadata, to name it in messages.
#[derive(Clone, Copy)]
pub(super) enum Site<'a> {
    Page { vma: &'a Vma, run: &'a PageRun },
    File { index: usize, file: &'a FileRef },
    Fd { entry: &'a FdEntry, path: &'a str },
    Other { offset: u64 },
}

impl fmt::Display for Site<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Page { vma, run } => write!(
                f,
                "page data of VMA {:x}-{:x} (run at {:x})",
                vma.start, vma.end, run.addr
            ),
            Site::File { index, file } => {
                write!(f, "embedded file #{index} {}", one_line(&file.path))
            }
            Site::Fd { entry, path } => write!(
                f,
                "embedded content of fd {} ({})",
                entry.fd,
                one_line(path)
            ),
            Site::Other { offset } => write!(f, "data at image offset {offset}"),
        }
    }
}

/// Calls `f` on every DataRef of `meta`, in a fixed order, stopping at the
/// first error.
pub(super) fn for_each_ref<'a, E>(
    meta: &'a Metadata,
    mut f: impl FnMut(Site<'a>, &'a DataRef) -> Result<(), E>,
) -> Result<(), E> {
    for vma in meta.processes().flat_map(|p| &p.vmas) {
        for run in &vma.pages {
            f(Site::Page { vma, run }, &run.data)?;
        }
    }
    for (index, file) in meta.files.iter().enumerate() {
        if let Some(r) = &file.embedded {
            f(Site::File { index, file }, r)?;
        }
    }
    for entry in meta.processes().flat_map(|p| &p.fds) {
        if let FdKind::Fifo {
            path,
            data: Some(r),
            ..
        } = &entry.kind
        {
            f(Site::Fd { entry, path }, r)?;
        }
        if let FdKind::UnixPair {
            queued: Some(r), ..
        } = &entry.kind
        {
            f(
                Site::Fd {
                    entry,
                    path: "socket",
                },
                r,
            )?;
        }
        for r in crate::image::model_sockets::data_refs(&entry.kind) {
            f(
                Site::Fd {
                    entry,
                    path: "socket",
                },
                r,
            )?;
        }
        if let FdKind::RegularFile {
            path,
            embedded: Some(r),
            ..
        } = &entry.kind
        {
            f(Site::Fd { entry, path }, r)?;
        }
        if let FdKind::Memfd {
            name,
            content: Some(r),
            ..
        } = &entry.kind
        {
            f(Site::Fd { entry, path: name }, r)?;
        }
        if let FdKind::Pipe { data: Some(r), .. } = &entry.kind {
            f(
                Site::Fd {
                    entry,
                    path: "pipe",
                },
                r,
            )?;
        }
    }
    Ok(())
}

/// Every DataRef of `meta`, in the order of [`for_each_ref`].
pub(crate) fn all_refs(meta: &Metadata) -> Vec<DataRef> {
    let mut refs = Vec::new();
    let _ = for_each_ref(meta, |_, r| {
        refs.push(*r);
        Ok::<(), ()>(())
    });
    refs
}

/// Calls `f` on every DataRef of `meta` to change it, in the order of
/// [`for_each_ref`] (the two list the same sites: keep them together), so
/// that a writer can move or re-encode every blob the metadata refers to.
pub(crate) fn for_each_ref_mut<E>(
    meta: &mut Metadata,
    mut f: impl FnMut(&mut DataRef) -> Result<(), E>,
) -> Result<(), E> {
    for vma in meta.processes_mut().flat_map(|p| &mut p.vmas) {
        for run in &mut vma.pages {
            f(&mut run.data)?;
        }
    }
    for file in &mut meta.files {
        if let Some(r) = &mut file.embedded {
            f(r)?;
        }
    }
    for entry in meta.processes_mut().flat_map(|p| &mut p.fds) {
        match &mut entry.kind {
            FdKind::Fifo { data: Some(r), .. }
            | FdKind::UnixPair {
                queued: Some(r), ..
            }
            | FdKind::RegularFile {
                embedded: Some(r), ..
            }
            | FdKind::Memfd {
                content: Some(r), ..
            }
            | FdKind::Pipe { data: Some(r), .. } => f(r)?,
            kind => {
                for r in crate::image::model_sockets::data_refs_mut(kind) {
                    f(r)?;
                }
            }
        }
    }
    Ok(())
}

/// Checks that blob `r` lies in the data area `[data_start, data_end)` (which
/// the caller has checked to be inside the file) and claims sane sizes.
pub(super) fn check_ref(
    r: &DataRef,
    name: &dyn Fn() -> String,
    data_start: u64,
    data_end: u64,
) -> Result<(), ImageError> {
    let inside = r.offset >= data_start
        && r.offset
            .checked_add(r.stored_len)
            .is_some_and(|end| end <= data_end);
    if !inside {
        return Err(ImageError::OutOfBounds { section: name() });
    }
    let bad = |reason: String| ImageError::Decode {
        section: name(),
        reason,
    };
    if !r.offset.is_multiple_of(ALIGN) {
        return Err(bad(format!("offset {} is not 4096-aligned", r.offset)));
    }
    if r.raw_len > format::MAX_BLOB_RAW_LEN {
        return Err(bad(format!("{} bytes is over the 64 GiB limit", r.raw_len)));
    }
    if r.compression == Compression::None && r.raw_len != r.stored_len {
        return Err(bad(format!(
            "uncompressed, yet {} bytes stored for {} raw",
            r.stored_len, r.raw_len
        )));
    }
    Ok(())
}

/// Checks the metadata's references: every DataRef in the data area, page
/// runs inside their VMA and consistent with the page size and each other,
/// file indices in range. Returns the page runs sorted by address.
pub(super) fn validate(
    meta: &Metadata,
    data_start: u64,
    data_end: u64,
) -> Result<Vec<RunSpan>, ImageError> {
    for_each_ref(meta, |site, r| {
        check_ref(r, &|| site.to_string(), data_start, data_end)
    })?;

    let bad_meta = |reason: String| ImageError::Decode {
        section: "metadata".into(),
        reason,
    };
    let nfiles = meta.files.len();
    for p in meta.processes() {
        if let Some(i) = p.process.exe_file
            && i >= nfiles
        {
            return Err(bad_meta(format!(
                "the executable of PID {} is file #{i} but the image lists {nfiles} files",
                p.process.pid
            )));
        }
    }

    let page_size = meta.host.page_size;
    // The root's runs, for `read_memory`; every process's are checked.
    let mut runs = Vec::new();
    for (pi, p) in meta.processes().enumerate() {
        let mut process_runs = Vec::new();
        for (vi, vma) in p.vmas.iter().enumerate() {
            if let Some(i) = vma.file
                && i >= nfiles
            {
                return Err(bad_meta(format!(
                    "VMA {:x}-{:x} maps file #{i} but the image lists {nfiles} files",
                    vma.start, vma.end
                )));
            }
            for (ri, run) in vma.pages.iter().enumerate() {
                let site = Site::Page { vma, run };
                let bad = |reason: String| ImageError::Decode {
                    section: site.to_string(),
                    reason,
                };
                if !page_size.is_power_of_two() {
                    return Err(bad_meta(format!(
                        "page size {page_size} is not a power of two"
                    )));
                }
                if !run.addr.is_multiple_of(page_size) {
                    return Err(bad("run address is not page-aligned".into()));
                }
                if run.npages.checked_mul(page_size) != Some(run.data.raw_len) {
                    return Err(bad(format!(
                        "{} pages of {page_size} bytes but {} bytes of data",
                        run.npages, run.data.raw_len
                    )));
                }
                let inside = run.addr >= vma.start
                    && run
                        .addr
                        .checked_add(run.data.raw_len)
                        .is_some_and(|end| end <= vma.end);
                if !inside {
                    return Err(bad("the run lies outside its VMA".into()));
                }
                if run.npages > 0 {
                    process_runs.push(RunSpan {
                        start: run.addr,
                        end: run.addr + run.data.raw_len,
                        vma: vi,
                        run: ri,
                    });
                }
            }
        }
        // Two runs for the same address would make memory content ambiguous.
        process_runs.sort_unstable_by_key(|s| s.start);
        for pair in process_runs.windows(2) {
            if let [a, b] = pair
                && b.start < a.end
            {
                return Err(bad_meta(format!(
                    "page runs at {:x} and {:x} of PID {} overlap",
                    a.start, b.start, p.process.pid
                )));
            }
        }
        if pi == 0 {
            runs = process_runs;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two walks visit the same references in the same order.
    #[test]
    fn both_walks_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut meta =
            crate::image::testutil::write_sample_image(&dir.path().join("img"), false).meta;
        let mut seen = Vec::new();
        for_each_ref(&meta, |_, r| {
            seen.push(*r);
            Ok::<(), ()>(())
        })
        .expect("walk");
        let mut changed = Vec::new();
        for_each_ref_mut(&mut meta, |r| {
            changed.push(*r);
            Ok::<(), ()>(())
        })
        .expect("walk");
        assert!(seen.len() >= 7, "{seen:?}");
        assert_eq!(seen, changed);
    }
}
