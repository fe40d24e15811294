//! What a thread borrowed for remote system calls does if chpox dies
//! while holding it: it goes back to exactly where it was.
//!
//! A tracer that dies detaches its tracees, and they run on from whatever
//! registers they have. A thread we borrowed has ours: an instruction
//! pointer on a `syscall` in some library, our arguments, every signal
//! blocked. Left like that it would run our syscall and then whatever code
//! follows it, and crash the job chpox was protecting.
//!
//! So, as CRIU's parasite does, we make the thread's way back a signal
//! return. Before changing anything, we write below its stack pointer (and
//! its red zone) a signal frame (`struct rt_sigframe`) holding its own
//! registers, signal mask, alternate stack and XSAVE area, and run our
//! syscalls on a `syscall; ret` found in its code, with the stack pointer
//! at that frame, whose first word (`pretcode`, where a signal handler
//! returns to) is the address of a `mov $15, %rax; syscall` — an
//! `rt_sigreturn`, as every C library has for its signal handlers. A
//! thread released at any moment finishes the syscall it is in (or the
//! harmless `getpid` it is parked on), returns into `rt_sigreturn`, and
//! the kernel loads everything from the frame: the registers (with the
//! interrupted syscall set to restart), the mask, the FPU state.
//!
//! Without both gadgets (a process with no C library), or with a user-mode
//! shadow stack (which a `ret` to an address it did not call would
//! violate), threads are borrowed as before, unguarded.
//!
//! What a dying chpox still leaves behind: a one-page scratch mapping; a
//! sleep whose restart block the sigreturn resets (the program sees the
//! sleep end with EINTR, as after a signal handler); and, if it dies during
//! the very first call (the one that reads the alternate stack), the
//! thread's alternate signal stack disabled.

use crate::error::Result;
use crate::remote::{read_memory, write_memory};

/// Addresses, in the target, of the two pieces of its code we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gadgets {
    /// `syscall; ret` (0f 05 c3).
    pub syscall_ret: u64,
    /// `mov $15, %rax; syscall` (rt_sigreturn).
    pub sigreturn: u64,
    /// Mappings where a frame may go below a thread's stack pointer: the
    /// main stack, and mappings with a guard page right below them (thread
    /// stacks of the C library). Elsewhere — a Go goroutine's stack in its
    /// heap, say — the bytes below the stack pointer may be someone's
    /// data: such threads are borrowed unguarded, as the kernel itself
    /// would need SA_ONSTACK there.
    stacks: Vec<(u64, u64)>,
}

const SYSCALL_RET: &[u8] = &[0x0f, 0x05, 0xc3];
/// `mov $15, %rax; syscall` (glibc, musl) and `mov $15, %eax; syscall`.
const SIGRETURNS: [&[u8]; 2] = [
    &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
    &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
];

/// Look for both gadgets in the executable mappings of `pid`, the C
/// library and the dynamic loader first. None if either is missing, or if
/// the process uses a shadow stack.
pub fn find_gadgets(pid: i32) -> Option<Gadgets> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let shadow_stack = status
        .lines()
        .find_map(|l| l.strip_prefix("x86_Thread_features:"))
        .is_some_and(|f| f.split_whitespace().any(|w| w == "shstk"));
    if shadow_stack {
        return None;
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let stacks = stack_mappings(&maps);
    let mut regions: Vec<(u64, u64, String)> = maps
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let range = cols.next()?;
            let perms = cols.next()?;
            let name = cols.nth(3).unwrap_or("").to_string();
            let (start, end) = range.split_once('-')?;
            let (start, end) = (
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            );
            (perms.starts_with('r') && perms.get(2..3) == Some("x") && name.starts_with('/'))
                .then_some((start, end, name))
        })
        .collect();
    regions.sort_by_key(|(_, _, name)| !(name.contains("/libc") || name.contains("/ld-")));
    let (mut syscall_ret, mut sigreturn) = (None, None);
    for (start, end, _) in regions {
        search_code(
            pid,
            start,
            end.min(start + (16 << 20)),
            &mut syscall_ret,
            &mut sigreturn,
        );
        if let (Some(syscall_ret), Some(sigreturn)) = (syscall_ret, sigreturn) {
            return Some(Gadgets {
                syscall_ret,
                sigreturn,
                stacks,
            });
        }
    }
    None
}

