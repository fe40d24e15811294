//! Reading what the kernel holds of one frozen process through the eBPF
//! `task` iterator (`chpox_tstate_v2`), for `process::kernelstate`:
//! every thread's record, then the leader's process record and its 64
//! dispositions (see `chpox_common::TaskStateRecord`).

use std::io::Read;
use std::os::fd::OwnedFd;

use chpox_common::{
    TASK_STATE_ACTION, TASK_STATE_PROCESS, TASK_STATE_RLIMIT, TASK_STATE_THREAD, TaskStateRecord,
};

use crate::process::kernelstate::{ActionFields, ProcessFields, ThreadFields};

/// 65536 threads' records and the leader's are about 5 MiB.
const MAX_BYTES: u64 = 16 << 20;

/// The loaded iterator program.
pub struct TaskStateIter {
    prog: OwnedFd,
}

impl TaskStateIter {
    pub fn new(prog: OwnedFd) -> TaskStateIter {
        TaskStateIter { prog }
    }

    /// What the kernel holds of process `pid` and its threads.
    pub fn read(&self, pid: i32) -> std::io::Result<ProcessFields> {
        let file = super::iter::open(&self.prog, super::iter::Scope::Process(pid))?;
        decode(read_one_pass(file)?, pid)
    }
}

/// The records of one walk over the threads: a walk limited to one
/// process may start again once over, and a thread seen twice begins the
/// next one.
fn read_one_pass(file: impl Read) -> std::io::Result<Vec<TaskStateRecord>> {
    const SIZE: usize = std::mem::size_of::<TaskStateRecord>();
    let mut records: Vec<TaskStateRecord> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    super::iter::read_records(file, SIZE, MAX_BYTES, "task iterator", |r| {
        let u32_at = |i: usize| u32::from_ne_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        let mut record = TaskStateRecord {
            kind: u32_at(0),
            tid: u32_at(4),
            words: [0; 12],
        };
        for (i, w) in record.words.iter_mut().enumerate() {
            // The words follow the two u32s, one word in.
            *w = super::iter::word(r, i + 1);
        }
        if record.kind == TASK_STATE_THREAD && !seen.insert(record.tid) {
            return false;
        }
        records.push(record);
        true
    })?;
    Ok(records)
}

fn decode(records: Vec<TaskStateRecord>, pid: i32) -> std::io::Result<ProcessFields> {
    let mut fields = ProcessFields::default();
    let mut process_seen = false;
    let mut last_signal = 0;
    for r in records {
        let w = r.words;
        match r.kind {
            TASK_STATE_THREAD => {
                if w[5] as i32 != pid {
                    return Err(std::io::Error::other(format!(
                        "task iterator walked thread {} of process {}, not of {pid}",
                        r.tid, w[5]
                    )));
                }
                fields.threads.push(ThreadFields {
                    tid: r.tid as i32,
                    clear_child_tid: w[0],
                    sas_ss_sp: w[1],
                    sas_ss_size: w[2],
                    sas_ss_flags: w[3] as u32,
                    pdeath_signal: w[4] as i32,
                    seccomp_mode: w[6] as i32,
                    comm: comm_of(w[7], w[8]),
                });
            }
            TASK_STATE_PROCESS => {
                process_seen = true;
                fields.actions = vec![ActionFields::default(); 64];
                fields.brk = w[0];
                fields.mm_flags = w[1];
                fields.child_subreaper = w[2] != 0;
                fields.real_expires = w[3];
                fields.real_incr = w[4];
                fields.cpu_itimers = [(w[5], w[6]), (w[7], w[8])];
                fields.oom_score_adj = w[9] as i64 as i32;
                fields.personality = w[10] as u32;
            }
            TASK_STATE_ACTION if process_seen && fields.rlimits.is_empty() => {
                let signo = w[0] as usize;
                if !(1..=64).contains(&signo) || signo <= last_signal {
                    return Err(std::io::Error::other(
                        "task iterator wrote dispositions out of order",
                    ));
                }
                last_signal = signo;
                fields.actions[signo - 1] = ActionFields {
                    handler: w[1],
                    flags: w[2],
                    restorer: w[3],
                    mask: w[4],
                };
            }
            TASK_STATE_RLIMIT if process_seen => {
                if w[0] != fields.rlimits.len() as u64 {
                    return Err(std::io::Error::other(
                        "task iterator wrote limits out of order",
                    ));
                }
                fields.rlimits.push((w[1], w[2]));
            }
            kind => {
                return Err(std::io::Error::other(format!(
                    "task iterator wrote an unexpected record (kind {kind})"
                )));
            }
        }
    }
    if !process_seen || fields.rlimits.len() != 16 {
        // The leader has exited (a zombie leader has no mm), or its walk
        // stopped short: the remote calls, which refuse such a process by
        // name, decide.
        fields.actions.clear();
        fields.rlimits.clear();
    }
    Ok(fields)
}

