//! The /proc files a dump reads of each process while it is frozen,
//! opened before the freeze and read again from their start (`pread`)
//! while frozen.
//!
//! Opening and closing a file are two system calls, 2–3 us each on a VM
//! like ours, and a tree of 8 read ~60 such files while frozen (its
//! stat three times over); read through these, each is one call.
//!
//! Each process's task directory is held too: a freeze lists its threads
//! twice, and a directory held is listed in three calls instead of five.
//!
//! A /proc/PID file stays bound to the process it was opened for: once
//! that process is gone, reading it fails (ESRCH), never giving the file
//! of a process that took the PID since. What fails here is read again
//! by path, as if it had never been held.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

/// The files held, by path, with how many [`Held`] hold each: the agent
/// may dump two processes at once, and a path held twice stays until
/// both let go.
type ByPath = HashMap<String, (Arc<File>, usize)>;

static HELD: LazyLock<Mutex<ByPath>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The directories held, as [`HELD`] holds files.
type DirsByPath = HashMap<String, (Arc<Mutex<nix::dir::Dir>>, usize)>;

static DIRS: LazyLock<Mutex<DirsByPath>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// What is read of each process while frozen, by /proc/PID/NAME. Only
/// files that find the process's memory when read: maps and auxv take
/// the memory the process has when they are opened, so once it calls
/// `execve` a held maps would read as empty and a held auxv as the old
/// program's, and both are read by path.
const NAMES: [&str; 4] = ["stat", "status", "cmdline", "timers"];

/// Bytes asked for per read.
const READ_STEP: usize = 4096;

/// The most files and directories one [`Held`] holds: descriptors of
/// ours, under a soft limit that may be 1024 (a tree of hundreds, or a
/// process with thousands of descriptors, has the rest read by path).
const MAX_HELD: usize = 512;

fn held() -> MutexGuard<'static, ByPath> {
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

fn dirs() -> MutexGuard<'static, DirsByPath> {
    DIRS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The /proc files of some processes, held open until dropped.
#[must_use = "the files are let go when this is dropped"]
pub struct Held {
    paths: Vec<String>,
    dirs: Vec<String>,
}

