//! Writing an image: blobs are streamed into a temporary file next to the
//! final path, the metadata and header go last, and a rename publishes the
//! complete image atomically.
//!
//! Nothing but a complete image ever appears at the final path, and an image
//! already there stays intact until the rename replaces it: if the writer is
//! dropped before [`ImageWriter::finish`] (an error, a panic), the temporary
//! file is removed.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::error::ImageError;
use super::format::{self, ALIGN, HEADER_SIZE, Header};
use super::model::{Compression, DataRef, Metadata};

/// zstd level for blobs and metadata. Page data is large and restore speed
/// matters more than the last few percent of size; level 1 compresses at
/// hundreds of MB/s per core and still shrinks typical heaps a lot.
const ZSTD_LEVEL: i32 = 1;

/// `raw` compressed as one blob of a compressing writer (its own zstd
/// frame, with the content size recorded), for [`ImageWriter::add_prepared`].
pub fn compress_blob(raw: &[u8]) -> io::Result<Vec<u8>> {
    zstd::bulk::compress(raw, ZSTD_LEVEL)
}

/// Zeros to pad with; one ALIGN is the most padding ever needed at once.
static ZEROS: [u8; ALIGN as usize] = [0; ALIGN as usize];

/// Distinguishes temporary files of several writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Longest part of the final name kept in the temporary name, so that the
/// temporary name stays under NAME_MAX (255) with its prefix and suffix.
const MAX_NAME_IN_TEMP: usize = 180;

#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// zstd-compress every blob and the metadata.
    pub compress: bool,
    /// uid and gid to give the image file to (e.g. the user who asked for a
    /// dump run as root).
    pub owner: Option<(u32, u32)>,
    /// Keep this many earlier images as `FILE.1` (the newest) … `FILE.N`.
    pub keep_previous: u32,
    /// Create, replace and rotate the image with this user's file rights
    /// rather than ours (see `crate::creds`): a root agent writing for a
    /// user must not reach where the user may not.
    pub as_user: Option<crate::creds::UserCreds>,
}

/// Writes one image; see the module documentation.
pub struct ImageWriter {
    final_path: PathBuf,
    /// The directory of the final path, resolved and opened once (see
    /// `open_dir`): the temporary file is created, renamed, given to its
    /// owner, and (on failure) removed, and earlier images are rotated,
    /// relative to it, so a rename of a path component in the meantime
    /// cannot make us touch another directory.
    dir: File,
    final_name: OsString,
    temp_name: OsString,
    /// Shared with a blob's zstd encoder, which needs to own its output.
    file: Arc<File>,
    compress: bool,
    /// Bytes written so far, which is also the file offset of the next
    /// write: the file is only ever appended to (the header is pwritten).
    pos: u64,
    state: State,
    /// Set once the temporary file has been renamed to the final path, after
    /// which there is nothing to clean up.
    published: bool,
    /// The file was extended by `preallocate`; `finish` cuts it back to
    /// what was written.
    preallocated: bool,
    keep_previous: u32,
    as_user: Option<crate::creds::UserCreds>,
}

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

enum State {
    /// Between blobs.
    Idle,
    /// Inside `begin_data` .. `end_data`.
    Blob(Blob),
    /// A mapped area is out (`map_area`); no other writes until it closes.
    Mapped,
    /// An operation failed midway; the file's content is unknown, so the
    /// writer refuses to go on (dropping it removes the temporary file).
    Broken,
}

enum Blob {
    Plain {
        start: u64,
        len: u64,
        crc: u32,
    },
    Zstd {
        start: u64,
        raw_len: u64,
        encoder: zstd::stream::write::Encoder<'static, StoredOut>,
    },
}

/// Where a zstd encoder writes: the image file, counting and checksumming
/// the compressed bytes on their way.
struct StoredOut {
    file: Arc<File>,
    written: u64,
    crc: u32,
}

