//! `--lazy` for an incremental image: pages the image inherits come from
//! its parent, served like the image's own.
//!
//! The page server maps both files as one range ([`ImageMap::pair`]): the
//! image at offsets from 0, the parent from a base past the image's end.
//! A piece of inherited memory is then a piece at `base + parent offset`,
//! and the parent's page runs join the run table at the same shifted
//! offsets: each is verified before any of it is served, as the image's
//! own runs are (see `checks`). Memory filled eagerly even with `--lazy`
//! (file-backed private pages, say) is verified just before it is written.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::image::model::{DataRef, Vma};
use crate::restore::memory::fill::{ImageMap, ParentImage, Piece};

/// A page run: the address it is for, and where its bytes are.
type RunAt = (u64, DataRef);

/// The parent's page runs, by offset in the parent file.
fn runs_by_offset(parent: &ParentImage) -> BTreeMap<u64, RunAt> {
    parent
        .reader
        .metadata()
        .processes()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.pages)
        .filter(|r| r.data.raw_len > 0)
        .map(|r| (r.data.offset, (r.addr, r.data)))
        .collect()
}

/// The runs of `runs` holding bytes of `[off, off + len)` of the parent
/// file; an error if some byte is in none.
fn covering(runs: &BTreeMap<u64, RunAt>, off: u64, len: u64) -> Result<Vec<RunAt>> {
    let end = off + len;
    let mut out = Vec::new();
    let mut covered = off;
    let first = runs.range(..=off).next_back().map_or(off, |(&o, _)| o);
    for (&o, &(addr, d)) in runs.range(first..end) {
        if o > covered {
            break;
        }
        if o + d.raw_len > covered {
            out.push((addr, d));
            covered = o + d.raw_len;
        }
    }
    if covered < end {
        return Err(Error::Other(format!(
            "the parent image's bytes {covered}..{end}, which the image inherits, belong to no page run: the images do not match"
        )));
    }
    Ok(out)
}

/// What `vma` (of the image's process `pid`) inherits: its pieces, at
/// offsets shifted by `base`, and the parent's runs holding them (the
/// same shift) to verify before serving.
pub(super) fn inherited(
    parent: &ParentImage,
    pid: i32,
    vmas: &[&Vma],
    base: u64,
) -> Result<(Vec<Piece>, Vec<RunAt>)> {
    let runs = runs_by_offset(parent);
    let mut pieces = Vec::new();
    let mut used: BTreeMap<u64, RunAt> = BTreeMap::new();
    for vma in vmas {
        for p in parent.pieces(pid, vma)? {
            for (addr, d) in covering(&runs, p.file_off, p.len)? {
                used.insert(
                    d.offset,
                    (
                        addr,
                        DataRef {
                            offset: base + d.offset,
                            ..d
                        },
                    ),
                );
            }
            pieces.push(Piece {
                file_off: base + p.file_off,
                ..p
            });
        }
    }
    Ok((pieces, used.into_values().collect()))
}

/// Verify every run of the parent that holds some of `pieces` (parent
/// offsets): before they are written into a process that runs before the
/// parent is read whole.
pub(in crate::restore) fn verify_pieces(parent: &ParentImage, pieces: &[Piece]) -> Result<()> {
    let runs = runs_by_offset(parent);
    let mut seen = std::collections::BTreeSet::new();
    for p in pieces {
        for (addr, d) in covering(&runs, p.file_off, p.len)? {
            if !seen.insert(d.offset) {
                continue;
            }
            let map = ImageMap::new(std::os::fd::AsFd::as_fd(&parent.file), d.offset, d.raw_len)?;
            let bytes = map
                .bytes(d.offset, d.raw_len)
                .ok_or_else(|| Error::Other("internal: page run outside its mapping".into()))?;
            if crc32c::crc32c(bytes) != d.crc32c {
                return Err(Error::Other(format!(
                    "checksum mismatch in the page run for {addr:#x} of the parent image {} ({} bytes at offset {}): the image is corrupt",
                    parent.path.display(),
                    d.raw_len,
                    d.offset
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::Compression;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn run(off: u64, len: u64) -> (u64, RunAt) {
        let d = DataRef {
            offset: off,
            stored_len: len,
            raw_len: len,
            crc32c: 0,
            compression: Compression::None,
        };
        (off, (0x1000 + off, d))
    }

    #[test]
    fn pieces_are_covered_by_the_runs_they_lie_in() {
        let runs: BTreeMap<u64, RunAt> = [run(0, 8192), run(8192, 4096), run(16384, 4096)]
            .into_iter()
            .collect();
        let offs = |v: Vec<RunAt>| v.iter().map(|(_, d)| d.offset).collect::<Vec<_>>();
        // Inside one run, from its middle.
        assert_eq!(offs(covering(&runs, 4096, 4096).expect("covered")), [0]);
        // Across two.
        assert_eq!(
            offs(covering(&runs, 4096, 8192).expect("covered")),
            [0, 8192]
        );
        // Into the gap between runs: the images do not match.
        assert!(covering(&runs, 8192, 8192).is_err());
        assert!(covering(&runs, 20480, 4096).is_err());
    }

    #[test]
    fn a_pair_maps_the_second_file_past_the_first() {
        let mut a = tempfile::tempfile().expect("temp file");
        let mut b = tempfile::tempfile().expect("temp file");
        a.write_all(&[1u8; 5000]).expect("write");
        b.write_all(&[2u8; 3000]).expect("write");
        let (map, base) = ImageMap::pair(a.as_fd(), b.as_fd()).expect("map");
        assert_eq!(base, 8192);
        assert_eq!(map.bytes(0, 5000).expect("first"), &[1u8; 5000][..]);
        assert_eq!(map.bytes(base, 3000).expect("second"), &[2u8; 3000][..]);
    }
}
