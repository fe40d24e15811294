//! Deferred compression: a compressed image whose blobs are first written
//! uncompressed, then compressed into a second temporary file once the
//! processes run again.
//!
//! A dump that leaves its processes running freezes them only while it
//! reads what it cannot read later. A pre-copy writes their pages into the
//! image beforehand and, after the freeze, writes the pages changed
//! meanwhile over their earlier copies in place; pages copied while frozen
//! (shared memory, a process that cannot be snapshotted) are copied into a
//! mapping of the file. Both need the bytes of a blob at a known place, and
//! the second must not wait for a compressor. So such a dump writes its
//! image uncompressed into the writer's temporary file, and at the end,
//! with the processes running, [`ImageWriter::finish_updating`] compresses
//! every uncompressed blob into a new temporary file in the same directory
//! (blobs compressed already are copied as they are), on every core, one
//! zstd frame per blob, and updates the metadata's references: the image
//! published is the same as a directly compressed one. It needs, for a
//! while, the uncompressed size in the image's directory; the first file's
//! space is given back blob by blob as it is compressed (hole punching),
//! and the file is removed before the rename, on success and on failure
//! alike (the writer's own temporary file is removed by its `Drop`).
//!
//! A process to be killed must not wait for the compressor either, but it
//! may die only once its image is durable: [`ImageWriter::finish_durable_first`]
//! publishes the uncompressed image, lets the caller kill, then replaces
//! the image with its compressed copy.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use nix::unistd::UnlinkatFlags;

use super::dir::create_temp;
use super::{ImageWriter, State, ZEROS, ZSTD_LEVEL, compress_blob};
use crate::image::error::ImageError;
use crate::image::format::HEADER_SIZE;
use crate::image::model::{Compression, DataRef, Metadata};
use crate::image::reader::{all_refs, for_each_ref_mut};

/// `add_data` compresses blobs up to this size at once even while
/// compression is deferred.
pub(super) const SMALL_BLOB: usize = 64 << 10;

/// Uncompressed blobs are read and compressed in pieces of this size; a
/// blob up to this size (every page run: see `pagecopy::CHUNK_PAGES`) is
/// compressed in one go, as the page copy does.
const PIECE: usize = 8 << 20;

/// Whether `meta` refers to an uncompressed blob.
pub(super) fn any_plain(meta: &Metadata) -> bool {
    all_refs(meta)
        .iter()
        .any(|r| r.compression == Compression::None)
}

/// How many blobs workers may compress ahead of the one being written
/// (per worker): a long blob on one worker must not let the others fill
/// memory with what cannot be written before it.
const AHEAD_PER_WORKER: usize = 2;

/// Uncompressed blobs written so far, which workers wait on to go ahead.
#[derive(Default)]
struct Progress {
    written: Mutex<usize>,
    moved: Condvar,
}

/// A blob compressed by a worker, to be written in order.
struct Compressed {
    index: usize,
    result: Result<(Vec<u8>, u32), ImageError>,
}

impl ImageWriter {
    /// From now on blobs are compressed as they are written (the bytes
    /// written so far stay uncompressed until `finish_updating`).
    pub fn compress_from_now(&mut self) {
        self.compress = self.compress_image;
    }

