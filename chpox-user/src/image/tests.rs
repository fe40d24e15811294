//! Tests of writing and reading whole images.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use super::format::{ALIGN, HEADER_SIZE, HEADER_USED};
use super::model::*;
use super::testutil::*;
use super::*;

/// Big enough to span several zstd blocks and several reader chunks.
const BIG_PAGES: u64 = 1536; // 6 MiB
const BIG_VMA: u64 = 0x7fff_e000_0000;

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn opts(compress: bool) -> WriteOptions {
    WriteOptions {
        compress,
        owner: None,
        keep_previous: 0,
        as_user: None,
        defer_compression: false,
    }
}

/// Every DataRef in `meta` with the bytes it must read back as.
fn expected_blobs(meta: &Metadata) -> Vec<(DataRef, Vec<u8>)> {
    let mut out = Vec::new();
    for vma in &meta.root.vmas {
        for run in &vma.pages {
            out.push((run.data, memory(run.addr, run.npages * PAGE)));
        }
    }
    for f in &meta.files {
        if let Some(r) = f.embedded {
            let content = if f.path == "/tmp/scratch" {
                EMBEDDED_FILE.to_vec()
            } else {
                Vec::new()
            };
            out.push((r, content));
        }
    }
    for fd in &meta.root.fds {
        if let FdKind::RegularFile {
            embedded: Some(r), ..
        } = fd.kind
        {
            out.push((r, FD_CONTENT.to_vec()));
        }
    }
    out
}

/// The sample image plus an empty embedded file (a 0-length blob) and a
/// 6 MiB VMA whose pages are streamed in uneven slices.
fn write_full_image(path: &Path, compress: bool) -> SampleImage {
    write_sample_image_with(path, compress, |w, meta| {
        w.begin_data().unwrap();
        let empty = w.end_data().unwrap();
        let mut f = meta.files[2].clone();
        f.path = "/tmp/empty".into();
        f.size = 0;
        f.embedded = Some(empty);
        meta.files.push(f);

        let big = memory(BIG_VMA, BIG_PAGES * PAGE);
        w.begin_data().unwrap();
        let slices = [1 << 20, 12_345, 3 << 19, 7, 2 << 20];
        let mut at = 0;
        for n in slices.iter().cycle() {
            let end = (at + n).min(big.len());
            w.write_data(&big[at..end]).unwrap();
            at = end;
            if at == big.len() {
                break;
            }
        }
        let data = w.end_data().unwrap();
        let mut v = meta.root.vmas[4].clone();
        v.start = BIG_VMA;
        v.end = BIG_VMA + (BIG_PAGES + 16) * PAGE;
        v.pages = vec![PageRun {
            addr: BIG_VMA,
            npages: BIG_PAGES,
            data,
        }];
        meta.root.vmas.insert(4, v);
    })
}

