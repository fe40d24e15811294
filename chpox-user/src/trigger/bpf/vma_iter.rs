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
fn read_one_pass(mut file: impl Read) -> std::io::Result<Vec<(u64, u64, u64)>> {
    const SIZE: usize = std::mem::size_of::<VmaRecord>();
    let mut records: Vec<(u64, u64, u64)> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_BYTES {
            // vm.max_map_count (65530 by default) records are 1.5 MiB.
            return Err(std::io::Error::other(
                "task_vma iterator wrote more than 16 MiB for one process",
            ));
        }
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / SIZE * SIZE;
        for r in pending[..whole].chunks_exact(SIZE) {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&r[i * 8..i * 8 + 8]);
                u64::from_ne_bytes(w)
            };
            let record = (word(0), word(1), word(2));
            if records.last().is_some_and(|last| record.0 < last.1) {
                return Ok(records);
            }
            records.push(record);
        }
        pending.drain(..whole);
    }
    if !pending.is_empty() {
        return Err(std::io::Error::other(
            "task_vma iterator wrote a partial record",
        ));
    }
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