    /// Every blob `meta` refers to, uncompressed ones compressed, into a
    /// new temporary file that replaces the one written so far. Nothing to
    /// do if every blob is compressed already.
    pub(super) fn compress_deferred(&mut self, meta: &mut Metadata) -> Result<(), ImageError> {
        self.require_idle("finish while a blob or mapped area is open")?;
        let refs = all_refs(meta);
        let plain_bytes: u64 = refs
            .iter()
            .filter(|r| r.compression == Compression::None)
            .map(|r| r.stored_len)
            .sum();
        if !refs.iter().any(|r| r.compression == Compression::None) {
            self.compress = true;
            return Ok(());
        }
        let started = std::time::Instant::now();
        // Broken until the new file is complete: an error on the way
        // leaves a writer that only removes its temporary file.
        self.state = State::Broken;
        let (new_file, new_name) = match &self.as_user {
            Some(user) => crate::creds::as_user(user, || create_temp(&self.dir, &self.final_name))
                .and_then(|r| r),
            None => create_temp(&self.dir, &self.final_name),
        }
        .map_err(|e| self.err(e))?;
        // From here on the new file is the writer's (removed by its Drop on
        // failure) and the old one is removed when `old` goes, whatever
        // happens.
        let old_file = std::mem::replace(&mut self.file, Arc::new(new_file));
        let old_name = std::mem::replace(&mut self.temp_name, new_name);
        let _old = RemoveOnDrop {
            dir: self.dir.try_clone().map_err(|e| self.err(e))?,
            name: old_name,
        };
        // The same owner as the first file (root's dump of a user's
        // process gives the image to the user).
        let st = nix::sys::stat::fstat(&*old_file).map_err(|e| self.err(e.into()))?;
        self.chown(st.st_uid, st.st_gid)?;
        (&*self.file)
            .write_all(&ZEROS[..HEADER_SIZE])
            .map_err(|e| self.err(e))?;
        self.pos = HEADER_SIZE as u64;
        self.preallocated = false;
        self.allocated_to = Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.compress = true;
        self.state = State::Idle;

        let moved = self.move_blobs(&old_file, &refs, true)?;
        tracing::debug!(
            blobs = refs.len(),
            plain_bytes,
            stored_bytes = self.pos,
            us = started.elapsed().as_micros() as u64,
            "deferred compression done"
        );
        let mut moved = moved.into_iter();
        for_each_ref_mut(meta, |r| {
            *r = moved.next().ok_or(ImageError::WriterState {
                reason: "the metadata changed while its blobs were compressed",
            })?;
            Ok(())
        })
    }

