//! Byte layout of a chpox image, format version 1.
//!
//! ```text
//! offset 0      header region, HEADER_SIZE (4096) bytes
//! offset 4096   data area: blobs, each starting at a 4096-aligned offset,
//!               zero padding between them
//! 4096-aligned  metadata: `Metadata` as CBOR (named fields), maybe zstd
//! ```
//!
//! The header is a tiny fixed struct, so it is encoded by hand rather than
//! through serde: its layout must never depend on a library's choices.
//! All integers are little-endian.
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    8 | magic `b"CHPOXIMG"`                              |
//! |      8 |    4 | format_version (1)                               |
//! |     12 |    4 | flags (reserved, 0)                              |
//! |     16 |    8 | meta_offset                                      |
//! |     24 |    8 | meta_len (stored bytes)                          |
//! |     32 |    8 | meta_raw_len (bytes once decompressed)           |
//! |     40 |    4 | meta_crc32c (CRC-32C of the stored metadata)     |
//! |     44 |    1 | meta_compression (0 none, 1 zstd)                |
//! |     45 |    3 | zero padding                                     |
//! |     48 |    8 | data_offset (4096)                               |
//! |     56 |    8 | data_len (end of the last blob - data_offset)    |
//! |     64 |    4 | header_crc32c (CRC-32C of bytes 0..64)           |
//! |     68 | 4028 | zero                                             |
//!
//! The magic and the version come first and never move, so that any future
//! chpox can tell "not an image" from "an image of another version" before it
//! interprets anything else.

use super::error::ImageError;
use super::model::Compression;

/// First 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"CHPOXIMG";
/// The format version this chpox writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header region at the start of the file.
pub const HEADER_SIZE: usize = 4096;
/// Blobs and the metadata start at multiples of this, so that page data can
/// later be read (or mapped) with page-aligned, direct I/O-friendly offsets.
pub const ALIGN: u64 = 4096;

/// Largest metadata a reader accepts (and a writer produces), in bytes once
/// decompressed. A process with one thread and a few dozen mappings takes
/// about 15 KiB, each further thread about 3.5 KiB (its XSAVE area), each
/// mapping about 300 bytes: 16 MiB is a tree of some thousand small
/// processes or four thousand threads, about what the decoding budget
/// below allows. It is what a reader allocates for the decompressed bytes,
/// which must stay small whatever the image, since zstd makes 128 KiB of
/// four bytes: a 100 KiB image can claim this much.
pub const MAX_META_RAW_LEN: u64 = 16 << 20;
/// Largest memory the decoded metadata may take, as the reader counts it
/// while decoding (see `reader::budget`): each element, map entry and string
/// is counted before it is stored, and decoding fails once the count would
/// pass this. Decoded, a small process takes about 50 KiB (the root, whose
/// fields serde buffers, about 200 KiB), a thread about 3.5 KiB, a mapping
/// about 1 KiB: 64 MiB is a tree of some 1300 small processes, or 18 000
/// threads, where chpox's jobs are tens. One byte of CBOR can become a
/// 24-byte string or a 32-byte buffered value, so this bound, not the byte
/// count above, is what keeps a small image from exhausting memory.
/// Counting the decompressed bytes and what serde builds from buffered
/// values, decoding the metadata of any image takes less than about
/// 150 MiB.
pub const MAX_META_DECODED: u64 = 64 << 20;
/// Deepest nesting of CBOR arrays and maps the reader accepts in metadata.
/// The model nests about ten deep; the bound keeps a crafted image from
/// exhausting the stack.
pub const MAX_META_DEPTH: usize = 64;
/// Largest decompressed blob a reader accepts (and a writer produces).
pub const MAX_BLOB_RAW_LEN: u64 = 64 << 30;

// Field offsets inside the header.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_META_OFFSET: usize = 16;
const OFF_META_LEN: usize = 24;
const OFF_META_RAW_LEN: usize = 32;
const OFF_META_CRC: usize = 40;
const OFF_META_COMPRESSION: usize = 44;
const OFF_DATA_OFFSET: usize = 48;
const OFF_DATA_LEN: usize = 56;
/// Where the header checksum lives; it covers every byte before it.
pub const OFF_HEADER_CRC: usize = 64;
/// Bytes of the header that carry meaning (fields plus their checksum); the
/// rest of the header region is zero and ignored on read, so that a later
/// version could use it without breaking this reader's layout assumptions.
pub const HEADER_USED: usize = OFF_HEADER_CRC + 4;

/// The decoded header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    /// Reserved; version 1 writes 0 and rejects anything else.
    pub flags: u32,
    pub meta_offset: u64,
    pub meta_len: u64,
    pub meta_raw_len: u64,
    pub meta_crc32c: u32,
    pub meta_compression: Compression,
    pub data_offset: u64,
    pub data_len: u64,
}

/// On-disk code of a compression method (header byte `meta_compression`).
pub fn compression_code(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Zstd => 1,
    }
}

/// Inverse of [`compression_code`]; `None` for codes this version doesn't know.
pub fn compression_from_code(code: u8) -> Option<Compression> {
    match code {
        0 => Some(Compression::None),
        1 => Some(Compression::Zstd),
        _ => None,
    }
}

/// Rounds `n` up to a multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    Some(n.checked_add(ALIGN - 1)? & !(ALIGN - 1))
}

