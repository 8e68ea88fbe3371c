//! Per-call cost of the fallback layer on a healthy primary, and of the
//! dedup layer on unique keys, on one hot key, and on a burst of callers
//! sharing one call: ours against the bare service and tower-resilience's
//! Coalesce, in one run.
#![allow(missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, Service};
use tower_bulwark::dedup::DedupLayer;
use tower_bulwark::fallback::FallbackLayer;

mod support;
use support::{drive, generic, keep, Bare};

fn fallback() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    FallbackLayer::builder()
        .primary_name("primary")
        .fallback("secondary", Bare)
        .build()
        .unwrap()
        .layer(Bare)
}

/// tower-resilience's fallback to a backup service: one secondary, no
/// per-entry breakers.
fn tower_resilience_fallback() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    tower_resilience::fallback::FallbackLayer::<u64, u64, std::convert::Infallible>::tower_service(
        Bare,
    )
    .layer(Bare)
}

fn dedup() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    DedupLayer::builder()
        .key(|k: &u64| Some(*k))
        .build()
        .unwrap()
        .layer(Bare)
}

fn dedup_cached() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    DedupLayer::builder()
        .key(|k: &u64| Some(*k))
        .cache_ttl(Duration::from_secs(3600))
        .build()
        .unwrap()
        .layer(Bare)
}

fn coalesce() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    tower_resilience::coalesce::CoalesceLayer::new(|k: &u64| *k).layer(Bare)
}

/// `n` callers with the same key: all call first, then each future is
/// polled once (the first poll runs the shared call).
fn burst<S: Service<u64>>(svc: &mut S, n: usize) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut futs = Vec::with_capacity(n);
    for _ in 0..n {
        assert!(svc.poll_ready(&mut cx).is_ready());
        futs.push(Box::pin(svc.call(black_box(42))));
    }
    for f in &mut futs {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                let _ = black_box(r.is_ok());
            }
            Poll::Pending => panic!("pending"),
        }
    }
}

fn bench(c: &mut Criterion) {
    // tower-resilience and the dedup cache read tokio's clock.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    macro_rules! one {
        ($g:expr, $name:expr, $svc:expr, $key:expr) => {{
            let mut svc = $svc;
            $g.bench_function($name, |b| {
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    let k: fn(u64) -> u64 = $key;
                    keep(drive(&mut svc, black_box(k(i))))
                })
            });
        }};
    }

    let mut g = c.benchmark_group("fallback/healthy primary");
    one!(g, "bare", Bare, |i| i);
    one!(g, "bulwark fallback", fallback(), |i| i);
    one!(
        g,
        "tower-resilience fallback",
        tower_resilience_fallback(),
        |i| i
    );
    g.finish();

    // The same, as a user's generic loop sees it (nothing forced inline).
    let mut g = c.benchmark_group("fallback/healthy primary, generic driver");
    macro_rules! generic {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter_custom(|n| generic(&mut svc, n)));
        }};
    }
    generic!("bare", Bare);
    generic!("bulwark fallback", fallback());
    generic!("tower-resilience fallback", tower_resilience_fallback());
    g.finish();

    let mut g = c.benchmark_group("dedup/unique keys");
    one!(g, "bare", Bare, |i| i);
    one!(g, "bulwark dedup", dedup(), |i| i);
    one!(g, "tower-resilience coalesce", coalesce(), |i| i);
    g.finish();

    let mut g = c.benchmark_group("dedup/hot key");
    one!(g, "bare", Bare, |_| 7);
    one!(g, "bulwark dedup", dedup(), |_| 7);
    one!(g, "bulwark dedup, cache hit", dedup_cached(), |_| 7);
    one!(g, "tower-resilience coalesce", coalesce(), |_| 7);
    g.finish();

    let mut g = c.benchmark_group("dedup/burst of 16 on one key");
    macro_rules! many {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter(|| burst(&mut svc, 16)));
        }};
    }
    many!("bare", Bare);
    many!("bulwark dedup", dedup());
    many!("tower-resilience coalesce", coalesce());
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