    /// Writes `refs` of `old` into this writer's file in order: the
    /// uncompressed ones compressed by workers on every core, the others
    /// copied. Returns where each went.
    /// With `punch`, the space of each blob compressed is given back.
    fn move_blobs(
        &mut self,
        old: &File,
        refs: &[DataRef],
        punch: bool,
    ) -> Result<Vec<DataRef>, ImageError> {
        let plain: Vec<usize> = (0..refs.len())
            .filter(|&i| refs[i].compression == Compression::None)
            .collect();
        // Unless two references share bytes (none of our writers makes
        // such, but a hole punched under another blob would lose its
        // bytes).
        let punch = punch && no_overlaps(refs);
        if !punch {
            tracing::debug!(
                "blobs share bytes: the uncompressed image is kept whole until the end"
            );
        }
        // Read through a mapping: the compressor reads the page cache
        // itself, no copy into a buffer first.
        // SAFETY: `old` is our own temporary file (O_EXCL, mode 0600, its
        // name known to no one else), which nothing truncates while it is
        // mapped; holes punched in it read back as zeros, never fault.
        let map = unsafe { memmap2::Mmap::map(old) }.ok();
        let source = match &map {
            Some(m) => Source::Mapped(m),
            None => Source::File(old),
        };
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8)
            .min(plain.len());
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let progress = Progress::default();
        let ahead = AHEAD_PER_WORKER * workers;
        let (tx, rx) = mpsc::sync_channel::<Compressed>(ahead);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let tx = tx.clone();
                let (next, abort, plain, progress, source) =
                    (&next, &abort, &plain, &progress, &source);
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    while !abort.load(Ordering::Relaxed) {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&index) = plain.get(k) else {
                            break;
                        };
                        if !progress.wait_until(k, ahead, abort) {
                            break;
                        }
                        let r = &refs[index];
                        let result = compress_from(source, r, &mut buf);
                        if result.is_ok() && punch {
                            punch_hole(old, r);
                        }
                        if tx.send(Compressed { index, result }).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let result = self.write_in_order(old, refs, rx, &progress);
            progress.give_up(&abort);
            result
        })
    }

    /// The writer's half of [`move_blobs`](Self::move_blobs). Dropping
    /// `rx` (on return) stops the workers.
    fn write_in_order(
        &mut self,
        old: &File,
        refs: &[DataRef],
        rx: mpsc::Receiver<Compressed>,
        progress: &Progress,
    ) -> Result<Vec<DataRef>, ImageError> {
        let mut out = Vec::with_capacity(refs.len());
        let mut early: BTreeMap<usize, Result<(Vec<u8>, u32), ImageError>> = BTreeMap::new();
        for (index, r) in refs.iter().enumerate() {
            if r.compression != Compression::None {
                out.push(self.copy_stored(old, r)?);
                crate::progress::add(r.raw_len);
                continue;
            }
            let result = loop {
                if let Some(done) = early.remove(&index) {
                    break done;
                }
                let c = rx.recv().map_err(|_| ImageError::WriterState {
                    reason: "internal: a compression worker stopped",
                })?;
                early.insert(c.index, c.result);
            };
            let (stored, crc) = result?;
            out.push(self.append(&stored, r.raw_len, crc, Compression::Zstd)?);
            // The image's bytes pass twice (written, then compressed): a
            // compressed dump's progress counts both passes.
            crate::progress::add(r.raw_len);
            progress.one_more();
        }
        Ok(out)
    }

    /// Appends `stored` as a blob (its progress is counted by the caller).
    fn append(
        &mut self,
        stored: &[u8],
        raw_len: u64,
        crc32c: u32,
        compression: Compression,
    ) -> Result<DataRef, ImageError> {
        self.state = State::Broken;
        self.pad_to_alignment()?;
        let offset = self.pos;
        (&*self.file).write_all(stored).map_err(|e| self.err(e))?;
        self.pos += stored.len() as u64;
        self.state = State::Idle;
        Ok(DataRef {
            offset,
            stored_len: stored.len() as u64,
            raw_len,
            crc32c,
            compression,
        })
    }

    /// Copies blob `r` of `old` as it is stored, checking its checksum.
    fn copy_stored(&mut self, old: &File, r: &DataRef) -> Result<DataRef, ImageError> {
        self.state = State::Broken;
        self.pad_to_alignment()?;
        let offset = self.pos;
        let mut buf = vec![0u8; (r.stored_len as usize).min(PIECE)];
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < r.stored_len {
            let n = (r.stored_len - done).min(buf.len() as u64) as usize;
            let piece = &mut buf[..n];
            old.read_exact_at(piece, r.offset + done)
                .map_err(|e| self.err(e))?;
            crc = crc32c::crc32c_append(crc, piece);
            (&*self.file).write_all(piece).map_err(|e| self.err(e))?;
            done += n as u64;
        }
        if crc != r.crc32c {
            return Err(changed());
        }
        self.pos += r.stored_len;
        self.state = State::Idle;
        Ok(DataRef { offset, ..*r })
    }
}

impl Progress {
    /// Waits until the `k`th uncompressed blob is fewer than `ahead` past
    /// the ones written; false if the move was given up meanwhile.
    fn wait_until(&self, k: usize, ahead: usize, abort: &AtomicBool) -> bool {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        while k >= *written + ahead {
            if abort.load(Ordering::Relaxed) {
                return false;
            }
            written = self.moved.wait(written).unwrap_or_else(|e| e.into_inner());
        }
        true
    }

    /// Stops the workers, waiting or not (under the lock, so that none
    /// misses the news between its look and its wait).
    fn give_up(&self, abort: &AtomicBool) {
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        abort.store(true, Ordering::Relaxed);
        drop(written);
        self.moved.notify_all();
    }

    fn one_more(&self) {
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.moved.notify_all();
    }
}