impl Header {
    /// The full header region, ready to be written at offset 0.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, OFF_VERSION, self.format_version);
        put_u32(&mut b, OFF_FLAGS, self.flags);
        put_u64(&mut b, OFF_META_OFFSET, self.meta_offset);
        put_u64(&mut b, OFF_META_LEN, self.meta_len);
        put_u64(&mut b, OFF_META_RAW_LEN, self.meta_raw_len);
        put_u32(&mut b, OFF_META_CRC, self.meta_crc32c);
        b[OFF_META_COMPRESSION] = compression_code(self.meta_compression);
        put_u64(&mut b, OFF_DATA_OFFSET, self.data_offset);
        put_u64(&mut b, OFF_DATA_LEN, self.data_len);
        let crc = crc32c::crc32c(&b[..OFF_HEADER_CRC]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Parses and checks the header at the start of `b`, which should hold
    /// at least the [`HEADER_SIZE`] first bytes of the file.
    ///
    /// Only the header's own consistency is checked here; whether the offsets
    /// fit the file is the reader's business, as it alone knows the file size.
    pub fn decode(b: &[u8]) -> Result<Header, ImageError> {
        let header = "header";
        if b.len() < HEADER_SIZE {
            return Err(ImageError::Truncated {
                section: header.into(),
            });
        }
        if b[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err(ImageError::BadMagic);
        }
        // The version is judged before the checksum: a newer chpox may have
        // moved the checksum, and "upgrade chpox" is then the useful message,
        // not "corrupt header".
        let format_version = get_u32(b, OFF_VERSION);
        if format_version > FORMAT_VERSION {
            return Err(ImageError::UnsupportedVersion {
                found: format_version,
            });
        }
        let stored_crc = get_u32(b, OFF_HEADER_CRC);
        if crc32c::crc32c(&b[..OFF_HEADER_CRC]) != stored_crc {
            return Err(ImageError::Checksum {
                section: header.into(),
            });
        }
        let bad = |reason: String| ImageError::Decode {
            section: header.into(),
            reason,
        };
        if format_version == 0 {
            return Err(bad("format version 0 does not exist".into()));
        }
        let flags = get_u32(b, OFF_FLAGS);
        if flags != 0 {
            return Err(bad(format!(
                "unknown flags {flags:#x} (this chpox knows none)"
            )));
        }
        let code = b[OFF_META_COMPRESSION];
        let meta_compression = compression_from_code(code)
            .ok_or_else(|| bad(format!("unknown metadata compression {code}")))?;
        Ok(Header {
            format_version,
            flags,
            meta_offset: get_u64(b, OFF_META_OFFSET),
            meta_len: get_u64(b, OFF_META_LEN),
            meta_raw_len: get_u64(b, OFF_META_RAW_LEN),
            meta_crc32c: get_u32(b, OFF_META_CRC),
            meta_compression,
            data_offset: get_u64(b, OFF_DATA_OFFSET),
            data_len: get_u64(b, OFF_DATA_LEN),
        })
    }
}

fn put_u32(b: &mut [u8; HEADER_SIZE], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8; HEADER_SIZE], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// The getters are only called on a slice already checked to hold HEADER_SIZE
// bytes with constant offsets below HEADER_USED, so the copies cannot fail;
// they are written without indexing panics all the same.
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            format_version: FORMAT_VERSION,
            flags: 0,
            meta_offset: 3 * 4096,
            meta_len: 1234,
            meta_raw_len: 5678,
            meta_crc32c: 0xdead_beef,
            meta_compression: Compression::Zstd,
            data_offset: 4096,
            data_len: 8000,
        }
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[..8], b"CHPOXIMG");
        assert_eq!(&b[8..12], &1u32.to_le_bytes());
        assert_eq!(&b[16..24], &(3u64 * 4096).to_le_bytes());
        assert_eq!(b[44], 1);
        assert_eq!(&b[48..56], &4096u64.to_le_bytes());
        assert!(b[HEADER_USED..].iter().all(|&x| x == 0));
        assert_eq!(Header::decode(&b).ok(), Some(h));
    }

    #[test]
    fn header_rejects() {
        let b = sample().encode();
        assert!(matches!(
            Header::decode(&b[..HEADER_SIZE - 1]),
            Err(ImageError::Truncated { .. })
        ));

        let mut m = b;
        m[0] ^= 1;
        let e = Header::decode(&m).err();
        assert!(matches!(e, Some(ImageError::BadMagic)));

        let mut v = b;
        v[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = Header::decode(&v).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("image format version 7 is newer than this chpox supports (1); upgrade chpox")
        );

        let mut c = b;
        c[20] ^= 0x40;
        assert!(matches!(
            Header::decode(&c),
            Err(ImageError::Checksum { .. })
        ));

        // A well-checksummed header with an unknown compression code.
        let mut h = sample().encode();
        h[OFF_META_COMPRESSION] = 9;
        let crc = crc32c::crc32c(&h[..OFF_HEADER_CRC]);
        h[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(Header::decode(&h), Err(ImageError::Decode { .. })));
    }

    #[test]
    fn align() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(4096));
        assert_eq!(align_up(4096), Some(4096));
        assert_eq!(align_up(u64::MAX), None);
    }
}
