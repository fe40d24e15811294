use super::running::{FIRST_SCAN_SPAN, ScanPart, maybe_device, scan_batches};
use super::*;
use crate::image::model::Compression;

fn blob(offset: u64) -> DataRef {
    blob_of(offset, 1)
}

#[test]
fn device_nodes_are_kept_from_registering_by_path() {
    let line = |l: &str| crate::memory::parse_smaps(l, "test").unwrap().remove(0);
    let device = |l: &str| maybe_device(&line(l));
    assert!(device(
        "7f0000000000-7f0000001000 rw-p 00000000 00:05 12 /dev/mem"
    ));
    assert!(device(
        "7f0000000000-7f0000001000 rw-p 00000000 00:0e 9 anon_inode:foo"
    ));
    assert!(!device("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 "));
    assert!(!device(
        "7f0000000000-7f0000001000 rw-p 00000000 00:05 4 /dev/zero"
    ));
    assert!(!device(
        "7f0000000000-7f0000001000 rw-p 00000000 00:1a 7 /dev/shm/x"
    ));
    assert!(!device(
        "7f0000000000-7f0000001000 rw-p 00001000 08:01 99 /usr/lib/libc.so.6"
    ));
    assert!(!device(
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]"
    ));
}

fn blob_of(offset: u64, pages: u64) -> DataRef {
    DataRef {
        offset,
        stored_len: pages * PAGE_SIZE,
        raw_len: pages * PAGE_SIZE,
        crc32c: 0,
        compression: Compression::None,
    }
}

#[test]
fn storing_follows_the_kind() {
    let p = PAGE_IS_PRESENT;
    assert!(needs_storing(VmaKind::Anonymous, p));
    assert!(!needs_storing(VmaKind::Anonymous, p | PAGE_IS_PFNZERO));
    assert!(needs_storing(VmaKind::Anonymous, PAGE_IS_SWAPPED));
    assert!(!needs_storing(VmaKind::Anonymous, 0));
    assert!(needs_storing(VmaKind::PrivateFile, p));
    assert!(!needs_storing(VmaKind::PrivateFile, p | PAGE_IS_FILE));
    assert!(!needs_storing(VmaKind::SharedFile, p));
}

