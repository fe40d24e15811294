//! `chpox restore --lazy`: the process runs at once, its memory is filled
//! on demand and in the background through userfaultfd.
//!
//! # How
//!
//! Private anonymous mappings (heap, stacks, `mmap`ed memory) are mapped
//! empty, not filled. The child then creates a userfaultfd itself (a
//! remote syscall: a userfaultfd serves the memory of the process that
//! made it), and we take a copy of it with `pidfd_getfd`, enable fork,
//! mremap, madvise and munmap events, register the mappings for missing
//! pages, and close the child's copy. From then on, a thread of the
//! restorer serves every page the restore itself touches (a thread's TID
//! in its TLS, say) while the rest of the process is rebuilt.
//!
//! When the process is ready, that thread stops and hands its state to a
//! page server: a process forked from the restorer (in a session of its
//! own, so a ^C meant for the job does not end it first) that outlives
//! `chpox restore --detach`. It serves faults
//! first: each fault copies the aligned 64 KiB around the faulting page
//! from the image (`UFFDIO_COPY` from a read-only mapping of the image
//! file; pages never stored get the zero page). Between faults, it copies
//! the rest in address order, half a MiB at a time, so a fault waits for
//! at most one such copy. A process whose pages are all in is let go (its
//! userfaultfd closed, which unregisters its memory), and the server ends
//! when every process is.
//!
//! A fork is reported before the child runs: its memory lacks what its
//! parent's lacked, so it gets its own copy of the parent's pending list
//! and its own userfaultfd. Memory the process discards (`MADV_DONTNEED`)
//! or unmaps is dropped from the list, so old content never comes back
//! over what the process expects to be zero, and `mremap` moves it. Copies
//! that race with such a change fail with EAGAIN until the event is read,
//! and are retried after it.
//!
//! Reading every page to verify it before the process may start is what
//! `--lazy` avoids: each page run is verified the first time any of it is
//! to be copied in (see [`crate::restore::lazy::checks`]), and a thread of the server
//! verifies the rest meanwhile. A bad run is never copied: the restored
//! processes (and the children they forked meanwhile) are killed, the
//! server waits until they are gone, and says which run was bad. During
//! the rebuild, a bad run fails the restore instead.
//!
//! An incremental image's inherited pages come from its parent the same
//! way (see [`parent`]).
//!
//! # Limits
//!
//! - Filled eagerly, as without `--lazy`: file-backed and shared memory,
//!   compressed page runs, hugetlb and `MADV_WIPEONFORK` mappings (the
//!   child of a fork must see those empty, which the server cannot tell
//!   from missing).
//! - If the page server is killed (SIGKILL) before the process is fully
//!   resident, the pages not yet in read as zeros. The server ignores
//!   SIGINT, SIGTERM, SIGHUP and SIGPIPE for that reason.
//! - A checkpoint taken before the process is fully resident would not see
//!   the pages still missing; wait for the server to end (`chpox restore
//!   --lazy` logs when every page is in, with `-v`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{debug, error, info};

pub mod checks;
pub mod hold;
pub mod parent;
mod pending;
mod server;

use pending::Pending;
use server::{poll, spawn_server};

use crate::error::{Error, Result};
use crate::image::model::{Compression, Vma, VmaKind};
use crate::memory::PAGE_SIZE;
use crate::restore::child::Child;
use crate::restore::lazy::checks::{BadRun, RunChecks};
use crate::restore::memory::fill::{ImageMap, Piece};
use crate::restore::memory::uffd::{self, Copied, Event};

/// Copied around a faulting page: neighbours are likely next.
const FAULT_WINDOW: u64 = 64 << 10;
/// Copied per step in the background: what a fault may wait behind.
const BACKGROUND_STEP: u64 = 512 << 10;

/// Whether `vma` may be filled on demand (see the module's limits).
pub fn eligible(vma: &Vma) -> bool {
    let flag = |f: &str| vma.vm_flags.iter().any(|x| x == f);
    vma.kind == VmaKind::Anonymous
        && !vma.shared
        // An incremental image's mapping may hold only inherited pages.
        && (!vma.pages.is_empty() || !vma.inherited.is_empty())
        && vma
            .pages
            .iter()
            .all(|r| r.data.compression == Compression::None)
        && !flag("wf")
        && !flag("ht")
}

