//! Builds images whose metadata is made to exhaust a reader: huge counts
//! (declared or real), huge strings, deep nesting, a huge tree, lying
//! sizes, all inside a tiny zstd frame of RLE blocks, the way a hostile
//! user would make them. Shared by the `image_crafted` target and by the
//! making of the `crafted-*` seeds (see the README).
//!
//! The base is the metadata of `seeds/plain-meta.img` (a real process);
//! a recipe, read from the fuzzer's bytes, replaces one value of it (or
//! adds a top-level entry) with a crafted one.

#![allow(dead_code)]

use chpox::image::Header;
use chpox::image::format::{FORMAT_VERSION, HEADER_SIZE};
use chpox::image::model::Compression;

/// The real image the crafted ones start from: header + plain CBOR metadata.
const BASE: &[u8] = include_bytes!("../seeds/plain-meta.img");

/// Where the crafted value goes: a key of the base metadata (its value is
/// replaced) or a new top-level key (added).
const TARGETS: &[(&str, bool)] = &[
    ("cmdline", false),
    ("vm_flags", false),
    ("groups", false),
    ("auxv", false),
    ("threads", false),
    ("vmas", false),
    ("fds", false),
    ("pages", false),
    ("actions", false),
    ("rlimits", false),
    ("xsave", false),
    ("comm", false),
    ("uid", false),
    ("descendants", true),
    ("zombies", true),
    ("children_not_saved", true),
    ("from_a_newer_chpox", true),
];

/// A piece of the metadata: bytes as they are, or one byte repeated.
#[derive(Clone, Debug)]
pub enum Piece {
    Bytes(Vec<u8>),
    Repeat(u8, u64),
}

/// Reads the recipe from fuzzer bytes and builds the image.
pub fn image_from_recipe(data: &[u8]) -> Vec<u8> {
    let mut r = Recipe(data);
    let (key, add) = TARGETS[r.byte() as usize % TARGETS.len()];
    let nth = (r.byte() % 4) as usize;
    let kind = r.byte();
    let form = r.byte();
    let declared = r.u64();
    // Up to 64 Mi elements: more than any limit, still quick as RLE.
    let actual = r.u64() % (64 << 20);
    let lies = r.byte();
    let compress = lies & 1 == 0 || actual > 1 << 20;

    let base = base_metadata();
    let value = crafted_value(base, kind, form, declared, actual);
    let pieces = if add {
        add_top_level(base, key, value)
    } else {
        replace_value(base, key, nth, value)
            .unwrap_or_else(|| add_top_level(base, key, vec![Piece::Repeat(0x80, 1)]))
    };
    image(&pieces, compress, lies, r.u64())
}

/// The base metadata's CBOR.
pub fn base_metadata() -> &'static [u8] {
    let off = u64_at(BASE, 16) as usize;
    let len = u64_at(BASE, 24) as usize;
    &BASE[off..off + len]
}

struct Recipe<'a>(&'a [u8]);

impl Recipe<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.byte());
        }
        v
    }
}

/// A CBOR item header: major type `major`, argument `n`.
pub fn cbor_head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => {
            let mut v = vec![m | 25];
            v.extend_from_slice(&(n as u16).to_be_bytes());
            v
        }
        0x1_0000..=0xffff_ffff => {
            let mut v = vec![m | 26];
            v.extend_from_slice(&(n as u32).to_be_bytes());
            v
        }
        _ => {
            let mut v = vec![m | 27];
            v.extend_from_slice(&n.to_be_bytes());
            v
        }
    }
}

