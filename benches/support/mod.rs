//! Shared harness for the per-call benchmarks: every figure is the cost of
//! `poll_ready` + `call` + one poll of the response future, with a no-op
//! waker, on a service whose inner call is immediately ready.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tower::{Service, ServiceExt};

/// Drives one request through `svc` to completion. Every benchmarked path
/// answers at once on one thread; under contention a peer's lock may make
/// it pending for a moment, so it is polled again until ready.
///
/// Always inlined into the measuring loop, as a tower stack is into its
/// caller: left to the compiler, this function is inlined for services
/// with small results (the bare service, tower's own layers with an
/// `Infallible` error) and called for services that box their errors,
/// whose 16-byte result then comes back through memory and costs a
/// store-forwarding stall (about 5 ns here) that says nothing about the
/// layer.
#[inline(always)]
pub fn drive<S: Service<R>, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => std::hint::spin_loop(),
        }
    }
    let mut fut = pin!(svc.call(req));
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(r) => return r,
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// Keeps the answer itself from being optimised away, not an `Option` of
/// it: a 16-byte value passed through `black_box` is stored in two words
/// and read back in one, which stalls every row, the bare service's too.
pub fn keep<T, E>(res: Result<T, E>) {
    if let Ok(answer) = res {
        black_box(answer);
    }
}

/// The bare service every layer wraps: echoes its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bare;

impl Service<u64> for Bare {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

/// Runs `iters` calls split over `threads` threads, each on its own clone
/// of `svc` (so all share the layer's state), and returns the wall time:
/// criterion then reports time per call across the whole group.
pub fn threaded<S>(svc: &S, threads: u64, iters: u64) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
{
    threaded_on(None, svc, threads, iters)
}

/// [`threaded`], with each thread inside `rt` (for peers whose futures
/// need a tokio runtime).
pub fn threaded_on<S>(
    rt: Option<&tokio::runtime::Handle>,
    svc: &S,
    threads: u64,
    iters: u64,
) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
{
    run_threads(rt, threads, iters, || {
        let mut svc = svc.clone();
        move |i| {
            let _ = black_box(drive(&mut svc, black_box(i)));
        }
    })
}

/// Runs `iters` steps split over `threads` threads; `make` builds each
/// thread's step function (called with the step number). Returns the wall
/// time from a common start.
pub fn run_threads<M, F>(
    rt: Option<&tokio::runtime::Handle>,
    threads: u64,
    iters: u64,
    make: M,
) -> Duration
where
    M: Fn() -> F,
    F: FnMut(u64) + Send + 'static,
{
    let per = iters.div_ceil(threads);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut step = make();
            let barrier = barrier.clone();
            let rt = rt.cloned();
            std::thread::spawn(move || {
                let _rt = rt.as_ref().map(|h| h.enter());
                barrier.wait();
                for i in 0..per {
                    step(black_box(i));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("bench thread panicked");
    }
    start.elapsed()
}

/// The other harness: a plain generic `async fn`, kept out of line, as a
/// caller's code that is generic over a service is when the compiler
/// declines to inline it. `svc.ready().await?.call(i).await` `n` times.
#[inline(never)]
pub async fn drive_generic<S: Service<u64>>(svc: &mut S, n: u64) -> Result<(), S::Error> {
    for i in 0..n {
        black_box(svc.ready().await?.call(black_box(i)).await?);
    }
    Ok(())
}

/// The smallest executor: polls `f` with a no-op waker until it is ready
/// (every benchmarked path answers at once).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// Criterion's `iter_custom` body for [`drive_generic`]: `n` calls through
/// `svc`, timed as one run.
pub fn generic<S: Service<u64>>(svc: &mut S, n: u64) -> Duration {
    let start = Instant::now();
    let answered = block_on(drive_generic(svc, n)).is_ok();
    let elapsed = start.elapsed();
    assert!(answered, "every benchmarked call is admitted");
    elapsed
}

/// governor's `check()` in front of [`Bare`], as a service, so both
/// harnesses drive it the way they drive the layers.
#[derive(Clone)]
pub struct GovernorGate(
    pub  std::sync::Arc<
        governor::RateLimiter<
            governor::state::NotKeyed,
            governor::state::InMemoryState,
            governor::clock::DefaultClock,
        >,
    >,
);

impl Service<u64> for GovernorGate {
    type Response = u64;
    type Error = &'static str;
    type Future = Ready<Result<u64, &'static str>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: u64) -> Self::Future {
        match self.0.check() {
            Ok(()) => ready(Ok(req)),
            Err(_) => ready(Err("limited")),
        }
    }
}

/// tower's `Retry` with the smallest useful policy: clone the request,
/// never retry a success, retry errors up to twice.
#[derive(Clone, Copy)]
pub struct Attempts(pub u32);

impl tower::retry::Policy<u64, u64, Infallible> for Attempts {
    type Future = Ready<()>;

    fn retry(&mut self, _req: &mut u64, res: &mut Result<u64, Infallible>) -> Option<Ready<()>> {
        match res {
            Ok(_) => None,
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}