fn round_trip(compress: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.img");
    let written = write_full_image(&path, compress);

    let r = ImageReader::open(&path).unwrap();
    assert_eq!(cbor(r.metadata()), cbor(&written.meta));
    assert_eq!(r.file_len(), written.size);
    assert_eq!(fs::metadata(&path).unwrap().len(), written.size);
    let h = r.header();
    assert_eq!(h.format_version, 1);
    assert_eq!(h.data_offset, HEADER_SIZE as u64);
    assert_eq!(h.meta_offset % ALIGN, 0);
    assert_eq!(h.meta_offset + h.meta_len, written.size);
    let want = if compress {
        Compression::Zstd
    } else {
        Compression::None
    };
    assert_eq!(h.meta_compression, want);

    let blobs = expected_blobs(&written.meta);
    assert_eq!(blobs.len(), SAMPLE_RUNS.len() + 4);
    let mut raw_total = 0;
    for (d, content) in &blobs {
        assert_eq!(d.compression, want);
        assert_eq!(d.offset % ALIGN, 0);
        assert_eq!(d.raw_len, content.len() as u64);
        assert_eq!(&r.read_data(d).unwrap(), content);
        let mut buf = vec![0xff; content.len()];
        r.read_data_into(d, &mut buf).unwrap();
        assert_eq!(&buf, content);
        raw_total += d.raw_len;
    }
    let big = blobs.iter().find(|(d, _)| d.raw_len == BIG_PAGES * PAGE);
    let big = big.unwrap().0;
    if compress {
        // Half of each page is zero: zstd must at least halve it.
        assert!(big.stored_len < big.raw_len / 2, "{big:?}");
    } else {
        assert_eq!(big.stored_len, big.raw_len);
    }

    let report = r.verify_all().unwrap();
    assert_eq!(report.blobs, blobs.len() as u64);
    assert_eq!(report.raw_bytes, raw_total);

    // Memory from the big run, at an offset that straddles reader chunks.
    let addr = BIG_VMA + (1 << 20) - 10;
    assert_eq!(r.read_memory(addr, 5000).unwrap(), Some(memory(addr, 5000)));
    // ... and from its end, where the VMA goes on unstored.
    let end = BIG_VMA + BIG_PAGES * PAGE;
    assert_eq!(r.read_memory(end - 8, 8).unwrap(), Some(memory(end - 8, 8)));
    assert_eq!(r.read_memory(end - 8, 9).unwrap(), None);

    // The same bytes parsed from memory give the same result.
    let m = ImageReader::from_bytes(fs::read(&path).unwrap()).unwrap();
    assert_eq!(cbor(m.metadata()), cbor(&written.meta));
    assert_eq!(m.verify_all().unwrap(), report);
}

#[test]
fn round_trip_plain() {
    round_trip(false);
}

#[test]
fn round_trip_compressed() {
    round_trip(true);
}

#[test]
fn image_without_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.img");
    let meta = sample_metadata();
    let w = ImageWriter::create(&path, opts(false)).unwrap();
    let size = w.finish(&meta).unwrap();
    let r = ImageReader::open(&path).unwrap();
    assert_eq!(r.header().data_len, 0);
    assert_eq!(r.header().meta_offset, HEADER_SIZE as u64);
    assert_eq!(r.file_len(), size);
    assert_eq!(cbor(r.metadata()), cbor(&meta));
    assert_eq!(r.verify_all().unwrap().blobs, 0);
    assert_eq!(r.read_memory(HEAP_VMA.0, 1).unwrap(), None);
}

/// Blobs written at once with their own checksums read back one by one,
/// compressed or not, and a spare file made ready for the image is used
/// and cut to the image's size.
#[test]
fn consecutive_blobs_in_a_spare_file() {
    for compress in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inc.img");
        let spare = SpareFile::prepare(&path, 1 << 20, None).unwrap();
        let spare_inode = spare.inode();
        let mut w = ImageWriter::create_in(&path, opts(compress), Some(spare)).unwrap();
        let lens = [4096usize, 8192, 4096];
        let bytes: Vec<u8> = (0..lens.iter().sum::<usize>())
            .map(|i| (i % 251) as u8)
            .collect();
        let mut pieces = Vec::new();
        let mut at = 0;
        for len in lens {
            pieces.push((len, crc32c::crc32c(&bytes[at..at + len])));
            at += len;
        }
        let misfit = w.add_consecutive(&bytes, &pieces[..2]).unwrap_err();
        assert!(matches!(misfit, ImageError::WriterState { .. }), "{misfit}");
        let refs = w.add_consecutive(&bytes, &pieces).unwrap();
        let size = w.finish(&sample_metadata()).unwrap();
        assert_eq!(dir_entries(dir.path()), ["inc.img".to_string()].into());
        let written = fs::metadata(&path).unwrap();
        assert_eq!(written.len(), size);
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&written), spare_inode);
        let r = ImageReader::open(&path).unwrap();
        let mut at = 0;
        for (data, len) in refs.iter().zip(lens) {
            assert_eq!(r.read_data(data).unwrap(), &bytes[at..at + len]);
            at += len;
        }
    }
}

