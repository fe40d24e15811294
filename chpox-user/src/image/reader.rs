//! Reading an image.
//!
//! `open` checks everything that can be checked without touching the bulk
//! data: the header, the metadata's checksum and decoding, and that every
//! `DataRef` the metadata holds lies inside the data area and the file. After
//! that, no read can go out of bounds, and each blob is checked (checksum,
//! decompressed size) as it is read.
//!
//! Nothing the file contains may make the reader panic or allocate without
//! bound: sizes are checked against the file size and fixed limits before
//! any allocation, and allocations use `try_reserve` so that an absurd but
//! in-limit size is an error, not an abort. The metadata is decompressed
//! within [`format::MAX_META_RAW_LEN`] bytes and decoded within a memory
//! budget, [`format::MAX_META_DECODED`] (see `budget` below): a few bytes of
//! zstd or CBOR can claim any count, and no count is believed before the
//! elements are there and paid for.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{ImageError, one_line};
use super::format::{self, ALIGN, HEADER_SIZE, Header};
use super::model::{Compression, DataRef, Metadata};

pub(crate) mod budget;
mod metadata;
mod refs;

pub use metadata::decode_metadata;
use metadata::read_metadata;
use refs::{Site, check_ref, for_each_ref, validate};
pub(crate) use refs::{all_refs, for_each_ref_mut};

/// Bulk data is read, checksummed and decompressed in pieces of this size,
/// so that verifying or sampling a huge blob needs little memory.
const CHUNK: u64 = 1 << 20;

/// Positioned reads from an image's bytes, wherever they are.
pub(crate) trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; `UnexpectedEof` if the bytes aren't there.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// What [`ImageReader::verify_all`] checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blobs read, checksummed and decompressed.
    pub blobs: u64,
    /// Their bytes as stored (read and checksummed).
    pub bytes: u64,
    /// Their bytes once decompressed.
    pub raw_bytes: u64,
}

/// A parsed image; see the module documentation.
pub struct ImageReader {
    src: Source,
    file_len: u64,
    header: Header,
    meta: Metadata,
    /// Non-empty page runs sorted by address, not overlapping, for
    /// `read_memory`.
    runs: Vec<RunSpan>,
}

#[derive(Debug, Clone, Copy)]
struct RunSpan {
    start: u64,
    end: u64,
    vma: usize,
    run: usize,
}

impl ImageReader {
    /// Opens and checks the image at `path` (see the module documentation).
    pub fn open(path: &Path) -> Result<ImageReader, ImageError> {
        Self::open_file(path).map(|(reader, _)| reader)
    }

