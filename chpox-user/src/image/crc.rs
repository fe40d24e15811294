//! CRC-32C of two byte strings put together, from theirs.
//!
//! The page copy checksums each piece of a blob on a worker and the writer
//! joins the pieces' CRCs in order; restore does the same when it reads a
//! blob in pieces. `crc32c::crc32c_combine` builds its operator by 32×32
//! matrix squarings for every bit of the length, about 20–40 µs a call
//! here, on the writer's thread, which is the dump's bound: over a
//! millisecond for 64 MiB. Multiplying by x^(8·len) modulo the polynomial,
//! from a table of x^(2^k), takes a few hundred nanoseconds.

/// CRC-32C's polynomial, bit-reflected (x^0 is the top bit).
const POLY: u32 = 0x82F6_3B78;

/// `a · b mod POLY`, both reflected: bit 31 is x^0.
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0u32;
    let mut bit = 1u32 << 31;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b · x: a right shift in the reflected order, reduced.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// `x^(2^k) mod POLY` for every k a length in bits can need (a byte count
/// up to 2^64 is up to 2^67 bits).
const POWERS: [u32; 67] = {
    let mut table = [0u32; 67];
    // x^1, reflected.
    table[0] = 1 << 30;
    let mut k = 1;
    while k < table.len() {
        table[k] = mul_mod(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// `x^(8·bytes) mod POLY`: the operator that appends `bytes` zero bytes.
fn zeros_operator(bytes: u64) -> u32 {
    // x^0, reflected.
    let mut op = 1u32 << 31;
    // 8·bytes = bytes << 3: bit j of bytes is power 2^(j+3).
    let mut rest = bytes;
    let mut k = 3;
    while rest != 0 {
        if rest & 1 != 0 {
            op = mul_mod(POWERS[k], op);
        }
        rest >>= 1;
        k += 1;
    }
    op
}

/// CRC-32C of `a || b` from `crc_a`, `crc_b` and `b`'s length.
pub fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    if len_b == 0 {
        return crc_a;
    }
    // The pre- and post-inversion of the standard CRC cancel out in the
    // shifted sum: the same identity as zlib's crc32_combine.
    mul_mod(zeros_operator(len_b), crc_a) ^ crc_b
}

/// What rewriting part of a blob does to the blob's CRC-32C: the CRC of
/// the old bytes and of the new ones, joined, and where they end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patch {
    /// The file offset just past the rewritten bytes.
    pub end: u64,
    /// How many bytes were rewritten.
    pub len: u64,
    /// `crc32c(old) ^ crc32c(new)`.
    pub delta: u32,
}

impl Patch {
    /// The patch of rewriting `old` with `new` (as long) at file `offset`.
    pub fn new(offset: u64, old: &[u8], new: &[u8]) -> Patch {
        Patch {
            end: offset + new.len() as u64,
            len: new.len() as u64,
            delta: crc32c::crc32c(old) ^ crc32c::crc32c(new),
        }
    }
}

/// The CRC-32C of the `len` bytes at file offset `start`, whose CRC was
/// `crc` before `patches` (each wholly inside) rewrote parts of them, in
/// any order, overlapping or not. CRC-32C is linear: for strings of equal
/// length, `crc(a) ^ crc(b)` is the CRC of `a ^ b` without its
/// pre- and post-inversion, and zeros before a string change nothing of
/// that, zeros after it shift it. So each patch adds its delta shifted by
/// the bytes after it, and the blob need not be read again (it was, whole,
/// for a page rewritten anywhere in it: 278 ms after the freeze for 1 GiB
/// with a few thousand pages written during its pre-copy).
pub fn patched(crc: u32, start: u64, len: u64, patches: &[Patch]) -> Option<u32> {
    let end = start + len;
    let mut out = crc;
    for p in patches {
        if p.end > end || p.end < start + p.len {
            return None;
        }
        out ^= mul_mod(zeros_operator(end - p.end), p.delta);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn combined_crcs_are_those_of_the_joined_bytes() {
        for (la, lb) in [
            (0, 0),
            (0, 7),
            (5, 0),
            (1, 1),
            (13, 4096),
            (4096, 1 << 20),
            (1 << 20, 3),
            (777, 65_537),
        ] {
            let (a, b) = (bytes(la, la as u64 + 1), bytes(lb, lb as u64 + 7));
            let joined = [a.as_slice(), b.as_slice()].concat();
            let (ca, cb) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
            assert_eq!(
                combine(ca, cb, lb as u64),
                crc32c::crc32c(&joined),
                "{la}+{lb}"
            );
        }
    }

    #[test]
    fn patched_crcs_are_those_of_the_rewritten_bytes() {
        let start = 3 * 4096;
        let original = bytes(64 * 4096, 5);
        let crc = crc32c::crc32c(&original);
        // (offset within, length): a page at each end, one inside, one
        // rewritten twice over, and one overlapping it.
        let rewrites = [
            (0usize, 4096usize),
            (63 * 4096, 4096),
            (17 * 4096, 3 * 4096),
            (17 * 4096, 4096),
            (18 * 4096, 4 * 4096),
            (40 * 4096, 100),
        ];
        let mut now = original.clone();
        let mut patches = Vec::new();
        for (i, &(at, len)) in rewrites.iter().enumerate() {
            let new = bytes(len, 100 + i as u64);
            let offset = start + at as u64;
            patches.push(Patch::new(offset, &now[at..at + len], &new));
            now[at..at + len].copy_from_slice(&new);
            assert_eq!(
                patched(crc, start, now.len() as u64, &patches),
                Some(crc32c::crc32c(&now)),
                "after rewrite {i}"
            );
        }
        // Rewriting bytes as they were changes nothing.
        let same = Patch::new(start, &now[..4096], &now[..4096]);
        assert_eq!(
            patched(crc32c::crc32c(&now), start, now.len() as u64, &[same]),
            Some(crc32c::crc32c(&now))
        );
    }

    #[test]
    fn a_patch_outside_the_blob_is_refused() {
        let p = Patch::new(4096, &[0; 4096], &[1; 4096]);
        assert_eq!(patched(7, 8192, 4096, &[p]), None);
        assert_eq!(patched(7, 0, 4096, &[p]), None);
        assert!(patched(7, 4096, 4096, &[p]).is_some());
        assert!(patched(7, 0, 8192, &[p]).is_some());
    }

    #[test]
    fn lengths_beyond_memory_agree_with_the_crate() {
        for len in [1u64 << 32, (1 << 40) + 12_345, u64::MAX / 3] {
            let len = usize::try_from(len).expect("64-bit");
            assert_eq!(
                combine(0x1234_5678, 0x9abc_def0, len as u64),
                crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len)
            );
        }
    }
}
