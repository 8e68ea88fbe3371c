//! Success-path overhead of the retry layer against the bare service,
//! tower's `Retry` with a trivial policy and tower-resilience's retry, in
//! one criterion run.

mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;

use support::{drive, Attempts, Bare};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("retry/success");

    let mut bare = Bare;
    g.bench_function("bare", |b| {
        b.iter(|| black_box(drive(&mut bare, black_box(1))))
    });

    let layer = tower_bulwark::RetryLayer::builder()
        .max_attempts(3)
        .backoff(tower_bulwark::retry::Backoff::exponential(
            Duration::from_millis(100),
        ))
        .build()
        .unwrap();
    let mut ours = layer.layer(Bare);
    g.bench_function("bulwark", |b| {
        b.iter(|| black_box(drive(&mut ours, black_box(1))))
    });

    // With a shared budget: one clock read and one compare-and-swap more.
    let budgeted = tower_bulwark::RetryLayer::builder()
        .max_attempts(3)
        .budget(tower_bulwark::retry::RetryBudget::default())
        .build()
        .unwrap();
    let mut ours_budget = budgeted.layer(Bare);
    g.bench_function("bulwark+budget", |b| {
        b.iter(|| black_box(drive(&mut ours_budget, black_box(1))))
    });

    let mut tower_retry = tower::retry::RetryLayer::new(Attempts(2)).layer(Bare);
    g.bench_function("tower", |b| {
        b.iter(|| black_box(drive(&mut tower_retry, black_box(1))))
    });

    let resilience = tower_resilience::retry::RetryLayer::<u64, u64, Infallible>::builder()
        .max_attempts(3)
        .build();
    let mut theirs = resilience.layer(Bare);
    g.bench_function("tower-resilience", |b| {
        b.iter(|| black_box(drive(&mut theirs, black_box(1))))
    });

    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
