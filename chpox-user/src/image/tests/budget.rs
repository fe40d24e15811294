//! Metadata made to exhaust memory: every bound of the decoder (see
//! `reader::budget`).

use super::{assert_one_line, with_metadata};
use crate::image::format::HEADER_SIZE;
use crate::image::model::*;
use crate::image::testutil::*;
use crate::image::*;

/// A text nobody writes, to find a value in encoded metadata.
const MARK: &str = "\u{1}chpox-test-mark\u{1}";

/// The CBOR of `meta` with the value `[MARK]` (an array holding the mark,
/// as a one-element `cmdline` or `children_not_saved` encodes) replaced by
/// `crafted`.
fn splice(meta: &Metadata, crafted: &[u8]) -> Vec<u8> {
    splice_raw(&cbor(meta), crafted)
}

/// `raw` (CBOR) with the value `[MARK]` replaced by `crafted`.
fn splice_raw(raw: &[u8], crafted: &[u8]) -> Vec<u8> {
    let mut mark = vec![0x81, 0x60 | MARK.len() as u8];
    mark.extend_from_slice(MARK.as_bytes());
    let at = raw
        .windows(mark.len())
        .position(|w| w == mark)
        .expect("the mark in the metadata");
    [&raw[..at], crafted, &raw[at + mark.len()..]].concat()
}