/// The crafted value: `actual` elements (or bytes) under a header that
/// declares `declared` (or the truth, or an indefinite length).
fn crafted_value(base: &[u8], kind: u8, form: u8, declared: u64, actual: u64) -> Vec<Piece> {
    let count = match form % 3 {
        0 => actual,
        1 => declared,
        _ => u64::MAX, // indefinite
    };
    let container = |major: u8, elem: Piece| -> Vec<Piece> {
        let mut out = Vec::new();
        if count == u64::MAX {
            out.push(Piece::Bytes(vec![major << 5 | 31]));
        } else {
            out.push(Piece::Bytes(cbor_head(major, count)));
        }
        out.push(elem);
        if count == u64::MAX {
            out.push(Piece::Bytes(vec![0xff]));
        }
        out
    };
    match kind % 12 {
        // Arrays of one-byte items: "", 0, [], {}, null, b"".
        k @ 0..=5 => {
            let elem = [0x60, 0x00, 0x80, 0xa0, 0xf6, 0x40][k as usize];
            container(4, Piece::Repeat(elem, actual))
        }
        // A map of 0 => 0 entries.
        6 => container(5, Piece::Repeat(0x00, actual.saturating_mul(2))),
        // Nesting: [[[[…]]]].
        7 => vec![Piece::Repeat(0x81, actual), Piece::Bytes(vec![0x80])],
        // A huge text or byte string (also read as a sequence of bytes).
        8 => container_string(3, count, actual, b'a'),
        9 => container_string(2, count, actual, 0x07),
        // Tags before an empty array.
        10 => vec![Piece::Repeat(0xc6, actual), Piece::Bytes(vec![0x80])],
        // A tree: the root process repeated as descendants, up to some
        // 10 MiB of metadata (the harness's own copies of a bigger image
        // would weigh more than the reader; the size limit is tried by
        // the other kinds).
        _ => {
            let root = root_process(base);
            let n = actual % 700;
            let mut out = vec![Piece::Bytes(cbor_head(
                4,
                if count == u64::MAX { n } else { count },
            ))];
            let mut all = Vec::with_capacity(root.len() * n as usize);
            for _ in 0..n {
                all.extend_from_slice(&root);
            }
            out.push(Piece::Bytes(all));
            out
        }
    }
}

fn container_string(major: u8, count: u64, actual: u64, fill: u8) -> Vec<Piece> {
    let head = if count == u64::MAX {
        // An indefinite string: one definite chunk inside.
        let mut h = vec![major << 5 | 31];
        h.extend(cbor_head(major, actual));
        h
    } else {
        cbor_head(major, count)
    };
    let mut out = vec![Piece::Bytes(head), Piece::Repeat(fill, actual)];
    if count == u64::MAX {
        out.push(Piece::Bytes(vec![0xff]));
    }
    out
}

/// The base's root process as one map (the fields a descendant has).
fn root_process(base: &[u8]) -> Vec<u8> {
    let fields = ["process", "threads", "vmas", "fds", "signals"];
    let mut out = cbor_head(5, fields.len() as u64);
    for f in fields {
        if let Some((start, end)) = find_value(base, f, 0) {
            out.extend(cbor_head(3, f.len() as u64));
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(&base[start..end]);
        }
    }
    out
}

/// The byte range of the value of the `nth` map key `key` in `cbor`.
pub fn find_value(cbor: &[u8], key: &str, nth: usize) -> Option<(usize, usize)> {
    let mut pat = cbor_head(3, key.len() as u64);
    pat.extend_from_slice(key.as_bytes());
    let mut seen = 0;
    let mut at = 0;
    while let Some(i) = cbor[at..].windows(pat.len()).position(|w| w == pat) {
        let start = at + i + pat.len();
        if seen == nth {
            let end = skip(cbor, start)?;
            return Some((start, end));
        }
        seen += 1;
        at = start;
    }
    None
}

/// The end of the CBOR item at `at` (definite lengths only, as the base has).
fn skip(b: &[u8], at: usize) -> Option<usize> {
    let first = *b.get(at)?;
    let (major, info) = (first >> 5, first & 31);
    let (n, mut pos) = match info {
        0..=23 => (u64::from(info), at + 1),
        24..=27 => {
            let len = 1usize << (info - 24);
            let mut v = 0u64;
            for &x in b.get(at + 1..at + 1 + len)? {
                v = v << 8 | u64::from(x);
            }
            (v, at + 1 + len)
        }
        _ => return None,
    };
    match major {
        0 | 1 | 7 => Some(pos),
        2 | 3 => Some(pos + usize::try_from(n).ok()?),
        4 | 5 => {
            let items = if major == 5 { n * 2 } else { n };
            for _ in 0..items {
                pos = skip(b, pos)?;
            }
            Some(pos)
        }
        6 => skip(b, pos),
        _ => None,
    }
}