/// A writer waiting for its next bytes allocates the file ahead in
/// steps, only as far as asked and never past a spare file's allocation
/// twice; what the image does not use is cut off, and a compressed image
/// (whose size is unknown) allocates nothing.
#[test]
fn allocation_while_waiting_stops_where_asked_and_is_cut_off() {
    for (compress, spare) in [(false, false), (false, true), (true, false)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.img");
        let spare = spare.then(|| SpareFile::prepare(&path, 2 << 20, None).unwrap());
        let mut w = ImageWriter::create_in(&path, opts(compress), spare).unwrap();
        let until = w.position() + (3 << 20) + 4096;
        let mut steps = 0;
        while w.allocate_while_waiting(until) {
            steps += 1;
            assert!(steps <= 4, "allocated past {until}");
        }
        // The temporary file, the directory's only entry until `finish`.
        let temp = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap();
        let on_disk = temp.metadata().unwrap().len();
        match (compress, steps) {
            (true, 0) => {}
            // A fresh file: 1 MiB steps up to `until`, the last one short.
            (false, 4) => assert_eq!(on_disk, until),
            // The spare's 2 MiB (from offset 0) are not allocated again.
            (false, 2) => assert_eq!(on_disk, until),
            other => panic!("compress, steps: {other:?}"),
        }
        assert!(!w.allocate_while_waiting(until));
        let bytes = vec![7u8; 8192];
        let data = w.add_data(&bytes).unwrap();
        let size = w.finish(&sample_metadata()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        assert!(size < until, "compress={compress}: {size} not cut back");
        let r = ImageReader::open(&path).unwrap();
        assert_eq!(r.read_data(&data).unwrap(), bytes);
    }
}

/// A spare file made in another directory is not used there.
#[test]
fn spare_file_of_another_directory_is_left_alone() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spare = SpareFile::prepare(&a.path().join("x.img"), 1 << 16, None).unwrap();
    let path = b.path().join("y.img");
    let w = ImageWriter::create_in(&path, opts(false), Some(spare)).unwrap();
    w.finish(&sample_metadata()).unwrap();
    assert!(dir_entries(a.path()).is_empty());
    assert_eq!(dir_entries(b.path()), ["y.img".to_string()].into());
}

#[test]
fn dropped_writer_leaves_previous_image_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    write_sample_image(&path, false);
    let before = fs::read(&path).unwrap();

    for compress in [false, true] {
        let mut w = ImageWriter::create(&path, opts(compress)).unwrap();
        w.add_data(&[1u8; 10_000]).unwrap();
        w.begin_data().unwrap();
        w.write_data(&[2u8; 5000]).unwrap();
        // A temporary file exists next to the image while writing.
        assert_eq!(dir_entries(dir.path()).len(), 2);
        drop(w);
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(dir_entries(dir.path()), BTreeSet::from(["img".to_string()]));
    }

    // Unwinding out of a dump removes the temporary file too.
    let res = std::panic::catch_unwind(|| {
        let mut w = ImageWriter::create(&path, opts(false)).unwrap();
        w.add_data(b"partial").unwrap();
        panic!("dump failed");
    });
    assert!(res.is_err());
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), BTreeSet::from(["img".to_string()]));

    // A finish that fails (blob still open) publishes nothing.
    let mut w = ImageWriter::create(&path, opts(false)).unwrap();
    w.begin_data().unwrap();
    let e = w.finish(&sample_metadata()).unwrap_err();
    assert!(matches!(e, ImageError::WriterState { .. }), "{e}");
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), BTreeSet::from(["img".to_string()]));

    // A successful second write replaces the image.
    let s = write_sample_image(&path, true);
    assert_eq!(fs::metadata(&path).unwrap().len(), s.size);
    assert_ne!(fs::read(&path).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), BTreeSet::from(["img".to_string()]));
}

