//! Per-call cost of a closed breaker: ours (consecutive and window modes)
//! against the bare service, tower-resilience and failsafe, in one run, on
//! one thread and on two threads sharing one breaker.
#![allow(missing_docs)]

use std::future::Ready;
use std::hint::black_box;
use std::task::{Context, Poll};

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, Service};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, Window};

mod support;
use support::{drive, generic_loop, threaded, Bare};

/// failsafe has no tower layer: wrap its futures API as a service.
#[derive(Clone)]
struct Failsafe<B> {
    breaker: B,
    inner: Bare,
}

impl<B> Service<u64> for Failsafe<B>
where
    B: failsafe::futures::CircuitBreaker,
{
    type Response = u64;
    type Error = failsafe::Error<std::convert::Infallible>;
    type Future = failsafe::futures::ResponseFuture<
        Ready<Result<u64, std::convert::Infallible>>,
        B::FailurePolicy,
        B::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        self.breaker.call(self.inner.call(req))
    }
}

fn ours() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    CircuitBreakerLayer::builder().build().unwrap().layer(Bare)
}

fn ours_window() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    CircuitBreakerLayer::builder()
        .window(Window::count(100))
        .build()
        .unwrap()
        .layer(Bare)
}

/// A breaker per key, over 1024 keys in turn.
fn ours_keyed() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    CircuitBreakerLayer::builder()
        .key(|k: &u64| *k % 1024)
        .build()
        .unwrap()
        .layer(Bare)
}

fn tower_resilience() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .unwrap()
        .layer(Bare)
}

fn failsafe() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    Failsafe {
        breaker: failsafe::Config::new().build(),
        inner: Bare,
    }
}

fn bench(c: &mut Criterion) {
    // tower-resilience reads tokio's clock: give it a runtime context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let mut g = c.benchmark_group("circuit_breaker/1 thread");
    macro_rules! one {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| {
                b.iter(|| black_box(drive(&mut svc, black_box(1))))
            });
        }};
    }
    one!("bare", Bare);
    one!("bulwark consecutive", ours());
    one!("bulwark count window", ours_window());
    one!("bulwark keyed (1024 keys)", ours_keyed());
    one!("tower-resilience", tower_resilience());
    one!("failsafe", failsafe());
    g.finish();

    // The same, as a user's generic loop sees it (nothing forced inline).
    let mut g = c.benchmark_group("circuit_breaker/generic driver");
    macro_rules! generic {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter_custom(|n| generic_loop(&mut svc, n)));
        }};
    }
    generic!("bare", Bare);
    generic!("bulwark consecutive", ours());
    generic!("bulwark count window", ours_window());
    generic!("bulwark keyed (1024 keys)", ours_keyed());
    generic!("tower-resilience", tower_resilience());
    generic!("failsafe", failsafe());
    g.finish();

    let mut g = c.benchmark_group("circuit_breaker/2 threads");
    macro_rules! two {
        ($name:expr, $svc:expr) => {{
            let svc = $svc;
            let handle = rt.handle().clone();
            g.bench_function($name, move |b| {
                let handle = handle.clone();
                b.iter_custom(|iters| {
                    let _guard = handle.enter();
                    threaded(&svc, 2, iters)
                })
            });
        }};
    }
    two!("bare", Bare);
    two!("bulwark consecutive", ours());
    two!("bulwark count window", ours_window());
    two!("tower-resilience", tower_resilience());
    two!("failsafe", failsafe());
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
