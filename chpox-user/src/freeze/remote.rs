//! Running system calls inside a frozen process.
//!
//! Some state is only visible from inside the target: signal dispositions
//! (`rt_sigaction`), alternate signal stacks (`sigaltstack`), the current
//! program break (`brk`). We borrow a stopped thread: point its instruction
//! pointer at a `syscall` instruction already present in its address space
//! (the vdso has some), load the arguments, let it run exactly that syscall
//! under `PTRACE_SYSCALL`, read the result at syscall exit, and put every
//! register back. No code is written into the target.
//!
//! All signals are blocked in the borrowed thread while it runs for us, so a
//! signal arriving meanwhile stays pending instead of running a handler on
//! our borrowed registers.

use std::io::{IoSlice, IoSliceMut};

use nix::sys::ptrace;
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ptrace::{Frozen, Stop, get_regs, get_sigmask, set_regs, set_sigmask, wait_stop};
use crate::registers;
use crate::safe_return::{self, Gadgets};

/// Every signal blocked (the kernel ignores the SIGKILL/SIGSTOP bits).
const ALL_SIGNALS: u64 = u64::MAX;

/// The address of a `syscall` instruction (0f 05) in the target, searched in
/// the vdso first and then in any executable mapping.
pub fn find_syscall_insn(pid: i32) -> Result<u64> {
    let maps = crate::error::read_proc(&format!("/proc/{pid}/maps"))?;
    let mut candidates: Vec<(u64, u64, bool)> = Vec::new();
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            continue;
        };
        let name = cols.nth(3).unwrap_or("");
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        // Readable (so we can search it) and executable.
        if perms.starts_with('r') && perms.get(2..3) == Some("x") {
            candidates.push((start, end, name == "[vdso]"));
        }
    }
    // vdso first: it is always there and always has syscall fallbacks.
    candidates.sort_by_key(|&(_, _, vdso)| !vdso);
    for (start, end, _) in candidates {
        let len = (end - start).min(1 << 20) as usize;
        let mut buf = vec![0u8; len];
        if read_memory(pid, start, &mut buf).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(start + i as u64);
        }
    }
    Err(Error::NoSyscallInsn(pid))
}

/// Read `buf.len()` bytes of the target's memory at `addr`.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let n = process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(buf)], &remote).map_err(
        |e| Error::Memory {
            pid,
            addr,
            source: e.into(),
        },
    )?;
    if n != len {
        return Err(Error::Memory {
            pid,
            addr,
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read"),
        });
    }
    Ok(())
}

pub fn write_memory(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: data.len(),
    }];
    let n = process_vm_writev(Pid::from_raw(pid), &[IoSlice::new(data)], &remote).map_err(|e| {
        Error::Memory {
            pid,
            addr,
            source: e.into(),
        }
    })?;
    if n != data.len() {
        return Err(Error::Memory {
            pid,
            addr,
            source: std::io::Error::new(std::io::ErrorKind::WriteZero, "short write"),
        });
    }
    Ok(())
}

/// Remote syscalls run so far by this process (each costs two ptrace
/// stops): for the restore's step log.
pub static REMOTE_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One thread of a frozen process, borrowed to run syscalls.
///
/// Its registers and signal mask are saved when borrowed and put back by
/// `give_back` (or on drop, so an error path cannot leave the thread with
/// our registers).
pub struct RemoteThread<'f> {
    frozen: &'f Frozen,
    tid: i32,
    syscall_ip: u64,
    saved_regs: libc::user_regs_struct,
    saved_mask: u64,
    /// We changed registers; they must be restored, with the interrupted
    /// syscall's restart applied by hand.
    ran: bool,
    returned: bool,
    /// The way back if we die while holding the thread (`safe_return`):
    /// the frame its stack pointer points at while it runs for us.
    frame: Option<u64>,
    /// The `stack_t` its `sigaltstack` gave when it was borrowed guarded
    /// (with the stack pointer every later call has too).
    altstack: Option<[u8; 24]>,
}

/// A frozen thread's registers, signal mask and XSAVE area, read since it
/// stopped and before any remote call in it: as it still has them, since
/// only the thread that seized it can change them while it is stopped.
/// A borrow given them need not ask the kernel again (three ptrace
/// requests per thread).
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub regs: libc::user_regs_struct,
    pub mask: u64,
    pub xsave: &'a [u8],
}

