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

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{ImageError, one_line};
use super::format::{self, ALIGN, HEADER_SIZE, Header};
use super::model::{Compression, DataRef, FdEntry, FdKind, FileRef, Metadata, PageRun, Vma};

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

/// Reads, checks, decompresses and decodes the metadata `h` points to
/// (inside the file: checked by the caller).
fn read_metadata(src: &Source, h: &Header) -> Result<Metadata, ImageError> {
    let meta_name = || "metadata".to_string();
    let bad_meta = |reason: String| ImageError::Decode {
        section: "metadata".into(),
        reason,
    };
    if h.meta_raw_len > format::MAX_META_RAW_LEN {
        return Err(bad_meta(format!(
            "{} bytes is over the {} MiB limit",
            h.meta_raw_len,
            format::MAX_META_RAW_LEN >> 20
        )));
    }
    // A bound on the stored size too, so a huge file with a lying header
    // cannot make us read gigabytes before the checksum fails.
    let max_stored = match h.meta_compression {
        Compression::None => h.meta_raw_len,
        Compression::Zstd => zstd::zstd_safe::compress_bound(h.meta_raw_len as usize) as u64,
    };
    if h.meta_len > max_stored {
        return Err(bad_meta(format!(
            "{} stored bytes cannot hold {} bytes",
            h.meta_len, h.meta_raw_len
        )));
    }
    let mut stored = try_alloc(h.meta_len, &meta_name)?;
    src.read_at(&mut stored, h.meta_offset, &meta_name)?;
    if crc32c::crc32c(&stored) != h.meta_crc32c {
        return Err(ImageError::Checksum {
            section: "metadata".into(),
        });
    }
    let raw = match h.meta_compression {
        Compression::None => stored,
        // The stored bytes are freed before decoding.
        Compression::Zstd => decompress_metadata(stored, h.meta_raw_len)?,
    };
    decode_metadata(&raw)
}

/// Decodes metadata CBOR into the model, within [`format::MAX_META_DECODED`]
/// bytes of memory and [`format::MAX_META_DEPTH`] levels of nesting (see
/// `budget` below), rejecting anything after the value.
pub fn decode_metadata(raw: &[u8]) -> Result<Metadata, ImageError> {
    let bad_meta = |reason: String| ImageError::Decode {
        section: "metadata".into(),
        reason,
    };
    let mut rest: &[u8] = raw;
    let decoded: Result<budget::Budgeted<Metadata>, _> =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, format::MAX_META_DEPTH);
    let meta = match decoded {
        Ok(budget::Budgeted(meta)) => meta,
        Err(ciborium::de::Error::Semantic(_, msg)) if msg == budget::OVER_BUDGET => {
            return Err(bad_meta(format!(
                "decoding it would take more than the {} MiB of memory allowed \
                 (the image is corrupt or made to exhaust memory)",
                format::MAX_META_DECODED >> 20
            )));
        }
        Err(ciborium::de::Error::RecursionLimitExceeded) => {
            return Err(bad_meta(format!(
                "nested more than {} levels deep",
                format::MAX_META_DEPTH
            )));
        }
        Err(e) => return Err(bad_meta(one_line(&e.to_string()).into_owned())),
    };
    // Trailing bytes mean the length fields and the content disagree.
    if !rest.is_empty() {
        return Err(bad_meta(format!(
            "{} unexpected bytes after the CBOR value",
            rest.len()
        )));
    }
    Ok(meta)
}

/// Decoding within a memory budget.
///
/// CBOR is compact: a one-byte item can become a 24-byte `String` or a
/// 32-byte value that serde buffers (the root's fields are buffered, being
/// `#[serde(flatten)]`), and a declared length lets a vector reserve room
/// before a single element is read. So the bytes of the metadata do not
/// bound the memory of decoding it. [`Budgeted`] decodes through a
/// deserializer that sits between the CBOR decoder and the model's
/// `Deserialize` code and, before each element of a sequence, each entry
/// of a map and each string or byte string reaches the code that stores
/// it, counts its size (twice that of an element, for the slack of a
/// growing vector) against [`format::MAX_META_DECODED`]; past that, the
/// decode fails. It also hides every declared length (`size_hint`), so no
/// vector is reserved from a count the input merely claims.
///
/// What is counted is what the decode allocates, give or take the
/// allocator's own overhead and the final values serde builds from what it
/// buffered (both at most about as much again), so the real peak stays
/// within a small factor of the budget whatever the input.
pub(crate) mod budget {
    use std::cell::Cell;
    use std::fmt;
    use std::mem::size_of;

