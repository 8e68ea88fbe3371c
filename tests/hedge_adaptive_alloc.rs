//! A call through the hedge layer that answers before its delay, and a
//! call admitted by the adaptive limit, allocate nothing. Its own test
//! binary, with one test, so the counting allocator sees no other work.

use std::alloc::System;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{service_fn, Layer, Service};
use tower_bulwark::adaptive::{AdaptiveLimitLayer, Aimd, Gradient, Vegas};
use tower_bulwark::error::BoxError;
use tower_bulwark::hedge::HedgeLayer;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations made by 1000 calls through `svc`, after a warm-up.
fn allocations<S: Service<u64, Response = u64>>(mut svc: S) -> usize
where
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut call = |n: u64| {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let mut fut = pin!(svc.call(n));
        loop {
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                return r.unwrap();
            }
        }
    };
    // Warm up the runtime's timer and the layers' windows.
    for n in 0..2_000 {
        call(n);
    }
    let region = Region::new(GLOBAL);
    for n in 0..1_000 {
        assert_eq!(call(n), n);
    }
    region.change().allocations
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn calls_that_need_no_hedge_and_admitted_calls_allocate_nothing() {
    // Ready after a yield: the hedge's timer is armed, never fires.
    let upstream = || {
        service_fn(|n: u64| async move {
            tokio::task::yield_now().await;
            Ok::<_, BoxError>(n)
        })
    };
    let fixed = HedgeLayer::builder()
        .delay(Duration::from_secs(1))
        .max_extra_load(1.0)
        .build()
        .unwrap();
    assert_eq!(allocations(fixed.layer(upstream())), 0, "fixed delay");
    let percentile = HedgeLayer::builder()
        .min_delay(Duration::from_secs(1))
        .max_extra_load(1.0)
        .build()
        .unwrap();
    assert_eq!(allocations(percentile.layer(upstream())), 0, "percentile");

    for layer in [
        AdaptiveLimitLayer::builder()
            .algorithm(Aimd::default())
            .build()
            .unwrap(),
        AdaptiveLimitLayer::builder()
            .algorithm(Gradient::default())
            .build()
            .unwrap(),
        AdaptiveLimitLayer::builder()
            .algorithm(Vegas::default())
            .build()
            .unwrap(),
    ] {
        assert_eq!(allocations(layer.layer(upstream())), 0, "{layer:?}");
    }
}
