//! Process trees: finding a process's descendants, freezing every one of
//! them before any state is read, the zombies among them, and which open
//! file descriptions they share.
//!
//! Freezing follows CRIU: stop the root, then its children, then theirs,
//! and read the frozen members' children again until nobody new comes. A stopped process cannot
//! fork, so a child forked while the freeze was under way is found by the
//! next scan; a process that exits meanwhile is simply not in the image
//! (or is, as a zombie, if its parent has not reaped it).

use std::collections::{HashMap, HashSet};

use tracing::debug;

use crate::error::{Error, Result};
use crate::image::model::Zombie;
use crate::ptrace::Frozen;

/// What /proc says of one process, for the tree.
#[derive(Debug, Clone, Copy)]
struct ProcEntry {
    pid: i32,
    ppid: i32,
    state: char,
    pgid: i32,
    sid: i32,
    exit_code: i32,
}

/// Every process on the machine (a snapshot; processes come and go).
/// Read by hand, one `stat` file each (for callers outside a freeze; a
/// freeze reads its members' `children` files instead).
fn scan_all() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        entry_of(pid)
    })
    .collect()
}

/// The processes `pids` that still exist.
fn entries_of(pids: &[i32]) -> Vec<ProcEntry> {
    pids.iter().filter_map(|&pid| entry_of(pid)).collect()
}

fn entry_of(pid: i32) -> Option<ProcEntry> {
    let stat = crate::error::read_proc(&format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &stat)
}

/// `/proc/PID/stat`: the fields after the command name (which may hold
/// spaces and parentheses, hence the last ')') start with the third.
fn parse_stat(pid: i32, text: &str) -> Option<ProcEntry> {
    let mut fields = text[text.rfind(')')? + 1..].split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    // Field 52, the exit status (since Linux 3.5).
    let exit_code = fields.nth(45).and_then(|f| f.parse().ok()).unwrap_or(0);
    Some(ProcEntry {
        pid,
        ppid,
        state,
        pgid,
        sid,
        exit_code,
    })
}

/// Where to look first for the descendants of a root: a function giving
/// the PIDs that may belong to its tree (the agent's eBPF-kept members).
#[derive(Clone)]
pub struct MemberHint(pub std::sync::Arc<dyn Fn(i32) -> Vec<i32> + Send + Sync>);

impl std::fmt::Debug for MemberHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberHint")
    }
}

/// `pid` and every live descendant, for an estimate made before freezing.
pub fn descendants_now(pid: i32) -> Vec<i32> {
    let table = scan_all();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            table
                .iter()
                .filter(|e| e.ppid == parent && e.state != 'Z')
                .map(|e| e.pid),
        );
        i += 1;
    }
    out
}