    use serde::de::{
        self, Deserialize, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
        VariantAccess, Visitor,
    };

    use super::format::MAX_META_DECODED;

    /// The message of the error that ends a decode over budget.
    pub(crate) const OVER_BUDGET: &str = "chpox: metadata over its memory budget";

    /// Bytes still allowed.
    struct Budget {
        left: Cell<u64>,
        /// A charge was refused.
        exceeded: Cell<bool>,
    }

    impl Budget {
        fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
            match self.left.get().checked_sub(bytes as u64) {
                Some(left) => {
                    self.left.set(left);
                    Ok(())
                }
                None => {
                    self.exceeded.set(true);
                    Err(E::custom(OVER_BUDGET))
                }
            }
        }

        /// An element of a growing vector: its size twice.
        fn element<T, E: de::Error>(&self) -> Result<(), E> {
            self.charge(2 * size_of::<T>())
        }
    }

    /// `T` decoded within [`MAX_META_DECODED`] bytes; fails with
    /// [`OVER_BUDGET`] past that.
    pub(crate) struct Budgeted<T>(pub T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Budgeted<T> {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            let budget = Budget {
                left: Cell::new(MAX_META_DECODED),
                exceeded: Cell::new(false),
            };
            budget.charge::<D::Error>(size_of::<T>())?;
            let metered = Meter {
                de,
                budget: &budget,
            };
            match T::deserialize(metered) {
                Ok(v) => Ok(Budgeted(v)),
                // Whatever the error says by the time it comes back, the
                // budget ran out: say that.
                Err(_) if budget.exceeded.get() => Err(de::Error::custom(OVER_BUDGET)),
                Err(e) => Err(e),
            }
        }
    }

    /// A deserializer that meters what its visitors receive.
    struct Meter<'b, D> {
        de: D,
        budget: &'b Budget,
    }

    /// A visitor whose sequences, maps, enums and strings are metered.
    struct Metered<'b, V> {
        inner: V,
        budget: &'b Budget,
        /// A map is a struct's fields (stored in the struct, already
        /// counted with it), not a collection.
        fields: bool,
    }

    impl<'b, V> Metered<'b, V> {
        fn new(inner: V, budget: &'b Budget) -> Self {
            Metered {
                inner,
                budget,
                fields: false,
            }
        }

        fn fields(inner: V, budget: &'b Budget) -> Self {
            Metered {
                inner,
                budget,
                fields: true,
            }
        }
    }

    struct MeteredSeed<'b, S> {
        seed: S,
        budget: &'b Budget,
    }

    struct MeteredSeq<'b, A> {
        seq: A,
        budget: &'b Budget,
    }

    struct MeteredMap<'b, A> {
        map: A,
        budget: &'b Budget,
        fields: bool,
    }

    struct MeteredEnum<'b, A> {
        data: A,
        budget: &'b Budget,
    }

    macro_rules! forward_deserialize {
        ($($method:ident)*) => {$(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.de.$method(Metered::new(visitor, self.budget))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Meter<'_, D> {
        type Error = D::Error;

        forward_deserialize! {
            deserialize_any deserialize_bool
            deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
            deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
            deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
            deserialize_identifier deserialize_ignored_any
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_unit_struct(name, Metered::new(visitor, self.budget))
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_newtype_struct(name, Metered::new(visitor, self.budget))
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_tuple(len, Metered::new(visitor, self.budget))
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_tuple_struct(name, len, Metered::new(visitor, self.budget))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_struct(name, fields, Metered::fields(visitor, self.budget))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.de
                .deserialize_enum(name, variants, Metered::new(visitor, self.budget))
        }

        fn is_human_readable(&self) -> bool {
            self.de.is_human_readable()
        }
    }

    macro_rules! forward_visit {
        ($($method:ident: $ty:ty)*) => {$(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Metered<'_, V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.inner.expecting(f)
        }

        forward_visit! {
            visit_bool: bool
            visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64 visit_i128: i128
            visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64 visit_u128: u128
            visit_f32: f32 visit_f64: f64 visit_char: char
        }

        // Strings and byte strings: their bytes, which the visitor may copy.
        fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
            self.budget.charge(v.len())?;
            self.inner.visit_str(v)
        }

        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
            self.budget.charge(v.len())?;
            self.inner.visit_borrowed_str(v)
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
            self.budget.charge(v.capacity())?;
            self.inner.visit_string(v)
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
            self.budget.charge(v.len())?;
            self.inner.visit_bytes(v)
        }

        fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
            self.budget.charge(v.len())?;
            self.inner.visit_borrowed_bytes(v)
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
            self.budget.charge(v.capacity())?;
            self.inner.visit_byte_buf(v)
        }

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_none()
        }

        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
            self.inner.visit_some(Meter {
                de,
                budget: self.budget,
            })
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_unit()
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
            self.inner.visit_newtype_struct(Meter {
                de,
                budget: self.budget,
            })
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            self.inner.visit_seq(MeteredSeq {
                seq,
                budget: self.budget,
            })
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.inner.visit_map(MeteredMap {
                map,
                budget: self.budget,
                fields: self.fields,
            })
        }

        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
            self.inner.visit_enum(MeteredEnum {
                data,
                budget: self.budget,
            })
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for MeteredSeed<'_, S> {
        type Value = S::Value;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
            self.seed.deserialize(Meter {
                de,
                budget: self.budget,
            })
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for MeteredSeq<'_, A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.budget.element::<T::Value, A::Error>()?;
            self.seq.next_element_seed(MeteredSeed {
                seed,
                budget: self.budget,
            })
        }

        /// None: a declared length is a claim, not room to reserve.
        fn size_hint(&self) -> Option<usize> {
            None
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for MeteredMap<'_, A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            if !self.fields {
                self.budget.element::<K::Value, A::Error>()?;
            }
            self.map.next_key_seed(MeteredSeed {
                seed,
                budget: self.budget,
            })
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            if !self.fields {
                self.budget.element::<T::Value, A::Error>()?;
            }
            self.map.next_value_seed(MeteredSeed {
                seed,
                budget: self.budget,
            })
        }

        fn size_hint(&self) -> Option<usize> {
            None
        }
    }

    impl<'de, 'b, A: EnumAccess<'de>> EnumAccess<'de> for MeteredEnum<'b, A> {
        type Error = A::Error;
        type Variant = MeteredVariant<'b, A::Variant>;

        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), A::Error> {
            let (value, variant) = self.data.variant_seed(MeteredSeed {
                seed,
                budget: self.budget,
            })?;
            Ok((
                value,
                MeteredVariant {
                    variant,
                    budget: self.budget,
                },
            ))
        }
    }

    pub(crate) struct MeteredVariant<'b, A> {
        variant: A,
        budget: &'b Budget,
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for MeteredVariant<'_, A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.variant.unit_variant()
        }

        fn newtype_variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            self.variant.newtype_variant_seed(MeteredSeed {
                seed,
                budget: self.budget,
            })
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.variant
                .tuple_variant(len, Metered::new(visitor, self.budget))
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.variant
                .struct_variant(fields, Metered::fields(visitor, self.budget))
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

