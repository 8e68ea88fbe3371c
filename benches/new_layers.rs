//! Timeout, hedge and adaptive limit: the per-call cost of a call that
//! answers at once, against the bare service and the peers, in one run,
//! through the inlined driver and through a plain generic `async fn` loop.
//!
//! The timeout and hedge never fire here (the call is ready on its first
//! poll): what is measured is what every fast call pays.

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::Layer;
use tower_bulwark::ClockSource;

use support::{generic, threaded_on, Bare};

const LONG: Duration = Duration::from_secs(3600);

/// tower's hedge policy: every request may be hedged.
#[derive(Clone)]
struct Always;

impl tower::hedge::Policy<u64> for Always {
    fn clone_request(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }

    fn can_retry(&self, _: &u64) -> bool {
        true
    }
}

fn timeout(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let ours = tower_bulwark::TimeoutLayer::builder()
        .timeout(LONG)
        .build()
        .unwrap()
        .layer(Bare);
    let ours_per_request = tower_bulwark::TimeoutLayer::builder()
        .timeout(LONG)
        .per_request(|_: &u64| Some(LONG / 2))
        .build()
        .unwrap()
        .layer(Bare);
    let tower_timeout = tower::timeout::TimeoutLayer::new(LONG).layer(Bare);
    let resilience = tower_resilience::timelimiter::TimeLimiterLayer::builder()
        .timeout_duration(LONG)
        .build()
        .layer(Bare);

    let mut g = c.benchmark_group("timeout/1t");
    let h = Some(rt.handle());
    g.bench_function("bare", |b| b.iter_custom(|n| threaded_on(h, &Bare, 1, n)));
    g.bench_function("bulwark", |b| {
        b.iter_custom(|n| threaded_on(h, &ours, 1, n))
    });
    g.bench_function("bulwark_per_request", |b| {
        b.iter_custom(|n| threaded_on(h, &ours_per_request, 1, n))
    });
    g.bench_function("tower", |b| {
        b.iter_custom(|n| threaded_on(h, &tower_timeout, 1, n))
    });
    g.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| threaded_on(h, &resilience, 1, n))
    });
    g.finish();

    let mut g = c.benchmark_group("timeout_generic");
    macro_rules! generic {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter_custom(|n| generic(&mut svc, n)));
        }};
    }
    generic!("bare", Bare);
    generic!("bulwark", ours.clone());
    generic!("tower", tower_timeout.clone());
    generic!("tower_resilience", resilience.clone());
    g.finish();
}

fn hedge(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let fixed = tower_bulwark::HedgeLayer::builder()
        .delay(LONG)
        .max_extra_load(1.0)
        .build()
        .unwrap()
        .layer(Bare);
    // The percentile is learnt from the bench's own calls (all fast), and
    // the floor keeps the hedge from firing.
    let percentile = tower_bulwark::HedgeLayer::builder()
        .percentile(0.95)
        .min_delay(LONG)
        .max_extra_load(1.0)
        .build()
        .unwrap()
        .layer(Bare);
    let fixed_fast = tower_bulwark::HedgeLayer::builder()
        .delay(LONG)
        .max_extra_load(1.0)
        .clock(ClockSource::Fast)
        .build()
        .unwrap()
        .layer(Bare);
    let percentile_fast = tower_bulwark::HedgeLayer::builder()
        .percentile(0.95)
        .min_delay(LONG)
        .max_extra_load(1.0)
        .clock(ClockSource::Fast)
        .build()
        .unwrap()
        .layer(Bare);
    // Not `Clone`: each thread makes its own.
    let tower_hedge =
        || tower::hedge::Hedge::new::<u64>(Bare, Always, 10, 0.95, Duration::from_secs(10));
    let resilience = tower_resilience::hedge::HedgeLayer::builder()
        .delay(LONG)
        .max_hedged_attempts(2)
        .build()
        .layer(Bare);

    let mut g = c.benchmark_group("hedge/1t");
    let h = Some(rt.handle());
    g.bench_function("bare", |b| b.iter_custom(|n| threaded_on(h, &Bare, 1, n)));
    g.bench_function("bulwark_fixed", |b| {
        b.iter_custom(|n| threaded_on(h, &fixed, 1, n))
    });
    g.bench_function("bulwark_percentile", |b| {
        b.iter_custom(|n| threaded_on(h, &percentile, 1, n))
    });
    g.bench_function("bulwark_fixed_fast_clock", |b| {
        b.iter_custom(|n| threaded_on(h, &fixed_fast, 1, n))
    });
    g.bench_function("bulwark_percentile_fast_clock", |b| {
        b.iter_custom(|n| threaded_on(h, &percentile_fast, 1, n))
    });
    g.bench_function("tower", |b| {
        b.iter_custom(|n| {
            support::run_threads(h, 1, n, || {
                let mut svc = tower_hedge();
                move |i| {
                    let _ = std::hint::black_box(support::drive(&mut svc, i));
                }
            })
        })
    });
    g.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| threaded_on(h, &resilience, 1, n))
    });
    g.finish();

    let mut g = c.benchmark_group("hedge_generic");
    macro_rules! generic {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter_custom(|n| generic(&mut svc, n)));
        }};
    }
    generic!("bare", Bare);
    generic!("bulwark_fixed", fixed.clone());
    generic!("bulwark_percentile", percentile.clone());
    generic!("bulwark_fixed_fast_clock", fixed_fast.clone());
    generic!("bulwark_percentile_fast_clock", percentile_fast.clone());
    generic!("tower", tower_hedge());
    generic!("tower_resilience", resilience.clone());
    g.finish();
}

