//! Like `image_decode`, but repairs the header and metadata checksums after
//! mutation, so the fuzzer reaches what lies behind them: metadata
//! decompression, CBOR decoding and the validation of every reference the
//! metadata makes. Without this, almost every input stops at a checksum.
//!
//! Seed with `header + metadata` of real images, and with the crafted ones
//! (see `chpox-user/fuzz/README.md`).

#![no_main]

mod exercise;

use libfuzzer_sys::fuzz_target;

const HEADER_SIZE: usize = 4096;
const OFF_META_OFFSET: usize = 16;
const OFF_META_LEN: usize = 24;
const OFF_META_CRC: usize = 40;
const OFF_HEADER_CRC: usize = 64;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Recompute the metadata CRC (if the header's range is inside the input)
/// and the header CRC.
fn reseal(b: &mut [u8]) {
    if b.len() < HEADER_SIZE {
        return;
    }
    let offset = u64_at(b, OFF_META_OFFSET) as usize;
    let len = u64_at(b, OFF_META_LEN) as usize;
    if let Some(end) = offset.checked_add(len).filter(|&e| e <= b.len()) {
        let crc = crc32c::crc32c(&b[offset..end]);
        b[OFF_META_CRC..OFF_META_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..OFF_HEADER_CRC]);
    b[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    reseal(&mut bytes);
    exercise::exercise(bytes);
});