#[test]
fn unchanged_fills_the_copied_pages_between_written_ones() {
    let pg = PAGE_SIZE;
    let copied = [
        (0x10000, 4, blob(0), ()),
        (0x10000 + 6 * pg, 2, blob(0), ()),
    ]
    .map(|(a, n, d, ())| (a, n, d));
    let w = |s: u64, e: u64| Region {
        start: 0x10000 + s * pg,
        end: 0x10000 + e * pg,
        categories: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
    };
    let got = with_unchanged(
        &copied,
        0x10000,
        0x10000 + 10 * pg,
        vec![w(1, 2), w(3, 7), w(9, 10)],
    );
    let got: Vec<(u64, u64, bool)> = got
        .iter()
        .map(|r| {
            (
                (r.start - 0x10000) / pg,
                (r.end - 0x10000) / pg,
                r.written(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 1, false),
            (1, 2, true),
            (2, 3, false),
            (3, 7, true),
            (7, 8, false),
            (9, 10, true)
        ]
    );
}

#[test]
fn pieces_become_runs_along_blobs() {
    let pg = PAGE_SIZE;
    let blobs = [blob_of(0x10000, 2), blob_of(0x12000, 2)];
    // Two blobs side by side in memory and file, and a new page after.
    let placed = [
        (0x1000, 3, 0x10000),
        (0x1000 + 3 * pg, 1, 0x13000),
        (0x1000 + 4 * pg, 1, 0x90000),
    ];
    assert_eq!(
        runs_of_pieces(&placed, &blobs),
        vec![
            (0x1000, 2, 0x10000),
            (0x1000 + 2 * pg, 2, 0x12000),
            (0x1000 + 4 * pg, 1, 0x90000)
        ]
    );
}

/// The runs cut from one step to the next are those a page-by-page walk
/// cuts, over many layouts: blobs of every size, pieces that cross them,
/// runs longer than a chunk.
#[test]
fn pieces_become_the_runs_a_page_walk_makes() {
    let pg = PAGE_SIZE;
    let chunk = crate::pagecopy::CHUNK_PAGES;
    let by_page = |placed: &[(u64, u64, u64)], blobs: &[DataRef]| {
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for &(addr, n, offset) in placed {
            for i in 0..n {
                let (a, o) = (addr + i * pg, offset + i * pg);
                match runs.last_mut() {
                    Some((ra, rn, ro))
                        if *ra + *rn * pg == a
                            && *ro + *rn * pg == o
                            && *rn < chunk
                            && !blobs.iter().any(|b| b.offset == o) =>
                    {
                        *rn += 1
                    }
                    _ => runs.push((a, 1, o)),
                }
            }
        }
        runs
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    for _ in 0..200 {
        let mut blobs = Vec::new();
        let mut at = 0x10_0000;
        for _ in 0..next(6) {
            let pages = 1 + next(3 * chunk);
            blobs.push(blob_of(at, pages));
            at += (pages + next(3)) * pg;
        }
        let mut placed = Vec::new();
        let (mut addr, mut offset) = (0x4000_0000, 0x10_0000 - next(4) * pg);
        for _ in 0..1 + next(5) {
            let n = 1 + next(2 * chunk + 7);
            placed.push((addr, n, offset));
            addr += (n + next(2)) * pg;
            offset += (n + next(2)) * pg;
        }
        assert_eq!(
            runs_of_pieces(&placed, &blobs),
            by_page(&placed, &blobs),
            "{placed:x?}"
        );
    }
}

#[test]
fn a_walk_over_mappings_side_by_side_is_cut_at_their_bounds() {
    let region = |start: u64, end: u64, categories: u64| Region {
        start: start * PAGE_SIZE,
        end: end * PAGE_SIZE,
        categories,
    };
    // One stretch the kernel joined across the bound at page 4, one inside
    // the second mapping, one crossing into the third.
    let walked = [region(2, 6, 1), region(7, 8, 2), region(9, 12, 3)];
    let pages = |rs: Vec<Region>| -> Vec<(u64, u64, u64)> {
        rs.iter()
            .map(|r| (r.start / PAGE_SIZE, r.end / PAGE_SIZE, r.categories))
            .collect()
    };
    assert_eq!(pages(within(&walked, 0, 4 * PAGE_SIZE)), vec![(2, 4, 1)]);
    assert_eq!(
        pages(within(&walked, 4 * PAGE_SIZE, 10 * PAGE_SIZE)),
        vec![(4, 6, 1), (7, 8, 2), (9, 10, 3)]
    );
    assert_eq!(
        pages(within(&walked, 10 * PAGE_SIZE, 16 * PAGE_SIZE)),
        vec![(10, 12, 3)]
    );
    assert!(within(&walked, 12 * PAGE_SIZE, 16 * PAGE_SIZE).is_empty());
    assert!(within(&[], 0, PAGE_SIZE).is_empty());
}

#[test]
fn batches_cover_the_registered_mappings_in_growing_spans() {
    let line = |l: &str| crate::memory::parse_smaps(l, "test").unwrap().remove(0);
    let maps = vec![
        // 8 MiB, registered.
        line("7f0000000000-7f0000800000 rw-p 00000000 00:00 0 "),
        // 4 KiB, not registered.
        line("7f0000800000-7f0000801000 r--p 00000000 00:00 0 "),
        // 1 GiB, registered.
        line("7f1000000000-7f1040000000 rw-p 00000000 00:00 0 "),
    ];
    let registered: Vec<(u64, u64)> = [&maps[0], &maps[2]]
        .iter()
        .map(|m| (m.start, m.end))
        .collect();
    let batches = scan_batches(&maps, &registered, FIRST_SCAN_SPAN);
    let spans: Vec<u64> = batches
        .iter()
        .map(|b| b.iter().map(|&(_, s, e)| e - s).sum())
        .collect();
    const MIB: u64 = 1 << 20;
    // 16, 64, 256 MiB, then what is left of 1032 MiB.
    assert_eq!(spans, [16 * MIB, 64 * MIB, 256 * MIB, 696 * MIB]);
    // In address order, end to end within each mapping, nothing else.
    let parts: Vec<ScanPart> = batches.concat();
    assert_eq!(parts[0], (0, maps[0].start, maps[0].end));
    assert_eq!(parts[1], (2, maps[2].start, maps[2].start + 8 * MIB));
    assert!(parts.windows(2).all(|w| w[0].2 <= w[1].1));
    assert!(parts[1..].windows(2).all(|w| w[0].2 == w[1].1));
    assert_eq!(parts.last().map(|p| p.2), Some(maps[2].end));
    assert!(parts.iter().all(|&(i, ..)| i != 1));
    // Unbatched: one batch of both mappings whole.
    assert_eq!(
        scan_batches(&maps, &registered, u64::MAX),
        vec![vec![
            (0, maps[0].start, maps[0].end),
            (2, maps[2].start, maps[2].end)
        ]]
    );
}

#[test]
fn patches_go_to_the_blobs_they_lie_in() {
    const P: u64 = PAGE_SIZE;
    // Three blobs of two pages side by side, a gap, and one more.
    let blobs = [
        blob_of(0, 2),
        blob_of(2 * P, 2),
        blob_of(4 * P, 2),
        blob_of(10 * P, 2),
    ];
    let patch = |at: u64, pages: u64| Patch {
        end: at + pages * P,
        len: pages * P,
        delta: at as u32 ^ 0x5a5a,
    };
    let (inside, again, straddling, in_gap) =
        (patch(P, 1), patch(0, 2), patch(3 * P, 2), patch(7 * P, 1));
    let by_blob = patches_by_blob(&blobs, vec![inside, again, straddling, in_gap]);
    // Both patches of the first blob, in order; the two blobs the third
    // patch straddles are checksummed from the file; the gap's patch
    // touches no blob, and the last blob none.
    assert_eq!(by_blob.get(&0), Some(&Some(vec![inside, again])));
    assert_eq!(by_blob.get(&1), Some(&None));
    assert_eq!(by_blob.get(&2), Some(&None));
    assert_eq!(by_blob.get(&3), None);
    assert_eq!(by_blob.len(), 3);
}