/// Where the uncompressed blobs are read from.
enum Source<'a> {
    Mapped(&'a [u8]),
    File(&'a File),
}

impl Source<'_> {
    /// `len` bytes at `offset`, from the mapping or read into `buf`.
    fn piece<'b>(
        &'b self,
        offset: u64,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], ImageError> {
        match self {
            Source::Mapped(map) => usize::try_from(offset)
                .ok()
                .and_then(|o| map.get(o..o.checked_add(len)?))
                .ok_or(ImageError::WriterState {
                    reason: "internal: a blob lies past the end of the image",
                }),
            Source::File(file) => {
                buf.resize(len, 0);
                file.read_exact_at(buf, offset)
                    .map_err(|_| ImageError::WriterState {
                        reason: "cannot read back the uncompressed image",
                    })?;
                Ok(buf)
            }
        }
    }
}

impl ImageWriter {
    /// For a process killed once its image is durable: a writer that
    /// deferred compression publishes the image uncompressed first (the
    /// usual way, previous images rotated), calls `durable`, then writes
    /// the compressed image beside it and renames it over the uncompressed
    /// one (no second rotation), `meta` updated. Should that fail, the
    /// uncompressed image stays, with a warning: it is complete, and the
    /// process is gone. Otherwise as [`finish`](Self::finish), then
    /// `durable`.
    pub fn finish_durable_first(
        self,
        meta: &mut Metadata,
        durable: &mut dyn FnMut(),
    ) -> Result<u64, ImageError> {
        if !self.compress_image || !any_plain(meta) {
            let bytes = self.seal(meta)?;
            durable();
            return Ok(bytes);
        }
        // Blobs stay plain; the metadata is compressed as in any
        // compressed image.
        let plain = Arc::clone(&self.file);
        let final_path = self.final_path.clone();
        let as_user = self.as_user.clone();
        let st = nix::sys::stat::fstat(&*plain).map_err(|e| self.err(e.into()))?;
        let bytes = self.seal(meta)?;
        durable();
        let started = std::time::Instant::now();
        match compress_published(&plain, &final_path, as_user, (st.st_uid, st.st_gid), meta) {
            Ok((compressed, moved)) => {
                tracing::debug!(
                    us = started.elapsed().as_micros() as u64,
                    "published image compressed"
                );
                *meta = moved;
                Ok(compressed)
            }
            Err(e) => {
                tracing::warn!(
                    image = %final_path.display(),
                    error = %e,
                    "the image is complete but stays uncompressed"
                );
                Ok(bytes)
            }
        }
    }
}

/// The published uncompressed image `plain` (at `final_path`, described by
/// `meta`) compressed into a new one that replaces it. Returns its size and
/// metadata; on failure nothing changed (the new temporary file goes).
fn compress_published(
    plain: &File,
    final_path: &std::path::Path,
    as_user: Option<crate::creds::UserCreds>,
    owner: (u32, u32),
    meta: &Metadata,
) -> Result<(u64, Metadata), ImageError> {
    let mut w = ImageWriter::create(
        final_path,
        super::WriteOptions {
            compress: true,
            owner: Some(owner),
            keep_previous: 0,
            as_user,
            defer_compression: false,
        },
    )?;
    // Never punched: the published image must stay whole until replaced.
    let moved = w.move_blobs(plain, &all_refs(meta), false)?;
    let mut meta = meta.clone();
    let mut moved = moved.into_iter();
    for_each_ref_mut(&mut meta, |r| {
        *r = moved.next().ok_or(ImageError::WriterState {
            reason: "the metadata changed while its blobs were compressed",
        })?;
        Ok(())
    })?;
    let bytes = w.seal(&meta)?;
    Ok((bytes, meta))
}