impl Write for StoredOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        let done = buf.get(..n).unwrap_or(buf);
        self.crc = crc32c::crc32c_append(self.crc, done);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ImageWriter {
    /// Starts an image that [`finish`](Self::finish) will put at
    /// `final_path`. The parent directory must exist; an existing regular
    /// file at `final_path` is replaced only when `finish` succeeds.
    pub fn create(final_path: &Path, opts: WriteOptions) -> Result<ImageWriter, ImageError> {
        let (dir_path, final_name) = split_path(final_path)?;
        // Whose file rights apply: symbolic links are followed only where
        // nobody else could have planted them (see `open_dir`).
        let acting_uid = match &opts.as_user {
            Some(user) => user.uid,
            None => nix::unistd::geteuid().as_raw(),
        };

        let open_and_create = || -> Result<(File, File, OsString), ImageError> {
            let dir = open_dir(&dir_path, acting_uid).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::NoDirectory {
                    path: final_path.to_path_buf(),
                    dir: dir_path.clone(),
                },
                _ => ImageError::writing(final_path, e),
            })?;
            // Refuse to replace a symlink or a non-file. (`finish` renames
            // over the final name, which replaces a symlink itself rather
            // than following it, so a link planted after this check still
            // cannot redirect the write; the check is there so the user
            // learns about an unexpected link instead of losing it
            // silently.) Looked up in the directory opened above, like
            // everything that follows: the path is never resolved again.
            match nix::sys::stat::fstatat(
                &dir,
                final_name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                    return Err(ImageError::Symlink {
                        path: final_path.to_path_buf(),
                    });
                }
                Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => {
                    return Err(ImageError::NotRegular {
                        path: final_path.to_path_buf(),
                    });
                }
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(ImageError::writing(final_path, e.into())),
            }
            remove_stale_temps(&dir, &final_name);
            let (file, temp_name) =
                create_temp(&dir, &final_name).map_err(|e| ImageError::writing(final_path, e))?;
            Ok((dir, file, temp_name))
        };
        let (dir, file, temp_name) = match &opts.as_user {
            Some(user) => crate::creds::as_user(user, open_and_create)
                .map_err(|e| ImageError::writing(final_path, e))??,
            None => open_and_create()?,
        };
        // From here on the writer owns the temporary file, so any early
        // return below removes it through Drop.
        let mut w = ImageWriter {
            final_path: final_path.to_path_buf(),
            dir,
            final_name,
            temp_name,
            file: Arc::new(file),
            compress: opts.compress,
            pos: 0,
            state: State::Broken,
            published: false,
            preallocated: false,
            keep_previous: opts.keep_previous,
            as_user: opts.as_user.clone(),
        };

        if let Some((uid, gid)) = opts.owner {
            w.chown(uid, gid)?;
        }

        // Reserve the header region; the real header is written last, so a
        // crash midway leaves a file without magic that no reader accepts.
        (&*w.file)
            .write_all(&ZEROS[..HEADER_SIZE])
            .map_err(|e| ImageError::writing(final_path, e))?;
        w.pos = HEADER_SIZE as u64;
        w.state = State::Idle;
        Ok(w)
    }

    /// Give the image to another owner than the one it was created for
    /// (before it is finished: the rename publishes the file as it is).
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<(), ImageError> {
        self.chown(uid, gid)
    }

    fn chown(&self, uid: u32, gid: u32) -> Result<(), ImageError> {
        match nix::unistd::fchown(
            &*self.file,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        ) {
            Ok(()) => Ok(()),
            // Giving the file to ourselves needs no privilege in principle,
            // but some filesystems refuse any chown to non-root; the file is
            // ours already, so that refusal changes nothing.
            Err(Errno::EPERM)
                if uid == nix::unistd::geteuid().as_raw()
                    && gid == nix::unistd::getegid().as_raw() =>
            {
                Ok(())
            }
            Err(e) => Err(ImageError::Chown {
                path: self.final_path.clone(),
                uid,
                gid,
                source: e.into(),
            }),
        }
    }

    /// Starts a blob at the next 4096-aligned offset.
    pub fn begin_data(&mut self) -> Result<(), ImageError> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Idle => {}
            State::Blob(b) => {
                self.state = State::Blob(b);
                return Err(ImageError::WriterState {
                    reason: "begin_data while a blob is open",
                });
            }
            State::Broken => return Err(broken()),
            State::Mapped => {
                self.state = State::Mapped;
                return Err(ImageError::WriterState {
                    reason: "write while a mapped area is open",
                });
            }
        }
        self.pad_to_alignment()?;
        let start = self.pos;
        let blob = if self.compress {
            let out = StoredOut {
                file: Arc::clone(&self.file),
                written: 0,
                crc: 0,
            };
            // Each blob is its own zstd frame so that it decodes alone.
            let encoder =
                zstd::stream::write::Encoder::new(out, ZSTD_LEVEL).map_err(|e| self.err(e))?;
            Blob::Zstd {
                start,
                raw_len: 0,
                encoder,
            }
        } else {
            Blob::Plain {
                start,
                len: 0,
                crc: 0,
            }
        };
        self.state = State::Blob(blob);
        Ok(())
    }

    /// Appends `bytes` to the open blob.
    pub fn write_data(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        let mut blob = match std::mem::replace(&mut self.state, State::Broken) {
            State::Blob(b) => b,
            State::Idle => {
                self.state = State::Idle;
                return Err(ImageError::WriterState {
                    reason: "write_data without begin_data",
                });
            }
            State::Broken => return Err(broken()),
            State::Mapped => {
                self.state = State::Mapped;
                return Err(ImageError::WriterState {
                    reason: "write while a mapped area is open",
                });
            }
        };
        let n = bytes.len() as u64;
        match &mut blob {
            Blob::Plain { len, crc, .. } => {
                check_blob_len(*len, n)?;
                // Straight from the caller's buffer to the file: no copy.
                (&*self.file).write_all(bytes).map_err(|e| self.err(e))?;
                *crc = crc32c::crc32c_append(*crc, bytes);
                *len += n;
                self.pos += n;
            }
            Blob::Zstd {
                raw_len, encoder, ..
            } => {
                check_blob_len(*raw_len, n)?;
                encoder.write_all(bytes).map_err(|e| self.err(e))?;
                *raw_len += n;
            }
        }
        crate::progress::add(n);
        self.state = State::Blob(blob);
        Ok(())
    }

    /// Closes the open blob and says where it lies.
    pub fn end_data(&mut self) -> Result<DataRef, ImageError> {
        let blob = match std::mem::replace(&mut self.state, State::Broken) {
            State::Blob(b) => b,
            State::Idle => {
                self.state = State::Idle;
                return Err(ImageError::WriterState {
                    reason: "end_data without begin_data",
                });
            }
            State::Broken => return Err(broken()),
            State::Mapped => {
                self.state = State::Mapped;
                return Err(ImageError::WriterState {
                    reason: "write while a mapped area is open",
                });
            }
        };
        let r = match blob {
            Blob::Plain { start, len, crc } => DataRef {
                offset: start,
                stored_len: len,
                raw_len: len,
                crc32c: crc,
                compression: Compression::None,
            },
            Blob::Zstd {
                start,
                raw_len,
                encoder,
            } => {
                let out = encoder.finish().map_err(|e| self.err(e))?;
                self.pos += out.written;
                DataRef {
                    offset: start,
                    stored_len: out.written,
                    raw_len,
                    crc32c: out.crc,
                    compression: Compression::Zstd,
                }
            }
        };
        self.state = State::Idle;
        Ok(r)
    }

    /// Writes `bytes` as one blob.
    pub fn add_data(&mut self, bytes: &[u8]) -> Result<DataRef, ImageError> {
        self.begin_data()?;
        self.write_data(bytes)?;
        self.end_data()
    }

    /// Whether blobs are zstd-compressed (see [`compress_blob`]).
    pub fn compresses(&self) -> bool {
        self.compress
    }

    /// Writes one blob prepared elsewhere (the page copy compresses and
    /// checksums on every core; only the write itself is serial): `stored`
    /// as it goes to the file, what it decodes to (`raw_len`), and the
    /// CRC-32C of `stored`. `compression` must be what this writer uses.
    pub fn add_prepared(
        &mut self,
        stored: &[u8],
        raw_len: u64,
        crc32c: u32,
        compression: Compression,
    ) -> Result<DataRef, ImageError> {
        match &self.state {
            State::Idle => {}
            State::Broken => return Err(broken()),
            State::Blob(_) | State::Mapped => {
                return Err(ImageError::WriterState {
                    reason: "add_prepared while a blob or mapped area is open",
                });
            }
        }
        let expected = if self.compress {
            Compression::Zstd
        } else {
            Compression::None
        };
        if compression != expected
            || (compression == Compression::None && stored.len() as u64 != raw_len)
        {
            return Err(ImageError::WriterState {
                reason: "a prepared blob does not match the image's compression",
            });
        }
        check_blob_len(0, raw_len)?;
        self.state = State::Broken;
        self.pad_to_alignment()?;
        let offset = self.pos;
        (&*self.file).write_all(stored).map_err(|e| self.err(e))?;
        self.pos += stored.len() as u64;
        self.state = State::Idle;
        crate::progress::add(raw_len);
        Ok(DataRef {
            offset,
            stored_len: stored.len() as u64,
            raw_len,
            crc32c,
            compression,
        })
    }

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
        // with mode 0600 and reachable by no other name until `finish`, so
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

    /// Writes the metadata and the header, makes the file durable, and
    /// renames it to the final path. Returns the image's size in bytes.
    pub fn finish(mut self, meta: &Metadata) -> Result<u64, ImageError> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Idle => {}
            State::Blob(_) => {
                return Err(ImageError::WriterState {
                    reason: "finish while a blob is open",
                });
            }
            State::Broken => return Err(broken()),
            State::Mapped => {
                self.state = State::Mapped;
                return Err(ImageError::WriterState {
                    reason: "write while a mapped area is open",
                });
            }
        }
        let data_offset = HEADER_SIZE as u64;
        let data_len = self.pos - data_offset;

        let mut raw = Vec::new();
        ciborium::into_writer(meta, &mut raw).map_err(|e| ImageError::Encode {
            section: "metadata".into(),
            reason: super::error::one_line(&e.to_string()).into_owned(),
        })?;
        let meta_raw_len = raw.len() as u64;
        if meta_raw_len > format::MAX_META_RAW_LEN {
            return Err(ImageError::Encode {
                section: "metadata".into(),
                reason: format!(
                    "{meta_raw_len} bytes is over the limit of {} MiB (a tree of too many threads or mappings)",
                    format::MAX_META_RAW_LEN >> 20
                ),
            });
        }
        let (stored, meta_compression) = if self.compress {
            // Bulk compression records the content size in the frame, which
            // lets the reader reject a lying header before allocating.
            let z = zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(|e| self.err(e))?;
            (z, Compression::Zstd)
        } else {
            (raw, Compression::None)
        };

        self.pad_to_alignment()?;
        let meta_offset = self.pos;
        (&*self.file).write_all(&stored).map_err(|e| self.err(e))?;
        let meta_len = stored.len() as u64;
        self.pos += meta_len;

        if self.preallocated {
            // Drop the reserved space the data did not use.
            self.file.set_len(self.pos).map_err(|e| self.err(e))?;
        }
        let header = Header {
            format_version: format::FORMAT_VERSION,
            flags: 0,
            meta_offset,
            meta_len,
            meta_raw_len,
            meta_crc32c: crc32c::crc32c(&stored),
            meta_compression,
            data_offset,
            data_len,
        };
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| self.err(e))?;
        // Durable content before the rename: otherwise a crash could leave
        // the final name pointing at a file whose blocks never hit the disk.
        self.file.sync_all().map_err(|e| self.err(e))?;

        let publish = || {
            self.rotate_generations();
            nix::fcntl::renameat(
                &self.dir,
                self.temp_name.as_os_str(),
                &self.dir,
                self.final_name.as_os_str(),
            )
        };
        let renamed = match &self.as_user {
            Some(user) => crate::creds::as_user(user, publish).map_err(|e| self.err(e))?,
            None => publish(),
        };
        renamed.map_err(|e| self.err(e.into()))?;
        self.published = true;
        // Make the rename itself durable. Some filesystems cannot fsync a
        // directory (EINVAL); the image is in place regardless.
        match self.dir.sync_all() {
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(self.err(e)),
            _ => {}
        }
        Ok(self.pos)
    }

    /// Shift `FILE.1..` up by one and hard-link the current `FILE` as
    /// `FILE.1`, so the rename that follows replaces `FILE` while its
    /// previous content stays reachable. Best effort: losing an old
    /// generation must not lose the new checkpoint.
    fn rotate_generations(&self) {
        if self.keep_previous == 0 {
            return;
        }
        let generation = |n: u32| {
            let mut name = self.final_name.clone();
            name.push(format!(".{n}"));
            name
        };
        for n in (1..self.keep_previous).rev() {
            let _ = nix::fcntl::renameat(
                &self.dir,
                generation(n).as_os_str(),
                &self.dir,
                generation(n + 1).as_os_str(),
            );
        }
        let _ = nix::unistd::unlinkat(
            &self.dir,
            generation(1).as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        if let Err(e) = nix::unistd::linkat(
            &self.dir,
            self.final_name.as_os_str(),
            &self.dir,
            generation(1).as_os_str(),
            nix::fcntl::AtFlags::empty(),
        ) && e != Errno::ENOENT
        {
            tracing::warn!(error = %e, "could not keep the previous image");
        }
    }

    /// Pads the file with zeros up to the next multiple of ALIGN.
    fn pad_to_alignment(&mut self) -> Result<(), ImageError> {
        let target = format::align_up(self.pos).ok_or_else(broken)?;
        let pad = (target - self.pos) as usize;
        if pad > 0 {
            let zeros = ZEROS.get(..pad).ok_or_else(broken)?;
            (&*self.file).write_all(zeros).map_err(|e| self.err(e))?;
            self.pos = target;
        }
        Ok(())
    }

    fn err(&self, e: io::Error) -> ImageError {
        ImageError::writing(&self.final_path, e)
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if let Err(e) = nix::unistd::unlinkat(
            &self.dir,
            self.temp_name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            tracing::warn!(
                "cannot remove temporary file {:?} next to {}: {e}",
                self.temp_name,
                self.final_path.display()
            );
        }
    }
}

