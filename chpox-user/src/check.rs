//! `chpox check`: what this machine offers that chpox uses, found by
//! trying each thing (as `criu check` does), and what chpox does without
//! it. Run as root to see what the agent and a root restore can do.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::Serialize;

/// One finding.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// A stable name for scripts (`bpf_lsm`, `ring_buffer`, …).
    pub name: &'static str,
    /// What it is, in words.
    pub what: &'static str,
    pub available: bool,
    /// What was found (or why not).
    pub detail: String,
    /// What chpox does without it.
    pub without: &'static str,
}

/// Everything `chpox check` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub as_root: bool,
    pub findings: Vec<Finding>,
}

/// A probe: whether the thing is there, and what was found.
type Probe = fn() -> (bool, String);

/// Tries everything.
pub fn run() -> Report {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let probes: [(&str, &str, &str, Probe); 10] = [
        (
            "bpf_lsm",
            "BPF LSM (eBPF security hooks)",
            "no guard for a registered process that resets its trigger signal's disposition: the signal then does what it would without chpox",
            bpf_lsm,
        ),
        (
            "tracefs",
            "tracefs (tracepoints the eBPF program attaches to)",
            "chpox-agent cannot start: no `kill -31` trigger; `chpox dump` and `chpox restore` still work",
            tracefs,
        ),
        (
            "bpffs",
            "bpffs (the BPF filesystem)",
            "chpox-agent cannot start: no `kill -31` trigger; `chpox dump` and `chpox restore` still work",
            bpffs,
        ),
        (
            "ring_buffer",
            "BPF ring buffers (trigger events to the agent)",
            "chpox-agent cannot start: no `kill -31` trigger; `chpox dump` and `chpox restore` still work",
            ring_buffer,
        ),
        (
            "ptrace",
            "ptrace allowed (Yama ptrace_scope)",
            "scope 1: users may `chpox dump` only their descendants (the agent, as root, may checkpoint any); 2: only root; 3: nothing can be checkpointed",
            ptrace_scope,
        ),
        (
            "clone3_set_tid",
            "clone3 with set_tid (a chosen PID)",
            "processes cannot get their saved PIDs back: only `chpox restore --pid any` works, a tree cannot be restored",
            clone3_set_tid,
        ),
        (
            "userfaultfd_wp",
            "userfaultfd with write-protect",
            "memory is copied while the process is frozen (no copy-on-write snapshot, no lazy restore)",
            userfaultfd_wp,
        ),
        (
            "pagemap_scan",
            "PAGEMAP_SCAN ioctl on /proc/PID/pagemap",
            "no incremental checkpoints: every checkpoint stores all memory again",
            pagemap_scan,
        ),
        (
            "tcp_repair",
            "TCP repair mode",
            "established TCP connections cannot be saved in place: a dump refuses them (or closes them when told to)",
            tcp_repair,
        ),
        (
            "pid_namespace",
            "PID namespaces",
            "`chpox restore --pid-ns` fails: a tree whose PIDs are taken cannot be restored",
            pid_namespace,
        ),
    ];
    let findings = probes
        .into_iter()
        .map(|(name, what, without, probe)| {
            let (available, detail) = probe();
            Finding {
                name,
                what,
                available,
                detail,
                without,
            }
        })
        .collect();
    Report {
        kernel,
        as_root: nix::unistd::geteuid().is_root(),
        findings,
    }
}

/// The report in words, one line per finding and a line for what is
/// missing.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kernel {}{}",
        r.kernel,
        if r.as_root {
            ""
        } else {
            " (not root: run as root to see what chpox-agent can do)"
        }
    );
    for f in &r.findings {
        let _ = writeln!(
            s,
            "{:<4} {}: {}",
            if f.available { "yes" } else { "NO" },
            f.what,
            f.detail
        );
        if !f.available {
            let _ = writeln!(s, "     without it: {}", f.without);
        }
    }
    let missing = r.findings.iter().filter(|f| !f.available).count();
    let _ = writeln!(
        s,
        "{}",
        if missing == 0 {
            "everything chpox uses is here".to_string()
        } else {
            format!("{missing} missing: chpox works without them, as said above")
        }
    );
    s
}

fn errno_text(e: nix::errno::Errno) -> String {
    format!("{} ({})", e.desc(), e)
}

fn bpf_lsm() -> (bool, String) {
    match std::fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(list) => {
            let on = list.trim().split(',').any(|l| l == "bpf");
            (on, format!("active LSMs: {}", list.trim()))
        }
        Err(e) => (false, format!("cannot read /sys/kernel/security/lsm: {e}")),
    }
}

fn filesystem_known(name: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().last() == Some(name)))
}

fn tracefs() -> (bool, String) {
    let path = crate::bpf::TRACEFS;
    if std::path::Path::new(path).join("events").is_dir() {
        (true, format!("mounted at {path}"))
    } else if filesystem_known("tracefs") {
        (
            true,
            format!("not mounted; chpox-agent mounts it at {path}"),
        )
    } else {
        (false, "the kernel has no tracefs".into())
    }
}

fn bpffs() -> (bool, String) {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = crate::bpf::BPFFS;
    match nix::sys::statfs::statfs(path) {
        Ok(st) if st.filesystem_type().0 == BPF_FS_MAGIC => (true, format!("mounted at {path}")),
        _ if filesystem_known("bpf") => (
            true,
            format!("not mounted; chpox-agent mounts it at {path}"),
        ),
        _ => (false, "the kernel has no bpf filesystem".into()),
    }
}

