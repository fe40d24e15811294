//! Rewriting pages of blobs already written: a pre-copy dump (`precopy`)
//! copies a process's pages while it runs, then, once it is frozen, copies
//! again only the pages written since, over their earlier copies in place.
//! The blobs keep their offsets and sizes; each rewrite says what it did to
//! a checksum (a [`Patch`]), so a whole blob's new checksum follows from its
//! old one (`crc::patched`); any other part of the blobs is checksummed
//! again from the file ([`ImageWriter::blob_at`]).

use std::os::unix::fs::FileExt;

use super::ImageWriter;
use crate::image::crc::Patch;
use crate::image::error::ImageError;
use crate::image::model::{Compression, DataRef};

impl ImageWriter {
    /// Overwrite `bytes` at `offset` of the file, inside data written
    /// earlier as uncompressed blobs. The blobs' checksums are stale until
    /// they are patched (`crc::patched`, with the returned patch) or made
    /// again with [`blob_at`](Self::blob_at). The bytes written over are
    /// read first, for the patch: a read of what the write writes.
    pub fn rewrite(&mut self, offset: u64, bytes: &[u8]) -> Result<Patch, ImageError> {
        self.require_idle("rewrite while a blob or mapped area is open")?;
        if self.compress || offset + bytes.len() as u64 > self.pos {
            return Err(ImageError::WriterState {
                reason: "rewrite of compressed data or past what was written",
            });
        }
        let mut old = vec![0u8; bytes.len()];
        self.file
            .read_exact_at(&mut old, offset)
            .map_err(|e| self.err(e))?;
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| self.err(e))?;
        Ok(Patch::new(offset, &old, bytes))
    }

    /// A reference to `len` uncompressed bytes at `offset` (written
    /// earlier, possibly rewritten since), checksummed from the file as it
    /// is now: any part of earlier blobs may become a blob of its own.
    pub fn blob_at(&self, offset: u64, len: u64) -> Result<DataRef, ImageError> {
        if self.compress || offset + len > self.pos {
            return Err(ImageError::WriterState {
                reason: "a blob of compressed data or past what was written",
            });
        }
        let mut buf = vec![0u8; len.min(8 << 20) as usize];
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], offset + done)
                .map_err(|e| self.err(e))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            done += n as u64;
        }
        Ok(DataRef {
            offset,
            stored_len: len,
            raw_len: len,
            crc32c: crc,
            compression: Compression::None,
        })
    }
}