/// The memory of one process as the server sees it.
struct Space {
    /// For messages and for killing; 0 when not known.
    pid: i32,
    uffd: OwnedFd,
    pending: Pending,
    /// Faults to serve again once the events before them are read.
    retry: Vec<u64>,
    /// The process is gone (or its memory is).
    dead: bool,
}

enum Msg {
    /// A process's memory, and its page runs (address, data).
    Add(Space, Vec<(u64, crate::image::model::DataRef)>),
    Stop,
}

/// The state handed from the build thread to the page server.
struct Server {
    image: Arc<ImageMap>,
    /// Every run served, verified as it is first served (or before, by
    /// the server's verifying thread).
    runs: Arc<RunChecks>,
    spaces: Vec<Space>,
    /// The restored processes and those they forked, as pidfds, to kill
    /// if a checksum is bad.
    victims: Arc<Mutex<Vec<OwnedFd>>>,
    bytes: u64,
}

struct Serving {
    tx: mpsc::Sender<Msg>,
    /// A pipe written to tell the thread a message waits.
    wake: OwnedFd,
    thread: std::thread::JoinHandle<Result<Server>>,
}

/// The lazy part of one restore.
pub struct Lazy {
    image_fd: RawFd,
    /// An incremental image's parent, served from offset `parent_base`
    /// of the server's mapping on (see `parent`).
    parent_fd: Option<RawFd>,
    parent_base: std::cell::Cell<u64>,
    serving: std::cell::RefCell<Option<Serving>>,
}