fn adaptive(c: &mut Criterion) {
    use tower_bulwark::adaptive::{AdaptiveLimitLayer, Aimd, Gradient, Vegas};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let ours_on = |alg: tower_bulwark::adaptive::Algorithm, clock| {
        AdaptiveLimitLayer::builder()
            .algorithm(alg)
            .clock(clock)
            .initial_limit(1000)
            .max_limit(1000)
            .build()
            .unwrap()
            .layer(Bare)
    };
    let gradient = ours_on(Gradient::default().into(), ClockSource::Tokio);
    let aimd = ours_on(Aimd::default().into(), ClockSource::Tokio);
    let vegas = ours_on(Vegas::default().into(), ClockSource::Tokio);
    let gradient_fast = ours_on(Gradient::default().into(), ClockSource::Fast);
    let aimd_fast = ours_on(Aimd::default().into(), ClockSource::Fast);
    let vegas_fast = ours_on(Vegas::default().into(), ClockSource::Fast);
    let bulkhead = tower_bulwark::BulkheadLayer::builder()
        .max_concurrent(1000)
        .build()
        .unwrap()
        .layer(Bare);
    let resilience_aimd = tower_resilience::adaptive::AdaptiveLimiterLayer::new(
        tower_resilience::adaptive::Aimd::builder()
            .initial_limit(1000)
            .max_limit(1000)
            .build()
            .unwrap(),
    )
    .layer(Bare);
    let resilience_vegas = tower_resilience::adaptive::AdaptiveLimiterLayer::new(
        tower_resilience::adaptive::Vegas::builder()
            .initial_limit(1000)
            .max_limit(1000)
            .build()
            .unwrap(),
    )
    .layer(Bare);

    for threads in [1u64, 2] {
        let mut g = c.benchmark_group(format!("adaptive/{threads}t"));
        let h = Some(rt.handle());
        g.bench_function("bare", |b| {
            b.iter_custom(|n| threaded_on(h, &Bare, threads, n))
        });
        g.bench_function("bulwark_gradient", |b| {
            b.iter_custom(|n| threaded_on(h, &gradient, threads, n))
        });
        g.bench_function("bulwark_aimd", |b| {
            b.iter_custom(|n| threaded_on(h, &aimd, threads, n))
        });
        g.bench_function("bulwark_vegas", |b| {
            b.iter_custom(|n| threaded_on(h, &vegas, threads, n))
        });
        g.bench_function("bulwark_gradient_fast_clock", |b| {
            b.iter_custom(|n| threaded_on(h, &gradient_fast, threads, n))
        });
        g.bench_function("bulwark_aimd_fast_clock", |b| {
            b.iter_custom(|n| threaded_on(h, &aimd_fast, threads, n))
        });
        g.bench_function("bulwark_vegas_fast_clock", |b| {
            b.iter_custom(|n| threaded_on(h, &vegas_fast, threads, n))
        });
        g.bench_function("bulwark_bulkhead", |b| {
            b.iter_custom(|n| threaded_on(h, &bulkhead, threads, n))
        });
        g.bench_function("tower_resilience_aimd", |b| {
            b.iter_custom(|n| threaded_on(h, &resilience_aimd, threads, n))
        });
        g.bench_function("tower_resilience_vegas", |b| {
            b.iter_custom(|n| threaded_on(h, &resilience_vegas, threads, n))
        });
        g.finish();
    }

    let mut g = c.benchmark_group("adaptive_generic");
    macro_rules! generic {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            g.bench_function($name, |b| b.iter_custom(|n| generic(&mut svc, n)));
        }};
    }
    generic!("bare", Bare);
    generic!("bulwark_gradient", gradient.clone());
    generic!("bulwark_aimd", aimd.clone());
    generic!("bulwark_vegas", vegas.clone());
    generic!("bulwark_gradient_fast_clock", gradient_fast.clone());
    generic!("bulwark_aimd_fast_clock", aimd_fast.clone());
    generic!("bulwark_vegas_fast_clock", vegas_fast.clone());
    generic!("bulwark_bulkhead", bulkhead.clone());
    generic!("tower_resilience_aimd", resilience_aimd.clone());
    generic!("tower_resilience_vegas", resilience_vegas.clone());
    g.finish();
}

criterion_group!(benches, timeout, hedge, adaptive);
criterion_main!(benches);
