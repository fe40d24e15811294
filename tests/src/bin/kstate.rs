//! `kstate`
//!
//! Gives itself every piece of state a dump reads either from the kernel's
//! structures (the agent's eBPF `task` iterator) or with remote syscalls,
//! each set away from its default, so that the two ways can be compared:
//!
//! * dispositions: SIGUSR1 caught with SA_SIGINFO | SA_RESTART |
//!   SA_ONSTACK and SIGUSR2, SIGTERM in its mask; SIGTERM caught with
//!   SA_RESETHAND | SA_NODEFER; SIGHUP ignored with SA_RESTART; SIGCHLD at
//!   SIG_DFL with SA_NOCLDSTOP;
//! * parent-death signal SIGUSR2, child subreaper, not dumpable, THP
//!   disabled, personality ADDR_NO_RANDOMIZE, RLIMIT_NOFILE 1000/2000,
//!   RLIMIT_CORE 0, oom_score_adj 123, a break moved by an odd amount;
//! * three threads: the main one with a 64 KiB alternate stack, one with
//!   an alternate stack that disarms itself (SS_AUTODISARM) and the name
//!   `kstate-alt`, one with none (Rust's own switched off).
//!
//! Prints `READY pid=… brk=0x…`, then sleeps until killed.

use std::time::Duration;

use chpox_tests::{check, ignore_signal, install_handler, say};

extern "C" fn handler(_sig: libc::c_int) {}

/// An alternate stack of `len` bytes for the calling thread.
fn altstack(len: usize, flags: libc::c_int) {
    let stack = chpox_tests::mmap_anon(len, 0);
    let ss = libc::stack_t {
        ss_sp: stack.cast(),
        ss_flags: flags,
        ss_size: len,
    };
    // SAFETY: `ss` describes a live mapping of `len` bytes that stays
    // mapped for the life of the process.
    check(
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) },
        "sigaltstack",
    );
}

fn main() {
    const SS_AUTODISARM: libc::c_int = 1 << 31;
    install_handler(
        libc::SIGUSR1,
        handler,
        libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK,
        &[libc::SIGUSR2, libc::SIGTERM],
    );
    install_handler(
        libc::SIGTERM,
        handler,
        libc::SA_RESETHAND | libc::SA_NODEFER,
        &[],
    );
    ignore_signal(libc::SIGHUP);
    // SAFETY: sigaction on locals; SIG_DFL needs no handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        sa.sa_flags = libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        check(
            libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()),
            "sigaction(SIGCHLD)",
        );
    }
    // SAFETY: prctl, personality, setrlimit and sbrk with plain values.
    let brk = unsafe {
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR2 as libc::c_ulong),
            "PR_SET_PDEATHSIG",
        );
        check(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1), "subreaper");
        check(libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0), "thp");
        let persona = libc::personality(0xffff_ffff);
        check(
            libc::personality((persona | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong),
            "personality",
        );
        let nofile = libc::rlimit {
            rlim_cur: 1000,
            rlim_max: 2000,
        };
        check(libc::setrlimit(libc::RLIMIT_NOFILE, &nofile), "nofile");
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(libc::setrlimit(libc::RLIMIT_CORE, &core), "core");
        libc::sbrk(12345);
        let brk = libc::sbrk(0) as u64;
        // Last: not dumpable makes /proc/self root's.
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0), "dumpable");
        brk
    };
    std::fs::write("/proc/self/oom_score_adj", "123").expect("oom_score_adj");
    altstack(64 * 1024, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let with_stack = tx.clone();
    let named = std::thread::Builder::new().name("kstate-alt".into());
    let _ = named.spawn(move || {
        altstack(32 * 1024, SS_AUTODISARM);
        let _ = with_stack.send(());
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    std::thread::spawn(move || {
        // Rust's own, against stack overflows, off.
        let ss = libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: SS_DISABLE reads no stack.
        check(
            unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) },
            "sigaltstack(SS_DISABLE)",
        );
        let _ = tx.send(());
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    for _ in 0..2 {
        rx.recv().expect("threads start");
    }
    say(format!("READY pid={} brk={brk:#x}", std::process::id()));
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
