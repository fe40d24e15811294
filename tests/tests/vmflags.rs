//! Mappings' flags (smaps's VmFlags) of a process the agent checkpoints,
//! read while it is frozen through the eBPF `task_vma` iterator once the
//! kernel's bit patterns are known, instead of smaps (which walks every
//! page table entry): the image must hold exactly what smaps shows, also
//! for a flag the process set between two checkpoints.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chpox::image::ImageReader;
use common::agent::{Agent, poll_until, scratch, send};
use common::procs::{become_subreaper, restore_detached};
use common::{path_str, python};

/// Each mapping's VmFlags in /proc/PID/smaps, by start address.
fn smaps_flags(pid: i32) -> HashMap<u64, Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut out = HashMap::new();
    let mut start = None;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((s, _)) = first.split_once('-')
            && !first.ends_with(':')
        {
            start = u64::from_str_radix(s, 16).ok();
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let mut f: Vec<String> = flags.split_whitespace().map(str::to_string).collect();
            f.sort();
            out.insert(start.expect("a mapping line first"), f);
        }
    }
    out
}

/// The image's flags of each mapping, by start address.
fn image_flags(image: &std::path::Path) -> HashMap<u64, Vec<String>> {
    let reader = ImageReader::open(image).expect("image opens");
    reader
        .metadata()
        .root
        .vmas
        .iter()
        .map(|v| {
            let mut f = v.vm_flags.clone();
            f.sort();
            (v.start, f)
        })
        .collect()
}

const SCRIPT: &str = r#"
import ctypes, mmap, signal, time
region = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE)
region.write(b"x" * (64 * 4096))
# Thousands of mappings (alternating protections keep them apart): the
# iterator's records then take several reads.
many = [
    mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE,
              prot=mmap.PROT_READ if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE)
    for i in range(3000)
]
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
def advise(*_):
    region.madvise(mmap.MADV_DONTDUMP)
    region.madvise(18)  # MADV_WIPEONFORK
    print("ADVISED", flush=True)
signal.signal(signal.SIGUSR1, advise)
print(f"REGION {addr:x}", flush=True)
print("READY", flush=True)
while True:
    time.sleep(3600)
"#;

/// [`SCRIPT`] started, and the address of its region once it is ready.
fn start_script(logs: &std::path::Path) -> (common::Target, u64) {
    let mut t = python(SCRIPT, &[], logs);
    let region = t.wait_for_line("REGION ", Duration::from_secs(30));
    let region = u64::from_str_radix(region.trim_start_matches("REGION ").trim(), 16)
        .expect("region address");
    (t, region)
}