fn os(what: &str, e: std::io::Error) -> Error {
    Error::Other(format!("--lazy: {what}: {e}"))
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers; the result is checked and owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Lazy {
    /// For a restore reading pages from descriptor `image_fd`.
    pub fn new(image_fd: RawFd, parent_fd: Option<RawFd>) -> Lazy {
        Lazy {
            image_fd,
            parent_fd,
            parent_base: std::cell::Cell::new(0),
            serving: std::cell::RefCell::new(None),
        }
    }

    fn start(&self) -> Result<()> {
        if self.serving.borrow().is_some() {
            return Ok(());
        }
        // SAFETY: the image's descriptor stays open for the whole restore.
        let image = unsafe { BorrowedFd::borrow_raw(self.image_fd) };
        let mut runs = RunChecks::default();
        let map = match self.parent_fd {
            Some(fd) => {
                // SAFETY: the parent's descriptor stays open for the whole
                // restore (`ParentImage` holds it).
                let parent = unsafe { BorrowedFd::borrow_raw(fd) };
                let (map, base) = ImageMap::pair(image, parent)?;
                self.parent_base.set(base);
                runs.set_parent_base(base);
                map
            }
            None => {
                let len = nix::sys::stat::fstat(image)
                    .map_err(|e| os("image size", e.into()))?
                    .st_size as u64;
                ImageMap::new(image, 0, len)?
            }
        };
        let (thread_wake, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| os("pipe", e.into()))?;
        let (tx, rx) = mpsc::channel();
        let server = Server {
            image: Arc::new(map),
            runs: Arc::new(runs),
            spaces: Vec::new(),
            victims: Arc::new(Mutex::new(Vec::new())),
            bytes: 0,
        };
        let thread = std::thread::Builder::new()
            .name("chpox-lazy".into())
            .spawn(move || serve_build(server, rx, thread_wake))
            .map_err(|e| os("thread", e))?;
        *self.serving.borrow_mut() = Some(Serving { tx, wake, thread });
        Ok(())
    }

    fn send(&self, msg: Msg) -> Result<()> {
        let sent = {
            let serving = self.serving.borrow();
            let s = serving
                .as_ref()
                .ok_or_else(|| Error::Other("internal: lazy server not started".into()))?;
            s.tx.send(msg).is_ok() && nix::unistd::write(&s.wake, &[1u8]).is_ok()
        };
        if sent {
            return Ok(());
        }
        // The thread ended: by its error (a bad page run, say).
        let ended = self.serving.borrow_mut().take().map(|s| s.thread.join());
        match ended {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(Error::Other("--lazy: the page server thread ended".into())),
        }
    }

    /// Register `vmas` (mapped, empty) of the child for filling on demand;
    /// what they inherit from `parent` (an incremental image's, the
    /// process's PID in the image `image_pid`) comes from there.
    pub fn register(
        &self,
        c: &mut Child<'_>,
        vmas: &[&Vma],
        parent: Option<&crate::restore::memory::fill::ParentImage>,
        image_pid: i32,
    ) -> Result<()> {
        if vmas.is_empty() {
            return Ok(());
        }
        self.start()?;
        let pid = c.pid();
        let uffd = uffd::from_child(c)?.map_err(|e| {
            os(
                "userfaultfd in the restored process (restore without --lazy)",
                e,
            )
        })?;
        uffd::api(uffd.as_fd(), uffd::FEATURES)
            .map_err(|e| os("userfaultfd API (restore without --lazy)", e))?;
        let mut pending = Pending::default();
        let mut runs = Vec::new();
        for vma in vmas {
            uffd::register(uffd.as_fd(), vma.start, vma.end - vma.start)
                .map_err(|e| os(&format!("registering {:#x}-{:#x}", vma.start, vma.end), e))?;
            for run in &vma.pages {
                runs.push((run.addr, run.data));
                pending.insert(Piece {
                    addr: run.addr,
                    file_off: run.data.offset,
                    len: run.data.raw_len,
                });
            }
        }
        if let Some(parent) = parent {
            let (pieces, parent_runs) =
                parent::inherited(parent, image_pid, vmas, self.parent_base.get())?;
            for p in pieces {
                pending.insert(p);
            }
            runs.extend(parent_runs);
        }
        crate::restore::phases::mark("userfaultfd registered");
        debug!(
            pid,
            mappings = vmas.len(),
            bytes = pending.bytes(),
            "registered for lazy filling"
        );
        self.send(Msg::Add(
            Space {
                pid,
                uffd,
                pending,
                retry: Vec::new(),
                dead: false,
            },
            runs,
        ))
    }

    /// Stop serving from this process (a failed restore).
    pub fn abort(&self) {
        if let Some(s) = self.serving.borrow_mut().take() {
            let _ = s.tx.send(Msg::Stop);
            let _ = nix::unistd::write(&s.wake, &[1u8]);
            let _ = s.thread.join();
        }
    }

    /// The processes `pids` are rebuilt: hand their memory to a page server
    /// process that outlives us. Nothing to do if nothing was registered.
    /// The server fills memory in the background once the hold returned is
    /// dropped (see [`hold`]).
    pub fn finish(&self, pids: &[i32]) -> Result<Option<hold::ServerHold>> {
        let Some(s) = self.serving.borrow_mut().take() else {
            return Ok(None);
        };
        let _ = s.tx.send(Msg::Stop);
        nix::unistd::write(&s.wake, &[1u8]).map_err(|e| os("eventfd", e.into()))?;
        let server = s
            .thread
            .join()
            .map_err(|_| Error::Other("--lazy: the page server thread panicked".into()))??;
        crate::restore::phases::mark("build-time server stopped");
        {
            let mut victims = server.victims.lock().unwrap_or_else(|p| p.into_inner());
            for &pid in pids {
                victims.push(pidfd_open(pid).map_err(|e| os("pidfd_open", e))?);
            }
        }
        spawn_server(server, self.image_fd).map(Some)
    }
}

/// Serve faults while the restore runs in the other thread, until told to
/// stop; no background copying (the restore should reach running first).
fn serve_build(mut server: Server, rx: mpsc::Receiver<Msg>, wake: OwnedFd) -> Result<Server> {
    loop {
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.extend(server.spaces.iter().map(|s| libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        poll(&mut fds, -1)?;
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(&wake, &mut buf), Ok(n) if n > 0) {}
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Msg::Add(space, runs) => {
                        server.bytes += space.pending.bytes();
                        server.spaces.push(space);
                        // Only this thread holds the table until the
                        // server's verifying thread starts.
                        Arc::get_mut(&mut server.runs)
                            .ok_or_else(|| {
                                Error::Other("internal: page runs added while shared".into())
                            })?
                            .add(runs);
                    }
                    Msg::Stop => return Ok(server),
                }
            }
        }
        server.handle_events()?;
    }
}
