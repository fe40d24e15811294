//! Deferred compression (`writer::deferred`): blobs written plain, mapped
//! and rewritten in place, then compressed at the end into the image.

use std::path::Path;

use crate::image::model::*;
use crate::image::testutil::*;
use crate::image::*;

fn last(meta: &mut Metadata) -> &mut Vma {
    meta.root.vmas.last_mut().expect("a mapping")
}

fn deferred(path: &Path) -> ImageWriter {
    ImageWriter::create(
        path,
        WriteOptions {
            compress: true,
            defer_compression: true,
            ..WriteOptions::default()
        },
    )
    .expect("create")
}

/// The sample's metadata with a mapping from 0x10_0000_0000 to
/// 0x60_0000_0000 (its last), for the runs of the tests.
fn metadata() -> Metadata {
    let mut meta = sample_metadata();
    let mut vma = meta
        .root
        .vmas
        .iter()
        .find(|v| v.name == "[heap]")
        .expect("a heap")
        .clone();
    vma.name = String::new();
    (vma.start, vma.end) = (0x10_0000_0000, 0x60_0000_0000);
    vma.pages.clear();
    meta.root.vmas.push(vma);
    meta
}

/// Names in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

/// `len` bytes of sample memory from `addr`, as one plain blob (a run),
/// streamed in uneven slices.
fn stream(w: &mut ImageWriter, bytes: &[u8]) -> DataRef {
    w.begin_data().expect("begin");
    for piece in bytes.chunks(3 << 19) {
        w.write_data(piece).expect("write");
    }
    w.end_data().expect("end")
}

#[test]
fn deferred_blobs_are_compressed_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut meta = metadata();
    let mut w = deferred(&path);
    assert!(!w.compresses(), "plain while deferred");
    // A run of 8 MiB (one piece), one of 12 MiB (several), a small one
    // that `add_data` compresses at once, and one mapped.
    let mut expected = Vec::new();
    let push = |meta: &mut Metadata, addr: u64, data: DataRef| {
        last(meta).pages.push(PageRun {
            addr,
            npages: data.raw_len / PAGE,
            data,
        });
    };
    let a = memory(0x10_0000_0000, 8 << 20);
    let ra = stream(&mut w, &a);
    let b = memory(0x20_0000_0000, 12 << 20);
    let rb = stream(&mut w, &b);
    let c = memory(0x30_0000_0000, 4 * PAGE);
    let rc = w.add_data(&c).expect("small");
    assert_eq!(rc.compression, Compression::Zstd);
    let mut area = w.map_area(2 << 20).expect("map").expect("a mapping");
    let d = memory(0x40_0000_0000, 2 << 20);
    area.as_mut_slice().copy_from_slice(&d);
    let rd = w
        .close_area(area, vec![(0, 2 << 20)])
        .expect("close")
        .data_refs()[0];
    // A page of `a` rewritten in place, as a pre-copy does.
    let mut a = a;
    a[4096..8192].fill(0x5a);
    w.rewrite(ra.offset + 4096, &a[4096..8192])
        .expect("rewrite");
    let ra = w.blob_at(ra.offset, ra.stored_len).expect("blob_at");
    w.compress_from_now();
    assert!(w.compresses());
    let e = memory(0x50_0000_0000, 3 << 20);
    let re = stream(&mut w, &e);
    assert_eq!(re.compression, Compression::Zstd);
    for (addr, r, bytes) in [
        (0x10_0000_0000, ra, a),
        (0x20_0000_0000, rb, b),
        (0x30_0000_0000, rc, c),
        (0x40_0000_0000, rd, d),
        (0x50_0000_0000, re, e),
    ] {
        push(&mut meta, addr, r);
        expected.push(bytes);
    }
    let file = w.add_data(EMBEDDED_FILE).expect("file");
    meta.files[2].embedded = Some(file);
    expected.push(EMBEDDED_FILE.to_vec());
    w.finish_updating(&mut meta).expect("finish");

    assert_eq!(others(dir.path(), &["img"]), Vec::<String>::new());
    let reader = ImageReader::open(&path).expect("open");
    reader.verify_all().expect("verify");
    let runs = &reader.metadata().root.vmas.last().expect("vma").pages;
    assert_eq!(runs.len(), 5);
    for (run, bytes) in runs.iter().zip(&expected) {
        assert_eq!(run.data.compression, Compression::Zstd);
        assert_eq!(&reader.read_data(&run.data).expect("read"), bytes);
    }
    let file = reader.metadata().files[2].embedded.expect("embedded");
    assert_eq!(file.compression, Compression::Zstd);
    assert_eq!(reader.read_data(&file).expect("read"), EMBEDDED_FILE);
    // Incompressible pages would not shrink: the sample's half-zero pages do.
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < (27 << 20) / 2 + (1 << 20), "{size} bytes");
}

/// A blob that no longer matches its checksum when it is compressed fails
/// the image: no temporary file is left, the previous image stays.
#[test]
fn a_failed_compression_leaves_the_previous_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, b"previous").unwrap();
    let mut meta = metadata();
    let mut w = deferred(&path);
    let a = memory(0x10_0000_0000, 1 << 20);
    let mut r = stream(&mut w, &a);
    r.crc32c ^= 1;
    last(&mut meta).pages.push(PageRun {
        addr: 0x10_0000_0000,
        npages: 256,
        data: r,
    });
    let e = w.finish_updating(&mut meta).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    assert_eq!(others(dir.path(), &["img"]), Vec::<String>::new());
}

/// Without deferral nothing changes: an image with no plain blob is not
/// written twice.
#[test]
fn finish_of_a_deferred_writer_with_nothing_plain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut meta = metadata();
    let mut w = deferred(&path);
    w.compress_from_now();
    let r = stream(&mut w, &memory(0x10_0000_0000, 1 << 20));
    last(&mut meta).pages.push(PageRun {
        addr: 0x10_0000_0000,
        npages: 256,
        data: r,
    });
    let before = last(&mut meta).pages[0].data;
    w.finish_updating(&mut meta).expect("finish");
    assert_eq!(last(&mut meta).pages[0].data, before);
    let reader = ImageReader::open(&path).expect("open");
    reader.verify_all().expect("verify");
}

/// `finish` (the metadata borrowed) compresses too, into a copy of the
/// metadata: the image is compressed, the caller's metadata untouched.
#[test]
fn finish_of_a_deferred_writer_compresses_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut meta = metadata();
    let mut w = deferred(&path);
    let bytes = memory(0x10_0000_0000, 1 << 20);
    let r = stream(&mut w, &bytes);
    assert_eq!(r.compression, Compression::None);
    last(&mut meta).pages.push(PageRun {
        addr: 0x10_0000_0000,
        npages: 256,
        data: r,
    });
    w.finish(&meta).expect("finish");
    assert_eq!(last(&mut meta).pages[0].data, r);
    let reader = ImageReader::open(&path).expect("open");
    reader.verify_all().expect("verify");
    let run = reader.metadata().root.vmas.last().expect("vma").pages[0];
    assert_eq!(run.data.compression, Compression::Zstd);
    assert_eq!(reader.read_data(&run.data).expect("read"), bytes);
    assert_eq!(others(dir.path(), &["img"]), Vec::<String>::new());
}
