//! Types and constants shared by the chpox eBPF program and user space.
//!
//! Everything here must stay `no_std` and `#[repr(C)]`-plain, because the eBPF
//! side reads and writes the same bytes the agent does.
#![no_std]

/// The signal that triggers a checkpoint unless a registration names another.
/// 31 is SIGSYS on x86-64, the signal old chpox used.
pub const DEFAULT_TRIGGER_SIGNAL: u32 = 31;

/// The FLAGS field of the old `PID:SIG:FLAGS:FILE` register line.
///
/// Old chpox gave these bits meaning; we keep them so existing scripts keep
/// their behaviour.
pub mod flags {
    /// Plain registration (value 1 in the old how-to's examples).
    pub const REGISTERED: u32 = 1;
    /// Put the executable itself into the image.
    pub const EMBED_EXE: u32 = 2;
    /// Put the libraries registered with `chpoxctl addlib` into the image.
    pub const EMBED_LIBS: u32 = 4;
    /// Also checkpoint the children of the process.
    pub const INCLUDE_CHILDREN: u32 = 8;
    /// Every bit we understand; anything else in a register line is an error.
    pub const KNOWN: u32 = REGISTERED | EMBED_EXE | EMBED_LIBS | INCLUDE_CHILDREN;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_flags_cover_every_bit_old_chpox_defined() {
        assert_eq!(flags::KNOWN, 0b1111);
    }
}
