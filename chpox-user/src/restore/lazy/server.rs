//! The page server's own half: the process that holds the userfaultfds,
//! serves faults first and fills the rest in the background, and ends
//! once every page is in (or kills the restored processes if a page run
//! fails its check).

use super::*;

pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<()> {
    // SAFETY: `fds` is a valid array of pollfd of the length given.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(os("poll", e));
        }
    }
    Ok(())
}

impl Server {
    /// Read and act on every event waiting, then serve the faults that had
    /// to wait for them.
    pub(super) fn handle_events(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.spaces.len() {
            if !self.spaces[i].dead {
                loop {
                    let events = match uffd::read_events(self.spaces[i].uffd.as_fd(), 64) {
                        Ok(ev) => ev,
                        Err(e) => {
                            debug!(pid = self.spaces[i].pid, error = %e, "userfaultfd read failed");
                            self.spaces[i].dead = true;
                            break;
                        }
                    };
                    if events.is_empty() {
                        break;
                    }
                    for ev in events {
                        self.event(i, ev)?;
                    }
                }
                let retry = std::mem::take(&mut self.spaces[i].retry);
                for addr in retry {
                    self.fault(i, addr)?;
                }
            }
            i += 1;
        }
        Ok(())
    }

    fn event(&mut self, i: usize, ev: Event) -> Result<()> {
        match ev {
            Event::Fault(addr) => self.fault(i, addr)?,
            Event::Fork(fd) => {
                // SAFETY: the kernel installed this descriptor for us with
                // the message.
                let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
                let parent = self.spaces[i].pid;
                let pid = new_child(parent, &self.spaces);
                if let Ok(pidfd) = pidfd_open(pid) {
                    self.victims
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(pidfd);
                }
                debug!(parent, pid, "lazily restored process forked");
                let pending = self.spaces[i].pending.clone();
                self.spaces.push(Space {
                    pid,
                    uffd,
                    pending,
                    retry: Vec::new(),
                    dead: false,
                });
            }
            Event::Remap { from, to, len } => self.spaces[i].pending.remap(from, to, len),
            Event::Gone { start, end } => {
                self.spaces[i].pending.take(start, end);
            }
            Event::Other(code) => debug!(code, "unknown userfaultfd event ignored"),
        }
        Ok(())
    }