/// A task's `comm`, from the two words that hold it: up to its NUL.
fn comm_of(a: u64, b: u64) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_ne_bytes());
    bytes[8..].copy_from_slice(&b.to_ne_bytes());
    let len = bytes.iter().position(|&c| c == 0).unwrap_or(16);
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(records: &[TaskStateRecord]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| {
                let mut b = Vec::new();
                b.extend_from_slice(&r.kind.to_ne_bytes());
                b.extend_from_slice(&r.tid.to_ne_bytes());
                for w in r.words {
                    b.extend_from_slice(&w.to_ne_bytes());
                }
                b
            })
            .collect()
    }

    fn walk(pid: u32, threads: &[u32]) -> Vec<TaskStateRecord> {
        let mut out = Vec::new();
        for &tid in threads {
            let mut words = [0; 12];
            words[0] = 0x1000 + tid as u64;
            words[5] = pid as u64;
            words[7] = u64::from_ne_bytes(*b"kstate-w");
            words[8] = u64::from_ne_bytes(*b"orker\0\0\0");
            out.push(TaskStateRecord {
                kind: TASK_STATE_THREAD,
                tid,
                words,
            });
            if tid == pid {
                out.push(TaskStateRecord {
                    kind: TASK_STATE_PROCESS,
                    tid,
                    words: [0x5000, 1, 1, 0, 0, 0, 0, 0, 0, -1000i64 as u64, 8, 0],
                });
                // SIG_DFL ones all zeros are left out.
                for signo in (1..=64u64).filter(|s| s % 3 != 0) {
                    let mut words = [0; 12];
                    words[0] = signo;
                    words[1] = signo * 16;
                    out.push(TaskStateRecord {
                        kind: TASK_STATE_ACTION,
                        tid,
                        words,
                    });
                }
                for resource in 0..16u64 {
                    let mut words = [0; 12];
                    (words[0], words[1], words[2]) = (resource, resource, u64::MAX);
                    out.push(TaskStateRecord {
                        kind: TASK_STATE_RLIMIT,
                        tid,
                        words,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn one_walk_is_read_and_decoded() {
        let one = walk(7, &[7, 8, 9]);
        let mut twice = bytes(&one);
        twice.extend(bytes(&one));
        let records = read_one_pass(&twice[..]).expect("read");
        assert_eq!(records, one);
        let fields = decode(records, 7).expect("decode");
        assert_eq!(fields.threads.len(), 3);
        assert_eq!(fields.threads[2].clear_child_tid, 0x1009);
        assert_eq!(fields.brk, 0x5000);
        assert!(fields.child_subreaper);
        assert_eq!(fields.actions.len(), 64);
        assert_eq!(fields.actions[9].handler, 160);
        assert_eq!(
            fields.actions[8],
            ActionFields::default(),
            "signal 9 left out"
        );
        assert_eq!(fields.threads[0].comm, "kstate-worker");
        assert_eq!((fields.oom_score_adj, fields.personality), (-1000, 8));
        assert_eq!(fields.rlimits[5], (5, u64::MAX));
        assert!(decode(one.clone(), 8).is_err(), "another process's threads");
        assert!(read_one_pass(&bytes(&one)[..50]).is_err());
        // A walk cut short before its limits claims no disposition.
        let short: Vec<_> = one
            .iter()
            .filter(|r| r.kind != TASK_STATE_RLIMIT)
            .copied()
            .collect();
        assert!(decode(short, 7).expect("decode").actions.is_empty());
    }

    #[test]
    fn without_the_leader_no_disposition_is_claimed() {
        let fields = decode(walk(7, &[8, 9]), 7).expect("decode");
        assert!(fields.actions.is_empty() && fields.rlimits.is_empty());
        assert_eq!(fields.threads.len(), 2);
    }
}
