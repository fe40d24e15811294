//! Writing an image: blobs are streamed into a temporary file next to the
//! final path, the metadata and header go last, and a rename publishes the
//! complete image atomically.
//!
//! Nothing but a complete image ever appears at the final path, and an image
//! already there stays intact until the rename replaces it: if the writer is
//! dropped before [`ImageWriter::finish`] (an error, a panic), the temporary
//! file is removed.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::error::ImageError;
use super::format::{self, ALIGN, HEADER_SIZE, Header};
use super::model::{Compression, DataRef, Metadata};

mod ahead;
mod area;
mod deferred;
mod dir;
mod patch;
mod spare;

pub use ahead::AllocateAhead;
pub use area::{ClosedArea, MappedArea};
use dir::{create_temp, link_temp, open_dir, remove_stale_temps, split_path};
pub use spare::SpareFile;

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
    /// With `compress`: write blobs uncompressed until
    /// [`ImageWriter::compress_from_now`], so that they can be mapped,
    /// rewritten in place, and written while the process is frozen as fast
    /// as in an uncompressed image; [`ImageWriter::finish_updating`] then
    /// compresses them (see `deferred`).
    pub defer_compression: bool,
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
    /// Whether the blobs written now are compressed.
    compress: bool,
    /// Whether the image is to be compressed (`compress` is false while
    /// compression is deferred).
    compress_image: bool,
    /// Bytes written so far, which is also the file offset of the next
    /// write: the file is only ever appended to (the header is pwritten).
    pos: u64,
    state: State,
    /// Set once the temporary file has been renamed to the final path, after
    /// which there is nothing to clean up.
    published: bool,
    /// The file was extended by `map_area` or `allocate_ahead`; `finish`
    /// cuts it back to what was written.
    preallocated: bool,
    /// The end of the file space known allocated (by `allocate_ahead`, a
    /// spare file's preparation or `allocate_while_waiting`).
    allocated_to: Arc<std::sync::atomic::AtomicU64>,
    /// Whether `allocate_while_waiting` may allocate (it stops at the
    /// filesystem's first refusal).
    allocate_when_waiting: bool,
    keep_previous: u32,
    as_user: Option<crate::creds::UserCreds>,
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

/// A new image's directory, temporary file and its name, and how far a
/// spare file it went into was allocated ahead.
type Opened = (File, Arc<File>, OsString, Option<u64>);

impl ImageWriter {
    /// Starts an image that [`finish`](Self::finish) will put at
    /// `final_path`. The parent directory must exist; an existing regular
    /// file at `final_path` is replaced only when `finish` succeeds.
    pub fn create(final_path: &Path, opts: WriteOptions) -> Result<ImageWriter, ImageError> {
        Self::create_in(final_path, opts, None)
    }

