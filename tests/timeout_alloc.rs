//! A call through the timeout layer allocates nothing: the inner future and
//! the timer live inline in the response future. Its own test binary, so
//! the counting allocator sees no other test's work.

use std::alloc::System;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{service_fn, Layer, Service};
use tower_bulwark::error::BoxError;
use tower_bulwark::timeout::TimeoutLayer;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_allocates_nothing_whether_ready_at_once_or_timed() {
    let layer = TimeoutLayer::builder()
        .timeout(Duration::from_millis(100))
        .per_request(|n: &u64| Some(Duration::from_millis(*n)))
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|n: u64| async move {
        if n % 2 == 1 {
            tokio::task::yield_now().await;
        }
        Ok::<_, BoxError>(n)
    }));
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
    call(2);
    call(3);
    let region = Region::new(GLOBAL);
    for n in 0..1_000 {
        assert_eq!(call(n), n);
    }
    assert_eq!(region.change().allocations, 0);
}