fn ring_buffer() -> (bool, String) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    // union bpf_attr, map-create part: map_type, key_size, value_size,
    // max_entries; the rest zero.
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_RINGBUF;
    attr[3] = 4096;
    // SAFETY: attr is a zeroed buffer as large as the size passed, laid out
    // as the kernel's union bpf_attr for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return (false, errno_text(nix::errno::Errno::last()));
    }
    // SAFETY: the syscall returned a new descriptor we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    (true, "a ring buffer map was created".into())
}

fn ptrace_scope() -> (bool, String) {
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Err(_) => (true, "no Yama: ptrace as the kernel allows".into()),
        Ok(v) => match v.trim() {
            "0" => (true, "scope 0: a user may trace their own processes".into()),
            "1" => (
                true,
                "scope 1: a user may trace only their descendants (root: any)".into(),
            ),
            "2" => (false, "scope 2: only root may trace".into()),
            other => (false, format!("scope {other}: no process may be traced")),
        },
    }
}

fn clone3_set_tid() -> (bool, String) {
    // struct clone_args up to set_tid_size; asking for our own PID, which
    // is taken: EEXIST means the kernel would give a free one.
    let our_pid = [std::process::id() as libc::pid_t];
    let mut args = [0u64; 11];
    args[4] = libc::SIGCHLD as u64;
    args[8] = our_pid.as_ptr() as u64;
    args[9] = 1;
    // SAFETY: args is a clone_args of the size passed; set_tid points to
    // one pid_t that outlives the call. Our PID is taken, so no process is
    // created; if one ever were, it exits at once below.
    let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 88usize) };
    if r == 0 {
        // SAFETY: in the child: leave without running anything of ours.
        unsafe { libc::_exit(0) };
    }
    if r > 0 {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r as i32), None);
        return (true, "clone3 created a process with a chosen PID".into());
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::EEXIST => (true, "clone3 accepts set_tid".into()),
        nix::errno::Errno::EPERM => (
            false,
            "not permitted (needs CAP_CHECKPOINT_RESTORE or root)".into(),
        ),
        e => (false, errno_text(e)),
    }
}

fn userfaultfd_wp() -> (bool, String) {
    const UFFD_USER_MODE_ONLY: libc::c_long = 1;
    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFD_API: u64 = 0xaa;
    const FEATURE_WP: u64 = 1 << 0;
    const FEATURE_WP_ASYNC: u64 = 1 << 15;
    // SAFETY: userfaultfd takes flags and returns a descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as libc::c_long | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return (false, errno_text(nix::errno::Errno::last()));
    }
    // SAFETY: the syscall returned a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct uffdio_api: api, features (asking none returns all), ioctls.
    let mut api = [UFFD_API, 0, 0];
    // SAFETY: api is a struct uffdio_api the kernel fills in.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) } < 0 {
        return (false, errno_text(nix::errno::Errno::last()));
    }
    let features = api[1];
    match (features & FEATURE_WP != 0, features & FEATURE_WP_ASYNC != 0) {
        (true, true) => (true, "write-protect, asynchronous write-protect".into()),
        (true, false) => (true, "write-protect (no asynchronous write-protect)".into()),
        _ => (false, "userfaultfd without write-protect".into()),
    }
}

fn pagemap_scan() -> (bool, String) {
    const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    let file = match std::fs::File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) => return (false, format!("cannot open /proc/self/pagemap: {e}")),
    };
    let page = [0u8; 4096];
    let start = (page.as_ptr() as u64) & !4095;
    let mut regions = [0u64; 3];
    // struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len,
    // max_pages, category_inverted, category_mask, category_anyof_mask,
    // return_mask.
    let mut arg = [0u64; 12];
    arg[0] = 96;
    arg[2] = start;
    arg[3] = start + 4096;
    arg[5] = regions.as_mut_ptr() as u64;
    arg[6] = 1;
    arg[11] = PAGE_IS_PRESENT;
    // SAFETY: arg is a struct pm_scan_arg whose vec points to one
    // page_region (three u64) that outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN, arg.as_mut_ptr()) };
    if r < 0 {
        return (false, errno_text(nix::errno::Errno::last()));
    }
    std::hint::black_box(&page);
    (true, "the ioctl answers".into())
}

fn tcp_repair() -> (bool, String) {
    const TCP_REPAIR: libc::c_int = 19;
    let sock = match nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(s) => s,
        Err(e) => return (false, format!("no TCP socket: {}", errno_text(e))),
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return match nix::errno::Errno::last() {
            nix::errno::Errno::EPERM => (false, "not permitted (needs CAP_NET_ADMIN)".into()),
            e => (false, errno_text(e)),
        };
    }
    (true, "a socket entered repair mode".into())
}

fn pid_namespace() -> (bool, String) {
    use std::os::unix::process::CommandExt;
    if !std::path::Path::new("/proc/self/ns/pid").exists() {
        return (false, "the kernel has no PID namespaces".into());
    }
    let Ok(exe) = std::env::current_exe() else {
        return (false, "cannot find this program to try".into());
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: unshare is a single system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
        });
    }
    match cmd.status() {
        Ok(_) => (true, "a new PID namespace was created".into()),
        Err(e) => (false, format!("cannot create one: {e}")),
    }
}