/// The directory to create the image in and the image's name there.
fn split_path(final_path: &Path) -> Result<(PathBuf, OsString), ImageError> {
    // `file_name` is None for "/", "..", "x/..": no file to create.
    let Some(name) = final_path.file_name() else {
        return Err(ImageError::InvalidPath {
            path: final_path.to_path_buf(),
        });
    };
    let dir = match final_path.parent() {
        // A bare name ("img") has an empty parent: the current directory.
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_os_string()))
}

fn broken() -> ImageError {
    ImageError::WriterState {
        reason: "an earlier error left the image unusable; start a new one",
    }
}

fn check_blob_len(have: u64, more: u64) -> Result<(), ImageError> {
    match have.checked_add(more) {
        Some(total) if total <= format::MAX_BLOB_RAW_LEN => Ok(()),
        _ => Err(ImageError::Encode {
            section: "data".into(),
            reason: "a blob may hold at most 64 GiB; split it".into(),
        }),
    }
}

/// Removes temporary files of earlier dumps to the same name whose writer
/// died without cleaning up (SIGKILL, power loss): `.<name>.chpox-tmp.<pid>.*`
/// where no process `<pid>` exists any more. Best effort; a failure here
/// never fails the dump. Lists and unlinks in `dir` itself, never by path.
fn remove_stale_temps(dir: &File, final_name: &OsStr) {
    let name_bytes = final_name.as_bytes();
    let short = name_bytes.get(..MAX_NAME_IN_TEMP).unwrap_or(name_bytes);
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(short);
    prefix.extend_from_slice(b".chpox-tmp.");
    let Ok(mut listing) = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let names: Vec<OsString> = listing
        .iter()
        .flatten()
        .map(|entry| OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string())
        .filter(|name| name.as_bytes().starts_with(&prefix))
        .collect();
    for name in names {
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let pid = rest
            .split(|&b| b == b'.')
            .next()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if nix::unistd::unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
            tracing::info!(file = ?name, "removed a temporary file left by an interrupted dump");
        }
    }
}

