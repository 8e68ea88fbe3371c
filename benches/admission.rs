//! Admission control: the allowed-path cost of the rate limiter and the
//! bulkhead against the bare service and their peers, in one run, on 1 and
//! 2 threads. Also the clock reads the limiter could be built on.

mod support;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter as Governor};
use tower::Layer;

use support::{drive, Bare};

/// A bucket no benchmark loop can empty.
const HUGE: f64 = 1e12;

fn rate_limit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    // The fast clock (the TSC), the hot-path choice.
    let ours = tower_bulwark::RateLimitLayer::builder()
        .max_tokens(HUGE)
        .refill_rate(HUGE)
        .clock(tower_bulwark::ClockSource::Fast)
        .build()
        .unwrap()
        .layer(Bare);
    let ours_tokio = tower_bulwark::RateLimitLayer::builder()
        .max_tokens(HUGE)
        .refill_rate(HUGE)
        .clock(tower_bulwark::ClockSource::Tokio)
        .build()
        .unwrap()
        .layer(Bare);
    let ours_keyed = tower_bulwark::RateLimitLayer::builder()
        .max_tokens(HUGE)
        .refill_rate(HUGE)
        .clock(tower_bulwark::ClockSource::Fast)
        .key(|r: &u64| r % 1024)
        .build()
        .unwrap()
        .layer(Bare);
    let max = NonZeroU32::MAX;
    let gov = std::sync::Arc::new(Governor::direct(Quota::per_second(max).allow_burst(max)));
    let gov_keyed = std::sync::Arc::new(Governor::<u64, _, _, _>::keyed(
        Quota::per_second(max).allow_burst(max),
    ));
    let resilience = tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(usize::MAX / 4)
        .refresh_period(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(Bare);

    for threads in [1u64, 2] {
        let mut g = c.benchmark_group(format!("rate_limit/{threads}t"));
        g.bench_function("bare", |b| {
            b.iter_custom(|n| support::threaded(&Bare, threads, n))
        });
        g.bench_function("bulwark", |b| {
            b.iter_custom(|n| support::threaded(&ours, threads, n))
        });
        g.bench_function("bulwark_tokio_clock", |b| {
            b.iter_custom(|n| support::threaded(&ours_tokio, threads, n))
        });
        let gv = gov.clone();
        g.bench_function("governor_check", |b| {
            b.iter_custom(|n| {
                support::run_threads(None, threads, n, || {
                    let gv = gv.clone();
                    move |i| {
                        let _ = black_box(gv.check());
                        let _ = black_box(drive(&mut Bare, i));
                    }
                })
            })
        });
        g.bench_function("tower_resilience", |b| {
            b.iter_custom(|n| support::threaded_on(Some(rt.handle()), &resilience, threads, n))
        });
        g.bench_function("bulwark_keyed", |b| {
            b.iter_custom(|n| support::threaded(&ours_keyed, threads, n))
        });
        let gk = gov_keyed.clone();
        g.bench_function("governor_keyed", |b| {
            b.iter_custom(|n| {
                support::run_threads(None, threads, n, || {
                    let gk = gk.clone();
                    move |i| {
                        let _ = black_box(gk.check_key(&(i % 1024)));
                        let _ = black_box(drive(&mut Bare, i));
                    }
                })
            })
        });
        g.finish();
    }
}

fn bulkhead(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let ours = tower_bulwark::BulkheadLayer::builder()
        .max_concurrent(1000)
        .build()
        .unwrap()
        .layer(Bare);
    let limit = tower::limit::ConcurrencyLimitLayer::new(1000).layer(Bare);
    let resilience = tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(1000)
        .build()
        .unwrap()
        .layer(Bare);
    for threads in [1u64, 2] {
        let mut g = c.benchmark_group(format!("bulkhead/{threads}t"));
        g.bench_function("bare", |b| {
            b.iter_custom(|n| support::threaded(&Bare, threads, n))
        });
        g.bench_function("bulwark", |b| {
            b.iter_custom(|n| support::threaded(&ours, threads, n))
        });
        g.bench_function("tower_concurrency_limit", |b| {
            b.iter_custom(|n| support::threaded(&limit, threads, n))
        });
        g.bench_function("tower_resilience", |b| {
            b.iter_custom(|n| support::threaded_on(Some(rt.handle()), &resilience, threads, n))
        });
        g.finish();
    }
}

/// What one clock read costs: the limiter reads one per call.
fn clocks(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let mut g = c.benchmark_group("clock");
    g.bench_function("tokio_instant", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    g.bench_function("std_instant", |b| b.iter(|| black_box(Instant::now())));
    g.finish();
}

/// Per-call overhead of each layer over the bare service, against its
/// peer, through both harnesses in one run: `inlined` is [`drive`] (the
/// stack inlined into the caller), `generic` is a plain, non-inlined
/// generic `async fn` looping `svc.ready().await?.call(i).await`.
fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _g = rt.enter();
    let bulkhead = tower_bulwark::BulkheadLayer::builder()
        .max_concurrent(1000)
        .build()
        .unwrap();
    let limit = tower::limit::ConcurrencyLimitLayer::new(1000);
    let rate_limit = tower_bulwark::RateLimitLayer::builder()
        .max_tokens(HUGE)
        .refill_rate(HUGE)
        .build()
        .unwrap();
    // governor reads the CPU's counter: the like-for-like setting.
    let rate_limit_fast = tower_bulwark::RateLimitLayer::builder()
        .max_tokens(HUGE)
        .refill_rate(HUGE)
        .clock(tower_bulwark::ClockSource::Fast)
        .build()
        .unwrap();
    let max = NonZeroU32::MAX;
    let gov = std::sync::Arc::new(Governor::direct(Quota::per_second(max).allow_burst(max)));
    let retry = tower_bulwark::RetryLayer::builder()
        .max_attempts(3)
        .backoff(tower_bulwark::retry::Backoff::exponential(
            Duration::from_millis(100),
        ))
        .build()
        .unwrap();
    let tower_retry = tower::retry::RetryLayer::new(support::Attempts(2));

    macro_rules! both {
        ($g:ident, $name:literal, $svc:expr) => {{
            let mut svc = $svc;
            $g.bench_function(concat!("inlined/", $name), |b| {
                b.iter(|| black_box(drive(&mut svc, black_box(1))))
            });
            let mut svc = $svc;
            $g.bench_function(concat!("generic/", $name), |b| {
                b.iter_custom(|n| support::generic(&mut svc, n))
            });
        }};
    }
    let mut g = c.benchmark_group("overhead");
    both!(g, "bare", Bare);
    both!(g, "bulkhead", bulkhead.layer(Bare));
    both!(g, "tower_concurrency_limit", limit.layer(Bare));
    both!(g, "rate_limit", rate_limit.layer(Bare));
    both!(g, "rate_limit_fast_clock", rate_limit_fast.layer(Bare));
    both!(g, "governor_check", support::GovernorGate(gov.clone()));
    both!(g, "retry", retry.layer(Bare));
    both!(g, "tower_retry", tower_retry.layer(Bare));
    g.finish();
}

criterion_group!(benches, rate_limit, bulkhead, clocks, overhead);
criterion_main!(benches);
