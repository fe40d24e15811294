//! The stored pages of a lazily restored process that are not in its
//! memory yet: non-overlapping pieces, each an address range and where its
//! bytes are in the image, taken out as they are copied in, discarded or
//! moved as the process discards or moves its memory.

use std::collections::BTreeMap;

use crate::restore::memory::fill::Piece;

#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// start → (length, file offset).
    pieces: BTreeMap<u64, (u64, u64)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Bytes still to copy.
    pub fn bytes(&self) -> u64 {
        self.pieces.values().map(|&(len, _)| len).sum()
    }

    /// Add `p`, which must not overlap what is pending.
    pub fn insert(&mut self, p: Piece) {
        if p.len > 0 {
            self.pieces.insert(p.addr, (p.len, p.file_off));
        }
    }

    /// Remove and return what is pending in `[lo, hi)`, in address order;
    /// pieces reaching outside it are cut and keep their outer parts.
    pub fn take(&mut self, lo: u64, hi: u64) -> Vec<Piece> {
        if lo >= hi {
            return Vec::new();
        }
        // The piece starting before `lo` may reach into the range.
        let first = self
            .pieces
            .range(..lo)
            .next_back()
            .filter(|(s, (len, _))| *s + *len > lo)
            .map(|(s, _)| *s);
        let starts: Vec<u64> = first
            .into_iter()
            .chain(self.pieces.range(lo..hi).map(|(s, _)| *s))
            .collect();
        let mut out = Vec::with_capacity(starts.len());
        for s in starts {
            let Some((len, off)) = self.pieces.remove(&s) else {
                continue;
            };
            let end = s + len;
            let (a, b) = (s.max(lo), end.min(hi));
            if s < a {
                self.pieces.insert(s, (a - s, off));
            }
            if b < end {
                self.pieces.insert(b, (end - b, off + (b - s)));
            }
            out.push(Piece {
                addr: a,
                file_off: off + (a - s),
                len: b - a,
            });
        }
        out
    }

    /// Remove and return the lowest pending bytes, at most `max` of them.
    pub fn take_first(&mut self, max: u64) -> Option<Piece> {
        let (&s, &(len, _)) = self.pieces.iter().next()?;
        self.take(s, s + len.min(max)).into_iter().next()
    }

    /// What was pending in `[from, from + len)` is now pending at `to`.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        // What was at the destination is gone (the kernel reports that
        // separately too; dropping it here is harmless).
        for p in self.take(from, from + len) {
            self.take(to + (p.addr - from), to + (p.addr - from) + p.len);
            self.insert(Piece {
                addr: to + (p.addr - from),
                ..p
            });
        }
    }

    /// Whether `addr` is pending.
    pub fn contains(&self, addr: u64) -> bool {
        self.pieces
            .range(..=addr)
            .next_back()
            .is_some_and(|(s, (len, _))| addr < s + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(addr: u64, len: u64) -> Piece {
        Piece {
            addr,
            file_off: addr * 2,
            len,
        }
    }

    #[test]
    fn take_cuts_pieces_and_keeps_offsets() {
        let mut pend = Pending::default();
        pend.insert(p(0x1000, 0x4000));
        pend.insert(p(0x8000, 0x2000));
        let got = pend.take(0x2000, 0x9000);
        assert_eq!(
            got,
            vec![
                Piece {
                    addr: 0x2000,
                    file_off: 0x3000,
                    len: 0x3000
                },
                Piece {
                    addr: 0x8000,
                    file_off: 0x10000,
                    len: 0x1000
                }
            ]
        );
        assert!(pend.contains(0x1000));
        assert!(!pend.contains(0x2000));
        assert!(pend.contains(0x9000));
        assert_eq!(pend.bytes(), 0x2000);
        // The rest of the second piece still knows where its bytes are.
        assert_eq!(
            pend.take(0, u64::MAX),
            vec![
                p(0x1000, 0x1000),
                Piece {
                    addr: 0x9000,
                    file_off: 0x11000,
                    len: 0x1000
                }
            ]
        );
        assert!(pend.is_empty());
    }

    #[test]
    fn take_first_is_bounded_and_ordered() {
        let mut pend = Pending::default();
        pend.insert(p(0x10000, 0x3000));
        pend.insert(p(0x1000, 0x1000));
        assert_eq!(pend.take_first(0x2000), Some(p(0x1000, 0x1000)));
        let second = pend.take_first(0x2000).unwrap();
        assert_eq!(second, p(0x10000, 0x2000));
        assert_eq!(pend.bytes(), 0x1000);
    }

    #[test]
    fn remap_moves_what_is_pending() {
        let mut pend = Pending::default();
        pend.insert(p(0x1000, 0x2000));
        pend.remap(0x2000, 0x100000, 0x1000);
        assert!(pend.contains(0x1000));
        assert!(!pend.contains(0x2000));
        assert!(pend.contains(0x100000));
        let moved = pend.take(0x100000, 0x101000);
        // The second page of the piece: its bytes follow the first's.
        assert_eq!(moved[0].file_off, 0x3000);
    }
}
