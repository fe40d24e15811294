//! What several unit tests need.

/// A thread of the test's own process that waits until dropped: a second
/// task of the process, with its own thread id, for tests of what the
/// kernel says of threads.
pub(crate) struct ParkedThread {
    pub(crate) tid: i32,
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ParkedThread {
    pub(crate) fn start() -> ParkedThread {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (release, parked) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            let _ = parked.recv();
        });
        let tid = tid_rx.recv().expect("the parked thread's id");
        ParkedThread {
            tid,
            release: Some(release),
            thread: Some(thread),
        }
    }
}

impl Drop for ParkedThread {
    fn drop(&mut self) {
        // Its receiver sees the sender go and returns.
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Spend `cpu` of the calling thread's CPU time (not wall time): work
/// that takes as long as the scheduler keeps the thread from a core.
pub(crate) fn spend_cpu_time(cpu: std::time::Duration) {
    use nix::time::{ClockId, clock_gettime};
    let now = || {
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(std::time::Duration::from)
            .unwrap_or_default()
    };
    let until = now() + cpu;
    while now() < until {
        std::hint::spin_loop();
    }
}