/// Most symbolic links followed while resolving one path (the kernel's
/// MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// Opens the directory `path` to write an image in, as `acting_uid` (the
/// caller's file identity), one component at a time, and follows a
/// symbolic link only where nobody but `acting_uid` and root could have put
/// it there ([`may_follow`]).
///
/// Root writing a user's image under a directory that user controls must
/// not be led elsewhere (`/etc`) by a link the user swaps in for a path
/// component between registration and checkpoint. Every step opens one
/// name relative to the directory reached so far, with `O_NOFOLLOW`, and
/// the link's own target is walked the same way, so each directory is the
/// one the previous step found; the caller then acts only relative to the
/// descriptor returned.
fn open_dir(path: &Path, acting_uid: u32) -> io::Result<File> {
    use std::collections::VecDeque;
    use std::os::unix::ffi::OsStringExt as _;
    use std::path::Component;

    let open_start = |p: &str| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(p)
    };
    let push = |queue: &mut VecDeque<OsString>, p: &Path, front: bool| -> bool {
        let mut names: Vec<OsString> = Vec::new();
        let mut absolute = false;
        for c in p.components() {
            match c {
                Component::RootDir => absolute = true,
                Component::ParentDir => names.push("..".into()),
                Component::Normal(n) => names.push(n.to_os_string()),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
        if front {
            for n in names.into_iter().rev() {
                queue.push_front(n);
            }
        } else {
            queue.extend(names);
        }
        absolute
    };

    let mut queue = VecDeque::new();
    let mut cur = if push(&mut queue, path, false) {
        open_start("/")?
    } else {
        open_start(".")?
    };
    // The path walked so far, for messages.
    let mut shown = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        PathBuf::from(".")
    };
    let mut links = 0u32;
    while let Some(name) = queue.pop_front() {
        let next = File::from(nix::fcntl::openat(
            &cur,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?);
        let st = nix::sys::stat::fstat(&next)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                cur = next;
                shown.push(&name);
            }
            libc::S_IFLNK => {
                let dir = nix::sys::stat::fstat(&cur)?;
                shown.push(&name);
                if let Err(why) = may_follow(&dir, &st, acting_uid) {
                    return Err(io::Error::other(format!(
                        "{} is a symbolic link in a directory {why}; chpox does not follow it \
                         (a link there may be changed to point anywhere): name the real directory",
                        shown.display()
                    )));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno::ELOOP.into());
                }
                // Empty name: the link this O_PATH descriptor is open on.
                let target = nix::fcntl::readlinkat(&next, "")?;
                let target = PathBuf::from(OsString::from_vec(target.into_vec()));
                shown.pop();
                if push(&mut queue, &target, true) {
                    cur = open_start("/")?;
                    shown = PathBuf::from("/");
                }
            }
            _ => return Err(Errno::ENOTDIR.into()),
        }
    }
    Ok(File::from(nix::fcntl::openat(
        &cur,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?))
}

