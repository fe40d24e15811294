//! `procattrs`
//!
//! Sets the small per-process attributes a checkpoint must keep, and on
//! SIGUSR1 checks that it still has them:
//!
//! * `oom_score_adj` 321; `PR_SET_THP_DISABLE` (except where madvised,
//!   where the kernel has that); `PR_SET_DUMPABLE` 0;
//!   `PR_SET_NO_NEW_PRIVS`.
//! * two seccomp filters, installed on both its threads (TSYNC): the first
//!   makes `sysinfo` fail with errno 42, the second, newer, with 44 (the
//!   newer one wins, so 44 says they came back in order).
//! * mappings with madvise and mlock state: MADV_DONTFORK (`dc`),
//!   MADV_WIPEONFORK (`wf`), MADV_NOHUGEPAGE (`nh`), MADV_DONTDUMP (`dd`),
//!   MADV_MERGEABLE (`mg`, when KSM exists), `mlock` (`lo`),
//!   `mlock2(MLOCK_ONFAULT)` (`lo lf`); each holds a pattern; and
//!   `mlockall(MCL_FUTURE)`, so a mapping made later is locked.
//! * with a directory argument: works in that directory (made with mode
//!   0751), removed.
//!
//! Prints `READY ...`; on SIGUSR1 prints one `OK` line per check and
//! `DONE`, exit 0; a failed check panics (exit 101).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{check, mmap_anon_isolated, say, stop_on_signal, wait_for_stop};

const LEN: usize = 4 * 4096;

static CHECK_NOW: AtomicU32 = AtomicU32::new(0);

/// A classic BPF program: `sysinfo` fails with `errno`, all else allowed.
fn filter(errno: u32) -> Vec<[u8; 8]> {
    let insn = |code: u16, jt: u8, jf: u8, k: u32| {
        let mut i = [0u8; 8];
        i[..2].copy_from_slice(&code.to_ne_bytes());
        i[2] = jt;
        i[3] = jf;
        i[4..].copy_from_slice(&k.to_ne_bytes());
        i
    };
    vec![
        // A = seccomp_data.nr
        insn(0x20, 0, 0, 0),
        // if A == SYS_sysinfo goto errno else goto allow
        insn(0x15, 0, 1, libc::SYS_sysinfo as u32),
        insn(0x06, 0, 0, 0x0005_0000 | errno),
        insn(0x06, 0, 0, 0x7fff_0000),
    ]
}

fn install(prog: &[[u8; 8]]) {
    // struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    let mut fprog = [0u8; 16];
    fprog[..2].copy_from_slice(&(prog.len() as u16).to_ne_bytes());
    fprog[8..].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    // SAFETY: fprog points at `prog`, alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1, // SECCOMP_SET_MODE_FILTER
            1, // SECCOMP_FILTER_FLAG_TSYNC
            fprog.as_ptr(),
        )
    };
    assert_eq!(ret, 0, "seccomp: {}", std::io::Error::last_os_error());
}

/// The errno `sysinfo` fails with (0 if it succeeds).
fn sysinfo_errno() -> i32 {
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: info is a live struct sysinfo.
    let ret = unsafe { libc::syscall(libc::SYS_sysinfo, &mut info as *mut libc::sysinfo) };
    if ret == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn prctl_get(option: libc::c_int) -> i32 {
    // SAFETY: the PR_GET_* options used here take no pointers.
    check(unsafe { libc::prctl(option, 0, 0, 0, 0) }, "prctl")
}

fn fill(p: *mut u8, seed: u8) {
    for i in 0..LEN {
        // SAFETY: p is a live LEN-byte mapping.
        unsafe { *p.add(i) = seed.wrapping_add((i % 251) as u8) };
    }
}

fn intact(p: *mut u8, seed: u8) -> bool {
    // SAFETY: p is a live LEN-byte mapping.
    (0..LEN).all(|i| unsafe { *p.add(i) } == seed.wrapping_add((i % 251) as u8))
}

/// The VmFlags of the mapping at `addr` in /proc/self/smaps.
fn vm_flags(addr: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
    let mut here = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, _)) = range.split_once('-')
            && let Ok(start) = usize::from_str_radix(start, 16)
            && !line.starts_with("VmFlags")
        {
            here = start == addr;
            continue;
        }
        if here && let Some(flags) = line.strip_prefix("VmFlags:") {
            return flags.split_whitespace().map(str::to_string).collect();
        }
    }
    panic!("no mapping at {addr:#x}");
}

fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .expect("read status")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn main() {
    stop_on_signal(libc::SIGUSR1);
    let ksm = std::path::Path::new("/sys/kernel/mm/ksm").exists();
    let mut regions: Vec<(*mut u8, &str, &[&str])> = Vec::new();
    let advised: [(libc::c_int, &str); 5] = [
        (libc::MADV_DONTFORK, "dc"),
        (libc::MADV_WIPEONFORK, "wf"),
        (libc::MADV_NOHUGEPAGE, "nh"),
        (libc::MADV_DONTDUMP, "dd"),
        (libc::MADV_MERGEABLE, "mg"),
    ];
    for (advice, flag) in advised {
        if flag == "mg" && !ksm {
            continue;
        }
        let p = mmap_anon_isolated(LEN, 0);
        // SAFETY: p is a live LEN-byte mapping of ours.
        check(unsafe { libc::madvise(p.cast(), LEN, advice) }, "madvise");
        regions.push((p, flag, &[]));
    }
    let locked = mmap_anon_isolated(LEN, 0);
    // SAFETY: a live mapping of ours.
    check(unsafe { libc::mlock(locked.cast(), LEN) }, "mlock");
    regions.push((locked, "lo", &[]));
    let on_fault = mmap_anon_isolated(LEN, 0);
    // SAFETY: a live mapping of ours; MLOCK_ONFAULT = 1.
    check(
        unsafe { libc::syscall(libc::SYS_mlock2, on_fault, LEN, 1) } as i32,
        "mlock2",
    );
    regions.push((on_fault, "lf", &["lo"]));
    for (i, &(p, _, _)) in regions.iter().enumerate() {
        fill(p, i as u8 * 17);
    }

    // SAFETY: plain mlockall; MCL_FUTURE alone locks only what comes.
    check(unsafe { libc::mlockall(libc::MCL_FUTURE) }, "mlockall");
    let cwd = std::env::args().nth(1);
    if let Some(dir) = &cwd {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(dir).expect("mkdir");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o751)).expect("chmod");
        std::env::set_current_dir(dir).expect("chdir");
        std::fs::remove_dir(dir).expect("rmdir");
    }
    std::fs::write("/proc/self/oom_score_adj", "321").expect("set oom_score_adj");
    // SAFETY: prctl with integer arguments.
    unsafe {
        // Disabled except where madvised (Linux 6.18), else disabled.
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 2, 0, 0) != 0 {
            check(
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0),
                "THP_DISABLE",
            );
        }
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "NO_NEW_PRIVS",
        );
    }
    let helper = std::thread::spawn(|| {
        while CHECK_NOW.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        sysinfo_errno()
    });
    install(&filter(42));
    install(&filter(44));
    // SAFETY: prctl with integer arguments. Last: it makes /proc/self root's.
    check(
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
        "DUMPABLE",
    );
    assert_eq!(sysinfo_errno(), 44);
    let thp = prctl_get(libc::PR_GET_THP_DISABLE);
    say!("READY regions={} ksm={ksm} thp={thp}", regions.len());

    wait_for_stop(Duration::from_millis(100));

    let adj = std::fs::read_to_string("/proc/self/oom_score_adj").expect("read oom_score_adj");
    assert_eq!(adj.trim(), "321", "oom_score_adj");
    say!("OK oom_score_adj");
    assert_eq!(prctl_get(libc::PR_GET_THP_DISABLE), thp, "THP disabled");
    assert_eq!(prctl_get(libc::PR_GET_DUMPABLE), 0, "dumpable");
    assert_eq!(prctl_get(libc::PR_GET_NO_NEW_PRIVS), 1, "no_new_privs");
    say!("OK prctl");
    assert_eq!(status("Seccomp:"), "2", "seccomp mode");
    assert_eq!(status("Seccomp_filters:"), "2", "seccomp filters");
    assert_eq!(
        sysinfo_errno(),
        44,
        "the newer filter decides, in the main thread"
    );
    CHECK_NOW.store(1, Ordering::SeqCst);
    let in_thread = helper.join().expect("helper thread");
    assert_eq!(in_thread, 44, "the filters hold in the other thread");
    say!("OK seccomp");
    for (i, &(p, flag, also)) in regions.iter().enumerate() {
        let flags = vm_flags(p as usize);
        for f in std::iter::once(&flag).chain(also.iter()) {
            assert!(
                flags.iter().any(|x| x == f),
                "mapping {p:?} lost {f}: {flags:?}"
            );
        }
        assert!(
            intact(p, i as u8 * 17),
            "mapping {p:?} ({flag}) lost its content"
        );
    }
    let later = mmap_anon_isolated(LEN, 0);
    let flags = vm_flags(later as usize);
    assert!(
        flags.iter().any(|f| f == "lo"),
        "a new mapping is not locked (mlockall MCL_FUTURE lost): {flags:?}"
    );
    say!("OK vmflags");
    if let Some(dir) = &cwd {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let link = std::fs::read_link("/proc/self/cwd").expect("readlink cwd");
        assert_eq!(
            link.to_string_lossy(),
            format!("{dir} (deleted)"),
            "the working directory"
        );
        let md = std::fs::metadata(".").expect("stat .");
        assert_eq!(md.permissions().mode() & 0o7777, 0o751, "its mode");
        assert_eq!(md.nlink(), 0, "it is removed");
        say!("OK cwd");
    }
    say!("DONE");
}
