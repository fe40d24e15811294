//! The mappings' VmFlags without reading `/proc/PID/smaps` while frozen.
//!
//! `smaps` is the only place the kernel shows VmFlags, and reading it walks
//! every page table entry to count Rss (tens of milliseconds per GiB): far
//! too long for the frozen window. So a dump that leaves the process running
//! reads `smaps` just before the freeze (or, beside an agent, names the
//! kernel's flag bits by patterns learned before, see `vmflags`, without a
//! page walk), and while frozen only
//! `/proc/PID/maps` (no page walk). A mapping whose line is unchanged keeps
//! the flags read before. If any line changed (a mapping came, went, moved
//! or changed protection), or the locked total (`VmLck`) no longer matches
//! the `lo` mappings, `smaps` is read while frozen after all.
//!
//! Flags that change without changing the maps line (`madvise` or `mlock`
//! of a whole mapping between the two reads) are checked after the process
//! runs again, from its snapshot (`snapshot`): a fork copies every mapping's
//! flags but a few it clears by design (see [`IGNORED_IN_COPY`]), and leaves
//! out `MADV_DONTFORK` mappings. A difference fails the dump by name: the
//! image would hold flags of another instant.

use std::collections::HashMap;

use tracing::debug;

use crate::error::{Error, Result};
use crate::memory::vmflags::{KernelVmaFlags, RawMaps};
use crate::memory::{self, MapEntry};

/// Flags a fork does not copy: mlock (`lo`) and userfaultfd registrations
/// without `UFFD_FEATURE_EVENT_FORK`.
const IGNORED_IN_COPY: [&str; 4] = ["lo", "um", "uw", "ui"];

/// The text of `/proc/PID/maps`.
fn read_maps_text(pid: i32) -> Result<String> {
    crate::error::read_proc(&format!("/proc/{pid}/maps"))
}

/// When `pid` started (`/proc/PID/stat` field 22): with the PID, one process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    fields.nth(19)?.parse().ok()
}

/// `smaps` of each process of a tree, read before it is frozen, and
/// where its code holds what remote syscalls need (searched before the
/// freeze too, checked again while frozen).
#[derive(Debug, Default)]
pub struct EarlyMaps {
    by_pid: HashMap<i32, (u64, Vec<MapEntry>)>,
    code: HashMap<i32, (u64, Option<crate::safe_return::Gadgets>)>,
    /// Where flags read while frozen come from, if not from smaps.
    kernel: Option<std::sync::Arc<KernelVmaFlags>>,
    /// Processes whose flags, read while frozen, came from `kernel`.
    from_kernel: std::sync::atomic::AtomicUsize,
    /// The kernel's raw bits behind each early smaps read, where `kernel`
    /// gave the same before and after it: what
    /// [`verify_after`](Self::verify_after) compares without smaps.
    raw: HashMap<i32, RawMaps>,
    /// Processes [`verify_after`](Self::verify_after) checked by `raw`.
    checked_by_bits: std::sync::atomic::AtomicUsize,
}

/// Whether two map entries are the same `maps` line.
fn same_line(a: &MapEntry, b: &MapEntry) -> bool {
    a.start == b.start
        && a.end == b.end
        && a.read == b.read
        && a.write == b.write
        && a.exec == b.exec
        && a.shared == b.shared
        && a.offset == b.offset
        && a.dev == b.dev
        && a.inode == b.inode
        && a.path == b.path
        && a.deleted == b.deleted
}