#[test]
fn flags_read_without_smaps_are_smaps_flags_also_after_a_change() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("flags.chpox");
    let (mut t, region) = start_script(&s.logs);
    let pid = t.pid;
    let pid_s = pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    let checkpoint = || {
        agent.chpox_ok(&["checkpoint", &pid_s]);
        agent
            .events("checkpoint written")
            .last()
            .and_then(|e| e.get("flags_without_smaps").cloned())
            .expect("the agent logs where the flags came from")
    };
    // The first checkpoints teach the agent this kernel's patterns (the
    // second one the patterns with our write tracking on); from then on
    // an unchanged process's flags come without smaps.
    let mut from_kernel = Vec::new();
    for _ in 0..3 {
        from_kernel.push(checkpoint());
    }
    assert_eq!(
        from_kernel.last().map(String::as_str),
        Some("1"),
        "flags never came from the iterator: {from_kernel:?}\n{}",
        agent.describe()
    );
    assert_eq!(
        image_flags(&img),
        smaps_flags(pid),
        "flags from the iterator"
    );

    // A flag set on a whole mapping: its maps line stays the same.
    send(pid, libc::SIGUSR1);
    t.wait_for_line("ADVISED", Duration::from_secs(30));
    checkpoint();
    let second = checkpoint();
    assert_eq!(second, "1", "known patterns again: {}", agent.describe());
    let image = image_flags(&img);
    assert_eq!(image, smaps_flags(pid), "flags after madvise");
    let flags = image.get(&region).expect("the region is in the image");
    assert!(
        flags.iter().any(|f| f == "dd") && flags.iter().any(|f| f == "wf"),
        "{flags:?}"
    );

    // The restored process has them too (and its wipe-on-fork pages,
    // which a fork-based snapshot does not see, came through).
    agent.chpox_ok(&["unregister", &pid_s]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
    common::wait_pid_free(pid);
    let restored = restore_detached(&img, &[]);
    poll_until(
        "the restored process",
        Duration::from_secs(30),
        || format!("{restored}"),
        || std::path::Path::new(&format!("/proc/{restored}")).exists(),
    );
    let after = smaps_flags(restored);
    let flags = after.get(&region).expect("the region is restored");
    assert!(
        flags.iter().any(|f| f == "dd") && flags.iter().any(|f| f == "wf"),
        "{flags:?}"
    );
    let mut page = [0u8; 8];
    chpox::remote::read_memory(restored, region + 4096 * 63, &mut page).expect("read");
    assert_eq!(
        &page, b"xxxxxxxx",
        "the wipe-on-fork pages are in the image"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restored),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// `chpox dump` beside a running agent: its pre-copy reads smaps while the
/// process runs, with the kernel's bits before and after, and checks the
/// flags after the freeze by the bits alone. The image must hold smaps's
/// flags, also those madvise set on a whole mapping.
#[test]
fn a_pre_copied_dump_beside_the_agent_checks_flags_by_the_kernels_bits() {
    become_subreaper();
    let s = scratch();
    let _agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("precopied.chpox");
    let (mut t, region) = start_script(&s.logs);
    send(t.pid, libc::SIGUSR1);
    t.wait_for_line("ADVISED", Duration::from_secs(30));
    let out = common::chpox_ok(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&img),
        "--json",
        "--precopy",
        "--unsupported-fd",
        "null",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("dump --json");
    assert_eq!(report["precopied"], 1, "{report}");
    assert_eq!(report["flags_checked_without_smaps"], 1, "{report}");
    let image = image_flags(&img);
    assert_eq!(image, smaps_flags(t.pid), "flags of a pre-copied dump");
    let flags = image.get(&region).expect("the region is in the image");
    assert!(
        flags.iter().any(|f| f == "dd") && flags.iter().any(|f| f == "wf"),
        "{flags:?}"
    );
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
}

/// The agent learns a registered process's flag patterns while it runs:
/// at its registration, and after a checkpoint whose write tracking gave
/// its mappings new ones. So even its first checkpoints read no smaps
/// while it is frozen (a page walk of ~17 ms per GiB).
#[test]
fn a_registered_process_is_frozen_without_smaps_from_its_first_checkpoint() {
    become_subreaper();
    let s = scratch();
    let agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let img = dir.join("learned.chpox");
    let mut t = python(SCRIPT, &[], &s.logs);
    t.wait_for_line("READY", Duration::from_secs(30));
    let pid_s = t.pid.to_string();
    agent.chpox_ok(&["register", &pid_s, "-o", path_str(&img)]);
    let mut from_kernel = Vec::new();
    for _ in 0..3 {
        // The learning runs beside, a page walk of a small process.
        std::thread::sleep(Duration::from_millis(500));
        agent.chpox_ok(&["checkpoint", &pid_s]);
        from_kernel.push(
            agent
                .events("checkpoint written")
                .last()
                .and_then(|e| e.get("flags_without_smaps").cloned())
                .expect("the agent logs where the flags came from"),
        );
    }
    assert_eq!(from_kernel, ["1", "1", "1"], "{}", agent.describe());
    assert_eq!(
        image_flags(&img),
        smaps_flags(t.pid),
        "flags learned while running"
    );
    agent.chpox_ok(&["unregister", &pid_s]);
    t.child.kill().expect("kill");
    t.child.wait().expect("reap");
}

/// `chpox dump --json --no-precopy` of `pid` to `image`, with `extra`
/// arguments and its caches in `cache`: the report.
fn dump_with_cache(
    pid: i32,
    image: &std::path::Path,
    cache: &std::path::Path,
    extra: &[&str],
) -> serde_json::Value {
    let out = std::process::Command::new(common::chpox_bin())
        .args(["dump", &pid.to_string(), "-o", path_str(image)])
        .args(["--json", "--no-precopy", "--unsupported-fd", "null"])
        .args(extra)
        .env("CHPOX_CACHE_DIR", cache)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run chpox");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("dump --json")
}

/// What one `chpox dump` learned of the kernel's flag patterns (from the
/// smaps it read) is kept for the next one, a new process: a dump that
/// kills its process then reads no smaps while it is frozen, and the
/// image still holds exactly smaps's flags, also madvise's on a whole
/// mapping. Patterns kept for another kernel are not used.
#[test]
fn flag_patterns_learned_by_one_dump_spare_the_next_its_smaps_read() {
    become_subreaper();
    let s = scratch();
    let _agent = Agent::start(&s);
    let dir = s.dir("out", 0o755);
    let cache = s.dir("cache", 0o700);
    let kept_file = cache.join("vm-flag-names");
    let advised = || {
        let (mut t, region) = start_script(&s.logs);
        send(t.pid, libc::SIGUSR1);
        t.wait_for_line("ADVISED", Duration::from_secs(30));
        (t, region)
    };

    let (mut first, _) = advised();
    dump_with_cache(first.pid, &dir.join("learn.chpox"), &cache, &[]);
    let kept = std::fs::read_to_string(&kept_file).expect("patterns kept");
    assert!(kept.starts_with("kernel "), "{kept}");
    // The same patterns said to come from another kernel: smaps is read.
    let other = kept.replacen("kernel ", "kernel 0.0.0-other ", 1);
    std::fs::write(&kept_file, other).expect("rewrite the cache");
    let report = dump_with_cache(first.pid, &dir.join("other.chpox"), &cache, &["--kill"]);
    assert_eq!(
        report["flags_without_smaps"], 0,
        "another kernel's: {report}"
    );
    first.child.wait().expect("reap");
    let kept = std::fs::read_to_string(&kept_file).expect("patterns kept again");
    assert!(!kept.contains("0.0.0-other"), "{kept}");

    let (mut second, region) = advised();
    let before = smaps_flags(second.pid);
    let img = dir.join("killed.chpox");
    let report = dump_with_cache(second.pid, &img, &cache, &["--kill"]);
    assert_eq!(report["flags_without_smaps"], 1, "{report}");
    second.child.wait().expect("reap");
    let image = image_flags(&img);
    assert_eq!(image, before, "flags from the kept patterns");
    let flags = image.get(&region).expect("the region is in the image");
    assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
}