impl Held {
    /// Open the files of `pids` that can be opened (a process gone, or a
    /// file it lacks, is simply not held).
    pub fn open(pids: &[i32]) -> Held {
        let mut held = Held {
            paths: Vec::with_capacity(pids.len() * NAMES.len()),
            dirs: Vec::with_capacity(pids.len()),
        };
        for pid in pids {
            held.hold_dir(format!("/proc/{pid}/task"));
            // Its main thread's children too, which a tree's freeze reads
            // to find them.
            let children = format!("task/{pid}/children");
            for name in NAMES.iter().copied().chain([children.as_str()]) {
                held.hold(format!("/proc/{pid}/{name}"));
            }
        }
        // The fdinfo of each descriptor open now. Read while frozen, it
        // tells what that descriptor is then (the kernel looks it up at
        // each read), in one call where opening it by path took three.
        for pid in pids {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for fd in fds.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
                if held.full() {
                    return held;
                }
                held.hold(format!("/proc/{pid}/fdinfo/{fd}"));
            }
        }
        held
    }

    /// As many held as [`MAX_HELD`] allows.
    fn full(&self) -> bool {
        self.paths.len() + self.dirs.len() >= MAX_HELD
    }

    fn hold_dir(&mut self, path: String) {
        use nix::{fcntl::OFlag, sys::stat::Mode};
        if self.full() {
            return;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if let Ok(dir) = nix::dir::Dir::open(path.as_str(), flags, Mode::empty()) {
            add_holder(&mut dirs(), &path, Mutex::new(dir));
            self.dirs.push(path);
        }
    }

    fn hold(&mut self, path: String) {
        if self.full() {
            return;
        }
        if let Ok(file) = File::open(&path) {
            add_holder(&mut held(), &path, file);
            self.paths.push(path);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let_go(&mut held(), &self.paths);
        let_go(&mut dirs(), &self.dirs);
    }
}

/// One holder more for `path`: the first one keeps `opened`, a later one
/// the copy opened before (and `opened` is closed).
fn add_holder<T>(held: &mut HashMap<String, (Arc<T>, usize)>, path: &str, opened: T) {
    held.entry(path.to_string())
        .and_modify(|(_, holders)| *holders += 1)
        .or_insert((Arc::new(opened), 1));
}

/// One holder fewer for each of `paths`; the last one closes it.
fn let_go<T>(held: &mut HashMap<String, (T, usize)>, paths: &[String]) {
    for path in paths {
        if let Some((_, holders)) = held.get_mut(path) {
            *holders -= 1;
            if *holders == 0 {
                held.remove(path);
            }
        }
    }
}

/// The names in the directory at `path`, if held, as they are now (but
/// `.` and `..`): None when it is not held or could not be read (the
/// caller lists it by path).
pub(crate) fn list(path: &str) -> Option<Vec<String>> {
    let dir = dirs().get(path).map(|(dir, _)| Arc::clone(dir))?;
    let mut dir = dir.lock().unwrap_or_else(PoisonError::into_inner);
    // Each listing starts over (the iterator rewinds the directory when
    // dropped), and a /proc directory is read anew.
    dir.iter()
        .filter_map(|entry| match entry {
            Ok(e) => match e.file_name().to_bytes() {
                b"." | b".." => None,
                name => Some(Ok(String::from_utf8_lossy(name).into_owned())),
            },
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

/// Read the file at `path`, if held, whole into `buf` (replacing what it
/// held): None when it is not held or the read failed (the caller reads
/// it by path).
pub(crate) fn read(path: &str, buf: &mut Vec<u8>) -> Option<()> {
    let file = held().get(path).map(|(file, _)| Arc::clone(file))?;
    buf.clear();
    let mut offset = 0u64;
    loop {
        if buf.capacity() - buf.len() < READ_STEP {
            buf.reserve(buf.capacity().max(READ_STEP));
        }
        let filled = buf.len();
        // A page at a time, which is what a seq_file gives per read
        // anyway: zeroing all the room there is first touched pages a
        // small file never needed.
        buf.resize(filled + READ_STEP, 0);
        // From offset 0 a /proc file is made anew (seq_file starts over):
        // what it says now, not when it was opened.
        match file.read_at(&mut buf[filled..], offset) {
            Ok(0) => {
                buf.truncate(filled);
                return Some(());
            }
            Ok(n) => {
                buf.truncate(filled + n);
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(filled),
            Err(_) => {
                buf.clear();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests hold their own process's files, in one registry: one at a
    /// time, or one would find held what another let go.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn alone() -> MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn a_held_file_reads_as_it_is_now_and_goes_when_let_go() {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
        let _alone = alone();
        // This thread's own status (its blocked signals are its own).
        let tid = nix::unistd::gettid().as_raw();
        let path = format!("/proc/{tid}/status");
        let mut buf = Vec::new();
        assert!(read(&path, &mut buf).is_none());
        let held = Held::open(&[tid]);
        let twice = Held::open(&[tid]);
        let blocked = |buf: &[u8]| {
            String::from_utf8_lossy(buf)
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:").map(|v| v.trim().to_string()))
        };
        assert!(read(&path, &mut buf).is_some());
        let before = blocked(&buf);
        // A signal blocked after the file was opened is in what it reads.
        let mut usr2 = SigSet::empty();
        usr2.add(Signal::SIGUSR2);
        let was_blocked = SigSet::thread_get_mask().is_ok_and(|m| m.contains(Signal::SIGUSR2));
        assert!(pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&usr2), None).is_ok());
        assert!(read(&path, &mut buf).is_some());
        let after = blocked(&buf);
        if !was_blocked {
            assert!(pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&usr2), None).is_ok());
            assert_ne!(before, after);
        }
        // Into a buffer too small for it, which grows.
        let mut small = Vec::with_capacity(16);
        assert!(read(&path, &mut small).is_some());
        assert!(String::from_utf8_lossy(&small).contains("VmRSS:"));
        drop(held);
        assert!(read(&path, &mut buf).is_some(), "still held once");
        drop(twice);
        assert!(read(&path, &mut buf).is_none());
    }

    /// A held fdinfo says what its descriptor is when read, not when it
    /// was opened.
    #[test]
    fn a_held_fdinfo_follows_its_descriptor() {
        let _alone = alone();
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        let first = tempfile::tempfile().expect("temp file");
        let second = tempfile::tempfile().expect("temp file");
        let fd = first.as_raw_fd();
        let held = Held::open(&[me]);
        let path = format!("/proc/{me}/fdinfo/{fd}");
        let ino_read = |buf: &[u8]| {
            String::from_utf8_lossy(buf)
                .lines()
                .find_map(|l| l.strip_prefix("ino:").map(|v| v.trim().to_string()))
        };
        let mut buf = Vec::new();
        assert!(read(&path, &mut buf).is_some());
        let ino = |f: &File| f.metadata().expect("stat").ino().to_string();
        assert_eq!(ino_read(&buf), Some(ino(&first)));
        // SAFETY: dup2 onto a descriptor we own (`first`'s), which then
        // refers to `second`'s file until `first` closes it.
        assert!(unsafe { libc::dup2(second.as_raw_fd(), fd) } >= 0);
        assert!(read(&path, &mut buf).is_some());
        assert_eq!(ino_read(&buf), Some(ino(&second)));
        drop(held);
    }

    #[test]
    fn a_held_task_directory_lists_the_threads_there_are_now() {
        let _alone = alone();
        let me = std::process::id() as i32;
        let path = format!("/proc/{me}/task");
        let held = Held::open(&[me]);
        let tids = |names: Vec<String>| -> Vec<i32> {
            let mut t: Vec<i32> = names.iter().filter_map(|n| n.parse().ok()).collect();
            t.sort_unstable();
            t
        };
        let before = tids(list(&path).expect("held"));
        assert!(before.contains(&me), "{before:?}");
        let parked = crate::testing::ParkedThread::start();
        let tid = parked.tid;
        let during = tids(list(&path).expect("held"));
        assert!(during.contains(&tid), "{during:?}");
        drop(parked);
        // A thread gone is no longer listed: once its exit is over, which
        // may be just after the join returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tids(list(&path).expect("held")).contains(&tid) {
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} still listed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(held);
        assert!(list(&path).is_none());
    }

    /// A process that runs another program after its files were held
    /// reads as the new program, never as its old memory.
    #[test]
    fn a_process_that_execs_is_read_as_its_new_program() {
        let _alone = alone();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line; exec sleep 60"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id() as i32;
        let held = Held::open(&[pid]);
        let exe_of = || std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        let sh = exe_of();
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while exe_of() == sh {
            assert!(std::time::Instant::now() < deadline, "sh never ran sleep");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let sleep = exe_of().to_string_lossy().into_owned();
        let maps = crate::error::read_proc(&format!("/proc/{pid}/maps")).expect("maps");
        assert!(maps.contains(&sleep), "{maps}");
        let auxv = crate::error::read_proc_bytes(&format!("/proc/{pid}/auxv")).expect("auxv");
        assert!(!auxv.is_empty());
        let stat = crate::error::read_proc(&format!("/proc/{pid}/stat")).expect("stat");
        assert!(stat.contains("(sleep)"), "{stat}");
        let cmdline = crate::error::read_proc_bytes(&format!("/proc/{pid}/cmdline")).expect("cmd");
        assert!(cmdline.starts_with(b"sleep\0"), "{cmdline:?}");
        let _ = child.kill();
        let _ = child.wait();
        drop(held);
    }

    #[test]
    fn a_process_gone_is_not_read_through_its_held_file() {
        let _alone = alone();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let held = Held::open(&[pid]);
        let path = format!("/proc/{pid}/stat");
        let mut buf = Vec::new();
        assert!(read(&path, &mut buf).is_some());
        let _ = child.kill();
        let _ = child.wait();
        assert!(read(&path, &mut buf).is_none());
        drop(held);
    }
}
