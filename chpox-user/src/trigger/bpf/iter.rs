//! Opening a loaded eBPF iterator program on one task or one process.
//!
//! aya attaches an iterator to every task of the system; a checkpoint
//! wants one process, so each read makes its own link with the kernel's
//! per-task parameter (`bpf_iter_link_info.task`, Linux 6.1+), opens an
//! iterator on it and reads it: the kernel then visits only that task (or
//! that process's threads).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `BPF_LINK_CREATE`, `BPF_ITER_CREATE` (bpf(2) commands) and
/// `BPF_TRACE_ITER` (the attach type of iterators).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;
/// `BPF_PROG_GET_NEXT_ID`, `BPF_PROG_GET_FD_BY_ID`, `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_PROG_TYPE_TRACING`, the type of iterator programs.
const BPF_PROG_TYPE_TRACING: u32 = 26;

/// What an iterator visits.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// One thread (`task.tid`).
    Thread(i32),
    /// Every thread of a process (`task.pid`).
    Process(i32),
}

/// bpf(2) with `attr`, for commands that return 0 or a number.
fn bpf_call(cmd: libc::c_long, attr: &mut [u64; 8]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size
    // given; the kernel reads it and writes results only inside it, or
    // into buffers it points to, which callers size as they say.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// The loaded iterator program named `name` (as the kernel keeps it: 15
/// characters at most), whoever loaded it: a running agent's. Reading the
/// kernel's list of programs takes CAP_SYS_ADMIN.
pub fn find_loaded(name: &str) -> std::io::Result<Option<OwnedFd>> {
    let mut id = 0u32;
    loop {
        // start_id, then next_id (u32 each).
        let mut attr = [0u64; 8];
        attr[0] = id as u64;
        match bpf_call(BPF_PROG_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        id = (attr[0] >> 32) as u32;
        let mut attr = [0u64; 8];
        attr[0] = id as u64;
        // Unloaded since: on to the next.
        let Ok(prog) = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) else {
            continue;
        };
        // struct bpf_prog_info: type (u32) at 0, name (16 bytes) at 64.
        let mut info = [0u8; 128];
        let mut attr = [0u64; 8];
        // bpf_fd, info_len (u32 each), info (pointer).
        attr[0] = prog.as_raw_fd() as u64 | (info.len() as u64) << 32;
        attr[1] = info.as_mut_ptr() as u64;
        if bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
            continue;
        }
        let kind = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        let kept = &info[64..80];
        let kept = &kept[..kept.iter().position(|&b| b == 0).unwrap_or(kept.len())];
        let wanted = &name.as_bytes()[..name.len().min(15)];
        if kind == BPF_PROG_TYPE_TRACING && kept == wanted {
            return Ok(Some(prog));
        }
    }
}

/// bpf(2) with `attr`, for commands that return a new descriptor.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> std::io::Result<OwnedFd> {
    let fd = bpf_call(cmd, attr)?;
    // SAFETY: a non-negative result of these commands is a new descriptor
    // that we alone own from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The output of `prog` (a loaded iterator program) over `scope`, to be
/// read to its end (see the readers: a walk limited to one task may start
/// again once over).
pub fn open(prog: &OwnedFd, scope: Scope) -> std::io::Result<std::fs::File> {
    // union bpf_iter_link_info: task.tid, task.pid, task.pid_fd.
    let info: [u32; 4] = match scope {
        Scope::Thread(tid) => [tid as u32, 0, 0, 0],
        Scope::Process(pid) => [0, pid as u32, 0, 0],
    };
    let mut attr = [0u64; 8];
    // link_create: prog_fd, target_fd (u32 each), attach_type, flags
    // (u32 each), iter_info (pointer), iter_info_len (u32).
    attr[0] = prog.as_raw_fd() as u64;
    attr[1] = BPF_TRACE_ITER as u64;
    attr[2] = info.as_ptr() as u64;
    attr[3] = std::mem::size_of_val(&info) as u64;
    let link = bpf(BPF_LINK_CREATE, &mut attr)?;
    let mut attr = [0u64; 8];
    attr[0] = link.as_raw_fd() as u64;
    let iter = bpf(BPF_ITER_CREATE, &mut attr)?;
    Ok(std::fs::File::from(iter))
}

/// Read an iterator's output (`file`) as records of `size` bytes, each
/// handed to `take`, until the output ends or `take` returns false (the
/// record begins the walk again: a walk limited to one task may start
/// over once done). `what` names the iterator in errors; more than
/// `max_bytes` is one.
pub fn read_records(
    mut file: impl Read,
    size: usize,
    max_bytes: u64,
    what: &str,
    take: impl FnMut(&[u8]) -> bool,
) -> std::io::Result<()> {
    // The buffers of the thread's last read, their pages touched: a dump
    // reads each frozen process, and fresh 64 KiB faulted in each time.
    thread_local! {
        static BUFFERS: std::cell::Cell<(Vec<u8>, Vec<u8>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }
    let (mut buf, mut pending) = BUFFERS.take();
    buf.resize(64 * 1024, 0);
    pending.clear();
    let result = read_records_into(
        &mut file,
        size,
        max_bytes,
        what,
        take,
        &mut buf,
        &mut pending,
    );
    BUFFERS.set((buf, pending));
    result
}

fn read_records_into(
    file: &mut impl Read,
    size: usize,
    max_bytes: u64,
    what: &str,
    mut take: impl FnMut(&[u8]) -> bool,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut total = 0u64;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > max_bytes {
            return Err(std::io::Error::other(format!(
                "{what} wrote more than {} MiB for one process",
                max_bytes >> 20
            )));
        }
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / size * size;
        for r in pending[..whole].chunks_exact(size) {
            if !take(r) {
                return Ok(());
            }
        }
        pending.drain(..whole);
    }
    if !pending.is_empty() {
        return Err(std::io::Error::other(format!(
            "{what} wrote a partial record"
        )));
    }
    Ok(())
}

/// The `i`th 64-bit word of a record.
pub fn word(record: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&record[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(w)
}