/// A CBOR array header declaring `n` elements.
fn array_of(n: u32) -> Vec<u8> {
    let mut v = vec![0x9a];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

/// `bytes` (an image) with its metadata replaced by `raw` compressed with
/// zstd, header fixed.
fn with_zstd_metadata(bytes: &[u8], raw: &[u8]) -> Vec<u8> {
    let r = ImageReader::from_bytes(bytes.to_vec()).unwrap();
    let mut h = *r.header();
    let stored = zstd::bulk::compress(raw, 3).unwrap();
    let mut out = bytes[..h.meta_offset as usize].to_vec();
    out.extend_from_slice(&stored);
    h.meta_len = stored.len() as u64;
    h.meta_raw_len = raw.len() as u64;
    h.meta_crc32c = crc32c::crc32c(&stored);
    h.meta_compression = Compression::Zstd;
    out[..HEADER_SIZE].copy_from_slice(&h.encode());
    out
}

/// The error opening `image`, checked to be one line about the metadata.
fn refused(image: Vec<u8>) -> String {
    let e = ImageReader::from_bytes(image)
        .err()
        .expect("the crafted image is refused");
    assert_one_line(&e);
    let s = e.to_string();
    assert!(s.starts_with("cannot decode metadata: "), "{s}");
    s
}

/// What the error of a decode over budget says.
fn over_budget() -> String {
    format!(
        "more than the {} MiB of memory allowed",
        format::MAX_META_DECODED >> 20
    )
}

/// A cmdline of 4 Mi empty strings is 4 MiB of CBOR and would take some
/// 250 MiB decoded (a buffered value and a `String` for each byte): the
/// decoder stops at its budget, for the root (whose fields serde buffers)
/// and for a descendant alike.
#[test]
fn many_tiny_elements_stop_at_the_memory_budget() {
    let (bytes, meta) = sample_image_bytes(false);
    let n = 4 << 20;
    let mut crafted = array_of(n);
    crafted.resize(crafted.len() + n as usize, 0x60);

    let mut root = meta.clone();
    root.root.process.cmdline = vec![MARK.into()];
    let e = refused(with_metadata(&bytes, &splice(&root, &crafted)));
    assert!(e.contains(&over_budget()), "{e}");

    let mut tree = meta.clone();
    let mut child = meta.root.clone();
    child.process.pid += 1;
    child.process.ppid = meta.root.process.pid;
    child.process.cmdline = vec![MARK.into()];
    tree.descendants.push(child);
    let e = refused(with_metadata(&bytes, &splice(&tree, &crafted)));
    assert!(e.contains(&over_budget()), "{e}");
}

/// The image: zstd turns a few KiB into a 15 MiB cmdline of empty
/// strings (under the limit on decompressed metadata). The image is tiny,
/// the decoded cmdline would not be.
#[test]
fn tiny_compressed_image_stops_at_the_memory_budget() {
    let (bytes, mut meta) = sample_image_bytes(false);
    meta.root.process.cmdline = vec![MARK.into()];
    let n = 15 << 20;
    let mut crafted = array_of(n);
    crafted.resize(crafted.len() + n as usize, 0x60);
    let image = with_zstd_metadata(&bytes, &splice(&meta, &crafted));
    assert!(image.len() < 200 << 10, "{} bytes", image.len());
    let e = refused(image);
    assert!(e.contains(&over_budget()), "{e}");
}

/// A byte string where a list of integers is expected decodes as one
/// integer per byte: `children_not_saved` made of 12 MiB of bytes would be
/// 48 MiB of `i32` (and twice that while the vector grows).
#[test]
fn bytes_read_as_integers_count_as_integers() {
    let (bytes, mut meta) = sample_image_bytes(false);
    meta.children_not_saved = vec![];
    let mut value = ciborium::Value::serialized(&meta).unwrap();
    if let ciborium::Value::Map(fields) = &mut value {
        for (k, v) in fields.iter_mut() {
            if k.as_text() == Some("children_not_saved") {
                *v = ciborium::Value::Array(vec![MARK.into()]);
            }
        }
    }
    let mut raw = Vec::new();
    ciborium::into_writer(&value, &mut raw).unwrap();
    let n: u32 = 12 << 20;
    let mut crafted = vec![0x5a];
    crafted.extend_from_slice(&n.to_be_bytes());
    crafted.resize(crafted.len() + n as usize, 7);
    let e = refused(with_metadata(&bytes, &splice_raw(&raw, &crafted)));
    assert!(e.contains(&over_budget()), "{e}");
}

/// The header may not claim more decompressed metadata than the limit,
/// whatever the frame holds: the claim alone would be allocated.
#[test]
fn decompressed_size_over_the_limit_is_refused_before_reading() {
    let (bytes, _) = sample_image_bytes(true);
    let r = ImageReader::from_bytes(bytes.clone()).unwrap();
    let mut h = *r.header();
    h.meta_raw_len = format::MAX_META_RAW_LEN + 1;
    let mut image = bytes.clone();
    image[..HEADER_SIZE].copy_from_slice(&h.encode());
    let e = refused(image);
    assert!(
        e.contains(&format!(
            "{} bytes is over the {} MiB limit",
            format::MAX_META_RAW_LEN + 1,
            format::MAX_META_RAW_LEN >> 20
        )),
        "{e}"
    );
}

/// Unknown fields are skipped (a newer chpox may add some), but not at any
/// depth: 100 nested arrays would be 100 frames of recursion per level of
/// the decoder, the kind of stack a crafted image must not get.
#[test]
fn nesting_is_bounded() {
    let (bytes, meta) = sample_image_bytes(false);
    let mut value = ciborium::Value::serialized(&meta).unwrap();
    let mut deep = ciborium::Value::Array(vec![]);
    for _ in 0..100 {
        deep = ciborium::Value::Array(vec![deep]);
    }
    if let ciborium::Value::Map(fields) = &mut value {
        fields.push(("from_a_newer_chpox".into(), deep));
    }
    let mut raw = Vec::new();
    ciborium::into_writer(&value, &mut raw).unwrap();
    let e = refused(with_metadata(&bytes, &raw));
    assert!(e.contains("nested more than 64 levels deep"), "{e}");
}

/// A declared length is never room reserved: a count of 2^64 - 1 over
/// three elements is an error, not an allocation.
#[test]
fn declared_counts_reserve_nothing() {
    let (bytes, mut meta) = sample_image_bytes(false);
    meta.root.process.cmdline = vec![MARK.into()];
    let mut crafted = vec![0x9b];
    crafted.extend_from_slice(&u64::MAX.to_be_bytes());
    crafted.extend_from_slice(&[0x60, 0x60, 0x60]);
    let e = refused(with_metadata(&bytes, &splice(&meta, &crafted)));
    assert!(!e.contains(&over_budget()), "{e}");
}

/// What real trees need fits: a thousand processes like the sample (which
/// are each charged a few times their CBOR) decode.
#[test]
fn a_large_tree_within_the_limits_decodes() {
    let (bytes, meta) = sample_image_bytes(false);
    let mut tree = meta.clone();
    for i in 0..1000 {
        let mut p = meta.root.clone();
        p.process.pid = 10_000 + i;
        p.process.ppid = meta.root.process.pid;
        for vma in &mut p.vmas {
            vma.pages.clear();
        }
        for fd in &mut p.fds {
            if let FdKind::RegularFile { embedded, .. } = &mut fd.kind {
                *embedded = None;
            }
        }
        tree.descendants.push(p);
    }
    let raw = cbor(&tree);
    let r = ImageReader::from_bytes(with_metadata(&bytes, &raw)).unwrap();
    assert_eq!(r.metadata().descendants.len(), 1000);
    assert_eq!(cbor(r.metadata()), raw);
}