/// `VmLck:` of `/proc/PID/status`, in bytes.
fn locked_bytes(pid: i32) -> Option<u64> {
    crate::process::locked_bytes_in(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

impl EarlyMaps {
    /// Read `smaps` of every process in `pids` (running). A process that
    /// cannot be read is left out: its `smaps` is read while frozen.
    /// With `kernel`, its raw bits are read around each smaps read: where
    /// they held throughout, they name the flags (learned) and are kept
    /// for [`verify_after`](Self::verify_after).
    pub fn read(pids: &[i32], kernel: Option<&KernelVmaFlags>) -> EarlyMaps {
        // The code search (a few reads of text) beside the page walks of
        // smaps: neither needs the other.
        std::thread::scope(|scope| {
            let code = scope.spawn(|| EarlyMaps::read_code(pids));
            let mut by_pid = HashMap::new();
            let mut raws = HashMap::new();
            for &pid in pids {
                let Some(started) = start_time(pid) else {
                    continue;
                };
                let read = match kernel {
                    Some(k) => k.smaps_while_running(pid),
                    None => memory::read_maps(pid).map(|maps| (maps, None)),
                };
                if let Ok((maps, raw)) = read
                    && start_time(pid) == Some(started)
                {
                    if let Some(raw) = raw {
                        raws.insert(pid, raw);
                    }
                    by_pid.insert(pid, (started, maps));
                }
            }
            let mut early = code.join().unwrap_or_default();
            early.by_pid = by_pid;
            early.raw = raws;
            early
        })
    }

    /// Only where the code of each process of `pids` (running) holds what
    /// remote syscalls need (see [`code`](Self::code)): no smaps read.
    pub fn read_code(pids: &[i32]) -> EarlyMaps {
        let code = pids
            .iter()
            .filter_map(|&pid| {
                let ip = crate::remote::find_syscall_insn(pid).ok()?;
                Some((pid, (ip, crate::safe_return::find_gadgets(pid))))
            })
            .collect();
        EarlyMaps {
            code,
            ..EarlyMaps::default()
        }
    }

    /// The mappings of `pid` as read (with their flags), if it was.
    pub fn maps_of(&self, pid: i32) -> Option<&[MapEntry]> {
        self.by_pid.get(&pid).map(|(_, maps)| maps.as_slice())
    }

    /// Read flags while frozen from `kernel` rather than smaps where it can
    /// tell them (`vmflags`).
    pub fn with_kernel_flags(mut self, kernel: Option<std::sync::Arc<KernelVmaFlags>>) -> Self {
        self.kernel = kernel;
        self
    }

    /// The mappings of frozen `pid` with their flags as they are now.
    pub fn read_now(&self, pid: i32) -> Result<Vec<MapEntry>> {
        match &self.kernel {
            Some(k) => {
                let (maps, from_kernel) = k.read_maps(pid)?;
                if from_kernel {
                    self.from_kernel
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(maps)
            }
            None => memory::read_maps(pid),
        }
    }

    /// How many processes' flags [`verify_after`](Self::verify_after)
    /// checked without smaps.
    pub fn checked_without_smaps(&self) -> usize {
        self.checked_by_bits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many processes' flags, read while frozen, came without smaps.
    pub fn read_from_kernel(&self) -> usize {
        self.from_kernel.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Take over what `other` read (a process read by both keeps `other`'s).
    pub fn absorb(&mut self, other: EarlyMaps) {
        for pid in other.by_pid.keys() {
            self.raw.remove(pid);
        }
        self.by_pid.extend(other.by_pid);
        self.code.extend(other.code);
        self.raw.extend(other.raw);
    }

    /// Read the processes of `pids` not read yet, or whose mappings changed
    /// since (`/proc/PID/maps`, no page walk, tells): what
    /// [`frozen_maps`](Self::frozen_maps) finds then is as fresh as after a
    /// [`read`](Self::read) now.
    pub fn refresh(&mut self, pids: &[i32]) {
        let stale: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&pid| !matches!(self.unchanged(pid), Ok(Some(_))))
            .collect();
        if !stale.is_empty() {
            let read = EarlyMaps::read(&stale, self.kernel.as_deref());
            self.absorb(read);
        }
    }

    /// For frozen `pid`: a `syscall` instruction and the gadgets of
    /// `safe_return`, from the early search where they still hold, else
    /// searched now.
    pub fn code(&self, pid: i32) -> Result<(u64, Option<crate::safe_return::Gadgets>)> {
        let status = crate::error::read_proc(&format!("/proc/{pid}/status"))?;
        self.code_in(pid, &read_maps_text(pid)?, &status)
    }

    /// [`code`](Self::code) with `maps` and `status`, the texts of frozen
    /// `pid`'s /proc/PID/maps and /proc/PID/status read already.
    pub fn code_in(
        &self,
        pid: i32,
        maps: &str,
        status: &str,
    ) -> Result<(u64, Option<crate::safe_return::Gadgets>)> {
        if let Some((ip, gadgets)) = self.code.get(&pid) {
            let mut insn = [0u8; 2];
            let ip_holds =
                crate::remote::read_memory(pid, *ip, &mut insn).is_ok() && insn == [0x0f, 0x05];
            let gadgets_hold = gadgets
                .as_ref()
                .map(|g| crate::safe_return::still_valid_in(pid, g, maps, status));
            match (ip_holds, gadgets_hold) {
                (true, None) => return Ok((*ip, None)),
                (true, Some(Some(g))) => return Ok((*ip, Some(g))),
                _ => {}
            }
        }
        if let Some(found) = recent_code_in(pid, maps, status) {
            return Ok(found);
        }
        let found = (
            crate::remote::find_syscall_insn(pid)?,
            crate::safe_return::find_gadgets(pid),
        );
        remember_code(&found);
        Ok(found)
    }

    /// The mappings of frozen `pid`, and whether their flags are the early
    /// ones (then to be checked against its snapshot, see the module
    /// documentation) rather than read while frozen.
    pub fn frozen_maps(&self, pid: i32) -> Result<(Vec<MapEntry>, bool)> {
        let status = crate::error::read_proc(&format!("/proc/{pid}/status"))?;
        self.frozen_maps_in(pid, &read_maps_text(pid)?, &status)
    }

    /// [`frozen_maps`](Self::frozen_maps) with `maps` and `status`, the
    /// texts of frozen `pid`'s /proc/PID/maps and /proc/PID/status read
    /// already: while frozen its mappings and locked total change only by
    /// what the dump does, and the dump's remote calls leave them as they
    /// found them (they unmap the one page they map: see `dump::capture`).
    pub fn frozen_maps_in(
        &self,
        pid: i32,
        maps: &str,
        status: &str,
    ) -> Result<(Vec<MapEntry>, bool)> {
        if let Some(maps) = self.unchanged_in(pid, Some((maps, status)), None)? {
            return Ok((maps, true));
        }
        Ok((self.read_now(pid)?, false))
    }

    /// The mappings of frozen `pid` with their early flags, if `maps` and
    /// `status` (its texts, read while frozen) show them unchanged since
    /// the early read; None otherwise (then to be read now). `started`:
    /// its start time, where read while frozen already.
    pub fn unchanged_maps_in(
        &self,
        pid: i32,
        maps: &str,
        status: &str,
        started: Option<u64>,
    ) -> Result<Option<Vec<MapEntry>>> {
        self.unchanged_in(pid, Some((maps, status)), started)
    }

    fn unchanged(&self, pid: i32) -> Result<Option<Vec<MapEntry>>> {
        self.unchanged_in(pid, None, None)
    }

    /// Whether the mappings of `pid` (`texts`: its maps and status, else
    /// read now) are those of the early read, by the same process
    /// (`started`: its start time, else read now).
    fn unchanged_in(
        &self,
        pid: i32,
        texts: Option<(&str, &str)>,
        started: Option<u64>,
    ) -> Result<Option<Vec<MapEntry>>> {
        let Some((started_early, early)) = self.by_pid.get(&pid) else {
            return Ok(None);
        };
        if started.or_else(|| start_time(pid)) != Some(*started_early) {
            return Ok(None);
        }
        let mut now = match texts {
            Some((text, _)) => memory::parse_smaps(text, &format!("/proc/{pid}/maps"))?,
            None => memory::read_maps_lines(pid)?,
        };
        if now.len() != early.len() || now.iter().zip(early).any(|(n, e)| !same_line(n, e)) {
            debug!(
                pid,
                "mappings changed since smaps was read: smaps read while frozen"
            );
            return Ok(None);
        }
        for (n, e) in now.iter_mut().zip(early) {
            n.vm_flags = e.vm_flags.clone();
        }
        let locked: u64 = now
            .iter()
            .filter(|m| m.vm_flags.iter().any(|f| f == "lo"))
            .map(MapEntry::len)
            .sum();
        let locked_now = match texts {
            Some((_, status)) => crate::process::locked_bytes_in(status),
            None => locked_bytes(pid),
        };
        if locked_now != Some(locked) {
            debug!(
                pid,
                locked, "locked memory changed: smaps read while frozen"
            );
            return Ok(None);
        }
        Ok(Some(now))
    }
}

/// Check that `copy`, a fork of `target` taken while frozen, shows the
/// flags `expected` (the mappings of the image, flags read before the
/// freeze) for every mapping, apart from what a fork changes by design.
pub fn verify_from_copy(target: i32, copy: i32, expected: &[MapEntry]) -> Result<()> {
    compare_with_copy(target, &memory::read_maps(copy)?, expected)
}

impl EarlyMaps {
    /// Check, once `pid` runs again, that every mapping of `expected`
    /// (flags read before the freeze) that is still there as it was has
    /// the same flags now. Used where no snapshot exists to check against
    /// (a pre-copy dump): a flag changed on a mapping between the early
    /// read and the freeze shows unless it changed back, or the mapping
    /// went, before this check; a change after the freeze fails the dump
    /// too (a retry helps).
    ///
    /// Where the kernel's raw bits were kept with the early read and every
    /// mapping still at the same bounds still has the same bits, the flags
    /// are the same (they are a function of the bits) without a page walk
    /// of smaps; any other difference is judged by smaps, as without them.
    pub fn verify_after(&self, pid: i32, expected: &[MapEntry]) -> Result<()> {
        if let (Some(kernel), Some(early)) = (&self.kernel, self.raw.get(&pid))
            && let Ok(now) = kernel.raw(pid)
            && same_bits_where_same_bounds(early, &now)
        {
            self.checked_by_bits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        debug!(pid, "flags checked after the freeze by smaps");
        verify_after_by_smaps(pid, expected)
    }
}

/// Whether every mapping of `now` whose bounds are those of one of
/// `early` (both in address order) has its bits.
fn same_bits_where_same_bounds(early: &[(u64, u64, u64)], now: &[(u64, u64, u64)]) -> bool {
    let mut now = now.iter().peekable();
    early.iter().all(|&(start, end, bits)| {
        while now.next_if(|n| n.0 < start).is_some() {}
        match now.peek() {
            Some(&&(s, e, b)) if (s, e) == (start, end) => b == bits,
            _ => true,
        }
    })
}

/// [`EarlyMaps::verify_after`] by smaps.
fn verify_after_by_smaps(pid: i32, expected: &[MapEntry]) -> Result<()> {
    let now = memory::read_maps(pid).map_err(|e| {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            e
        } else {
            Error::Other(format!(
                "PID {pid} exited right after the freeze, before the flags of its memory \
                 could be checked against those read before it; no checkpoint written; try again"
            ))
        }
    })?;
    let mut it = now.iter().peekable();
    for m in expected {
        while it.next_if(|c| c.end <= m.start).is_some() {}
        if let Some(c) = it.peek().filter(|c| same_line(c, m))
            && flags_of(c) != flags_of(m)
        {
            return Err(changed_err(pid, m));
        }
    }
    Ok(())
}

fn changed_err(target: i32, m: &MapEntry) -> Error {
    Error::Other(format!(
        "the flags of the memory of PID {target} at {:x}-{:x} changed (madvise or mlock) \
         while it was being frozen; no checkpoint written; try again",
        m.start, m.end
    ))
}

/// A mapping's flags without those a fork or our own write tracking
/// change, sorted.
fn flags_of(m: &MapEntry) -> Vec<&str> {
    let mut f: Vec<&str> = m
        .vm_flags
        .iter()
        .map(String::as_str)
        .filter(|f| !IGNORED_IN_COPY.contains(f))
        .collect();
    f.sort_unstable();
    f
}

fn compare_with_copy(target: i32, copy_maps: &[MapEntry], expected: &[MapEntry]) -> Result<()> {
    let mut in_copy = copy_maps.iter().peekable();
    for m in expected {
        let dontfork = m.vm_flags.iter().any(|f| f == "dc");
        while in_copy.next_if(|c| c.end <= m.start).is_some() {}
        let found = in_copy.peek().filter(|c| same_line(c, m));
        let changed = match found {
            // Left out of the copy: it must have been MADV_DONTFORK.
            None => !dontfork,
            Some(c) => dontfork || flags_of(c) != flags_of(m),
        };
        if changed {
            return Err(changed_err(target, m));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64, flags: &[&str]) -> MapEntry {
        let line = format!("{start:x}-{end:x} rw-p 00000000 00:00 0");
        let mut e = memory::parse_smaps(&line, "test").unwrap().remove(0);
        e.vm_flags = flags.iter().map(|s| s.to_string()).collect();
        e
    }

    #[test]
    fn bits_are_compared_only_where_the_bounds_are_the_same() {
        let early = [
            (0x1000, 0x2000, 7),
            (0x3000, 0x5000, 3),
            (0x8000, 0x9000, 1),
        ];
        assert!(same_bits_where_same_bounds(&early, &early));
        // A mapping gone, one split, one new: none of them compared.
        let moved = [
            (0x1000, 0x2000, 7),
            (0x3000, 0x4000, 9),
            (0x6000, 0x7000, 5),
        ];
        assert!(same_bits_where_same_bounds(&early, &moved));
        assert!(same_bits_where_same_bounds(&early, &[]));
        // The same bounds with another bit: changed.
        let flipped = [
            (0x1000, 0x2000, 7),
            (0x3000, 0x5000, 3),
            (0x8000, 0x9000, 0x2001),
        ];
        assert!(!same_bits_where_same_bounds(&early, &flipped));
        let first = [(0x1000, 0x2000, 6)];
        assert!(!same_bits_where_same_bounds(&early, &first));
    }

    #[test]
    fn copy_with_the_same_flags_passes() {
        let image = [
            entry(0x1000, 0x2000, &["rd", "wr", "lo"]),
            entry(0x3000, 0x4000, &["rd", "dc"]),
            entry(0x5000, 0x6000, &["wr", "rd", "uw"]),
        ];
        let copy = [
            entry(0x1000, 0x2000, &["rd", "wr"]),
            entry(0x5000, 0x6000, &["rd", "wr"]),
        ];
        compare_with_copy(1, &copy, &image).unwrap();
    }

    #[test]
    fn a_flag_changed_in_between_fails() {
        let image = [entry(0x1000, 0x2000, &["rd", "wr"])];
        let copy = [entry(0x1000, 0x2000, &["rd", "wr", "hg"])];
        let e = compare_with_copy(7, &copy, &image).unwrap_err().to_string();
        assert!(e.contains("PID 7") && e.contains("1000-2000"), "{e}");
    }

    #[test]
    fn a_mapping_turned_dontfork_or_back_fails() {
        let image = [
            entry(0x1000, 0x2000, &["rd"]),
            entry(0x3000, 0x4000, &["rd"]),
        ];
        let copy = [entry(0x3000, 0x4000, &["rd"])];
        assert!(compare_with_copy(1, &copy, &image).is_err());
        let image = [entry(0x1000, 0x2000, &["rd", "dc"])];
        let copy = [entry(0x1000, 0x2000, &["rd"])];
        assert!(compare_with_copy(1, &copy, &image).is_err());
    }

    #[test]
    fn same_line_ignores_flags_only() {
        let a = entry(0x1000, 0x2000, &["rd"]);
        let b = entry(0x1000, 0x2000, &["rd", "hg"]);
        assert!(same_line(&a, &b));
        assert!(!same_line(&a, &entry(0x1000, 0x3000, &["rd"])));
    }
}

/// Code addresses found lately in any process: a `syscall` instruction
/// and the gadgets. Searching a process's code for them reads its C
/// library's text (~0.45 ms here), once per process while frozen when the
/// freeze comes first (a trigger), so every member of a forked tree paid it
/// at every checkpoint, though all map the library at the same address.
/// Each use is proved in the frozen process itself: the bytes are there and
/// the mapping they lie in is executable ([`recent_code_in`]).
static RECENT_CODE: std::sync::Mutex<Vec<(u64, crate::safe_return::Gadgets)>> =
    std::sync::Mutex::new(Vec::new());

/// How many address pairs [`RECENT_CODE`] keeps (one per library layout:
/// a process not forked from another has its own).
const RECENT_CODE_KEPT: usize = 8;

fn remember_code(found: &(u64, Option<crate::safe_return::Gadgets>)) {
    let (ip, Some(gadgets)) = found else {
        return;
    };
    let Ok(mut recent) = RECENT_CODE.lock() else {
        return;
    };
    recent.retain(|(i, g)| {
        (*i, g.syscall_ret, g.sigreturn) != (*ip, gadgets.syscall_ret, gadgets.sigreturn)
    });
    recent.insert(0, (*ip, gadgets.clone()));
    recent.truncate(RECENT_CODE_KEPT);
}

/// A pair of [`RECENT_CODE`] that holds in frozen `pid` (its maps and
/// status texts given): a `syscall` at the address, in an executable
/// mapping, and gadgets that `still_valid_in` finds in place, also in
/// executable mappings.
fn recent_code_in(
    pid: i32,
    maps: &str,
    status: &str,
) -> Option<(u64, Option<crate::safe_return::Gadgets>)> {
    let recent = RECENT_CODE.lock().ok()?.clone();
    recent.into_iter().find_map(|(ip, gadgets)| {
        let executable = |at: u64, len: u64| in_executable_mapping(maps, at, len);
        let mut insn = [0u8; 2];
        let ip_holds = executable(ip, 2)
            && crate::remote::read_memory(pid, ip, &mut insn).is_ok()
            && insn == [0x0f, 0x05];
        if !ip_holds || !executable(gadgets.syscall_ret, 3) || !executable(gadgets.sigreturn, 9) {
            return None;
        }
        let g = crate::safe_return::still_valid_in(pid, &gadgets, maps, status)?;
        debug!(pid, ip, "code addresses of an earlier process hold");
        Some((ip, Some(g)))
    })
}

/// Whether `[at, at + len)` lies in one readable, executable mapping of a
/// /proc/PID/maps text.
fn in_executable_mapping(maps: &str, at: u64, len: u64) -> bool {
    maps.lines().any(|line| {
        let mut cols = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            return false;
        };
        let Some((start, end)) = range.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) else {
            return false;
        };
        perms.starts_with('r')
            && perms.get(2..3) == Some("x")
            && start <= at
            && at.checked_add(len).is_some_and(|e| e <= end)
    })
}

#[cfg(test)]
mod recent_code_tests {
    use super::in_executable_mapping;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 123 /usr/bin/x
7f0000000000-7f0000100000 r-xp 00028000 fd:01 456 /usr/lib/libc.so.6
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
";

    #[test]
    fn only_code_inside_an_executable_mapping_counts() {
        assert!(in_executable_mapping(MAPS, 0x7f0000000010, 3));
        assert!(in_executable_mapping(MAPS, 0x7f00000ffffd, 3));
        assert!(!in_executable_mapping(MAPS, 0x7f00000ffffe, 3));
        assert!(!in_executable_mapping(MAPS, 0x7f0000100010, 3));
        assert!(!in_executable_mapping(MAPS, 0x55d0c0a00010, 2));
        assert!(!in_executable_mapping(MAPS, u64::MAX - 1, 3));
    }
}