/// Whether a symbolic link `link` in directory `dir` may be followed by
/// `acting_uid`: only if nobody else could have put it there or replaced
/// it. The directory must belong to root or to `acting_uid` and be
/// writable by nobody else; in a sticky directory others may write to
/// (`/tmp`), the link must belong to `acting_uid` or to the directory's
/// owner, whose entries others cannot replace (the kernel's own rule for
/// `fs.protected_symlinks`). Otherwise says who controls the directory.
fn may_follow(
    dir: &nix::sys::stat::FileStat,
    link: &nix::sys::stat::FileStat,
    acting_uid: u32,
) -> Result<(), String> {
    if dir.st_uid != 0 && dir.st_uid != acting_uid {
        return Err(format!("uid {} controls", dir.st_uid));
    }
    if dir.st_mode & 0o022 == 0 {
        return Ok(());
    }
    if dir.st_mode & libc::S_ISVTX != 0 && (link.st_uid == acting_uid || link.st_uid == dir.st_uid)
    {
        return Ok(());
    }
    Err(format!(
        "others may write to, owned by uid {} (the link by uid {})",
        dir.st_uid, link.st_uid
    ))
}

/// Creates `.<name>.chpox-tmp.<pid>.<n>` in `dir`.
///
/// O_EXCL|O_NOFOLLOW: an existing file or a link planted under the temporary
/// name makes the open fail instead of redirecting our writes; we then try
/// the next name.
fn create_temp(dir: &File, final_name: &OsStr) -> io::Result<(File, OsString)> {
    let name_bytes = final_name.as_bytes();
    let short = name_bytes.get(..MAX_NAME_IN_TEMP).unwrap_or(name_bytes);
    let pid = std::process::id();
    let mut last_err = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..64 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp = b".".to_vec();
        temp.extend_from_slice(short);
        temp.extend_from_slice(format!(".chpox-tmp.{pid}.{n}").as_bytes());
        let temp = OsString::from_vec(temp);
        match nix::fcntl::openat(
            dir,
            temp.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((File::from(fd), temp)),
            Err(Errno::EEXIST) => last_err = Errno::EEXIST.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_paths() {
        let split = |p: &str| split_path(Path::new(p)).ok();
        assert_eq!(split("img"), Some((".".into(), "img".into())));
        assert_eq!(split("./img"), Some((".".into(), "img".into())));
        assert_eq!(split("/a/b/img"), Some(("/a/b".into(), "img".into())));
        assert_eq!(split("/img"), Some(("/".into(), "img".into())));
        assert_eq!(split("/"), None);
        assert_eq!(split("a/.."), None);
    }

    fn same_dir(a: &File, b: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (a.metadata().unwrap(), std::fs::metadata(b).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    #[test]
    fn links_where_only_we_write_are_followed() {
        let me = nix::unistd::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir_all(real.join("deeper")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("real/deeper/..", tmp.path().join("rel")).unwrap();
        std::os::unix::fs::symlink("loop", tmp.path().join("loop")).unwrap();
        for via in ["abs", "rel", "abs/deeper/..", "./rel/."] {
            let dir = open_dir(&tmp.path().join(via), me).unwrap();
            assert!(same_dir(&dir, &real), "{via}");
        }
        let e = open_dir(&tmp.path().join("loop"), me).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let e = open_dir(&tmp.path().join("file"), me).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        let e = open_dir(&tmp.path().join("none"), me).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn links_others_could_have_planted_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return; // giving files to another uid needs root
        }
        let nobody = 65534;
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let dir_with_link = |name: &str, mode: u32, owner: u32, link_owner: u32| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
            std::os::unix::fs::symlink(&real, d.join("link")).unwrap();
            std::os::unix::fs::lchown(d.join("link"), Some(link_owner), Some(link_owner)).unwrap();
            d.join("link")
        };
        // Another user's directory: refused to root, followed for its owner.
        let theirs = dir_with_link("theirs", 0o755, nobody, 0);
        let e = open_dir(&theirs.join("."), 0).unwrap_err();
        assert!(e.to_string().contains("uid 65534 controls"), "{e}");
        assert!(e.to_string().contains("theirs/link"), "{e}");
        assert!(same_dir(&open_dir(&theirs, nobody).unwrap(), &real));
        // Root's directory others may write to, not sticky: refused.
        let open = dir_with_link("open", 0o777, 0, 0);
        let e = open_dir(&open, 0).unwrap_err();
        assert!(e.to_string().contains("others may write"), "{e}");
        // Sticky (/tmp): a link of the directory's owner or our own is
        // followed, another user's is not.
        let sticky_root = dir_with_link("sticky-root", 0o1777, 0, 0);
        assert!(same_dir(&open_dir(&sticky_root, 0).unwrap(), &real));
        let sticky_theirs = dir_with_link("sticky-theirs", 0o1777, 0, nobody);
        assert!(open_dir(&sticky_theirs, 0).is_err());
        assert!(same_dir(&open_dir(&sticky_theirs, nobody).unwrap(), &real));
        // A real directory under another user's is fine: only links are
        // refused.
        let plain = tmp.path().join("theirs/plain");
        std::fs::create_dir(&plain).unwrap();
        assert!(same_dir(&open_dir(&plain, 0).unwrap(), &plain));
    }

    #[test]
    fn temp_name_fits_name_max() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let long = OsString::from("x".repeat(255));
        let (_f, name) = create_temp(&d, &long).unwrap();
        assert!(name.len() <= 255, "{}", name.len());
        assert!(name.as_bytes().starts_with(b".xxx"));
    }
}