/// `pid` and its descendants as their threads' `children` files list them:
/// only the tree is read, not every process of the machine (a scan of
/// /proc takes milliseconds on a busy host). A child forked or reparented
/// meanwhile may be missed (the kernel documents these files as a
/// snapshot, not a promise), so this is for estimates made before a
/// freeze, which scans again; zombies may be included.
pub fn descendants_estimate(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", out[i])) else {
            i += 1;
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                for child in text
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok())
                {
                    if !out.contains(&child) {
                        out.push(child);
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// A tree of processes, every thread of every live one held in a ptrace
/// stop by the calling thread.
pub struct FrozenTree {
    /// The root first, then every descendant, parents before children.
    members: Vec<Frozen>,
    pub zombies: Vec<Zombie>,
    /// Children of the root a single-process freeze left out.
    pub children_left_out: Vec<i32>,
    /// Descendants found through the hint, and by the scan after it (the
    /// ones the hint missed, or all of them without a hint).
    pub from_hint: usize,
    pub from_scan: usize,
}

impl FrozenTree {
    /// Freeze `root` and, with `children`, all its descendants.
    pub fn freeze(root: i32, children: bool) -> Result<FrozenTree> {
        Self::freeze_hinted(root, children, None, &|_| {})
    }

    /// [`FrozenTree::freeze`], finding the descendants first among the
    /// processes `hint` names (the agent's eBPF-kept list of the tree's
    /// members), whose /proc entries alone are read: no scan of every
    /// process between the stops. Each is taken only if its parent is a
    /// frozen member, as with a scan. Then a scan of /proc, made once every
    /// member the hint led to is stopped, confirms the tree (and finds its
    /// zombies, and anything the hint missed, which is then frozen too).
    /// `on_frozen` is told each member's PID as soon as it is frozen, in
    /// the order of [`members`](Self::members).
    pub fn freeze_hinted(
        root: i32,
        children: bool,
        hint: Option<&MemberHint>,
        on_frozen: &dyn Fn(i32),
    ) -> Result<FrozenTree> {
        let root_frozen = Frozen::freeze(root)?;
        on_frozen(root);
        let mut tree = FrozenTree {
            members: vec![root_frozen],
            zombies: Vec::new(),
            children_left_out: Vec::new(),
            from_hint: 0,
            from_scan: 0,
        };
        if !children {
            let mut left_out: Vec<i32> = tree
                .children_not_in(&HashSet::from([root]))
                .iter()
                .map(|e| e.pid)
                .collect();
            left_out.sort_unstable();
            tree.children_left_out = left_out;
            return Ok(tree);
        }
        // PIDs already frozen, recorded as zombies, or seen to vanish.
        let mut known: HashSet<i32> = HashSet::from([root]);
        if let Some(hint) = hint {
            // A member can fork until it is stopped; its children are in
            // the hint before the fork returns, so ask again until nothing
            // new comes. Only the PIDs not known yet are read (a /proc
            // read each, while the tree is partly frozen).
            loop {
                let unknown: Vec<i32> = (hint.0)(root)
                    .into_iter()
                    .filter(|pid| !known.contains(pid))
                    .collect();
                if unknown.is_empty() || !tree.grow(&mut known, &entries_of(&unknown), on_frozen)? {
                    break;
                }
            }
        }
        tree.from_hint = tree.members.len() - 1;
        loop {
            let children = tree.children_not_in(&known);
            if !tree.grow(&mut known, &children, on_frozen)? {
                break;
            }
        }
        tree.from_scan = tree.members.len() - 1 - tree.from_hint;
        debug!(
            root,
            processes = tree.members.len(),
            zombies = tree.zombies.len(),
            from_hint = tree.from_hint,
            from_scan = tree.from_scan,
            "tree frozen"
        );
        Ok(tree)
    }

    /// Freeze (or record as zombies) the children, in `table`, of frozen
    /// members that are not `known` yet, parents before children. Whether
    /// any were new.
    fn grow(
        &mut self,
        known: &mut HashSet<i32>,
        table: &[ProcEntry],
        on_frozen: &dyn Fn(i32),
    ) -> Result<bool> {
        let mut by_parent: HashMap<i32, Vec<&ProcEntry>> = HashMap::new();
        for e in table {
            by_parent.entry(e.ppid).or_default().push(e);
        }
        // Parents first: walk down from the frozen members in order.
        let frozen_pids: Vec<i32> = self.members.iter().map(Frozen::pid).collect();
        let mut new: Vec<ProcEntry> = Vec::new();
        for parent in frozen_pids {
            for e in by_parent.get(&parent).into_iter().flatten() {
                if !known.contains(&e.pid) {
                    new.push(**e);
                }
            }
        }
        if new.is_empty() {
            return Ok(false);
        }
        // Every new child is asked to stop before any is waited for: their
        // stops overlap instead of following one another.
        let mut freezing = Vec::with_capacity(new.len());
        for e in new {
            known.insert(e.pid);
            if e.state == 'Z' {
                self.zombies.push(Zombie {
                    pid: e.pid,
                    ppid: e.ppid,
                    pgid: e.pgid,
                    sid: e.sid,
                    status: e.exit_code,
                });
                continue;
            }
            if let Some(f) = gone_or(Frozen::begin_freeze(e.pid), e.pid, known)? {
                freezing.push(f);
            }
        }
        for f in freezing {
            let pid = f.pid();
            if let Some(f) = gone_or(f.finish(), pid, known)? {
                self.members.push(f);
                on_frozen(pid);
            }
        }
        Ok(true)
    }

    /// The children of every frozen member that are not `known`, from
    /// their threads' `children` files: only the tree is read, not every
    /// process of the machine (a scan of /proc took 0.7–0.9 ms of every
    /// dump's frozen time here, more on a busy host). The kernel promises
    /// these lists only for stopped tasks, which is what the members are:
    /// a stopped member cannot fork, and its children stay listed until it
    /// reaps them (zombies included). A child forked by a member before
    /// its stop and not frozen yet is listed too; its own children are
    /// read once it is frozen, by the next round of `grow`.
    fn children_not_in(&self, known: &HashSet<i32>) -> Vec<ProcEntry> {
        let mut out = Vec::new();
        for member in &self.members {
            for tid in member.tids() {
                let path = format!("/proc/{}/task/{tid}/children", member.pid());
                let Ok(text) = crate::error::read_proc(&path) else {
                    continue;
                };
                for child in text.split_ascii_whitespace() {
                    let Ok(child) = child.parse::<i32>() else {
                        continue;
                    };
                    if known.contains(&child) || out.iter().any(|e: &ProcEntry| e.pid == child) {
                        continue;
                    }
                    out.extend(entry_of(child));
                }
            }
        }
        out
    }

    pub fn root(&self) -> i32 {
        self.members[0].pid()
    }

    pub fn members(&self) -> &[Frozen] {
        &self.members
    }

    /// CLOCK_MONOTONIC (ns) when the last thread of the tree stopped. The
    /// scan that then finds nobody new to freeze proves the tree was whole
    /// at that moment (a stopped process cannot fork), so it is not part
    /// of the time it took to freeze.
    pub fn stopped_at_ns(&self) -> u64 {
        self.members
            .iter()
            .map(Frozen::stopped_at_ns)
            .max()
            .unwrap_or(0)
    }

    /// Let every process run on. Children go first and the root last: each
    /// `Frozen` blocks terminal signals in this thread while it lives and
    /// unblocks them as it goes, so they must go in the reverse of the
    /// order they came.
    pub fn resume(mut self) {
        while let Some(f) = self.members.pop() {
            f.resume();
        }
    }

    /// Leave every process in a job-control stop.
    pub fn leave_stopped(mut self) {
        while let Some(f) = self.members.pop() {
            f.leave_stopped();
        }
    }

    /// Kill every process of the tree. Returns the descendants' PIDs, for
    /// [`wait_until_gone`].
    pub fn kill(mut self) -> Vec<i32> {
        let pids: Vec<i32> = self.members.iter().skip(1).map(Frozen::pid).collect();
        while let Some(f) = self.members.pop() {
            f.kill();
        }
        pids
    }

    /// Send SIGKILL to every process of the tree without waiting for any
    /// to go: the descendants' PIDs (for [`wait_until_gone`]), and every
    /// thread to collect with `ptrace::collect_killed` (each process's
    /// leader after its other threads).
    pub fn kill_nowait(mut self) -> (Vec<i32>, Vec<i32>) {
        let pids: Vec<i32> = self.members.iter().skip(1).map(Frozen::pid).collect();
        let mut threads = Vec::new();
        while let Some(f) = self.members.pop() {
            threads.extend(f.kill_nowait());
        }
        (pids, threads)
    }
}

/// Wait (a few seconds at most) until `pids` are free again: killed
/// orphans are reaped by init a moment later, and a restore right after
/// must find their PIDs free.
pub fn wait_until_gone(pids: &[i32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Drop for FrozenTree {
    fn drop(&mut self) {
        while let Some(f) = self.members.pop() {
            drop(f);
        }
    }
}

/// For a checkpoint taken for a user (an agent registration of theirs):
/// every process of the tree must be one the kernel would let that user
/// trace — all its uids and gids the user's, no capabilities, dumpable —
/// or its memory would land in a file the user owns. Checked while
/// frozen, so a process cannot change credentials between check and dump.
pub fn check_owned_by(tree: &FrozenTree, user: &crate::creds::UserCreds) -> Result<()> {
    tree.members
        .iter()
        .try_for_each(|f| crate::creds::may_checkpoint(f.pid(), user))
}

const KCMP_FILE: libc::c_long = 0;
const KCMP_VM: libc::c_long = 1;
const KCMP_FILES: libc::c_long = 2;
const KCMP_FS: libc::c_long = 3;

/// `kcmp`: whether the kernel objects of kind `what` (index `a` of `pa`,
/// `b` of `pb` for descriptors) are one.
fn kcmp_same(pa: i32, pb: i32, what: libc::c_long, a: i32, b: i32) -> bool {
    kcmp(pa, pb, what, a, b) == Some(KcmpOrder::Same)
}

/// Whether fd `a` of `pa` and fd `b` of `pb` are one open file description.
fn same_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    kcmp_same(pa, pb, KCMP_FILE, a, b)
}

/// Processes that share their memory or descriptor table (`clone` with
/// CLONE_VM or CLONE_FILES, but not as threads) cannot be brought back
/// sharing them yet: refused by name rather than restored as copies that
/// no longer see each other's changes. A filesystem context (working
/// directory, root, umask) shared with the parent (CLONE_FS) comes back
/// shared: returns the PIDs that share it so.
pub fn check_unshared(tree: &FrozenTree) -> Result<Vec<i32>> {
    let pids: Vec<i32> = tree.members.iter().map(Frozen::pid).collect();
    let parent_of = |pid: i32| {
        procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .map(|s| s.ppid)
            .ok()
    };
    let mut shared = Vec::new();
    let mut fs_with_parent = Vec::new();
    for (what, name) in [
        (KCMP_VM, "memory (CLONE_VM)"),
        (KCMP_FILES, "descriptor table (CLONE_FILES)"),
        (KCMP_FS, "working directory and umask (CLONE_FS)"),
    ] {
        for group in sharing(&pids, what) {
            for (i, &a) in group.iter().enumerate() {
                for &b in &group[i + 1..] {
                    if what == KCMP_FS && parent_of(b) == Some(a) {
                        fs_with_parent.push(b);
                    } else if what == KCMP_FS && fs_with_parent.contains(&b) {
                        // Shared with its parent, which shares it with `a`.
                    } else {
                        shared.push(format!("PID {a} and PID {b} share their {name}"));
                    }
                }
            }
        }
    }
    if shared.is_empty() {
        Ok(fs_with_parent)
    } else {
        Err(Error::Other(format!(
            "{}; chpox cannot restore processes that share these yet (checkpoint the process alone with --no-children)",
            shared.join(", ")
        )))
    }
}

/// The groups of two or more of `pids` that share their kernel object of
/// kind `what`, each in the order of `pids`. The kernel orders these
/// objects (`kcmp` answers less or greater, not only equal): each PID
/// finds its group by a binary search among those seen, ~n log n calls
/// rather than one per pair (84 calls for a tree of 8, all while frozen;
/// 6 048 for a tree of 64).
fn sharing(pids: &[i32], what: libc::c_long) -> Vec<Vec<i32>> {
    // Groups sorted by the kernel's order of their object.
    let mut sorted: Vec<Vec<i32>> = Vec::new();
    for &pid in pids {
        let (mut low, mut high) = (0, sorted.len());
        let mut place = None;
        while low < high {
            let mid = (low + high) / 2;
            match kcmp(sorted[mid][0], pid, what, 0, 0) {
                Some(KcmpOrder::Same) => {
                    place = Some(Ok(mid));
                    break;
                }
                Some(KcmpOrder::Less) => low = mid + 1,
                Some(KcmpOrder::Greater) => high = mid,
                // No order (a process gone): asked of every group.
                None => {
                    place = Some(
                        sorted
                            .iter()
                            .position(|g| kcmp_same(g[0], pid, what, 0, 0))
                            .ok_or(sorted.len()),
                    );
                    break;
                }
            }
        }
        match place.unwrap_or(Err(low)) {
            Ok(group) => sorted[group].push(pid),
            Err(at) => sorted.insert(at, vec![pid]),
        }
    }
    sorted.retain(|g| g.len() > 1);
    sorted
}

/// How `kcmp` orders two kernel objects.
#[derive(Debug, PartialEq, Eq)]
enum KcmpOrder {
    Same,
    Less,
    Greater,
}

/// `kcmp` of the objects of kind `what` (index `a` of `pa`, `b` of `pb`
/// for descriptors); None where the kernel gives no order (an error, or
/// unequal without one).
fn kcmp(pa: i32, pb: i32, what: libc::c_long, a: i32, b: i32) -> Option<KcmpOrder> {
    // SAFETY: kcmp takes integers only and touches no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pa as libc::c_long,
            pb as libc::c_long,
            what,
            a as libc::c_long,
            b as libc::c_long,
        )
    };
    match ret {
        0 => Some(KcmpOrder::Same),
        1 => Some(KcmpOrder::Less),
        2 => Some(KcmpOrder::Greater),
        _ => None,
    }
}

/// Give every descriptor of the tree the id of its open file description:
/// descriptors that share one (`dup`, inherited through `fork`) get the
/// same id, so restore makes one description for all of them (one offset,
/// one set of status flags). Candidates are the descriptors of the same
/// file (the `FileId` the scan found); the kernel says which of them are
/// one description. `fds` are those of the processes `pids`, in order.
pub fn link_descriptions(
    pids: &[i32],
    fds: &mut [Vec<(crate::image::model::FdEntry, Option<crate::fds::FileId>)>],
) {
    /// A descriptor that stands for its description: (PID, fd, id).
    type Seen = (i32, i32, u64);
    // (dev, ino) -> each description of that file seen so far
    let mut seen: HashMap<crate::fds::FileId, Vec<Seen>> = HashMap::new();
    let mut next_id = 1u64;
    for (&pid, entries) in pids.iter().zip(fds.iter_mut()) {
        for (e, file) in entries.iter_mut() {
            let id = file.and_then(|file| {
                let same_file = seen.entry(file).or_default();
                let found = same_file
                    .iter()
                    .find(|&&(op, ofd, _)| same_description(pid, e.fd, op, ofd))
                    .map(|&(_, _, id)| id);
                found.or_else(|| {
                    same_file.push((pid, e.fd, next_id));
                    None
                })
            });
            e.description = id.unwrap_or_else(|| {
                next_id += 1;
                next_id - 1
            });
        }
    }
}

/// A child's freeze `result`, its exit (since the scan) set apart: a child
/// still there (a zombie now) is forgotten, so that the next scan records
/// it; one reaped is gone. Other errors fail the freeze.
fn gone_or<T>(result: Result<T>, pid: i32, known: &mut HashSet<i32>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Error::Exited(_) | Error::NoSuchProcess(_)) => {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                known.remove(&pid);
            }
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's process and one of its threads share their memory and
    /// descriptor table; a child shares neither; a PID that is no process
    /// (no order from the kernel) is grouped with none and hides nothing.
    #[test]
    fn sharing_groups_the_pids_whose_kernel_object_is_one() {
        let me = std::process::id() as i32;
        let parked = crate::testing::ParkedThread::start();
        let tid = parked.tid;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let other = child.id() as i32;
        let gone = i32::MAX;
        for what in [KCMP_VM, KCMP_FILES] {
            assert_eq!(sharing(&[me, other, tid], what), vec![vec![me, tid]]);
            assert_eq!(sharing(&[other, tid, me], what), vec![vec![tid, me]]);
            assert_eq!(sharing(&[me, gone, other, tid], what), vec![vec![me, tid]]);
            assert_eq!(sharing(&[other, me], what), Vec::<Vec<i32>>::new());
        }
        // Among many that share nothing, the pair is still found wherever
        // the kernel's order puts them.
        let mut children: Vec<std::process::Child> = (0..5)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("start sleep")
            })
            .collect();
        let mut many: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
        many.insert(1, me);
        many.push(tid);
        for what in [KCMP_VM, KCMP_FILES] {
            assert_eq!(sharing(&many, what), vec![vec![me, tid]]);
        }
        for c in children.iter_mut().chain(std::iter::once(&mut child)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(parked);
    }

    #[test]
    fn stat_fields_after_a_command_name_with_parentheses_and_spaces() {
        let line = "4242 (a) b (c) Z 17 4242 99 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 \
                    123 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
                    0 0 0 0 0 0 0 9\n";
        let e = parse_stat(4242, line).expect("parsed");
        assert_eq!(
            (e.pid, e.state, e.ppid, e.pgid, e.sid, e.exit_code),
            (4242, 'Z', 17, 4242, 99, 9)
        );
        let own = std::fs::read_to_string("/proc/self/stat").expect("own stat");
        let me = parse_stat(std::process::id() as i32, &own).expect("own parsed");
        assert_eq!(me.ppid, std::os::unix::process::parent_id() as i32);
        assert_eq!(me.exit_code, 0);
    }
}