    /// [`create`](Self::create), written into `spare` (made ready for it
    /// beforehand, see `spare`) where it was made in the image's
    /// directory.
    pub fn create_in(
        final_path: &Path,
        opts: WriteOptions,
        spare: Option<SpareFile>,
    ) -> Result<ImageWriter, ImageError> {
        let (dir_path, final_name) = split_path(final_path)?;
        // Whose file rights apply: symbolic links are followed only where
        // nobody else could have planted them (see `open_dir`).
        let acting_uid = match &opts.as_user {
            Some(user) => user.uid,
            None => nix::unistd::geteuid().as_raw(),
        };

        let mut spare = spare;
        let mut open_and_create = || -> Result<Opened, ImageError> {
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
            if let Some((file, allocated)) = spare.take().and_then(|s| s.take_for(&dir)) {
                match link_temp(&dir, &file, &final_name) {
                    Ok(temp_name) => return Ok((dir, file, temp_name, Some(allocated))),
                    Err(e) => tracing::debug!(error = %e, "spare file not used"),
                }
            }
            let (file, temp_name) =
                create_temp(&dir, &final_name).map_err(|e| ImageError::writing(final_path, e))?;
            Ok((dir, Arc::new(file), temp_name, None))
        };
        let (dir, file, temp_name, spare_allocated) = match &opts.as_user {
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
            file,
            compress: opts.compress && !opts.defer_compression,
            compress_image: opts.compress,
            pos: 0,
            state: State::Broken,
            published: false,
            // A spare file is allocated past what the image may need.
            preallocated: spare_allocated.is_some(),
            allocated_to: Arc::new(std::sync::atomic::AtomicU64::new(
                spare_allocated.unwrap_or(0),
            )),
            allocate_when_waiting: true,
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

    /// Bytes written so far: the file offset of the next write.
    pub fn position(&self) -> u64 {
        self.pos
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

    /// Appends `bytes`, whose CRC-32C the caller computed already
    /// (`crc32c`, elsewhere, on another core), to the open blob of an
    /// uncompressed image: the blob's checksum is combined from the parts'
    /// without reading the bytes again.
    pub fn write_checksummed(&mut self, bytes: &[u8], crc32c: u32) -> Result<(), ImageError> {
        let (len, crc) = match &mut self.state {
            State::Blob(Blob::Plain { len, crc, .. }) => (len, crc),
            State::Broken => return Err(broken()),
            _ => {
                return Err(ImageError::WriterState {
                    reason: "write_checksummed outside an uncompressed blob",
                });
            }
        };
        let n = bytes.len() as u64;
        check_blob_len(*len, n)?;
        let (new_len, new_crc) = (*len + n, crate::image::crc::combine(*crc, crc32c, n));
        if let Err(e) = (&*self.file).write_all(bytes) {
            self.state = State::Broken;
            return Err(self.err(e));
        }
        if let State::Blob(Blob::Plain { len, crc, .. }) = &mut self.state {
            (*len, *crc) = (new_len, new_crc);
        }
        self.pos += n;
        crate::progress::add(n);
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

    /// Writes `bytes` as one blob. While compression is deferred, a blob
    /// of at most 64 KiB (a descriptor's buffer) is compressed at once.
    pub fn add_data(&mut self, bytes: &[u8]) -> Result<DataRef, ImageError> {
        if self.compress_image && !self.compress && bytes.len() <= deferred::SMALL_BLOB {
            // A descriptor's buffer (a pipe's 64 KiB) compresses in
            // microseconds: not worth moving again at the end.
            let z = compress_blob(bytes).map_err(|e| self.err(e))?;
            let crc = crc32c::crc32c(&z);
            return self.add_prepared(&z, bytes.len() as u64, crc, Compression::Zstd);
        }
        self.begin_data()?;
        self.write_data(bytes)?;
        self.end_data()
    }

    /// Writes `bytes` as one uncompressed blob, for a caller that will
    /// rewrite parts of it in place ([`rewrite`](Self::rewrite)): refused
    /// by a writer that compresses now.
    pub fn add_plain(&mut self, bytes: &[u8]) -> Result<DataRef, ImageError> {
        if self.compress {
            return Err(ImageError::WriterState {
                reason: "an uncompressed blob asked of a compressing writer",
            });
        }
        self.begin_data()?;
        self.write_data(bytes)?;
        self.end_data()
    }

    /// Whether blobs are zstd-compressed (see [`compress_blob`]).
    pub fn compresses(&self) -> bool {
        self.compress
    }

    /// Writes `bytes` as consecutive blobs, one per piece of `pieces`
    /// (length, a multiple of 4096, and the CRC-32C the caller computed),
    /// which together are `bytes`. In an image stored uncompressed that is
    /// a few large writes instead of one per blob: an increment's pages
    /// are thousands of runs of a page or two, and a write per run took
    /// most of the time spent writing them.
    pub fn add_consecutive(
        &mut self,
        bytes: &[u8],
        pieces: &[(usize, u32)],
    ) -> Result<Vec<DataRef>, ImageError> {
        let total: usize = pieces.iter().map(|p| p.0).sum();
        if total != bytes.len() || pieces.iter().any(|p| !(p.0 as u64).is_multiple_of(ALIGN)) {
            return Err(ImageError::WriterState {
                reason: "consecutive blobs that do not tile their bytes in aligned pieces",
            });
        }
        if self.compress_image {
            let mut refs = Vec::with_capacity(pieces.len());
            let mut at = 0;
            for &(len, _) in pieces {
                refs.push(self.add_data(&bytes[at..at + len])?);
                at += len;
            }
            return Ok(refs);
        }
        self.require_idle("add_consecutive while a blob or mapped area is open")?;
        for &(len, _) in pieces {
            check_blob_len(0, len as u64)?;
        }
        self.state = State::Broken;
        self.pad_to_alignment()?;
        let mut refs = Vec::with_capacity(pieces.len());
        let mut offset = self.pos;
        for &(len, crc32c) in pieces {
            refs.push(DataRef {
                offset,
                stored_len: len as u64,
                raw_len: len as u64,
                crc32c,
                compression: Compression::None,
            });
            offset += len as u64;
        }
        // In pieces of 8 MiB, for the progress shown meanwhile.
        for chunk in bytes.chunks(8 << 20) {
            (&*self.file).write_all(chunk).map_err(|e| self.err(e))?;
            self.pos += chunk.len() as u64;
            crate::progress::add(chunk.len() as u64);
        }
        self.state = State::Idle;
        Ok(refs)
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
        self.require_idle("add_prepared while a blob or mapped area is open")?;
        // While compression is deferred, a blob compressed already may go
        // in beside the plain ones.
        let allowed = match compression {
            Compression::Zstd => self.compress_image,
            Compression::None => !self.compress && stored.len() as u64 == raw_len,
        };
        if !allowed {
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

    /// Writes the metadata and the header, makes the file durable, and
    /// renames it to the final path. Returns the image's size in bytes.
    /// A writer that deferred compression compresses a copy of `meta`'s
    /// blobs first (see [`finish_updating`](Self::finish_updating)).
    pub fn finish(self, meta: &Metadata) -> Result<u64, ImageError> {
        if self.compress_image && deferred::any_plain(meta) {
            let mut meta = meta.clone();
            return self.finish_updating(&mut meta);
        }
        self.seal(meta)
    }

    /// [`finish`](Self::finish), and if compression was deferred, first
    /// every uncompressed blob compressed into a new temporary file (on
    /// every core), `meta`'s references updated to it.
    pub fn finish_updating(mut self, meta: &mut Metadata) -> Result<u64, ImageError> {
        if self.compress_image {
            self.compress_deferred(meta)?;
        }
        self.seal(meta)
    }

    fn seal(mut self, meta: &Metadata) -> Result<u64, ImageError> {
        self.compress = self.compress_image;
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

    /// No blob or mapped area open and no earlier failure: what `doing`
    /// (named in the error) needs.
    fn require_idle(&self, doing: &'static str) -> Result<(), ImageError> {
        match &self.state {
            State::Idle => Ok(()),
            State::Broken => Err(broken()),
            State::Blob(_) | State::Mapped => Err(ImageError::WriterState { reason: doing }),
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
        match nix::unistd::unlinkat(
            &self.dir,
            self.temp_name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            // Gone already (someone removed it): nothing is left behind.
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!(
                "cannot remove temporary file {:?} next to {}: {e}",
                self.temp_name,
                self.final_path.display()
            ),
        }
    }
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