impl<'f> RemoteThread<'f> {
    pub fn borrow(frozen: &'f Frozen, tid: i32, syscall_ip: u64) -> Result<Self> {
        Self::borrow_saved(frozen, tid, syscall_ip, None)
    }

    fn borrow_saved(
        frozen: &'f Frozen,
        tid: i32,
        syscall_ip: u64,
        saved: Option<Saved<'_>>,
    ) -> Result<Self> {
        let (saved_regs, saved_mask) = match saved {
            Some(s) => (s.regs, s.mask),
            None => (get_regs(tid)?, get_sigmask(tid)?),
        };
        set_sigmask(tid, ALL_SIGNALS)?;
        Ok(RemoteThread {
            frozen,
            tid,
            syscall_ip,
            saved_regs,
            saved_mask,
            ran: false,
            returned: false,
            frame: None,
            altstack: None,
        })
    }

    /// Borrow a thread of a process that must survive our death at any
    /// moment (a dump): with `gadgets`, the thread is never left with our
    /// registers without a way back to its own (see `safe_return`).
    /// Without them, or if the frame cannot be written below its stack
    /// pointer, as [`borrow`](Self::borrow) on `fallback_ip`.
    pub fn borrow_guarded(
        frozen: &'f Frozen,
        tid: i32,
        gadgets: Option<&Gadgets>,
        fallback_ip: u64,
    ) -> Result<Self> {
        crate::overlap::block_on(Self::borrow_guarded_async(
            frozen,
            tid,
            gadgets,
            fallback_ip,
        ))
    }

    /// [`borrow_guarded`](Self::borrow_guarded) for [`crate::overlap`].
    pub async fn borrow_guarded_async(
        frozen: &'f Frozen,
        tid: i32,
        gadgets: Option<&Gadgets>,
        fallback_ip: u64,
    ) -> Result<Self> {
        Self::borrow_guarded_saved_async(frozen, tid, gadgets, fallback_ip, None).await
    }

    /// [`borrow_guarded_async`](Self::borrow_guarded_async) of a thread
    /// whose state was read already (`saved`, see [`Saved`]).
    pub async fn borrow_guarded_saved_async(
        frozen: &'f Frozen,
        tid: i32,
        gadgets: Option<&Gadgets>,
        fallback_ip: u64,
        saved: Option<Saved<'_>>,
    ) -> Result<Self> {
        let Some(gadgets) = gadgets else {
            return Self::borrow_saved(frozen, tid, fallback_ip, saved);
        };
        let read;
        let (saved_regs, saved_mask, xsave) = match saved {
            Some(s) => (s.regs, s.mask, s.xsave),
            None => {
                read = crate::ptrace::get_xstate(tid)?;
                (get_regs(tid)?, get_sigmask(tid)?, &read[..])
            }
        };
        let resume = registers::restarted(&saved_regs);
        let frame =
            match safe_return::write_frame(frozen.pid(), &resume, saved_mask, xsave, gadgets) {
                Ok(frame) => frame,
                Err(e) => {
                    debug!(tid, error = %e, "no room for a return frame; borrowing unguarded");
                    return Self::borrow_saved(frozen, tid, fallback_ip, saved);
                }
            };
        let mut thread = RemoteThread {
            frozen,
            tid,
            syscall_ip: gadgets.syscall_ret,
            saved_regs,
            saved_mask,
            ran: true,
            returned: false,
            frame: Some(frame),
            altstack: None,
        };
        // Parked on a harmless getpid, with the frame as its way back,
        // before its mask changes: from here, released at any moment, it
        // goes back to its own state.
        set_regs(tid, thread.call_regs(libc::SYS_getpid, [0; 6]))?;
        set_sigmask(tid, ALL_SIGNALS)?;
        // Its alternate stack, for the frame: the one thing a release
        // during this first call would get wrong.
        thread
            .call(
                "sigaltstack",
                libc::SYS_sigaltstack,
                [0, frame + safe_return::FRAME_SCRATCH_AT, 0, 0, 0, 0],
            )
            .await?;
        thread.altstack = Some(safe_return::fill_altstack(frozen.pid(), frame)?);
        Ok(thread)
    }

