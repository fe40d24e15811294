//! Reading the metadata: its checks, decompression and decoding (within
//! the memory budget of `budget`).

use super::budget;
use super::{Source, try_alloc};
use crate::image::error::{ImageError, one_line};
use crate::image::format::{self, Header};
use crate::image::model::{Compression, Metadata};

/// Reads, checks, decompresses and decodes the metadata `h` points to
/// (inside the file: checked by the caller).
pub(super) fn read_metadata(src: &Source, h: &Header) -> Result<Metadata, ImageError> {
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
/// `budget`), rejecting anything after the value.
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
