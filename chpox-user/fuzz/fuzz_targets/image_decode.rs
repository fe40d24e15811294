//! Feeds arbitrary bytes to the image reader: parsing, verifying and
//! reading memory must return errors, never panic or run out of bounds.
//!
//! Run with `cargo +nightly fuzz run image_decode` from `chpox-user/`
//! (seed the corpus with a few small real images for depth).

#![no_main]

use chpox::image::ImageReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(reader) = ImageReader::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = reader.verify_all();

    // Addresses the metadata makes interesting (run starts and ends, VMA
    // edges) plus a few fixed ones, with lengths crossing page boundaries.
    let mut addrs = vec![0, 0x1000, 0x5555_5555_4000, 0x7fff_ffff_f000, u64::MAX - 7];
    for vma in reader.metadata().vmas.iter().take(8) {
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
    for f in reader.metadata().files.iter().take(4) {
        if let Some(r) = f.embedded.filter(|r| r.raw_len <= 16 << 20) {
            let _ = reader.read_data(&r);
        }
    }
});
