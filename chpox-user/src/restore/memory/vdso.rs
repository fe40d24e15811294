//! The kernel's own mappings: `[vvar]`, `[vvar_vclock]` (kernel 6.13+) and
//! `[vdso]`. Their content is the running kernel's, never the image's; the
//! restored code calls into the vdso at the addresses it had, and the vdso
//! finds its data at fixed offsets from itself, so all of them move to the
//! image's addresses together (`mremap`, which the kernel allows for these
//! special mappings and follows for signal return).
//!
//! Each moves twice: first to a parking range free in both layouts, then to
//! its place. That way a destination never overlaps a mapping still to
//! move.

use tracing::debug;

use super::child_maps;
use crate::error::{Error, Result};
use crate::image::model::{Vma, VmaKind};
use crate::restore::child::Child;

const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
const KINDS: [VmaKind; 3] = [VmaKind::Vvar, VmaKind::VvarVclock, VmaKind::Vdso];

fn label(kind: VmaKind) -> &'static str {
    match kind {
        VmaKind::Vvar => "[vvar]",
        VmaKind::VvarVclock => "[vvar_vclock]",
        _ => "[vdso]",
    }
}

/// Move the child's vdso mappings to where the image had them.
pub fn move_vdso(c: &mut Child<'_>, image: &[Vma], temp: u64) -> Result<()> {
    let maps = child_maps(c.pid())?;
    // (kind, current start, length, destination)
    let mut moves: Vec<(VmaKind, u64, u64, u64)> = Vec::new();
    let mut drop: Vec<(u64, u64)> = Vec::new();
    for kind in KINDS {
        let here: Vec<_> = maps.iter().filter(|m| m.kind() == kind).collect();
        let there: Vec<_> = image.iter().filter(|v| v.kind == kind).collect();
        match (here.as_slice(), there.as_slice()) {
            ([], []) => {}
            ([m], [v]) => {
                if m.end - m.start != v.end - v.start {
                    return Err(Error::Other(format!(
                        "this kernel's {} is {} bytes, the checkpointed kernel's was {}; restoring across kernels with different vdso layouts is not supported yet",
                        label(kind),
                        m.end - m.start,
                        v.end - v.start
                    )));
                }
                moves.push((kind, m.start, m.end - m.start, v.start));
            }
            // The image's kernel had no such mapping: the code never uses it.
            (here, []) => drop.extend(here.iter().map(|m| (m.start, m.end - m.start))),
            ([], [_, ..]) => {
                return Err(Error::Other(format!(
                    "the checkpointed process had a {} mapping, which this kernel does not provide",
                    label(kind)
                )));
            }
            _ => {
                return Err(Error::Other(format!(
                    "more than one {} mapping; cannot tell which to restore",
                    label(kind)
                )));
            }
        }
    }
    for (start, len) in drop {
        c.call("munmap", libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
    }
    let Some(low) = moves.iter().map(|m| m.1).min() else {
        return Ok(());
    };
    let mut parked = Vec::with_capacity(moves.len());
    for &(kind, start, len, dest) in &moves {
        let at = temp + (start - low);
        remap(c, kind, start, len, at)?;
        parked.push((kind, at, len, dest));
    }
    for (kind, at, len, dest) in parked {
        remap(c, kind, at, len, dest)?;
        debug!(?kind, dest, len, "moved");
    }
    Ok(())
}

fn remap(c: &mut Child<'_>, kind: VmaKind, from: u64, len: u64, to: u64) -> Result<()> {
    let got = c.raw(
        libc::SYS_mremap,
        [from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to, 0],
    )?;
    if got < 0 || got as u64 != to {
        return Err(Error::Other(format!(
            "cannot move {} from {from:#x} to {to:#x}: {}",
            label(kind),
            if got < 0 {
                crate::restore::child::errno_of(got).to_string()
            } else {
                format!("landed at {got:#x}")
            }
        )));
    }
    Ok(())
}