/// Bytes of code read at a time by [`search_code`].
const CODE_WINDOW: usize = 64 << 10;

/// Fill in whichever of the two gadgets is still missing from the code at
/// `[start, end)` of `pid`. The code is read a window at a time into one
/// buffer and the search stops once both are found: the C library's first
/// hundred KiB usually hold them, and reading all of it into fresh memory
/// cost ~1 ms before every dump.
fn search_code(
    pid: i32,
    start: u64,
    end: u64,
    syscall_ret: &mut Option<u64>,
    sigreturn: &mut Option<u64>,
) {
    // A gadget may straddle two windows: the tail of each is kept.
    let keep = SIGRETURNS
        .iter()
        .map(|p| p.len())
        .chain([SYSCALL_RET.len()])
        .max()
        .unwrap_or(1)
        - 1;
    let mut buf = vec![0u8; keep + CODE_WINDOW];
    let (mut kept, mut at) = (0usize, start);
    while at < end && (syscall_ret.is_none() || sigreturn.is_none()) {
        let len = ((end - at) as usize).min(CODE_WINDOW);
        if read_memory(pid, at, &mut buf[kept..kept + len]).is_err() {
            return;
        }
        let window = &buf[..kept + len];
        let base = at - kept as u64;
        let find = |pattern: &[u8]| memchr::memmem::find(window, pattern).map(|i| base + i as u64);
        if syscall_ret.is_none() {
            *syscall_ret = find(SYSCALL_RET);
        }
        if sigreturn.is_none() {
            *sigreturn = SIGRETURNS.iter().find_map(|p| find(p));
        }
        let filled = kept + len;
        let carry = keep.min(filled);
        buf.copy_within(filled - carry..filled, 0);
        kept = carry;
        at += len as u64;
    }
}

/// `gadgets` found in `pid` earlier (before a freeze, where the search
/// costs nothing), if they still hold: the bytes still there, no shadow
/// stack, and the stack mappings read again now (threads come and go).
/// None: search again with [`find_gadgets`].
pub fn still_valid(pid: i32, gadgets: &Gadgets) -> Option<Gadgets> {
    let maps = crate::error::read_proc(&format!("/proc/{pid}/maps")).ok()?;
    let status = crate::error::read_proc(&format!("/proc/{pid}/status")).ok()?;
    still_valid_in(pid, gadgets, &maps, &status)
}

/// [`still_valid`] with `maps` and `status`, the texts of /proc/PID/maps
/// and /proc/PID/status read already.
pub fn still_valid_in(pid: i32, gadgets: &Gadgets, maps: &str, status: &str) -> Option<Gadgets> {
    if status
        .lines()
        .find_map(|l| l.strip_prefix("x86_Thread_features:"))
        .is_some_and(|f| f.split_whitespace().any(|w| w == "shstk"))
    {
        return None;
    }
    let holds = |at: u64, pattern: &[u8]| {
        let mut buf = vec![0u8; pattern.len()];
        read_memory(pid, at, &mut buf).is_ok() && buf == pattern
    };
    if !holds(gadgets.syscall_ret, SYSCALL_RET)
        || !SIGRETURNS.iter().any(|p| holds(gadgets.sigreturn, p))
    {
        return None;
    }
    Some(Gadgets {
        syscall_ret: gadgets.syscall_ret,
        sigreturn: gadgets.sigreturn,
        stacks: stack_mappings(maps),
    })
}