#[test]
fn refuses_symlink_and_non_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    fs::write(&target, b"do not touch").unwrap();
    let link = dir.path().join("img");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let e = ImageWriter::create(&link, opts(false)).err().unwrap();
    assert!(matches!(e, ImageError::Symlink { .. }), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(fs::read(&target).unwrap(), b"do not touch");
    assert_eq!(
        dir_entries(dir.path()),
        BTreeSet::from(["img".to_string(), "precious".to_string()])
    );

    // A dangling link is refused just the same.
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let e = ImageWriter::create(&dangling, opts(false)).err().unwrap();
    assert!(matches!(e, ImageError::Symlink { .. }), "{e}");
    assert!(!dir.path().join("nowhere").exists());

    let sub = dir.path().join("subdir");
    fs::create_dir(&sub).unwrap();
    let e = ImageWriter::create(&sub, opts(false)).err().unwrap();
    assert!(matches!(e, ImageError::NotRegular { .. }), "{e}");
}

#[test]
fn missing_directory_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/img");
    let e = ImageWriter::create(&path, opts(false)).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot write image {}: directory {} does not exist",
            path.display(),
            dir.path().join("no/such").display()
        )
    );
}

#[test]
fn owner_can_be_ourselves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let w = ImageWriter::create(
        &path,
        WriteOptions {
            compress: false,
            owner: Some(me),
            keep_previous: 0,
            as_user: None,
            defer_compression: false,
        },
    )
    .unwrap();
    w.finish(&sample_metadata()).unwrap();
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&path).unwrap();
    assert_eq!((md.uid(), md.gid()), me);
    assert_eq!(md.mode() & 0o777, 0o600);
}

#[test]
fn writer_misuse_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ImageWriter::create(&dir.path().join("img"), opts(false)).unwrap();
    assert!(matches!(
        w.write_data(b"x"),
        Err(ImageError::WriterState { .. })
    ));
    assert!(matches!(w.end_data(), Err(ImageError::WriterState { .. })));
    w.begin_data().unwrap();
    assert!(matches!(
        w.begin_data(),
        Err(ImageError::WriterState { .. })
    ));
    // The open blob survives the misuse.
    w.write_data(b"abc").unwrap();
    let d = w.end_data().unwrap();
    assert_eq!(d.raw_len, 3);
}

#[test]
fn reader_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = ImageReader::open(&dir.path().join("absent")).err().unwrap();
    assert!(matches!(e, ImageError::NotFound { .. }), "{e}");
    let e = ImageReader::open(dir.path()).err().unwrap();
    assert!(matches!(e, ImageError::NotRegular { .. }), "{e}");
    let short = dir.path().join("short");
    fs::write(&short, b"CHPOXIMG").unwrap();
    let e = ImageReader::open(&short).err().unwrap();
    assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
    let e = ImageReader::from_bytes(vec![0; 8192]).err().unwrap();
    assert_eq!(e.to_string(), "not a chpox image (bad magic)");
}

#[test]
fn newer_version_is_reported_as_such() {
    let (mut bytes, _) = sample_image_bytes(false);
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = ImageReader::from_bytes(bytes).err().unwrap();
    assert_eq!(
        e.to_string(),
        "image format version 2 is newer than this chpox supports (1); upgrade chpox"
    );
}

#[test]
fn data_ref_outside_data_area_is_rejected_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    write_sample_image_with(&path, false, |_, meta| {
        let vma = &mut meta.root.vmas[3];
        let run = &mut vma.pages[0];
        run.data.offset += 1 << 30;
    });
    let e = ImageReader::open(&path).err().unwrap();
    assert!(matches!(e, ImageError::OutOfBounds { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "page data of VMA {:x}-{:x} (run at {:x}) lies outside the image's data area: the image is corrupt",
            HEAP_VMA.0, HEAP_VMA.1, HEAP_VMA.0
        )
    );
}