    /// The registers that run syscall `nr` with `args` on our `syscall`.
    fn call_regs(&self, nr: i64, args: [u64; 6]) -> libc::user_regs_struct {
        let mut regs = self.saved_regs;
        regs.rip = self.syscall_ip;
        regs.rax = nr as u64;
        // Not inside a syscall: the kernel must not "restart" one onto our
        // instruction pointer when the thread leaves its current stop.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        if let Some(frame) = self.frame {
            // `ret` after the syscall takes the frame's first word, the
            // address of rt_sigreturn, which finds the frame below.
            regs.rsp = frame;
        }
        regs
    }

    pub fn pid(&self) -> i32 {
        self.frozen.pid()
    }

    /// Room in the thread's stack for one call's results, with no mapping
    /// made for them (which costs two more calls): the siginfo part of its
    /// return frame, [`safe_return::FRAME_SCRATCH_LEN`] bytes that
    /// rt_sigreturn does not read. Guarded borrows only.
    pub fn frame_scratch(&self) -> Option<u64> {
        self.frame
            .map(|frame| frame + safe_return::FRAME_SCRATCH_AT)
    }

    /// The thread's `sigaltstack` `stack_t`, as read when it was borrowed
    /// (guarded borrows only): asking again, frozen, says the same.
    pub fn altstack_at_borrow(&self) -> Option<[u8; 24]> {
        self.altstack
    }

    /// Run syscall `nr` with `args`; returns the raw result (a negative
    /// errno on failure), as the kernel put it in rax.
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        crate::overlap::block_on(self.syscall_async(nr, args))
    }

    /// [`syscall`](Self::syscall), yielding while the thread runs (see
    /// [`crate::overlap`]).
    pub async fn syscall_async(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        REMOTE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tid = self.tid;
        set_regs(tid, self.call_regs(nr, args))?;
        self.ran = true;
        self.step_to_syscall_stop("entry").await?;
        self.step_to_syscall_stop("exit").await?;
        // The exit stop still tells which call ran (orig_rax): one
        // register read per call rather than one at each stop.
        let at_exit = get_regs(tid)?;
        if at_exit.orig_rax != nr as u64 {
            return Err(Error::RemoteProtocol {
                tid,
                what: format!("ran syscall {} instead of {nr}", at_exit.orig_rax as i64),
            });
        }
        Ok(at_exit.rax as i64)
    }

    /// Like `syscall`, turning a negative result into an error naming `call`.
    pub fn checked(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        crate::overlap::block_on(self.call(call, nr, args))
    }

    /// [`checked`](Self::checked), yielding while the thread runs (see
    /// [`crate::overlap`]).
    pub async fn call(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let ret = self.syscall_async(nr, args).await?;
        if (-4095..0).contains(&ret) {
            return Err(Error::RemoteSyscall {
                call,
                tid: self.tid,
                errno: nix::errno::Errno::from_raw(-ret as i32),
            });
        }
        Ok(ret as u64)
    }

    async fn step_to_syscall_stop(&mut self, what: &str) -> Result<()> {
        let tid = self.tid;
        loop {
            ptrace::syscall(Pid::from_raw(tid), None).map_err(|source| Error::Ptrace {
                op: "syscall",
                tid,
                source,
            })?;
            // The thread runs: let other processes' threads start too.
            crate::overlap::yield_now().await;
            match wait_stop(tid)? {
                Stop::Syscall => return Ok(()),
                // A group-stop (someone sent SIGSTOP): carry on, it is
                // re-established when we release the process.
                Stop::Event => continue,
                Stop::Exited => return Err(Error::Exited(self.frozen.pid())),
                Stop::Signal(sig) => {
                    return Err(Error::RemoteProtocol {
                        tid,
                        what: format!("signal {sig} at syscall {what} despite a full signal mask"),
                    });
                }
            }
        }
    }

    /// Map `len` bytes of read-write anonymous scratch memory in the target.
    pub fn map_scratch(&mut self, len: u64) -> Result<u64> {
        crate::overlap::block_on(self.map_scratch_async(len))
    }

    pub async fn map_scratch_async(&mut self, len: u64) -> Result<u64> {
        self.call(
            "mmap",
            libc::SYS_mmap,
            [
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
        .await
    }

    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<()> {
        crate::overlap::block_on(self.unmap_async(addr, len))
    }

    pub async fn unmap_async(&mut self, addr: u64, len: u64) -> Result<()> {
        self.call("munmap", libc::SYS_munmap, [addr, len, 0, 0, 0, 0])
            .await?;
        Ok(())
    }

    /// Put the thread back as it was.
    pub fn give_back(mut self) -> Result<()> {
        self.restore()
    }

    fn restore(&mut self) -> Result<()> {
        if self.returned {
            return Ok(());
        }
        self.returned = true;
        // The mask first: until the registers are the thread's own again,
        // a release finds it still parked on its way back.
        set_sigmask(self.tid, self.saved_mask)?;
        if self.ran {
            // We leave from a syscall-exit stop, whose return path does not
            // restart the syscall our interrupt cut short; do it by hand.
            set_regs(self.tid, registers::restarted(&self.saved_regs))?;
        }
        Ok(())
    }
}

impl Drop for RemoteThread<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            // A thread killed meanwhile has nothing left to restore.
            if crate::freeze::ptrace::process_is_exiting(self.tid) {
                debug!(tid = self.tid, error = %e, "thread exited during remote syscalls");
            } else {
                warn!(tid = self.tid, error = %e, "could not restore a thread after remote syscalls");
            }
        }
    }
}