fn replace_value(base: &[u8], key: &str, nth: usize, value: Vec<Piece>) -> Option<Vec<Piece>> {
    let (start, end) = find_value(base, key, nth)?;
    let mut out = vec![Piece::Bytes(base[..start].to_vec())];
    out.extend(value);
    out.push(Piece::Bytes(base[end..].to_vec()));
    Some(out)
}

/// The base with one more top-level entry `key: value` at its end.
fn add_top_level(base: &[u8], key: &str, value: Vec<Piece>) -> Vec<Piece> {
    // The top-level map's header, then its entries to the end.
    let first = base[0];
    let (n, body) = match first & 31 {
        i @ 0..=23 => (u64::from(i), 1),
        24 => (u64::from(base[1]), 2),
        25 => (u64::from(u16::from_be_bytes([base[1], base[2]])), 3),
        _ => (0, 1),
    };
    let mut head = cbor_head(5, n + 1);
    head.extend_from_slice(&base[body..]);
    head.extend(cbor_head(3, key.len() as u64));
    head.extend_from_slice(key.as_bytes());
    let mut out = vec![Piece::Bytes(head)];
    out.extend(value);
    out
}

/// Total length of `pieces`.
pub fn raw_len(pieces: &[Piece]) -> u64 {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Bytes(b) => b.len() as u64,
            Piece::Repeat(_, n) => *n,
        })
        .sum()
}

/// A zstd frame of raw and RLE blocks holding `pieces`, with its content
/// size recorded when `with_size`.
pub fn zstd_frame(pieces: &[Piece], with_size: bool) -> Vec<u8> {
    const MAX_BLOCK: u64 = 128 << 10;
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
    if with_size {
        // Single segment, 8-byte content size.
        f.push(0xe0);
        f.extend_from_slice(&raw_len(pieces).to_le_bytes());
    } else {
        // A 128 KiB window, no content size.
        f.push(0x00);
        f.push((17 - 10) << 3);
    }
    // Blocks as (raw or RLE, bytes, size), borrowing the pieces.
    let mut blocks: Vec<(u8, &[u8], u64)> = Vec::new();
    for p in pieces {
        match p {
            Piece::Bytes(b) => {
                for chunk in b.chunks(MAX_BLOCK as usize) {
                    blocks.push((0, chunk, chunk.len() as u64));
                }
            }
            Piece::Repeat(byte, n) => {
                let mut left = *n;
                while left > 0 {
                    let size = left.min(MAX_BLOCK);
                    blocks.push((1, std::slice::from_ref(byte), size));
                    left -= size;
                }
            }
        }
    }
    if blocks.is_empty() {
        blocks.push((0, &[], 0));
    }
    let last = blocks.len() - 1;
    for (i, (kind, body, size)) in blocks.into_iter().enumerate() {
        let head = (size << 3) as u32 | u32::from(kind) << 1 | u32::from(i == last);
        f.extend_from_slice(&head.to_le_bytes()[..3]);
        f.extend_from_slice(body);
    }
    f
}

/// The flat bytes of `pieces` (for uncompressed metadata).
pub fn flatten(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Bytes(b) => out.extend_from_slice(b),
            Piece::Repeat(byte, n) => out.extend(std::iter::repeat_n(*byte, *n as usize)),
        }
    }
    out
}

/// A whole image: header, empty data area, metadata. `lies` bits make the
/// header's decompressed size wrong (bit 1: `lie_len`), drop the frame's
/// content size (bit 2).
pub fn image(pieces: &[Piece], compress: bool, lies: u8, lie_len: u64) -> Vec<u8> {
    let raw = raw_len(pieces);
    let (stored, compression) = if compress {
        (zstd_frame(pieces, lies & 4 == 0), Compression::Zstd)
    } else {
        (flatten(pieces), Compression::None)
    };
    let meta_raw_len = if lies & 2 != 0 { lie_len } else { raw };
    let header = Header {
        format_version: FORMAT_VERSION,
        flags: 0,
        meta_offset: HEADER_SIZE as u64,
        meta_len: stored.len() as u64,
        meta_raw_len,
        meta_crc32c: crc32c::crc32c(&stored),
        meta_compression: compression,
        data_offset: HEADER_SIZE as u64,
        data_len: 0,
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&stored);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