#[test]
fn inconsistent_page_runs_are_rejected_at_open() {
    let cases: [fn(&mut Metadata); 4] = [
        // More pages than data.
        |m| m.root.vmas[3].pages[0].npages += 1,
        // Outside its VMA.
        |m| m.root.vmas[2].pages[0].addr -= PAGE,
        // Overlapping another run.
        |m| {
            let mut r = m.root.vmas[3].pages[1];
            r.addr = HEAP_VMA.0 + PAGE;
            m.root.vmas[3].pages.push(r);
        },
        // A file index out of range.
        |m| m.root.vmas[0].file = Some(99),
    ];
    for (i, change) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        write_sample_image_with(&path, false, |_, meta| change(meta));
        let e = ImageReader::open(&path).err();
        assert!(
            matches!(e, Some(ImageError::Decode { .. })),
            "case {i}: {e:?}"
        );
    }
}

#[test]
fn read_data_checks_caller_refs() {
    let (bytes, meta) = sample_image_bytes(false);
    let r = ImageReader::from_bytes(bytes).unwrap();
    let good = meta.root.vmas[3].pages[0].data;

    let mut far = good;
    far.offset = 1 << 40;
    assert!(matches!(
        r.read_data(&far),
        Err(ImageError::OutOfBounds { .. })
    ));

    let mut lying = good;
    lying.raw_len += 1;
    assert!(matches!(
        r.read_data(&lying),
        Err(ImageError::Decode { .. })
    ));

    let mut bad_crc = good;
    bad_crc.crc32c ^= 1;
    let e = r.read_data(&bad_crc).unwrap_err();
    assert!(matches!(e, ImageError::Checksum { .. }), "{e}");

    let mut small = vec![0; 10];
    let e = r.read_data_into(&good, &mut small).unwrap_err();
    assert!(matches!(e, ImageError::BufferSize { .. }), "{e}");
    // The error names the blob by where the metadata uses it.
    let want = format!("page data of VMA {:x}-{:x}", HEAP_VMA.0, HEAP_VMA.1);
    assert!(e.to_string().contains(&want), "{e}");
}

#[test]
fn compressed_blob_with_wrong_raw_len_is_rejected() {
    let (bytes, meta) = sample_image_bytes(true);
    let r = ImageReader::from_bytes(bytes).unwrap();
    let good = meta.root.vmas[3].pages[0].data;
    for delta in [-1i64, 1] {
        let mut d = good;
        d.raw_len = (d.raw_len as i64 + delta) as u64;
        let e = r.read_data(&d).unwrap_err();
        assert!(matches!(e, ImageError::Decode { .. }), "{e}");
    }
}

#[test]
fn read_memory_across_runs() {
    for compress in [false, true] {
        let (bytes, _) = sample_image_bytes(compress);
        let r = ImageReader::from_bytes(bytes).unwrap();
        let mem = |a, l| r.read_memory(a, l).unwrap();

        // Inside one run.
        assert_eq!(
            mem(HEAP_VMA.0 + 100, 50),
            Some(memory(HEAP_VMA.0 + 100, 50))
        );
        // From `.data` across the VMA boundary into two heap runs.
        let a = DATA_VMA.1 - 100;
        let l = 100 + 3 * PAGE as usize;
        assert_eq!(mem(a, l), Some(memory(a, l as u64)));
        // Exactly one whole run, and a span ending on a run boundary.
        assert_eq!(
            mem(HEAP_VMA.0, 2 * PAGE as usize),
            Some(memory(HEAP_VMA.0, 2 * PAGE))
        );
        // One byte too far: the heap's fourth page is not stored.
        assert_eq!(mem(a, l + 1), None);
        // Starting in a gap, or before any run, or unmapped.
        assert_eq!(mem(HEAP_VMA.0 + 3 * PAGE, 1), None);
        assert_eq!(mem(HEAP_VMA.0 + 4 * PAGE + 4095, 2), None);
        assert_eq!(mem(0x1000, 16), None);
        // The last stored run ends the stack VMA.
        assert_eq!(
            mem(STACK_VMA.1 - 16, 16),
            Some(memory(STACK_VMA.1 - 16, 16))
        );
        assert_eq!(mem(STACK_VMA.1 - 16, 17), None);
        // Degenerate requests.
        assert_eq!(mem(HEAP_VMA.0 + 3 * PAGE, 0), Some(Vec::new()));
        assert_eq!(mem(u64::MAX - 3, 8), None);
    }
}

