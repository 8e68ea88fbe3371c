//! The dedup layer on unique keys (every call leads a call of its own)
//! against the bare service and tower-resilience's Coalesce, in one run,
//! through the inlined harness and through a generic, non-inlined `async`
//! driver; and the cost of a new key once the cache is full.
#![allow(missing_docs)]

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, Service};
use tower_bulwark::dedup::DedupLayer;

use support::{drive, generic, keep, Bare};

fn dedup() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    DedupLayer::builder()
        .key(|k: &u64| Some(*k))
        .build()
        .unwrap()
        .layer(Bare)
}

fn coalesce() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    tower_resilience::coalesce::CoalesceLayer::new(|k: &u64| *k).layer(Bare)
}

fn unique_keys(c: &mut Criterion) {
    // tower-resilience reads tokio's clock.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    macro_rules! inlined {
        ($g:expr, $name:expr, $svc:expr) => {{
            let mut svc = $svc;
            let mut i = 0u64;
            $g.bench_function($name, |b| {
                b.iter(|| {
                    i += 1;
                    keep(drive(&mut svc, black_box(i)))
                })
            });
        }};
    }
    macro_rules! generic {
        ($g:expr, $name:expr, $svc:expr) => {{
            let mut svc = $svc;
            $g.bench_function($name, |b| b.iter_custom(|n| generic(&mut svc, n)));
        }};
    }

    let mut g = c.benchmark_group("dedup/unique keys/inlined");
    inlined!(g, "bare", Bare);
    inlined!(g, "bulwark dedup", dedup());
    inlined!(g, "tower-resilience coalesce", coalesce());
    g.finish();

    let mut g = c.benchmark_group("dedup/unique keys/generic driver");
    generic!(g, "bare", Bare);
    generic!(g, "bulwark dedup", dedup());
    generic!(g, "tower-resilience coalesce", coalesce());
    g.finish();
}

/// A cache of `size` answers, full; every measured call is a new key, so
/// each one evicts an answer.
fn eviction(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("dedup/new key, cache full");
    g.sample_size(10);
    for size in [10_000u64, 100_000] {
        let mut svc = DedupLayer::builder()
            .key(|k: &u64| Some(*k))
            .cache_ttl(Duration::from_secs(3600))
            .max_entries(size as usize)
            .build()
            .unwrap()
            .layer(Bare);
        for k in 0..size {
            drive(&mut svc, k).unwrap();
        }
        let mut next = size;
        g.bench_function(format!("{size} entries"), |b| {
            b.iter(|| {
                next += 1;
                keep(drive(&mut svc, black_box(next)))
            })
        });
    }
    // A flood of distinct keys into a table of the default size.
    g.bench_function("flood of 200k keys into 10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut svc = DedupLayer::builder()
                    .key(|k: &u64| Some(*k))
                    .cache_ttl(Duration::from_secs(3600))
                    .build()
                    .unwrap()
                    .layer(Bare);
                let start = Instant::now();
                for k in 0..200_000u64 {
                    black_box(drive(&mut svc, k).ok());
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, unique_keys, eviction);
criterion_main!(benches);