fn decompress_metadata(stored: Vec<u8>, raw_len: u64) -> Result<Vec<u8>, ImageError> {
    let bad = |reason: String| ImageError::Decode {
        section: "metadata".into(),
        reason,
    };
    // The writer records the content size in the frame; a mismatch with the
    // header is caught here before allocating for it.
    match zstd::zstd_safe::get_frame_content_size(&stored) {
        Ok(Some(n)) if n != raw_len => {
            return Err(bad(format!(
                "zstd frame holds {n} bytes, the header says {raw_len}"
            )));
        }
        Ok(_) => {}
        Err(_) => return Err(bad("not a zstd frame".into())),
    }
    let n = usize::try_from(raw_len).map_err(|_| bad("too large".into()))?;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| ImageError::OutOfMemory {
            section: "metadata".into(),
            len: raw_len,
        })?;
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| bad(format!("zstd: {e}")))?;
    let got = d
        .decompress_to_buffer(&stored, &mut out)
        .map_err(|e| bad(format!("zstd: {}", one_line(&e.to_string()))))?;
    if got as u64 != raw_len {
        return Err(bad(format!(
            "decompresses to {got} bytes, the header says {raw_len}"
        )));
    }
    Ok(out)
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

/// Where a DataRef sits in the metadata, to name it in messages.
#[derive(Clone, Copy)]
enum Site<'a> {
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
fn for_each_ref<'a, E>(
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

/// Checks that blob `r` lies in the data area `[data_start, data_end)` (which
/// the caller has checked to be inside the file) and claims sane sizes.
fn check_ref(
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
fn validate(meta: &Metadata, data_start: u64, data_end: u64) -> Result<Vec<RunSpan>, ImageError> {
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
