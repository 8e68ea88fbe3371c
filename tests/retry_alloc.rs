//! The retry layer's success path allocates nothing, whatever the layer
//! is configured with (a per-attempt timeout aside: its timer lives in the
//! one box a call that retries needs). Its own test binary, with one test,
//! so that the counting allocator sees no other test's work.

use std::alloc::System;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{service_fn, Layer, Service};
use tower_bulwark::error::BoxError;
use tower_bulwark::retry::{Backoff, RetryBudget, RetryLayer};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Readies `svc`, calls it and polls the answer once; all of it must be
/// ready at once.
fn call_once<S: Service<u32>>(svc: &mut S, n: u32) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(Ok(())) = svc.poll_ready(&mut cx) else {
        panic!("not ready")
    };
    match pin!(svc.call(n)).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("pending"),
    }
}

/// Allocations made by `calls` calls through `layer`, after one warm-up
/// call; the upstream fails requests below `fail_below` once each.
fn allocations(layer: &RetryLayer, calls: u32, fail_below: u32) -> usize {
    let mut svc = layer.layer(service_fn(move |n: u32| async move {
        if n < fail_below {
            Err::<u32, BoxError>("flaky".into())
        } else {
            Ok(n)
        }
    }));
    assert_eq!(call_once(&mut svc, 1_000).unwrap(), 1_000);
    let region = Region::new(GLOBAL);
    for n in 0..calls {
        // A failed first attempt waits out its back-off: pending.
        if n >= fail_below {
            assert_eq!(call_once(&mut svc, n).unwrap(), n);
        } else {
            let mut cx = Context::from_waker(Waker::noop());
            assert!(svc.poll_ready(&mut cx).is_ready());
            assert!(pin!(svc.call(n)).poll(&mut cx).is_pending());
        }
    }
    region.change().allocations
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_success_path_allocates_nothing() {
    let base = || {
        RetryLayer::builder()
            .max_attempts(3)
            .backoff(Backoff::constant(Duration::from_secs(1)))
    };
    let shapes = [
        ("plain", base().build().unwrap()),
        (
            "budget and listener",
            base()
                .budget(RetryBudget::default())
                .on_event(|_| {})
                .build()
                .unwrap(),
        ),
        ("named", base().name("payments").build().unwrap()),
        (
            "named past the inline length",
            base()
                .name("a-name-longer-than-twenty-three-bytes")
                .build()
                .unwrap(),
        ),
        (
            "deadline",
            base().deadline(Duration::from_secs(30)).build().unwrap(),
        ),
    ];
    for (name, layer) in &shapes {
        // The counter is global: the test harness's own threads sometimes
        // allocate meanwhile. A success path that allocated would do so in
        // every run, so the quietest of three runs must be zero.
        let quietest = (0..3).map(|_| allocations(layer, 1_000, 0)).min();
        assert_eq!(quietest, Some(0), "{name}");
        // The counter is live: a call whose first attempt fails boxes
        // its retry state.
        assert!(allocations(layer, 10, 10) >= 10, "{name}");
    }
}