    /// Like [`ImageReader::open`], and also hands back a descriptor of the
    /// very file read, for reading its data directly (not through the path,
    /// which may name another file by then).
    pub fn open_file(path: &Path) -> Result<(ImageReader, File), ImageError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound {
                path: path.to_path_buf(),
            },
            _ => ImageError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let md = file.metadata().map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if !md.is_file() {
            return Err(ImageError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        let kept = file.try_clone().map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok((
            Self::parse(Box::new(file), path.to_path_buf(), md.len())?,
            kept,
        ))
    }

    /// Parses an image held in memory (for tests and fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<ImageReader, ImageError> {
        let len = bytes.len() as u64;
        Self::parse(Box::new(bytes), PathBuf::from("<memory>"), len)
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's total size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Reads a blob, verifies its checksum and decompresses it; the result
    /// has exactly `r.raw_len` bytes.
    pub fn read_data(&self, r: &DataRef) -> Result<Vec<u8>, ImageError> {
        let name = || self.name_of(r);
        self.check_ref(r, &name)?;
        let mut out = try_alloc(r.raw_len, &name)?;
        self.decode_into(r, &mut out, &name)?;
        Ok(out)
    }

    /// Like [`read_data`](Self::read_data), into `out`, which must be
    /// exactly `r.raw_len` bytes long.
    pub fn read_data_into(&self, r: &DataRef, out: &mut [u8]) -> Result<(), ImageError> {
        let name = || self.name_of(r);
        self.check_ref(r, &name)?;
        self.decode_into(r, out, &name)
    }

    /// Reads and checks every blob the metadata refers to: page runs,
    /// embedded files, embedded content of fds. Stops at the first bad one;
    /// the error names it.
    pub fn verify_all(&self) -> Result<VerifyReport, ImageError> {
        let mut report = VerifyReport::default();
        for_each_ref(&self.meta, |site, r| {
            let name = || site.to_string();
            self.visit(r, &name, &mut |_, _| {})?;
            report.blobs += 1;
            report.bytes += r.stored_len;
            report.raw_bytes += r.raw_len;
            Ok(())
        })?;
        Ok(report)
    }

    /// Like [`verify_all`](Self::verify_all), for every blob but the page
    /// runs (which a restore checks while it fills memory, or in the
    /// background with `--lazy`: see [`verify_pages`](Self::verify_pages)).
    pub fn verify_except_pages(&self) -> Result<VerifyReport, ImageError> {
        self.verify_where(|site| !matches!(site, Site::Page { .. }))
    }

    /// Like [`verify_all`](Self::verify_all), for the page runs only.
    pub fn verify_pages(&self) -> Result<VerifyReport, ImageError> {
        self.verify_where(|site| matches!(site, Site::Page { .. }))
    }

    fn verify_where(&self, pick: impl Fn(&Site<'_>) -> bool) -> Result<VerifyReport, ImageError> {
        let mut report = VerifyReport::default();
        for_each_ref(&self.meta, |site, r| {
            if !pick(&site) {
                return Ok(());
            }
            let name = || site.to_string();
            self.visit(r, &name, &mut |_, _| {})?;
            report.blobs += 1;
            report.bytes += r.stored_len;
            report.raw_bytes += r.raw_len;
            Ok(())
        })?;
        Ok(report)
    }

    /// The process memory at `[addr, addr + len)` as stored in page runs, or
    /// `None` if some byte of it is not covered by a stored run (never
    /// touched, a clean file page, or not mapped at all).
    ///
    /// Every run involved is read whole, to verify its checksum.
    pub fn read_memory(&self, addr: u64, len: usize) -> Result<Option<Vec<u8>>, ImageError> {
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        let Some(end) = addr.checked_add(len as u64) else {
            return Ok(None);
        };
        // Find the runs covering the range before reading anything, so an
        // uncovered range costs no I/O.
        let first = self.runs.partition_point(|s| s.end <= addr);
        let mut cover = Vec::new();
        let mut cur = addr;
        for span in self.runs.get(first..).unwrap_or_default() {
            if span.start > cur {
                return Ok(None);
            }
            cover.push(*span);
            cur = span.end.min(end);
            if cur == end {
                break;
            }
        }
        if cur != end {
            return Ok(None);
        }

        let mut out = try_alloc(len as u64, &|| format!("memory at {addr:#x}"))?;
        for span in cover {
            let vma = self.meta.root.vmas.get(span.vma);
            let Some((vma, run)) = vma.and_then(|v| Some((v, v.pages.get(span.run)?))) else {
                // Spans were built from these vectors; cannot happen.
                return Err(ImageError::OutOfBounds {
                    section: format!("memory at {addr:#x}"),
                });
            };
            let site = Site::Page { vma, run };
            let name = || site.to_string();
            self.visit(&run.data, &name, &mut |raw_off, chunk| {
                // The chunk holds memory [from, from + chunk.len()); copy
                // what of it falls in [addr, end). Runs lie inside their VMA
                // (checked at open), so these sums don't overflow.
                let from = span.start + raw_off;
                let lo = from.max(addr);
                let hi = (from + chunk.len() as u64).min(end);
                if lo < hi {
                    let src = chunk.get((lo - from) as usize..(hi - from) as usize);
                    let dst = out.get_mut((lo - addr) as usize..(hi - addr) as usize);
                    if let (Some(src), Some(dst)) = (src, dst) {
                        dst.copy_from_slice(src);
                    }
                }
            })?;
        }
        Ok(Some(out))
    }

    fn parse(
        src: Box<dyn ReadAt>,
        origin: PathBuf,
        file_len: u64,
    ) -> Result<ImageReader, ImageError> {
        let src = Source { src, origin };
        // The magic first: a short file that is not an image at all should
        // say so, not that it is a truncated one.
        let mut magic = [0u8; 8];
        if file_len < magic.len() as u64 {
            return Err(ImageError::BadMagic);
        }
        src.read_at(&mut magic, 0, &|| "header".into())?;
        if magic != super::format::MAGIC {
            return Err(ImageError::BadMagic);
        }
        if file_len < HEADER_SIZE as u64 {
            return Err(ImageError::Truncated {
                section: "header".into(),
            });
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        src.read_at(&mut hbuf, 0, &|| "header".into())?;
        let h = Header::decode(&hbuf)?;

        let bad_header = |reason: String| ImageError::Decode {
            section: "header".into(),
            reason,
        };
        if h.data_offset < HEADER_SIZE as u64 || !h.data_offset.is_multiple_of(ALIGN) {
            return Err(bad_header(format!(
                "data area offset {} is inside the header or not 4096-aligned",
                h.data_offset
            )));
        }
        let data_end = h
            .data_offset
            .checked_add(h.data_len)
            .ok_or_else(|| bad_header("data area length overflows".into()))?;
        if data_end > file_len {
            return Err(ImageError::Truncated {
                section: "data area".into(),
            });
        }
        if h.meta_offset < data_end || !h.meta_offset.is_multiple_of(ALIGN) {
            return Err(bad_header(format!(
                "metadata offset {} overlaps the data area (ending at {data_end}) or is not 4096-aligned",
                h.meta_offset
            )));
        }
        match h.meta_offset.checked_add(h.meta_len) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(ImageError::Truncated {
                    section: "metadata".into(),
                });
            }
        }

        let meta = read_metadata(&src, &h)?;
        let runs = validate(&meta, h.data_offset, data_end)?;
        Ok(ImageReader {
            src,
            file_len,
            header: h,
            meta,
            runs,
        })
    }

    /// Names the blob `r` for an error message by finding it in the
    /// metadata. Only called on error paths, so the search cost is moot.
    fn name_of(&self, r: &DataRef) -> String {
        let mut found = None;
        let _ = for_each_ref(&self.meta, |site, d| {
            if d == r {
                found = Some(site.to_string());
                return Err(());
            }
            Ok(())
        });
        found.unwrap_or_else(|| Site::Other { offset: r.offset }.to_string())
    }

    /// Checks a DataRef that may come from the caller rather than from our
    /// (already checked) metadata.
    fn check_ref(&self, r: &DataRef, name: &dyn Fn() -> String) -> Result<(), ImageError> {
        let h = &self.header;
        let data_end = h.data_offset.saturating_add(h.data_len).min(self.file_len);
        check_ref(r, name, h.data_offset, data_end)
    }

    /// Decodes blob `r` (already checked) into `out`.
    fn decode_into(
        &self,
        r: &DataRef,
        out: &mut [u8],
        name: &dyn Fn() -> String,
    ) -> Result<(), ImageError> {
        if out.len() as u64 != r.raw_len {
            return Err(ImageError::BufferSize {
                section: name(),
                expected: r.raw_len,
                got: out.len() as u64,
            });
        }
        match r.compression {
            Compression::None => {
                // Uncompressed: raw_len == stored_len (checked), one read
                // straight into the caller's buffer.
                self.src.read_at(out, r.offset, name)?;
                if crc32c::crc32c(out) != r.crc32c {
                    return Err(ImageError::Checksum { section: name() });
                }
                Ok(())
            }
            Compression::Zstd => {
                let mut input = StoredReader::new(&*self.src.src, r);
                let outcome = {
                    let mut dec = zstd_decoder(&mut input, r)?;
                    fill_exact(&mut dec, out)
                };
                self.conclude(input, r, outcome, name)
            }
        }
    }

    /// Decodes blob `r` (already checked), handing each piece of raw bytes
    /// to `f` with its offset in the blob. Pieces may reach `f` before the
    /// checksum is known to be right; an error is returned at the end then.
    fn visit(
        &self,
        r: &DataRef,
        name: &dyn Fn() -> String,
        f: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ImageError> {
        match r.compression {
            Compression::None => {
                let mut buf = try_alloc(r.stored_len.min(CHUNK), name)?;
                let mut crc = 0;
                let mut done = 0u64;
                while done < r.stored_len {
                    let n = (r.stored_len - done).min(CHUNK) as usize;
                    let piece = buf.get_mut(..n).unwrap_or_default();
                    self.src.read_at(piece, r.offset + done, name)?;
                    crc = crc32c::crc32c_append(crc, piece);
                    f(done, piece);
                    crate::progress::add(n as u64);
                    done += n as u64;
                }
                if crc != r.crc32c {
                    return Err(ImageError::Checksum { section: name() });
                }
                Ok(())
            }
            Compression::Zstd => {
                // At least one byte of room, to notice output beyond raw_len.
                let mut buf = try_alloc(r.raw_len.clamp(1, CHUNK), name)?;
                let mut input = StoredReader::new(&*self.src.src, r);
                let outcome = {
                    let mut dec = zstd_decoder(&mut input, r)?;
                    let mut produced = 0u64;
                    loop {
                        match dec.read(&mut buf) {
                            Ok(0) => break Outcome::Len(produced),
                            Ok(n) => {
                                let piece = buf.get(..n).unwrap_or_default();
                                if produced + n as u64 > r.raw_len {
                                    break Outcome::TooLong;
                                }
                                f(produced, piece);
                                crate::progress::add(n as u64);
                                produced += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Outcome::Failed(e),
                        }
                    }
                };
                self.conclude(input, r, outcome, name)
            }
        }
    }

    /// Turns the end of a zstd decode into a result. The checksum of the
    /// stored bytes is judged before the decoder's opinion: a corrupt blob
    /// should be reported as corrupt, not as whatever zstd made of it.
    fn conclude(
        &self,
        mut input: StoredReader<'_>,
        r: &DataRef,
        outcome: Outcome,
        name: &dyn Fn() -> String,
    ) -> Result<(), ImageError> {
        input.drain();
        if let Some(e) = input.error.take() {
            return Err(self.src.read_error(e, name));
        }
        if input.crc != r.crc32c {
            return Err(ImageError::Checksum { section: name() });
        }
        let reason = match outcome {
            Outcome::Len(n) if n == r.raw_len => return Ok(()),
            Outcome::Len(n) => format!("decompresses to {n} bytes, expected {}", r.raw_len),
            Outcome::TooLong => {
                format!("decompresses to more than the expected {} bytes", r.raw_len)
            }
            Outcome::Failed(e) => format!("zstd: {}", one_line(&e.to_string())),
        };
        Err(ImageError::Decode {
            section: name(),
            reason,
        })
    }
}

enum Outcome {
    /// The decoder ended after producing this many bytes.
    Len(u64),
    /// It produced more than raw_len.
    TooLong,
    Failed(io::Error),
}

/// Feeds a blob's stored bytes to the zstd decoder, checksumming them on the
/// way, so that each byte is read from the image once.
struct StoredReader<'a> {
    src: &'a dyn ReadAt,
    offset: u64,
    remaining: u64,
    crc: u32,
    /// The error of the image read, kept aside: the decoder would wrap it in
    /// its own, and it must win over "corrupt frame".
    error: Option<io::Error>,
}

impl<'a> StoredReader<'a> {
    fn new(src: &'a dyn ReadAt, r: &DataRef) -> Self {
        StoredReader {
            src,
            offset: r.offset,
            remaining: r.stored_len,
            crc: 0,
            error: None,
        }
    }

    /// Reads (and checksums) whatever the decoder left unread.
    fn drain(&mut self) {
        let mut buf = vec![0u8; self.remaining.min(CHUNK) as usize];
        while self.remaining > 0 && self.error.is_none() {
            if self.read(&mut buf).is_err() {
                break;
            }
        }
    }
}

impl Read for StoredReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.error.is_some() {
            return Err(io::Error::other("earlier image read failed"));
        }
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let Some(piece) = buf.get_mut(..n) else {
            return Ok(0);
        };
        if n == 0 {
            return Ok(0);
        }
        match self.src.read_exact_at(piece, self.offset) {
            Ok(()) => {
                self.crc = crc32c::crc32c_append(self.crc, piece);
                self.offset += n as u64;
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) => {
                self.error = Some(e);
                Err(io::Error::other("image read failed"))
            }
        }
    }
}

