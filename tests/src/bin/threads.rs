//! `threads [<n_threads>]`
//!
//! Spawns `n` (default 4, at most 64) threads named `worker-<t>`
//! (`std::thread::Builder::name` and `prctl(PR_SET_NAME)`). Thread `t`
//! sets a thread-local to `t` and increments `COUNTERS[t]` (an `AtomicU64`)
//! every 1 ms until told to stop. Workers block SIGUSR1, so the signal
//! always goes to the main thread.
//!
//! Prints `READY tids=<tid0>,<tid1>,... counters=0x<addr of COUNTERS>`
//! (tids in thread order). On SIGUSR1 it stops and joins the workers and
//! prints `DONE` then one line per thread, `T<t>=ok` (counter > 0, its
//! thread-local intact, and `pthread_kill(thread, 0)` finds it: glibc
//! addresses a thread by the TID it keeps in the thread's control block)
//! or `T<t>=bad`; exits 0 if all are ok, else 1.

use std::cell::Cell;
use std::ffi::CString;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use chpox_tests::{
    arg_or, gettid, mask_signals, say, set_thread_name, stop_on_signal, wait_for_stop,
};

const MAX_THREADS: usize = 64;

static COUNTERS: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];
static WORKERS_STOP: AtomicBool = AtomicBool::new(false);

thread_local! {
    static MY_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn worker(t: usize, tids: mpsc::Sender<(usize, i32)>) -> bool {
    let name = CString::new(format!("worker-{t}")).expect("name");
    set_thread_name(&name);
    MY_INDEX.with(|c| c.set(t));
    tids.send((t, gettid())).expect("send tid");
    drop(tids);
    while !WORKERS_STOP.load(Ordering::SeqCst) {
        COUNTERS[t].fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1));
    }
    MY_INDEX.with(|c| c.get()) == t
}

fn main() {
    let n: usize = arg_or(0, 4);
    assert!(
        (1..=MAX_THREADS).contains(&n),
        "n_threads must be 1..={MAX_THREADS}"
    );
    stop_on_signal(libc::SIGUSR1);

    // Workers inherit the mask: only the main thread takes SIGUSR1.
    mask_signals(libc::SIG_BLOCK, &[libc::SIGUSR1]);
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("worker-{t}"))
                .spawn(move || worker(t, tx))
                .expect("spawn worker")
        })
        .collect();
    drop(tx);
    mask_signals(libc::SIG_UNBLOCK, &[libc::SIGUSR1]);

    let mut tids = vec![0i32; n];
    for (t, tid) in rx.iter() {
        tids[t] = tid;
    }
    assert!(
        tids.iter().all(|&t| t > 0),
        "a worker did not report its tid"
    );
    let tids: Vec<String> = tids.iter().map(|t| t.to_string()).collect();
    say!(
        "READY tids={} counters={:#x}",
        tids.join(","),
        COUNTERS.as_ptr() as usize
    );

    wait_for_stop(Duration::from_millis(100));

    let reachable: Vec<bool> = handles
        .iter()
        // SAFETY: the handle's thread has not been joined, so its pthread_t
        // is valid; signal 0 only checks that the thread exists.
        .map(|h| unsafe { libc::pthread_kill(h.as_pthread_t(), 0) } == 0)
        .collect();
    WORKERS_STOP.store(true, Ordering::SeqCst);
    let intact: Vec<bool> = handles
        .into_iter()
        .zip(reachable)
        .map(|(h, reachable)| h.join().expect("worker panicked") && reachable)
        .collect();
    say("DONE");
    let mut all_ok = true;
    for (t, ok) in intact.into_iter().enumerate() {
        let ok = ok && COUNTERS[t].load(Ordering::SeqCst) > 0;
        all_ok &= ok;
        say!("T{t}={}", if ok { "ok" } else { "bad" });
    }
    if !all_ok {
        std::process::exit(1);
    }
}