/// Parses `bytes` and verifies every blob; the error if anything fails.
fn check(bytes: Vec<u8>) -> Result<(), ImageError> {
    let r = ImageReader::from_bytes(bytes)?;
    r.verify_all()?;
    // Exercise read_memory on damaged-but-accepted images too.
    for (addr, _) in SAMPLE_RUNS {
        let _ = r.read_memory(addr, 64)?;
    }
    Ok(())
}

/// Byte ranges of `bytes` (a valid image of `meta`) that carry meaning; the
/// rest is padding that no check covers.
fn meaningful_ranges(bytes: &[u8], meta: &Metadata) -> Vec<(u64, u64)> {
    let r = ImageReader::from_bytes(bytes.to_vec()).unwrap();
    let h = *r.header();
    let mut ranges = vec![
        (0, HEADER_USED as u64),
        (h.meta_offset, h.meta_offset + h.meta_len),
    ];
    for (d, _) in expected_blobs(meta) {
        ranges.push((d.offset, d.offset + d.stored_len));
    }
    ranges
}

fn assert_one_line(e: &ImageError) {
    let s = e.to_string();
    assert!(!s.contains('\n') && !s.is_empty(), "{s:?}");
}

#[test]
fn truncated_images_are_rejected() {
    for compress in [false, true] {
        let (bytes, meta) = sample_image_bytes(compress);
        let len = bytes.len() as u64;
        let mut cuts: BTreeSet<u64> = (0..len).step_by(64).collect();
        for (a, b) in meaningful_ranges(&bytes, &meta) {
            for edge in [a, b] {
                for d in 0..4 {
                    cuts.insert(edge.saturating_sub(d));
                    cuts.insert(edge + d);
                }
            }
        }
        for cut in cuts.into_iter().filter(|&c| c < len) {
            let e = check(bytes[..cut as usize].to_vec())
                .err()
                .unwrap_or_else(|| panic!("cut at {cut} of {len} accepted"));
            assert_one_line(&e);
        }
    }
}

/// xorshift64*: a fixed pseudo-random sequence, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn flipped_bytes_are_detected() {
    for compress in [false, true] {
        let (bytes, meta) = sample_image_bytes(compress);
        let ranges = meaningful_ranges(&bytes, &meta);
        let mut rng = Rng(0x0123_4567_89ab_cdef ^ compress as u64);
        let mut rejected = 0;
        for _ in 0..3000 {
            let at = rng.next() % bytes.len() as u64;
            let flip = (rng.next() % 255 + 1) as u8;
            let mut bad = bytes.clone();
            bad[at as usize] ^= flip;
            let padding = !ranges.iter().any(|&(a, b)| a <= at && at < b);
            match check(bad) {
                Ok(()) => assert!(padding, "flip {flip:#x} at {at} accepted"),
                Err(e) => {
                    assert!(!padding, "flip at {at} in padding rejected: {e}");
                    assert_one_line(&e);
                    rejected += 1;
                }
            }
        }
        // The sample must be dense enough for the test to mean something.
        assert!(rejected > 500, "only {rejected} flips hit checked bytes");
    }
}

