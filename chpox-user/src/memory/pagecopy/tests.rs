use std::fs::File;

use super::source::mapped_alone;
use super::*;

#[test]
fn pages_shared_with_a_child_are_not_ours_alone() {
    const PAGES: u64 = 64;
    let len = (PAGES * PAGE_SIZE) as usize;
    // SAFETY: a fresh private anonymous mapping of ours; checked.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(at, libc::MAP_FAILED);
    // SAFETY: the mapping just made, `len` bytes.
    unsafe { std::ptr::write_bytes(at.cast::<u8>(), 7, len) };
    let addr = at as u64;
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let whole = [(addr, PAGES)];
    // Every other page: read as one span.
    let scattered: Vec<(u64, u64)> = (0..PAGES / 2)
        .map(|i| (addr + 2 * i * PAGE_SIZE, 1))
        .collect();
    assert!(mapped_alone(&pagemap, &whole));
    assert!(mapped_alone(&pagemap, &scattered));
    // SAFETY: the child only waits to be killed (async-signal-safe).
    let child = unsafe { libc::fork() };
    if child == 0 {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }
    assert!(child > 0, "fork");
    let (shared_whole, shared_scattered) = (
        mapped_alone(&pagemap, &whole),
        mapped_alone(&pagemap, &scattered),
    );
    // SAFETY: our own child, killed and reaped.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
        libc::munmap(at, len);
    }
    assert!(!shared_whole && !shared_scattered);
}

#[test]
fn runs_are_cut_to_chunks_and_chunks_hold_whole_runs() {
    let runs = split_runs(&[(0, CHUNK_PAGES * 2 + 3), (1 << 40, 1)]);
    assert_eq!(
        runs,
        vec![
            (0, CHUNK_PAGES),
            (CHUNK_PAGES * PAGE_SIZE, CHUNK_PAGES),
            (2 * CHUNK_PAGES * PAGE_SIZE, 3),
            (1 << 40, 1)
        ]
    );
    // Compressed: whole runs, grouped up to a chunk.
    let (pieces, chunks) = pieces_of(&runs, CHUNK_BYTES);
    assert_eq!(pieces.len(), 4);
    assert!(pieces.iter().all(|p| p.first && p.last));
    assert_eq!(chunks, vec![0..1, 1..2, 2..4]);
    let small = vec![(0, 1); 5000];
    let (_, chunks) = pieces_of(&small, CHUNK_BYTES);
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c.len() as u64 <= CHUNK_PAGES));
}

#[test]
fn long_runs_are_cut_into_pieces_that_fill_chunks() {
    let piece_pages = PIECE_BYTES as u64 / PAGE_SIZE;
    let runs = [(0, 2 * piece_pages + 3), (1 << 40, 1), (1 << 41, 2)];
    let (pieces, chunks) = pieces_of(&runs, PIECE_BYTES);
    let summary: Vec<(usize, u64, bool, bool)> = pieces
        .iter()
        .map(|p| (p.run, p.npages, p.first, p.last))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, piece_pages, true, false),
            (0, piece_pages, false, false),
            (0, 3, false, true),
            (1, 1, true, true),
            (2, 2, true, true),
        ]
    );
    assert_eq!(pieces[1].addr, piece_pages * PAGE_SIZE);
    assert_eq!(chunks, vec![0..1, 1..2, 2..5]);
}

/// Our own memory stands in for a target; plain and compressed images
/// read back exactly.
#[test]
fn runs_copied_on_all_cores_read_back_exactly() {
    use crate::image::model::{Vma, VmaKind};
    use crate::image::testutil::sample_metadata;
    use crate::image::{ImageReader, WriteOptions};

    let pages = 3 * CHUNK_PAGES + 5;
    let source: Vec<u8> = (0..(pages + 1) * PAGE_SIZE)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let base = source.as_ptr() as u64;
    let aligned = base.next_multiple_of(PAGE_SIZE);
    // A hole after the first page: two runs, cut into chunk-sized ones.
    let runs = split_runs(&[(aligned, 1), (aligned + 2 * PAGE_SIZE, pages - 2)]);
    // No worker: the writer reads every chunk itself, as it does
    // whenever the workers are behind.
    let cases = [false, true]
        .into_iter()
        .flat_map(|compress| [None, Some(1), Some(0)].map(|workers| (compress, workers)));
    for (compress, workers) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let opts = WriteOptions {
            compress,
            ..WriteOptions::default()
        };
        let mut writer = ImageWriter::create(&path, opts).expect("create");
        let how = if compress {
            Source::ProcMem
        } else {
            Source::VmReadv
        };
        let read_all = AtomicUsize::new(0);
        let refs = copy_with_workers(
            std::process::id() as i32,
            how,
            &runs,
            &mut writer,
            &|| {
                read_all.fetch_add(1, Ordering::Relaxed);
            },
            workers,
        )
        .expect("copy");
        assert_eq!(read_all.load(Ordering::Relaxed), 1, "{workers:?}");
        let mut meta = sample_metadata();
        meta.root.vmas = vec![Vma {
            start: aligned,
            end: aligned + pages * PAGE_SIZE,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            name: String::new(),
            kind: VmaKind::Anonymous,
            file: None,
            vm_flags: Vec::new(),
            pages: runs
                .iter()
                .zip(refs)
                .map(|(&(addr, npages), data)| crate::image::model::PageRun { addr, npages, data })
                .collect(),
            shmem_id: None,
            sysv: None,
            inherited: Vec::new(),
        }];
        writer.finish(&meta).expect("finish");
        let reader = ImageReader::open(&path).expect("open");
        reader.verify_all().expect("checksums");
        let off = (aligned - base) as usize;
        let first = reader
            .read_memory(aligned, PAGE_SIZE as usize)
            .expect("read")
            .expect("stored");
        assert_eq!(first, &source[off..off + PAGE_SIZE as usize]);
        let len = ((pages - 2) * PAGE_SIZE) as usize;
        let rest = reader
            .read_memory(aligned + 2 * PAGE_SIZE, len)
            .expect("read")
            .expect("stored");
        let from = off + 2 * PAGE_SIZE as usize;
        assert!(
            rest == source[from..from + len],
            "compress={compress} workers={workers:?}"
        );
    }
}