type ZstdDecoder<'r, 'a> =
    zstd::stream::read::Decoder<'static, BufReader<&'r mut StoredReader<'a>>>;

fn zstd_decoder<'r, 'a>(
    input: &'r mut StoredReader<'a>,
    r: &DataRef,
) -> Result<ZstdDecoder<'r, 'a>, ImageError> {
    // Small blobs get a small buffer: verify_all may go through many.
    let cap = r.stored_len.clamp(1, CHUNK) as usize;
    zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(cap, input)).map_err(|e| {
        ImageError::OutOfMemory {
            section: format!("a zstd decoder ({})", one_line(&e.to_string())),
            len: 0,
        }
    })
}

/// Decodes into all of `out`, then checks that nothing more follows.
fn fill_exact(dec: &mut impl Read, out: &mut [u8]) -> Outcome {
    let mut produced = 0usize;
    while produced < out.len() {
        let Some(rest) = out.get_mut(produced..) else {
            break;
        };
        match dec.read(rest) {
            Ok(0) => return Outcome::Len(produced as u64),
            Ok(n) => produced += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Outcome::Failed(e),
        }
    }
    let mut extra = [0u8; 1];
    loop {
        match dec.read(&mut extra) {
            Ok(0) => return Outcome::Len(produced as u64),
            Ok(_) => return Outcome::TooLong,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Outcome::Failed(e),
        }
    }
}

/// The image's bytes and, for messages, where they come from.
struct Source {
    src: Box<dyn ReadAt>,
    /// The file (`<memory>` for `from_bytes`).
    origin: PathBuf,
}

impl Source {
    fn read_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        name: &dyn Fn() -> String,
    ) -> Result<(), ImageError> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| self.read_error(e, name))
    }

    fn read_error(&self, e: io::Error, name: &dyn Fn() -> String) -> ImageError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // Sizes were checked against the file size at open, so the file
            // shrank since (or a caller-made DataRef points past the end).
            ImageError::Truncated { section: name() }
        } else {
            ImageError::Io {
                path: self.origin.clone(),
                source: e,
            }
        }
    }
}

/// A zeroed buffer of `len` bytes, or an error if memory is short.
fn try_alloc(len: u64, name: &dyn Fn() -> String) -> Result<Vec<u8>, ImageError> {
    let oom = || ImageError::OutOfMemory {
        section: name(),
        len,
    };
    let n = usize::try_from(len).map_err(|_| oom())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| oom())?;
    v.resize(n, 0);
    Ok(v)
}