/// `bytes` (an image) with its metadata replaced by `raw` (uncompressed
/// CBOR) and both checksums fixed, so corruption reaches past them.
fn with_metadata(bytes: &[u8], raw: &[u8]) -> Vec<u8> {
    let r = ImageReader::from_bytes(bytes.to_vec()).unwrap();
    let mut h = *r.header();
    let mut out = bytes[..h.meta_offset as usize].to_vec();
    out.extend_from_slice(raw);
    h.meta_len = raw.len() as u64;
    h.meta_raw_len = raw.len() as u64;
    h.meta_crc32c = crc32c::crc32c(raw);
    h.meta_compression = Compression::None;
    out[..HEADER_SIZE].copy_from_slice(&h.encode());
    out
}

#[test]
fn corrupt_but_checksummed_metadata_never_panics() {
    for compress in [false, true] {
        let (bytes, meta) = sample_image_bytes(compress);
        let raw = cbor(&meta);
        assert!(check(with_metadata(&bytes, &raw)).is_ok());
        let mut rng = Rng(0xfeed_f00d ^ compress as u64);
        for _ in 0..1500 {
            let mut m = raw.clone();
            for _ in 0..=rng.next() % 3 {
                let at = (rng.next() % m.len() as u64) as usize;
                m[at] ^= (rng.next() % 255 + 1) as u8;
            }
            if let Err(e) = check(with_metadata(&bytes, &m)) {
                assert_one_line(&e);
            }
        }
    }
}

#[test]
fn tampered_data_refs_never_panic() {
    for compress in [false, true] {
        let (bytes, meta) = sample_image_bytes(compress);
        let mut rng = Rng(0xdead_beef ^ compress as u64);
        for i in 0..600 {
            let mut m = meta.clone();
            let first_offset = m.root.vmas[3].pages[0].data.offset;
            let vma = &mut m.root.vmas[3];
            let run = &mut vma.pages[(i % 3) as usize];
            let d = &mut run.data;
            match rng.next() % 6 {
                0 => d.offset = rng.next() % (bytes.len() as u64 + 8192),
                1 => d.stored_len = rng.next() % 20_000,
                2 => {
                    d.raw_len = rng.next() % 20_000;
                    run.npages = d.raw_len / PAGE;
                }
                3 => {
                    d.compression = match d.compression {
                        Compression::None => Compression::Zstd,
                        Compression::Zstd => Compression::None,
                    }
                }
                4 => d.offset = ALIGN * (rng.next() % 16),
                _ => {
                    // Point at another blob, keeping our own lengths.
                    d.offset = first_offset;
                }
            }
            // Sometimes make the checksum match whatever it now covers,
            // to get past it into decompression.
            let d = m.root.vmas[3].pages[(i % 3) as usize].data;
            if rng.next() & 1 == 0 {
                let end = d
                    .offset
                    .saturating_add(d.stored_len)
                    .min(bytes.len() as u64);
                let start = d.offset.min(end);
                m.root.vmas[3].pages[(i % 3) as usize].data.crc32c =
                    crc32c::crc32c(&bytes[start as usize..end as usize]);
            }
            if let Err(e) = check(with_metadata(&bytes, &cbor(&m))) {
                assert_one_line(&e);
            }
        }
    }
}