/// The stack mappings of a /proc/PID/maps text (see `Gadgets::stacks`).
fn stack_mappings(maps: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    // (end, perms) of the mapping before the current one.
    let mut below: Option<(u64, String)> = None;
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            continue;
        };
        let name = cols.nth(3).unwrap_or("");
        let Some((start, end)) = range.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) else {
            continue;
        };
        let guarded = below
            .as_ref()
            .is_some_and(|(e, p)| *e == start && p.starts_with("---"));
        if perms.starts_with("rw") && (name == "[stack]" || guarded) {
            out.push((start, end));
        }
        below = Some((end, perms.to_string()));
    }
    out
}

/// Bytes the frame takes below the red zone, before the XSAVE area.
const FRAME_HEAD: usize = 8 + UCONTEXT_SIZE + FRAME_SCRATCH_LEN as usize;
/// `struct ucontext` on x86-64: flags, link, stack_t (24), sigcontext
/// (256), sigset (8).
const UCONTEXT_SIZE: usize = 8 + 8 + 24 + 256 + 8;
/// Where `uc_stack` lies in the frame (after pretcode, flags, link).
pub const FRAME_STACK_AT: u64 = 8 + 16;
/// Where `info` (the siginfo, which rt_sigreturn does not read) lies: our
/// first call writes the alternate stack there.
pub const FRAME_SCRATCH_AT: u64 = (8 + UCONTEXT_SIZE) as u64;
/// The size of `info` (a siginfo), free for results once the first call's
/// alternate stack is read from it.
pub const FRAME_SCRATCH_LEN: u64 = 128;
const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;
const UC_STRICT_RESTORE_SS: u64 = 4;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `sw_reserved` in the legacy FXSAVE area.
const SW_RESERVED_AT: usize = 464;
const RED_ZONE: u64 = 128;

