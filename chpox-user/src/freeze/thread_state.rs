//! The ptrace requests that read and write a stopped thread's state:
//! registers, XSAVE area, signal mask, pending signals, rseq. Many are not
//! wrapped by nix. The thread must be in a ptrace stop of ours
//! (`ptrace::Frozen`).

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::image::model::{GpRegs, PendingSignal, Rseq};

const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETREGSET: libc::c_uint = 0x4205;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const NT_X86_XSTATE: libc::c_ulong = 0x202;
const SIGINFO_SIZE: usize = 128;

pub fn get_regs(tid: i32) -> Result<libc::user_regs_struct> {
    ptrace::getregs(Pid::from_raw(tid)).map_err(|source| Error::Ptrace {
        op: "getregs",
        tid,
        source,
    })
}

pub fn set_regs(tid: i32, regs: libc::user_regs_struct) -> Result<()> {
    ptrace::setregs(Pid::from_raw(tid), regs).map_err(|source| Error::Ptrace {
        op: "setregs",
        tid,
        source,
    })
}

/// Raw `ptrace(2)` for the requests nix does not wrap.
fn raw_ptrace(
    op: &'static str,
    request: libc::c_uint,
    tid: i32,
    addr: usize,
    data: *mut libc::c_void,
) -> Result<libc::c_long> {
    // SAFETY: every caller passes `data` pointing to a live buffer at least
    // as large as the kernel writes for `request` (checked at each call).
    let ret = unsafe { libc::ptrace(request, tid, addr, data) };
    if ret == -1 {
        Err(Error::Ptrace {
            op,
            tid,
            source: Errno::last(),
        })
    } else {
        Ok(ret)
    }
}

/// The XSAVE area of a stopped thread, exactly as the kernel lays it out.
///
/// Read through one buffer kept for the process: a fresh 64 KiB buffer
/// per thread came from pages never touched, and the kernel's write into
/// it faulted 16 of them in, 20–30 µs of every frozen process's time (a
/// tree of 8: 0.2 ms). [`warm_xstate_buffer`] touches it before a freeze.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>> {
    let mut buf = xstate_buffer();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // The kernel writes at most iov_len bytes into iov_base and shrinks
    // iov_len to the size it wrote.
    raw_ptrace(
        "getregset(NT_X86_XSTATE)",
        PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE as usize,
        (&raw mut iov).cast(),
    )?;
    Ok(buf.get(..iov.iov_len).unwrap_or(&buf[..]).to_vec())
}

/// Larger than any XSAVE layout (AMX tiles included: ~11 KiB).
const XSTATE_BUFFER: usize = 64 * 1024;

/// The buffer [`get_xstate`] reads into, allocated and touched once.
fn xstate_buffer() -> std::sync::MutexGuard<'static, Vec<u8>> {
    static BUFFER: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
    let mut buf = BUFFER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if buf.len() < XSTATE_BUFFER {
        // Every byte written, so every page is touched now.
        buf.resize(XSTATE_BUFFER, 0);
    }
    buf
}

/// Have [`get_xstate`]'s buffer ready (allocated, its pages touched)
/// before a freeze.
pub fn warm_xstate_buffer() {
    drop(xstate_buffer());
}

/// Load a thread's XSAVE area (`PTRACE_SETREGSET NT_X86_XSTATE`). The
/// kernel takes only a whole standard-format area of exactly this CPU's
/// size, as `get_xstate` returns it.
pub fn set_xstate(tid: i32, xsave: &[u8]) -> Result<()> {
    let mut buf = xsave.to_vec();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // The kernel reads iov_len bytes from iov_base, which is `buf`.
    raw_ptrace(
        "setregset(NT_X86_XSTATE)",
        PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE as usize,
        (&raw mut iov).cast(),
    )?;
    Ok(())
}

pub fn get_sigmask(tid: i32) -> Result<u64> {
    let mut mask = 0u64;
    // addr is the size of the mask; the kernel writes exactly 8 bytes.
    raw_ptrace(
        "getsigmask",
        PTRACE_GETSIGMASK,
        tid,
        8,
        (&raw mut mask).cast(),
    )?;
    Ok(mask)
}

pub fn set_sigmask(tid: i32, mask: u64) -> Result<()> {
    let mut mask = mask;
    // The kernel reads exactly 8 bytes and never writes.
    raw_ptrace(
        "setsigmask",
        PTRACE_SETSIGMASK,
        tid,
        8,
        (&raw mut mask).cast(),
    )?;
    Ok(())
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Queued signals of one thread (`shared = false`) or of the whole process.
pub fn pending_signals(tid: i32, shared: bool) -> Result<Vec<PendingSignal>> {
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let mut buf = vec![0u8; BATCH * SIGINFO_SIZE];
        let mut args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        // The kernel copies at most `nr` siginfos of 128 bytes into `buf`,
        // which holds exactly BATCH of them.
        let n = raw_ptrace(
            "peeksiginfo",
            PTRACE_PEEKSIGINFO,
            tid,
            (&raw mut args) as usize,
            buf.as_mut_ptr().cast(),
        )? as usize;
        for info in buf.chunks_exact(SIGINFO_SIZE).take(n) {
            let word =
                |i: usize| i32::from_ne_bytes([info[i], info[i + 1], info[i + 2], info[i + 3]]);
            out.push(PendingSignal {
                signo: word(0),
                code: word(8),
                siginfo: info.to_vec(),
            });
        }
        if n < BATCH {
            return Ok(out);
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct RseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// The thread's rseq registration (glibc registers one for every thread).
pub fn rseq_config(tid: i32) -> Result<Option<Rseq>> {
    let mut conf = RseqConfiguration::default();
    // addr is the size of our struct; the kernel writes at most that much.
    raw_ptrace(
        "get_rseq_configuration",
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfiguration>(),
        (&raw mut conf).cast(),
    )?;
    Ok((conf.rseq_abi_pointer != 0).then_some(Rseq {
        addr: conf.rseq_abi_pointer,
        len: conf.rseq_abi_size,
        flags: conf.flags,
        signature: conf.signature,
    }))
}

pub fn gp_regs_from(r: &libc::user_regs_struct) -> GpRegs {
    GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}
