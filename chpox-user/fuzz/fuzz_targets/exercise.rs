//! What every target does with an image: open it, verify every blob, read
//! memory where the metadata makes it interesting, read small embedded
//! files, and print it as `chpox inspect` does. All of it must return
//! errors, never panic, hang or allocate without bound.

use chpox::image::ImageReader;
use chpox::inspect;

pub fn exercise(bytes: Vec<u8>) {
    let Ok(reader) = ImageReader::from_bytes(bytes) else {
        return;
    };
    let checks = inspect::checksum_status(&reader);

    // Addresses the metadata makes interesting (run starts and ends, VMA
    // edges) plus a few fixed ones, with lengths crossing page boundaries.
    let mut addrs = vec![0, 0x1000, 0x5555_5555_4000, 0x7fff_ffff_f000, u64::MAX - 7];
    let meta = reader.metadata();
    for vma in meta
        .processes()
        .flat_map(|p| p.vmas.iter().take(8))
        .take(16)
    {
        addrs.push(vma.start);
        addrs.push(vma.end.wrapping_sub(1));
        for run in vma.pages.iter().take(4) {
            addrs.push(run.addr);
            addrs.push(run.addr.wrapping_add(4090));
        }
    }
    for addr in addrs {
        for len in [1, 8, 4097] {
            let _ = reader.read_memory(addr, len);
        }
    }
    // read_data allocates the claimed raw size (up to 64 GiB by design), so
    // only small blobs, to keep the fuzzer within its memory limit.
    for f in meta.files.iter().take(4) {
        if let Some(r) = f.embedded.filter(|r| r.raw_len <= 16 << 20) {
            let _ = reader.read_data(&r);
        }
    }
    let _ = inspect::summary(&reader, &checks);
    let _ = inspect::to_json(&reader, &checks);
}
