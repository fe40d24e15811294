//! A frozen process's VmFlags without `/proc/PID/smaps`.
//!
//! `smaps` is the only file that shows a mapping's flags (`VmFlags:`), and
//! reading it walks every page table entry to count Rss: about 100 ms for
//! 4 GiB here, all of it while the process is frozen. The agent has a
//! cheaper source: its eBPF `task_vma` iterator hands over each mapping's
//! bounds and the kernel's raw `vm_flags` bits in microseconds
//! ([`KernelVmaFlags`]'s `read`, implemented by the trigger side).
//!
//! smaps prints VmFlags as a pure function of those bits (one two-letter
//! name per set bit that has one), so a bit pattern seen once next to its
//! smaps line names the same flags every time on this kernel. Each time
//! smaps has to be read, the patterns of that read are learned. A frozen
//! process whose every mapping has a learned pattern, and whose
//! iterator records match `/proc/PID/maps` line for line, gets its flags
//! from the patterns; anything else (a new pattern, a mismatch, an
//! iterator that fails) reads smaps, as without the iterator. Nothing is
//! guessed: no bit is ever translated on its own.
//!
//! What was learned is kept for the next run (`vm-flag-names` in the cache
//! directory, see `crate::cache`), for this kernel alone: the file names
//! the kernel it was learned on (release and build), and is not used on
//! any other. `chpox dump`, a new process each time, otherwise read smaps
//! (a page walk, ~10 ms per GiB) at least once per dump: while frozen when
//! the dump kills the process, or beside a pre-copy's copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::debug;

use crate::error::Result;
use crate::memory::{self, MapEntry};

/// Bounds and raw `vm_flags` of each mapping of a process, in address
/// order, as the kernel holds them.
pub type ReadRaw = dyn Fn(i32) -> std::io::Result<RawMaps> + Send + Sync;

/// (start, end, vm_flags) of each mapping, in address order.
pub type RawMaps = Vec<(u64, u64, u64)>;

/// The flags of frozen processes from the kernel's bits (see the module
/// documentation). One per agent: what it learns holds for the kernel.
pub struct KernelVmaFlags {
    read: Box<ReadRaw>,
    /// Raw `vm_flags` → smaps's names for them.
    learned: Mutex<HashMap<u64, Vec<String>>>,
    /// The `[vsyscall]` line's flags: the gate area is no mapping of the
    /// process (the iterator does not see it), and never changes.
    gate: Mutex<Option<Vec<String>>>,
    /// Learned something since the cache file was read.
    added: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for KernelVmaFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVmaFlags").finish_non_exhaustive()
    }
}

const GATE: &str = "[vsyscall]";