/// Write the way back for a thread whose registers, to be resumed as they
/// are (the interrupted syscall already set to restart), are `regs`, with
/// signal mask `mask` and XSAVE area `xsave`. Returns the frame's address:
/// the stack pointer to give the thread while it runs our syscalls.
pub fn write_frame(
    pid: i32,
    regs: &libc::user_regs_struct,
    mask: u64,
    xsave: &[u8],
    gadgets: &Gadgets,
) -> Result<u64> {
    let fp_offset = FRAME_HEAD.div_ceil(64) * 64;
    let total = fp_offset + xsave.len() + 4;
    let frame = (regs.rsp.saturating_sub(RED_ZONE + total as u64)) & !63;
    if !gadgets
        .stacks
        .iter()
        .any(|&(start, end)| start <= frame && regs.rsp <= end)
    {
        return Err(crate::error::Error::Other(format!(
            "the stack pointer {:#x} is not on a stack with room below it",
            regs.rsp
        )));
    }
    let mut f = vec![0u8; total];
    let mut put = |at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    put(0, gadgets.sigreturn);
    // struct ucontext at 8
    put(8, UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS);
    // uc_stack: disabled until the first call tells the real one.
    put(24 + 8, libc::SS_DISABLE as u64);
    // struct sigcontext at 8 + 40
    let sc = 48;
    let words = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.eflags,
    ];
    for (i, w) in words.into_iter().enumerate() {
        put(sc + 8 * i, w);
    }
    // cs, gs, fs, ss: 16 bits each.
    let segs = sc + 8 * words.len();
    for (i, s) in [regs.cs, regs.gs, regs.fs, regs.ss].into_iter().enumerate() {
        f[segs + 2 * i..segs + 2 * i + 2].copy_from_slice(&(s as u16).to_ne_bytes());
    }
    // err, trapno, oldmask, cr2 stay 0; then the fpstate pointer.
    let fpstate_at = segs + 8 + 32;
    f[fpstate_at..fpstate_at + 8].copy_from_slice(&(frame + fp_offset as u64).to_ne_bytes());
    // uc_sigmask after the 256-byte sigcontext.
    let sigmask_at = sc + 256;
    f[sigmask_at..sigmask_at + 8].copy_from_slice(&mask.to_ne_bytes());
    // The XSAVE area, with the software-reserved words that tell the kernel
    // it is a whole XSAVE area (ptrace gives them already; set them if not),
    // and the closing magic.
    let fp = &mut f[fp_offset..fp_offset + xsave.len()];
    fp.copy_from_slice(xsave);
    let magic1 = u32::from_ne_bytes(
        fp[SW_RESERVED_AT..SW_RESERVED_AT + 4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    if magic1 != FP_XSTATE_MAGIC1 {
        let len = xsave.len() as u32;
        fp[SW_RESERVED_AT..SW_RESERVED_AT + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_ne_bytes());
        fp[SW_RESERVED_AT + 4..SW_RESERVED_AT + 8].copy_from_slice(&(len + 4).to_ne_bytes());
        fp[SW_RESERVED_AT + 8..SW_RESERVED_AT + 16]
            .copy_from_slice(&crate::registers::host_xfeatures().0.to_ne_bytes());
        fp[SW_RESERVED_AT + 16..SW_RESERVED_AT + 20].copy_from_slice(&len.to_ne_bytes());
    }
    let end = fp_offset + xsave.len();
    f[end..end + 4].copy_from_slice(&FP_XSTATE_MAGIC2.to_ne_bytes());
    write_memory(pid, frame, &f)?;
    Ok(frame)
}

/// Put the alternate stack the thread really has (a `stack_t` as
/// `sigaltstack` wrote it at `frame + FRAME_SCRATCH_AT`) into the frame.
/// Returns the `stack_t` as read.
pub fn fill_altstack(pid: i32, frame: u64) -> Result<[u8; 24]> {
    let mut stack = [0u8; 24];
    read_memory(pid, frame + FRAME_SCRATCH_AT, &mut stack)?;
    write_memory(pid, frame + FRAME_STACK_AT, &stack)?;
    Ok(stack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_the_main_stack_and_guarded_mappings() {
        let maps = "\
7f0000000000-7f0000001000 ---p 00000000 00:00 0
7f0000001000-7f0000801000 rw-p 00000000 00:00 0
7f0000900000-7f0000a00000 rw-p 00000000 00:00 0
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(
            stack_mappings(maps),
            [
                (0x7f00_0000_1000, 0x7f00_0080_1000),
                (0x7ffc_0000_0000, 0x7ffc_0002_1000)
            ]
        );
    }

    #[test]
    fn gadgets_across_windows_are_found_at_their_first_place() {
        // Our own memory stands for the code: the syscall-ret straddles the
        // first window's end, the sigreturn lies in the third window, and a
        // later copy of each must not be the one reported.
        let mut code = vec![0u8; 3 * CODE_WINDOW + 100];
        let ret_at = CODE_WINDOW - 1;
        code[ret_at..ret_at + 3].copy_from_slice(SYSCALL_RET);
        let sig_at = 2 * CODE_WINDOW + 7;
        code[sig_at..sig_at + SIGRETURNS[1].len()].copy_from_slice(SIGRETURNS[1]);
        code[3 * CODE_WINDOW..3 * CODE_WINDOW + 3].copy_from_slice(SYSCALL_RET);
        let start = code.as_ptr() as u64;
        let pid = std::process::id() as i32;
        let (mut ret, mut sig) = (None, None);
        search_code(pid, start, start + code.len() as u64, &mut ret, &mut sig);
        assert_eq!(ret, Some(start + ret_at as u64));
        assert_eq!(sig, Some(start + sig_at as u64));
        // Stops at the end it is given.
        let (mut ret, mut sig) = (None, None);
        search_code(pid, start, start + ret_at as u64 + 2, &mut ret, &mut sig);
        assert_eq!((ret, sig), (None, None));
    }
}