/// Blob `r` (uncompressed) of `source`, checked against its checksum and
/// compressed as one zstd frame: the stored bytes and their CRC-32C.
/// `buf` is the worker's, kept from one blob to the next.
fn compress_from(
    source: &Source<'_>,
    r: &DataRef,
    buf: &mut Vec<u8>,
) -> Result<(Vec<u8>, u32), ImageError> {
    let zstd_err = |_| ImageError::WriterState {
        reason: "zstd could not compress a blob",
    };
    let len = r.stored_len;
    let stored = if len <= PIECE as u64 {
        let raw = source.piece(r.offset, len as usize, buf)?;
        if crc32c::crc32c(raw) != r.crc32c {
            return Err(changed());
        }
        compress_blob(raw).map_err(zstd_err)?
    } else {
        // A long blob (an embedded file) in pieces, into one frame that
        // records its size as a bulk compression does.
        let mut enc =
            zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(zstd_err)?;
        enc.set_pledged_src_size(Some(len)).map_err(zstd_err)?;
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            let raw = source.piece(r.offset + done, n, buf)?;
            crc = crc32c::crc32c_append(crc, raw);
            enc.write_all(raw).map_err(zstd_err)?;
            done += n as u64;
        }
        if crc != r.crc32c {
            return Err(changed());
        }
        enc.finish().map_err(zstd_err)?
    };
    let crc = crc32c::crc32c(&stored);
    Ok((stored, crc))
}

fn changed() -> ImageError {
    ImageError::WriterState {
        reason: "internal: a blob no longer matches its checksum before compression",
    }
}

/// Whether no two of `refs` share a byte of the file.
fn no_overlaps(refs: &[DataRef]) -> bool {
    let mut spans: Vec<(u64, u64)> = refs
        .iter()
        .map(|r| (r.offset, r.offset.saturating_add(r.stored_len)))
        .collect();
    spans.sort_unstable();
    spans.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// Gives the space of blob `r` of `old` back to the filesystem (best
/// effort: a filesystem without holes keeps it until the file goes). Blobs
/// start on 4 KiB boundaries and no other blob shares their last page.
fn punch_hole(old: &File, r: &DataRef) {
    let len = r.stored_len.div_ceil(4096) * 4096;
    if let (Ok(offset), Ok(len)) = (i64::try_from(r.offset), i64::try_from(len)) {
        let _ = nix::fcntl::fallocate(
            old,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
    }
}

/// A temporary file of ours, removed from its directory when this goes.
struct RemoveOnDrop {
    dir: File,
    name: std::ffi::OsString,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match nix::unistd::unlinkat(&self.dir, self.name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            // Gone already (someone removed it): nothing is left behind.
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!("cannot remove temporary file {:?}: {e}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read through the mapping or from the file, short or long, a blob
    /// compresses to the same frame; a changed byte is caught.
    #[test]
    fn both_sources_compress_alike() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs");
        let data: Vec<u8> = (0..(PIECE + 12345) as u64 * 2)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8 & 0x0f)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: a file of this test's own, not changed while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        for (offset, len) in [
            (0u64, 4096u64),
            (4096, PIECE as u64),
            (8192, PIECE as u64 + 9999),
        ] {
            let raw = &data[offset as usize..(offset + len) as usize];
            let r = DataRef {
                offset,
                stored_len: len,
                raw_len: len,
                crc32c: crc32c::crc32c(raw),
                compression: Compression::None,
            };
            let mut buf = Vec::new();
            let (a, crc_a) = compress_from(&Source::Mapped(&map), &r, &mut buf).unwrap();
            let (b, crc_b) = compress_from(&Source::File(&file), &r, &mut buf).unwrap();
            assert_eq!((&a, crc_a), (&b, crc_b));
            assert_eq!(crc_a, crc32c::crc32c(&a));
            assert!(a.len() < raw.len() / 2);
            assert_eq!(zstd::stream::decode_all(&a[..]).unwrap(), raw);
            let bad = DataRef {
                crc32c: r.crc32c ^ 1,
                ..r
            };
            assert!(compress_from(&Source::File(&file), &bad, &mut buf).is_err());
        }
        let past = DataRef {
            offset: data.len() as u64,
            stored_len: 4096,
            raw_len: 4096,
            crc32c: 0,
            compression: Compression::None,
        };
        assert!(compress_from(&Source::Mapped(&map), &past, &mut Vec::new()).is_err());
        assert!(compress_from(&Source::File(&file), &past, &mut Vec::new()).is_err());
    }
}
