//! Editing images as a hostile user would, for the tests of what restore
//! trusts.

use std::fs;
use std::path::Path;

use chpox::image::format::HEADER_SIZE;
use chpox::image::model::Metadata;
use chpox::image::{ImageReader, ImageWriter, WriteOptions};

/// What anyone who may write an image can do: change its metadata and
/// seal it again. `src`'s data area is copied as it is (one blob at the
/// same offset, so every reference in the metadata still holds), the
/// metadata `edit`ed, checksums recomputed; the new image at `dst` belongs
/// to `owner` (root when None).
pub fn reseal(src: &Path, dst: &Path, owner: Option<(u32, u32)>, edit: impl FnOnce(&mut Metadata)) {
    let reader = ImageReader::open(src).expect("open image");
    let mut meta = reader.metadata().clone();
    let meta_offset = reader.header().meta_offset as usize;
    drop(reader);
    edit(&mut meta);
    let bytes = fs::read(src).expect("read image");
    let data = &bytes[HEADER_SIZE..meta_offset];
    let opts = WriteOptions {
        owner,
        ..WriteOptions::default()
    };
    let mut w = ImageWriter::create(dst, opts).expect("create image");
    if !data.is_empty() {
        w.begin_data().expect("begin");
        w.write_data(data).expect("write data");
        let at = w.end_data().expect("end");
        assert_eq!(at.offset, HEADER_SIZE as u64, "the data area moved");
    }
    w.finish(&meta).expect("seal the image");
}