#[test]
fn corrupt_zstd_frame_with_matching_checksum() {
    let (bytes, meta) = sample_image_bytes(true);
    let d = meta.root.vmas[3].pages[1].data;
    let mut rng = Rng(42);
    let mut decode_errors = 0;
    for _ in 0..300 {
        let mut b = bytes.clone();
        let at = d.offset + rng.next() % d.stored_len;
        b[at as usize] ^= (rng.next() % 255 + 1) as u8;
        let mut m = meta.clone();
        let stored = &b[d.offset as usize..(d.offset + d.stored_len) as usize];
        m.root.vmas[3].pages[1].data.crc32c = crc32c::crc32c(stored);
        match check(with_metadata(&b, &cbor(&m))) {
            Ok(()) => {}
            Err(ImageError::Decode { .. }) => decode_errors += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(decode_errors > 0);
}

#[test]
fn reader_and_writer_can_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<ImageWriter>();
    send_sync::<ImageReader>();
    send_sync::<ImageError>();
}

/// Metadata written before a field existed still decodes: the schema only
/// grows by defaulted fields.
#[test]
fn metadata_without_later_fields_still_decodes() {
    let mut meta = sample_metadata();
    meta.registration = Some(SavedRegistration {
        signal: 12,
        flags: 2,
        ..SavedRegistration::default()
    });
    let mut value: ciborium::Value =
        ciborium::de::from_reader(cbor(&meta).as_slice()).expect("decode as a CBOR value");
    let ciborium::Value::Map(fields) = &mut value else {
        panic!("metadata is not a CBOR map");
    };
    let before = fields.len();
    fields.retain(|(k, _)| k.as_text() != Some("registration"));
    assert_eq!(fields.len(), before - 1, "no registration field to drop");
    let mut old = Vec::new();
    ciborium::ser::into_writer(&value, &mut old).expect("encode");
    let decoded: Metadata = ciborium::de::from_reader(old.as_slice()).expect("old metadata");
    assert_eq!(decoded.registration, None);
    assert_eq!(decoded.root.process.pid, meta.root.process.pid);
}

/// A single-process image of a chpox from before process trees: none of
/// the tree's fields (descendants, zombies, groups, description ids,
/// shared memory ids…) is there. It decodes as a tree of one process with
/// the defaults restore expects.
#[test]
fn single_process_metadata_from_before_trees_decodes() {
    fn strip(value: &mut ciborium::Value, fields: &[&str]) {
        if let ciborium::Value::Map(map) = value {
            map.retain(|(k, _)| !k.as_text().is_some_and(|k| fields.contains(&k)));
        }
    }
    fn field<'v>(value: &'v mut ciborium::Value, name: &str) -> &'v mut ciborium::Value {
        let ciborium::Value::Map(map) = value else {
            panic!("not a map");
        };
        &mut map
            .iter_mut()
            .find(|(k, _)| k.as_text() == Some(name))
            .unwrap_or_else(|| panic!("no field {name}"))
            .1
    }
    let meta = sample_metadata();
    let mut value: ciborium::Value =
        ciborium::de::from_reader(cbor(&meta).as_slice()).expect("decode as a CBOR value");
    strip(
        &mut value,
        &["descendants", "zombies", "children_not_saved"],
    );
    strip(
        field(&mut value, "process"),
        &[
            "pgid",
            "sid",
            "stopped",
            "exit_signal",
            "pdeath_signal",
            "child_subreaper",
            "shares_fs_with_parent",
        ],
    );
    for list in ["fds", "vmas"] {
        let ciborium::Value::Array(items) = field(&mut value, list) else {
            panic!("{list} is not an array");
        };
        for item in items {
            strip(item, &["description", "shmem_id"]);
        }
    }
    let mut old = Vec::new();
    ciborium::ser::into_writer(&value, &mut old).expect("encode");
    let decoded: Metadata = ciborium::de::from_reader(old.as_slice()).expect("old metadata");
    assert!(!decoded.is_tree());
    assert_eq!(decoded.processes().count(), 1);
    let p = &decoded.root.process;
    assert_eq!(p.pid, meta.root.process.pid);
    assert_eq!((p.pgid, p.sid, p.stopped), (0, 0, false));
    assert_eq!(p.exit_signal, libc::SIGCHLD);
    assert!(!p.shares_fs_with_parent);
    assert!(decoded.root.fds.iter().all(|f| f.description == 0));
    assert!(decoded.root.vmas.iter().all(|v| v.shmem_id.is_none()));
    assert_eq!(decoded.root.vmas.len(), meta.root.vmas.len());
}

mod budget;
mod deferred;