impl KernelVmaFlags {
    /// Nothing learned yet.
    pub fn new(read: Box<ReadRaw>) -> Arc<KernelVmaFlags> {
        Arc::new(KernelVmaFlags {
            read,
            learned: Mutex::new(HashMap::new()),
            gate: Mutex::new(None),
            added: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What earlier runs learned on this kernel, from the cache file (see
    /// the module documentation); [`save`](Self::save) keeps what this
    /// one adds.
    pub fn from_cache(read: Box<ReadRaw>) -> Arc<KernelVmaFlags> {
        let flags = Self::new(read);
        let kernel = kernel_identity();
        let text = cache_file().and_then(|path| crate::cache::read_own(&path));
        if let (Some(kernel), Some(text)) = (kernel, text) {
            match parse_cache(&text, &kernel) {
                Some((learned, gate)) => {
                    debug!(
                        patterns = learned.len(),
                        "VMA flag names read from the cache"
                    );
                    *lock(&flags.learned) = learned;
                    *lock(&flags.gate) = gate;
                }
                None => debug!("VMA flag names cached for another kernel, or unreadable"),
            }
        }
        flags
    }

    /// Write what was learned to the cache file, if anything was added
    /// since it was read.
    pub fn save(&self) {
        use std::sync::atomic::Ordering;
        if !self.added.swap(false, Ordering::Relaxed) {
            return;
        }
        let (Some(path), Some(kernel)) = (cache_file(), kernel_identity()) else {
            return;
        };
        let text = format_cache(&kernel, &lock(&self.learned), lock(&self.gate).as_deref());
        crate::cache::write(&path, &text);
    }

    /// The mappings of frozen `pid` with their VmFlags, and whether these
    /// came from learned patterns (true) or from smaps (false).
    pub fn read_maps(&self, pid: i32) -> Result<(Vec<MapEntry>, bool)> {
        let raw = match (self.read)(pid) {
            Ok(raw) => raw,
            Err(e) => {
                debug!(pid, error = %e, "task_vma iterator failed: smaps read");
                return Ok((memory::read_maps(pid)?, false));
            }
        };
        let mut maps = memory::read_maps_lines(pid)?;
        if self.fill(&mut maps, &raw) {
            return Ok((maps, true));
        }
        debug!(
            pid,
            records = raw.len(),
            lines = maps.len(),
            first = ?raw.iter().take(4).collect::<Vec<_>>(),
            "flags not all learned: smaps read"
        );
        let maps = memory::read_maps(pid)?;
        self.learn(&maps, &raw);
        Ok((maps, false))
    }

    /// Bounds and raw `vm_flags` of each mapping of `pid`, as the kernel
    /// holds them now (microseconds: no page walk).
    pub fn raw(&self, pid: i32) -> std::io::Result<RawMaps> {
        (self.read)(pid)
    }

    /// smaps of `pid`, which runs, read between two reads of its bits; and
    /// those bits where they held and named the same mappings (their
    /// patterns are then learned).
    /// Where every pattern is known already, no smaps: the `maps` lines
    /// named by them, when the bits held across that read too.
    pub fn smaps_while_running(&self, pid: i32) -> Result<(Vec<MapEntry>, Option<RawMaps>)> {
        let before = (self.read)(pid).ok();
        if let Some(b) = before.as_ref().filter(|b| self.knows(b)) {
            let mut maps = memory::read_maps_lines(pid)?;
            if self.fill(&mut maps, b) && (self.read)(pid).is_ok_and(|after| after == *b) {
                return Ok((maps, before));
            }
        }
        let maps = memory::read_maps(pid)?;
        let held = before
            .filter(|b| (self.read)(pid).is_ok_and(|after| after == *b) && self.learn(&maps, b));
        Ok((maps, held))
    }

    /// Learn, while `pid` runs, the patterns of its mappings not known
    /// yet, so that its next freeze need not walk smaps (see
    /// [`smaps_while_running`](Self::smaps_while_running)). Nothing is
    /// read but the bits when every pattern is known. Whether they all are
    /// now.
    pub fn learn_while_running(&self, pid: i32) -> bool {
        if (self.read)(pid).is_ok_and(|raw| self.knows(&raw)) {
            return true;
        }
        self.smaps_while_running(pid)
            .is_ok_and(|(_, held)| held.is_some())
    }

    /// Whether every pattern of `raw`, and the gate's flags, are known.
    fn knows(&self, raw: &[(u64, u64, u64)]) -> bool {
        let learned = lock(&self.learned);
        lock(&self.gate).is_some() && raw.iter().all(|r| learned.contains_key(&r.2))
    }

    /// Give `maps` (from `/proc/PID/maps`) the learned flags of `raw`;
    /// false if any line has no record or no learned pattern.
    fn fill(&self, maps: &mut [MapEntry], raw: &[(u64, u64, u64)]) -> bool {
        let learned = lock(&self.learned);
        let gate = lock(&self.gate);
        let mut records = raw.iter();
        for map in maps.iter_mut() {
            if map.path == GATE {
                match gate.as_ref() {
                    Some(flags) => map.vm_flags = flags.clone(),
                    None => return false,
                }
                continue;
            }
            let Some(&(start, end, bits)) = records.next() else {
                return false;
            };
            if (start, end) != (map.start, map.end) {
                return false;
            }
            match learned.get(&bits) {
                Some(flags) => map.vm_flags = flags.clone(),
                None => return false,
            }
        }
        records.next().is_none()
    }

    /// Remember the patterns of `raw` that `maps` (read from smaps while
    /// `raw` held: frozen, or the same bits read before and after) name. Learned only when the two agree line for
    /// line, so no pattern is ever paired with another mapping's flags.
    /// Returns whether they agreed.
    pub fn learn(&self, maps: &[MapEntry], raw: &[(u64, u64, u64)]) -> bool {
        let vmas: Vec<&MapEntry> = maps.iter().filter(|m| m.path != GATE).collect();
        if vmas.len() != raw.len()
            || vmas
                .iter()
                .zip(raw)
                .any(|(m, &(s, e, _))| (m.start, m.end) != (s, e))
        {
            debug!("task_vma records and smaps disagree: nothing learned");
            return false;
        }
        let mut learned = lock(&self.learned);
        let mut added = false;
        for (m, &(_, _, bits)) in vmas.iter().zip(raw) {
            learned.entry(bits).or_insert_with(|| {
                added = true;
                m.vm_flags.clone()
            });
        }
        if let Some(g) = maps.iter().find(|m| m.path == GATE) {
            lock(&self.gate).get_or_insert_with(|| {
                added = true;
                g.vm_flags.clone()
            });
        }
        if added {
            self.added.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }
}

fn cache_file() -> Option<std::path::PathBuf> {
    crate::cache::file("vm-flag-names")
}

/// The running kernel's release and build (`uname -r`, `uname -v`): flag
/// names learned on it hold for it alone.
fn kernel_identity() -> Option<String> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok();
    let (release, build) = (read("osrelease")?, read("version")?);
    Some(format!("{} {}", release.trim(), build.trim()))
}

/// The cache file's text: `kernel <identity>`, then one line per pattern,
/// `<raw bits in hex> <name>...`, and `gate <name>...`.
fn format_cache(
    kernel: &str,
    learned: &HashMap<u64, Vec<String>>,
    gate: Option<&[String]>,
) -> String {
    let mut patterns: Vec<(&u64, &Vec<String>)> = learned.iter().collect();
    patterns.sort();
    let mut text = format!("kernel {kernel}\n");
    for (bits, names) in patterns {
        text.push_str(&format!("{bits:x}"));
        names.iter().for_each(|n| text.push_str(&format!(" {n}")));
        text.push('\n');
    }
    if let Some(gate) = gate {
        text.push_str("gate");
        gate.iter().for_each(|n| text.push_str(&format!(" {n}")));
        text.push('\n');
    }
    text
}

/// The patterns and gate flags of a cache file written on `kernel`; None
/// for another kernel's, or for anything not as [`format_cache`] writes
/// (a file that does not parse is not trusted in part).
#[allow(clippy::type_complexity)]
fn parse_cache(
    text: &str,
    kernel: &str,
) -> Option<(HashMap<u64, Vec<String>>, Option<Vec<String>>)> {
    let mut lines = text.lines();
    if lines.next()?.strip_prefix("kernel ")? != kernel {
        return None;
    }
    // smaps prints two-letter names of lowercase letters and digits.
    let name = |n: &str| {
        (n.len() == 2
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .then(|| n.to_string())
    };
    let (mut learned, mut gate) = (HashMap::new(), None);
    for line in lines {
        let mut words = line.split(' ');
        let key = words.next()?;
        let names: Vec<String> = words.map(name).collect::<Option<_>>()?;
        if key == "gate" {
            gate = Some(names);
        } else if learned
            .insert(u64::from_str_radix(key, 16).ok()?, names)
            .is_some()
        {
            return None;
        }
    }
    Some((learned, gate))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64, path: &str, flags: &[&str]) -> MapEntry {
        let line = format!("{start:x}-{end:x} rw-p 00000000 00:00 0 {path}");
        let mut e = memory::parse_smaps(&line, "test").expect("parse").remove(0);
        e.vm_flags = flags.iter().map(|s| s.to_string()).collect();
        e
    }

    fn source() -> Arc<KernelVmaFlags> {
        KernelVmaFlags::new(Box::new(|_| Ok(Vec::new())))
    }

    #[test]
    fn learned_patterns_name_the_same_flags_again() {
        let k = source();
        let smaps = [
            entry(0x1000, 0x3000, "", &["rd", "wr", "mr", "mw", "me", "ac"]),
            entry(
                0x5000,
                0x6000,
                "",
                &["rd", "wr", "mr", "mw", "me", "ac", "dd"],
            ),
            entry(0xff600000, 0xff601000, GATE, &["ex"]),
        ];
        let raw = [(0x1000, 0x3000, 0x100073), (0x5000, 0x6000, 0x4100073)];
        k.learn(&smaps, &raw);
        let mut maps: Vec<MapEntry> = smaps.to_vec();
        maps.iter_mut().for_each(|m| m.vm_flags.clear());
        assert!(k.fill(&mut maps, &raw));
        assert_eq!(maps, smaps);
        // The first mapping now has a pattern never seen: smaps must be read.
        let raw2 = [(0x1000, 0x3000, 0x20100073), (0x5000, 0x6000, 0x4100073)];
        assert!(!k.fill(&mut maps, &raw2));
    }

    #[test]
    fn records_that_do_not_match_the_maps_lines_are_refused() {
        let k = source();
        let smaps = [entry(0x1000, 0x3000, "", &["rd"])];
        k.learn(&smaps, &[(0x1000, 0x3000, 1)]);
        let mut maps = smaps.to_vec();
        assert!(!k.fill(&mut maps, &[(0x1000, 0x2000, 1)]), "other bounds");
        assert!(!k.fill(&mut maps, &[]), "a line without a record");
        assert!(
            !k.fill(&mut maps, &[(0x1000, 0x3000, 1), (0x4000, 0x5000, 1)]),
            "a record without a line"
        );
        // The gate's flags were never seen.
        let mut with_gate = vec![smaps[0].clone(), entry(0xff600000, 0xff601000, GATE, &[])];
        assert!(!k.fill(&mut with_gate, &[(0x1000, 0x3000, 1)]));
    }

    #[test]
    fn a_running_process_is_learned_only_when_its_bits_hold_still() {
        let k = source();
        // No mapping here (the source reads none) and no gate seen yet:
        // nothing known, and smaps of ourselves to learn from.
        let me = std::process::id() as i32;
        assert!(!k.knows(&[]));
        assert!(
            !k.learn_while_running(me),
            "our smaps has lines the empty source does not"
        );
        let smaps = memory::read_maps(me).expect("smaps");
        let raw: Vec<(u64, u64, u64)> = smaps
            .iter()
            .filter(|m| m.path != GATE)
            .map(|m| (m.start, m.end, 7))
            .collect();
        assert!(k.learn(&smaps, &raw));
        assert!(k.knows(&[(0, 1, 7)]));
        assert!(!k.knows(&[(0, 1, 8)]));
    }

    #[test]
    fn nothing_is_learned_from_disagreeing_reads() {
        let k = source();
        let smaps = [
            entry(0x1000, 0x3000, "", &["rd"]),
            entry(0x4000, 0x5000, "", &["wr"]),
        ];
        // The second record is another mapping than smaps's second line.
        k.learn(&smaps, &[(0x1000, 0x3000, 1), (0x6000, 0x7000, 2)]);
        assert!(lock(&k.learned).is_empty());
    }

    #[test]
    fn the_cache_file_round_trips_for_its_kernel_only() {
        let learned: HashMap<u64, Vec<String>> = [
            (0x100073, vec!["rd".to_string(), "wr".to_string()]),
            (
                0x875,
                vec!["rd".to_string(), "ex".to_string(), "mr".to_string()],
            ),
        ]
        .into();
        let gate = vec!["ex".to_string()];
        let text = format_cache("6.18.0 #1 SMP", &learned, Some(&gate));
        assert_eq!(
            parse_cache(&text, "6.18.0 #1 SMP"),
            Some((learned.clone(), Some(gate.clone())))
        );
        assert_eq!(parse_cache(&text, "6.18.0 #2 SMP"), None, "another build");
        let no_gate = format_cache("k", &learned, None);
        assert_eq!(parse_cache(&no_gate, "k"), Some((learned, None)));
        for bad in [
            "",
            "k\n875 rd",
            "kernel k\n875 rd ex\n875 rd",
            "kernel k\nzz rd",
            "kernel k\n875 RD",
            "kernel k\n875 rdx",
            "kernel k\n875  rd",
        ] {
            assert_eq!(parse_cache(bad, "k"), None, "{bad:?}");
        }
    }
}
