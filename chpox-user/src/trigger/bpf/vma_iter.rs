//! Reading one process's mappings through the eBPF `task_vma` iterator
//! (`chpox_vma_flags`): bounds and raw `vm_flags`, for `memory::vmflags`.
//! The iterator is opened on the process's leader alone (`iter`).

use std::io::Read;
use std::os::fd::OwnedFd;

use chpox_common::VmaRecord;

const MAX_BYTES: u64 = 16 << 20;

/// The loaded iterator program.
pub struct VmaIter {
    prog: OwnedFd,
}

impl VmaIter {
    pub fn new(prog: OwnedFd) -> VmaIter {
        VmaIter { prog }
    }

    /// Every mapping of the thread group whose leader is `pid`, in address
    /// order: (start, end, vm_flags).
    pub fn read(&self, pid: i32) -> std::io::Result<Vec<(u64, u64, u64)>> {
        // The leader's tid alone: its mm is the process's (a process whose
        // leader has exited yields nothing, which the caller's check
        // against /proc/PID/maps refuses).
        read_one_pass(super::iter::open(
            &self.prog,
            super::iter::Scope::Thread(pid),
        )?)
    }
}

/// The records of one walk over the mappings. On this kernel an iterator
/// limited to one task does not end: once its walk is over, the next
/// `read` starts it again from the first mapping. A walk goes up in
/// address order, so a record that does not lie above the one before it
/// begins the next walk.
fn read_one_pass(file: impl Read) -> std::io::Result<Vec<(u64, u64, u64)>> {
    const SIZE: usize = std::mem::size_of::<VmaRecord>();
    let mut records: Vec<(u64, u64, u64)> = Vec::new();
    // vm.max_map_count (65530 by default) records are 1.5 MiB.
    super::iter::read_records(file, SIZE, MAX_BYTES, "task_vma iterator", |r| {
        let word = |i| super::iter::word(r, i);
        let record = (word(0), word(1), word(2));
        if records.last().is_some_and(|last| record.0 < last.1) {
            return false;
        }
        records.push(record);
        true
    })?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(records: &[(u64, u64, u64)]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|&(a, b, c)| [a, b, c])
            .flat_map(u64::to_ne_bytes)
            .collect()
    }

    #[test]
    fn one_walk_is_read_and_its_repetition_is_not() {
        let walk = [
            (0x1000, 0x2000, 1),
            (0x2000, 0x5000, 2),
            (0x9000, 0xa000, 3),
        ];
        let mut stream = bytes(&walk);
        stream.extend(bytes(&walk));
        assert_eq!(read_one_pass(&stream[..]).expect("read"), walk);
        assert_eq!(read_one_pass(&bytes(&walk)[..]).expect("read"), walk);
        let single = [(0x1000, 0x2000, 1)];
        let twice = [bytes(&single), bytes(&single)].concat();
        assert_eq!(read_one_pass(&twice[..]).expect("read"), single);
        assert!(read_one_pass(&[] as &[u8]).expect("read").is_empty());
        assert!(read_one_pass(&bytes(&walk)[..30]).is_err());
    }
}