    /// Serve a fault at `addr`: the window around it from the image, or
    /// the zero page where nothing was stored.
    fn fault(&mut self, i: usize, addr: u64) -> Result<()> {
        let page = addr & !(PAGE_SIZE - 1);
        let lo = addr & !(FAULT_WINDOW - 1);
        let stored = self.spaces[i].pending.contains(page);
        let pieces = self.spaces[i].pending.take(lo, lo + FAULT_WINDOW);
        let mut again = false;
        for p in pieces {
            // Neighbours come along only if their runs are verified
            // already: the thread waits for its own page's run alone.
            let own = (p.addr..p.addr + p.len).contains(&page);
            if own || self.runs.known_good(p.file_off, p.len) {
                again |= self.copy(i, p)?;
            } else {
                self.spaces[i].pending.insert(p);
            }
        }
        let space = &mut self.spaces[i];
        if space.dead {
            return Ok(());
        }
        if again {
            space.retry.push(addr);
            return Ok(());
        }
        if !stored {
            match uffd::zeropage(space.uffd.as_fd(), page, PAGE_SIZE) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    space.retry.push(addr);
                    return Ok(());
                }
                // Unmapped since the fault: the thread faults again, on
                // nothing, as it would have.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return self.failed(i, "mapping a zero page", e),
            }
        }
        // The page may have come in by another copy after the fault was
        // queued; the waiter needs waking either way.
        match uffd::wake(self.spaces[i].uffd.as_fd(), page, PAGE_SIZE) {
            Ok(()) => Ok(()),
            Err(e) => self.failed(i, "waking a thread", e),
        }
    }

    /// Copy `p` into space `i`. Returns true if part of it had to be put
    /// back until pending events are read.
    fn copy(&mut self, i: usize, p: Piece) -> Result<bool> {
        if let Some(bad) = self.runs.check(&self.image, p.file_off, p.len)? {
            return Err(self.corrupt(bad));
        }
        let mut done = 0u64;
        while done < p.len {
            let src = self.image.addr_of(p.file_off + done).ok_or_else(|| {
                Error::Other("internal: a page run lies outside the image".into())
            })?;
            let space = &mut self.spaces[i];
            match uffd::copy(space.uffd.as_fd(), p.addr + done, src, p.len - done) {
                Copied::All => return Ok(false),
                Copied::Part { done: n, errno } => {
                    done += n;
                    match errno {
                        // Already there (the process wrote it through a
                        // fault we served as zero, or it came in another
                        // way): never overwrite it.
                        libc::EEXIST => done += PAGE_SIZE.min(p.len - done),
                        libc::EAGAIN => {
                            space.pending.insert(Piece {
                                addr: p.addr + done,
                                file_off: p.file_off + done,
                                len: p.len - done,
                            });
                            return Ok(true);
                        }
                        libc::ESRCH => {
                            space.dead = true;
                            return Ok(false);
                        }
                        // Unmapped meanwhile: nothing to fill there.
                        libc::ENOENT => return Ok(false),
                        _ if n > 0 => {}
                        e => {
                            self.failed(i, "copying pages", std::io::Error::from_raw_os_error(e))?;
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(false)
    }

    /// A space the server cannot go on serving: its process would wait
    /// forever or read wrong memory, so it is killed, by name.
    fn failed(&mut self, i: usize, what: &str, e: std::io::Error) -> Result<()> {
        let space = &mut self.spaces[i];
        error!(
            pid = space.pid,
            "lazy restore: {what} failed ({e}); killing PID {}", space.pid
        );
        if space.pid > 0 {
            // SAFETY: kill takes integers. The process is held by its
            // userfaultfd, which we hold: it cannot have gone and its PID
            // been reused while this space is live.
            unsafe { libc::kill(space.pid, libc::SIGKILL) };
        }
        space.dead = true;
        Ok(())
    }

    /// A bad run was about to be served: kill every restored process
    /// before any could read it (none has: it was never copied), and wait
    /// until they are gone, so that closing their userfaultfds (which lets
    /// a waiting fault map an empty page) comes after. The error ends the
    /// server (during the rebuild, the restore).
    fn corrupt(&mut self, bad: BadRun) -> Error {
        kill_all(&self.victims);
        Error::Other(bad.to_string())
    }

    /// One background step: the lowest pending bytes of the next space
    /// with any. Returns false when nothing is left to copy.
    fn background(&mut self, next: &mut usize) -> Result<bool> {
        let n = self.spaces.len();
        for k in 0..n {
            let i = (*next + k) % n;
            let space = &mut self.spaces[i];
            if space.dead || !space.retry.is_empty() {
                continue;
            }
            if let Some(p) = space.pending.take_first(BACKGROUND_STEP) {
                self.copy(i, p)?;
                *next = i + 1;
                return Ok(true);
            }
        }
        Ok(self
            .spaces
            .iter()
            .any(|s| !s.dead && (!s.pending.is_empty() || !s.retry.is_empty())))
    }

    /// Let go of spaces with nothing left: their userfaultfd closes, which
    /// unregisters their memory (later faults are ordinary ones).
    fn release_done(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.spaces.len() {
            let done = {
                let s = &self.spaces[i];
                s.dead || (s.pending.is_empty() && s.retry.is_empty())
            };
            if done {
                // Events that came meanwhile (a fork's child must be taken
                // on before its parent's descriptor goes).
                if !self.spaces[i].dead {
                    self.handle_events()?;
                    let s = &self.spaces[i];
                    if !(s.pending.is_empty() && s.retry.is_empty()) {
                        i += 1;
                        continue;
                    }
                }
                let gone = self.spaces.swap_remove(i);
                if gone.dead && !gone.pending.is_empty() {
                    debug!(
                        pid = gone.pid,
                        left = gone.pending.bytes(),
                        "a lazily restored process went before all its pages were in"
                    );
                }
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

/// SIGKILL every restored process and every child they forked, then wait
/// (a few seconds at most) until each is gone.
fn kill_all(victims: &Mutex<Vec<OwnedFd>>) {
    let victims = victims.lock().unwrap_or_else(|p| p.into_inner());
    for pidfd in victims.iter() {
        // SAFETY: pidfd_send_signal takes integers and a null siginfo; a
        // pidfd names its process, never a reused PID.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // A pidfd polls readable once its process has exited.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    for pidfd in victims.iter() {
        let mut fds = [libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        while fds[0].revents == 0 && Instant::now() < deadline {
            let _ = poll(&mut fds, 100);
        }
    }
}

/// The child `parent` just forked: its child not among `spaces`. 0 if it
/// cannot be told.
fn new_child(parent: i32, spaces: &[Space]) -> i32 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return 0;
    };
    let mut found = 0;
    for task in tasks.flatten() {
        let path = task.path().join("children");
        let Ok(list) = std::fs::read_to_string(path) else {
            continue;
        };
        for pid in list
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if !spaces.iter().any(|s| s.pid == pid) {
                found = found.max(pid);
            }
        }
    }
    found
}

/// Fork the page server and give it `server`; return at once. One fork,
/// not the daemon's two: the server holds the userfaultfds from the moment
/// `fork` returns, so nothing needs to wait for it to be scheduled (under
/// load the double fork's wait for the intermediate child cost several ms
/// of the time to running). It is our child until we exit (`--detach`:
/// right away, then init's); a thread reaps it if we outlive it.
pub(super) fn spawn_server(server: Server, image_fd: RawFd) -> Result<hold::ServerHold> {
    let (write, held) = hold::new()?;
    // SAFETY: the restorer has no other thread now (the build thread was
    // joined, the verification thread runs for eager restores only); the
    // child runs the server and ends with _exit, never returning into the
    // restorer's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os(
            "fork of the page server",
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        drop(write);
        let code = server_main(server, held, image_fd);
        // SAFETY: ending the server without running the restorer's
        // destructors (they would kill the processes it restored).
        unsafe { libc::_exit(code) };
    }
    // Our copies of the userfaultfds close here; the server's remain.
    drop(server);
    drop(held);
    Ok(hold::ServerHold::new(write, pid))
}

/// The page server process: detach, serve, verify; the exit code.
fn server_main(mut server: Server, mut held: hold::Held, image_fd: RawFd) -> i32 {
    let started = Instant::now();
    // SAFETY: setsid, signal and prctl take integers; failures leave the
    // server in its parent's session or with default dispositions, which
    // only makes it easier to kill by accident.
    unsafe {
        libc::setsid();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(
            libc::PR_SET_NAME,
            c"chpox-lazy".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    close_others(&server, held.raw_fd(), image_fd);
    info!(
        pid = std::process::id(),
        mib = server.bytes >> 20,
        "lazy restore: page server running"
    );
    let (victims, runs, image) = (
        server.victims.clone(),
        server.runs.clone(),
        server.image.clone(),
    );
    let stop = AtomicBool::new(false);
    let (served, verified) = std::thread::scope(|s| {
        // The runs not served yet, on the other core: most are known good
        // before they are needed, and a bad one not touched for long still
        // stops the process early.
        let mut verifier_held = held.try_clone();
        let (runs, image, victims, stop) = (&runs, &image, &victims, &stop);
        let verifier = s.spawn(move || {
            verifier_held.wait(hold::HOLD_AT_MOST);
            let found = runs.check_all(image, stop);
            if let Ok(Some(_)) = found {
                kill_all(victims);
            }
            found
        });
        let served = serve_detached(&mut server, &mut held);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let verified = verifier
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the verifying thread panicked".into())));
        (served, verified)
    });
    let failed = match (served, verified) {
        (Err(e), _) | (Ok(()), Err(e)) => Some(e.to_string()),
        (Ok(()), Ok(Some(bad))) => Some(bad.to_string()),
        (Ok(()), Ok(None)) => None,
    };
    match failed {
        None => {
            info!(
                mib = server.bytes >> 20,
                us = started.elapsed().as_micros() as u64,
                "lazy restore: every page is in"
            );
            0
        }
        Some(e) => {
            error!("lazy restore: {e}; the restored processes were killed");
            1
        }
    }
}

/// Close every descriptor the server inherited but does not use (a pipe end
/// of the restored job kept open here would keep its reader from seeing
/// EOF), and point stdin and stdout at /dev/null. Stderr stays: errors go
/// there.
fn close_others(server: &Server, held: Option<RawFd>, image_fd: RawFd) {
    // The reader reads through a descriptor of its own, of the same file.
    let image = nix::sys::stat::fstat(
        // SAFETY: the image's descriptor is open in this process.
        unsafe { BorrowedFd::borrow_raw(image_fd) },
    )
    .ok()
    .map(|st| (st.st_dev, st.st_ino));
    let same_file = |fd: RawFd| {
        // SAFETY: `fd` was listed in /proc/self/fd just now; at worst it
        // is closed already and fstat fails.
        let st = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok();
        image.is_some() && st.map(|st| (st.st_dev, st.st_ino)) == image
    };
    let mut keep: Vec<RawFd> = vec![2, image_fd];
    keep.extend(held);
    keep.extend(server.spaces.iter().map(|s| s.uffd.as_raw_fd()));
    keep.extend(
        server
            .victims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|f| f.as_raw_fd()),
    );
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if !keep.contains(&fd) && !same_file(fd) {
            // SAFETY: closing descriptors nothing in this process uses (the
            // directory's own is already closed, EBADF is harmless).
            unsafe { libc::close(fd) };
        }
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 onto 0 and 1, which are ours to replace.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Serve faults first, copy the rest between them once the restorer lets
/// go (see `hold`), until every space is done.
fn serve_detached(server: &mut Server, held: &mut hold::Held) -> Result<()> {
    let mut next = 0usize;
    loop {
        server.release_done()?;
        if server.spaces.is_empty() {
            return Ok(());
        }
        let mut fds: Vec<libc::pollfd> = server
            .spaces
            .iter()
            .map(|s| libc::pollfd {
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Asked first: once closed, the restorer's end must not stay in
        // the poll set, where it would end every wait at once.
        let released = held.released();
        // While held, the restorer's closing its end wakes us too.
        fds.extend(held.raw_fd().map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let busy = server
            .spaces
            .iter()
            .any(|s| !s.dead && !s.pending.is_empty());
        let background = busy && released;
        let timeout = match (background, busy) {
            (true, _) => 0,
            (false, true) => held.timeout_ms(),
            (false, false) => 100,
        };
        poll(&mut fds, timeout)?;
        server.handle_events()?;
        if background {
            server.background(&mut next)?;
        }
    }
}
