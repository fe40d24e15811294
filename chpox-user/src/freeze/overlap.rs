//! Remote syscalls in several frozen processes at once.
//!
//! Each remote syscall waits twice for its tracee to be scheduled (to the
//! syscall's entry, then to its exit). One after the other, a tree of N
//! processes waits N times as long, while the machine's other core is idle.
//! Ptrace requests must come from the thread that seized the tracee (a
//! `Frozen` is !Send), so instead of threads the per-process sequences are
//! `async` functions polled in turn by [`run_all`]: each yields right after
//! it has let its tracee run ([`yield_now`]), so that the next one can start
//! its own tracee before anybody waits. The wait itself (`waitpid`) stays a
//! blocking call, made when a sequence is polled again, by which time its
//! tracee has mostly stopped already. No waker is needed: every sequence
//! that yielded is polled again in the next turn.
//!
//! With one sequence, [`block_on`], this is exactly the plain sequence of
//! calls: the synchronous `RemoteThread` calls are made of the same code.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Pending once, then ready: a point where another sequence may run.
pub struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

/// Let the other sequences of [`run_all`] run until they, too, wait.
pub fn yield_now() -> YieldNow {
    YieldNow(false)
}

/// Run one sequence to its end.
pub fn block_on<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// A boxed sequence for [`run_all`].
pub type Sequence<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Run every sequence to its end, interleaved at their yields, and return
/// their results in order. Every one runs to its end even when another has
/// failed: none is left with a tracee running on our registers.
pub fn run_all<T>(mut seqs: Vec<Sequence<'_, T>>) -> Vec<T> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out: Vec<Option<T>> = seqs.iter().map(|_| None).collect();
    let mut left = seqs.len();
    while left > 0 {
        for (seq, slot) in seqs.iter_mut().zip(out.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            if let Poll::Ready(v) = seq.as_mut().poll(&mut cx) {
                *slot = Some(v);
                left -= 1;
            }
        }
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn sequences_interleave_at_their_yields_and_all_finish() {
        let log = RefCell::new(Vec::new());
        let seq = |name: &'static str, steps: usize| -> Sequence<'_, usize> {
            let log = &log;
            Box::pin(async move {
                for i in 0..steps {
                    log.borrow_mut().push((name, i));
                    yield_now().await;
                }
                steps
            })
        };
        let results = run_all(vec![seq("a", 3), seq("b", 1), seq("c", 2)]);
        assert_eq!(results, vec![3, 1, 2]);
        assert_eq!(
            *log.borrow(),
            vec![("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]
        );
        assert_eq!(block_on(seq("d", 2)), 2);
    }
}
