//! Mapped areas: the page dump copies process memory straight into the
//! image file through a mapping, and checksums the copies afterwards.

use std::io::{self, Seek};

use nix::errno::Errno;

use super::{ImageWriter, State};
use crate::image::error::ImageError;
use crate::image::model::{Compression, DataRef};

/// CRC-32C of each slice, spread over the available cores: the page dump
/// checksums a whole process's memory while the process is frozen.
fn parallel_crc32c(slices: &[&[u8]]) -> Vec<u32> {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    if threads == 1 || total < (8 << 20) {
        return slices.iter().map(|s| crc32c::crc32c(s)).collect();
    }
    // Contiguous groups of slices with about total/threads bytes each.
    let share = total.div_ceil(threads);
    let mut groups: Vec<&[&[u8]]> = Vec::new();
    let mut rest = slices;
    while !rest.is_empty() {
        let mut bytes = 0usize;
        let mut n = 0usize;
        while n < rest.len() && (bytes < share || n == 0) {
            bytes += rest[n].len();
            n += 1;
        }
        let (group, r) = rest.split_at(n);
        groups.push(group);
        rest = r;
    }
    let crc_all = |g: &[&[u8]]| g.iter().map(|s| crc32c::crc32c(s)).collect::<Vec<u32>>();
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .map(|&g| scope.spawn(move || crc_all(g)))
            .collect();
        let mut out = Vec::with_capacity(slices.len());
        for (handle, group) in handles.into_iter().zip(&groups) {
            // A checksum thread cannot panic short of a bug in crc32c;
            // should one, recompute its share here rather than lose it.
            out.extend(handle.join().unwrap_or_else(|_| crc_all(group)));
        }
        out
    })
}

/// Part of the image file mapped for direct copies; see
/// [`ImageWriter::map_area`].
pub struct MappedArea {
    map: memmap2::MmapMut,
    /// File offset of the area's first byte.
    start: u64,
}

impl MappedArea {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A mapped area whose blobs are written but not yet checksummed.
///
/// Its mapping stays alive until `data_refs`; the writer may meanwhile
/// write past the blobs' end (the area's unused tail), which the blobs
/// never cover. `data_refs` must come before [`ImageWriter::finish`], which
/// needs the checksums in the metadata.
pub struct ClosedArea {
    map: memmap2::MmapMut,
    start: u64,
    blobs: Vec<(u64, u64)>,
}

impl ClosedArea {
    /// The blobs' `DataRef`s, in the order given to `close_area`.
    pub fn data_refs(self) -> Vec<DataRef> {
        // close_area checked every blob lies within the map.
        let slices: Vec<&[u8]> = self
            .blobs
            .iter()
            .map(|&(o, l)| self.map.get(o as usize..(o + l) as usize).unwrap_or(&[]))
            .collect();
        let crcs = parallel_crc32c(&slices);
        self.blobs
            .iter()
            .zip(crcs)
            .map(|(&(offset, len), crc)| DataRef {
                offset: self.start + offset,
                stored_len: len,
                raw_len: len,
                crc32c: crc,
                compression: Compression::None,
            })
            .collect()
    }
}

impl ImageWriter {
    /// Reserves the next `len` bytes of the data area and maps them into
    /// memory, already allocated and faulted in, for the caller to copy
    /// blobs into directly (the page dump's `process_vm_readv` writes
    /// straight into the page cache this way: one copy, no write(2)).
    ///
    /// Everything costly — allocating file space, faulting in the mapping —
    /// happens here, so the dump calls this before it freezes the process.
    /// Returns `None` when compressing (compressed sizes are unknown in
    /// advance) or when the filesystem cannot preallocate or map; the
    /// caller then streams with `begin_data`/`write_data`.
    pub fn map_area(&mut self, len: u64) -> Result<Option<MappedArea>, ImageError> {
        if self.compress || len == 0 || !matches!(self.state, State::Idle) {
            return Ok(None);
        }
        self.pad_to_alignment()?;
        let start = self.pos;
        let (Ok(offset), Ok(ilen), Ok(ulen)) = (
            i64::try_from(start),
            i64::try_from(len),
            usize::try_from(len),
        ) else {
            return Ok(None);
        };
        match nix::fcntl::fallocate(
            &*self.file,
            nix::fcntl::FallocateFlags::empty(),
            offset,
            ilen,
        ) {
            Ok(()) => {}
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => return Ok(None),
            Err(e) => return Err(self.err(e.into())),
        }
        self.preallocated = true;
        // SAFETY: the mapping covers our own temporary file, created O_EXCL
        // (or unnamed, then linked: `spare`) with mode 0600 and reachable
        // by no other name until `finish`, so
        // nothing else truncates or writes it while mapped; the range was
        // just allocated above, so no access can hit a hole past EOF.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(ulen)
                .populate()
                .map_mut(&*self.file)
        };
        let map = match map {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot map the image; streaming instead");
                return Ok(None);
            }
        };
        self.state = State::Mapped;
        Ok(Some(MappedArea { map, start }))
    }

    /// Ends a mapped area: each `(offset, len)` in `blobs` (relative to the
    /// area, in order, 4 KiB-aligned offsets) becomes a blob, and the writer
    /// continues after the last one. The blobs' checksums are computed by
    /// [`ClosedArea::data_refs`], which the dump calls after the process
    /// runs again: checksumming needs the copy, not the process.
    pub fn close_area(
        &mut self,
        area: MappedArea,
        blobs: Vec<(u64, u64)>,
    ) -> Result<ClosedArea, ImageError> {
        if !matches!(self.state, State::Mapped) {
            return Err(ImageError::WriterState {
                reason: "close_area without map_area",
            });
        }
        let mut end = 0u64;
        for &(offset, len) in &blobs {
            if offset
                .checked_add(len)
                .is_none_or(|e| e > area.map.len() as u64)
            {
                return Err(ImageError::WriterState {
                    reason: "blob outside its mapped area",
                });
            }
            end = end.max(offset + len);
        }
        self.pos = area.start + end;
        // Subsequent writes go through the file position.
        (&*self.file)
            .seek(io::SeekFrom::Start(self.pos))
            .map_err(|e| self.err(e))?;
        self.state = State::Idle;
        Ok(ClosedArea {
            map: area.map,
            start: area.start,
            blobs,
        })
    }
}