impl RemoteThread<'_> {
    /// Run `clone(args)` and return the new process's PID. The thread is
    /// traced with `PTRACE_O_TRACECLONE` for the one call, so the child
    /// starts attached to us and held in a ptrace stop before it runs a
    /// single instruction (see `snapshot`); the clone event stop is passed
    /// by hand on the way to the syscall's exit.
    pub fn clone_attached(&mut self, args: [u64; 6]) -> Result<i32> {
        use nix::sys::wait::WaitStatus;
        let tid = self.tid;
        let pid = Pid::from_raw(tid);
        let options = |o: ptrace::Options| {
            ptrace::setoptions(pid, o).map_err(|source| Error::Ptrace {
                op: "setoptions",
                tid,
                source,
            })
        };
        options(ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_TRACECLONE)?;
        let result = (|| -> Result<i32> {
            set_regs(tid, self.call_regs(libc::SYS_clone, args))?;
            self.ran = true;
            let mut child = None;
            let mut syscall_stops = 0;
            loop {
                ptrace::syscall(pid, None).map_err(|source| Error::Ptrace {
                    op: "syscall",
                    tid,
                    source,
                })?;
                match crate::ptrace::wait_traced(tid) {
                    Ok(WaitStatus::PtraceSyscall(_)) => {
                        syscall_stops += 1;
                        if syscall_stops == 2 {
                            break;
                        }
                    }
                    Ok(WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_CLONE)) => {
                        let msg = ptrace::getevent(pid).map_err(|source| Error::Ptrace {
                            op: "geteventmsg",
                            tid,
                            source,
                        })?;
                        child = Some(msg as i32);
                    }
                    // A group-stop meanwhile: carry on, as `syscall` does.
                    Ok(WaitStatus::PtraceEvent(..) | WaitStatus::Continued(_)) => {}
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                    | Err(nix::errno::Errno::ECHILD) => {
                        return Err(Error::Exited(self.frozen.pid()));
                    }
                    Ok(other) => {
                        return Err(Error::RemoteProtocol {
                            tid,
                            what: format!("{other:?} during a remote clone"),
                        });
                    }
                    Err(source) => {
                        return Err(Error::Ptrace {
                            op: "waitpid",
                            tid,
                            source,
                        });
                    }
                }
            }
            let ret = get_regs(tid)?.rax as i64;
            if (-4095..0).contains(&ret) {
                return Err(Error::RemoteSyscall {
                    call: "clone",
                    tid,
                    errno: nix::errno::Errno::from_raw(-ret as i32),
                });
            }
            child.ok_or_else(|| Error::RemoteProtocol {
                tid,
                what: "clone returned without a clone event".into(),
            })
        })();
        // Whatever happened, the thread traces no further clones.
        options(ptrace::Options::PTRACE_O_TRACESYSGOOD)?;
        result
    }
}
