//! The infallible presets, and paused tokio time driving the rate limiter
//! with no crate feature and no clock setting.
#![cfg(all(
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "circuit-breaker",
    feature = "retry"
))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::bulkhead::BulkheadFull;
use tower_bulwark::circuit_breaker::{CircuitOpen, CircuitState};
use tower_bulwark::rate_limit::RateLimited;
use tower_bulwark::{BulkheadLayer, CircuitBreakerLayer, RateLimitLayer, RetryLayer};

fn echo() -> impl Service<u32, Response = u32, Error = BoxError> + Clone {
    service_fn(|n: u32| async move { Ok::<_, BoxError>(n) })
}

#[tokio::test(start_paused = true)]
async fn paused_time_refills_the_default_limiter() {
    // No `.clock(..)`, no `test-util` feature: tokio's clock is the default.
    let mut svc = RateLimitLayer::per_second(2).layer(echo());
    for n in 0..2 {
        assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
    }
    let err = svc.ready().await.unwrap().call(2).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("a RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_millis(500));
    assert_eq!(limited.limit(), 2.0);

    // Paused time moves only when the test says so.
    tokio::time::advance(Duration::from_millis(499)).await;
    assert!(svc.ready().await.unwrap().call(3).await.is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(svc.ready().await.unwrap().call(4).await.unwrap(), 4);
}

#[tokio::test]
async fn bulkhead_new_fails_fast_when_full() {
    let layer = BulkheadLayer::new(1);
    let handle = layer.handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let mut svc = layer.layer(service_fn(move |_: ()| {
        let rx = rx.lock().unwrap().take();
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(())
        }
    }));
    let first = tokio::spawn(svc.ready().await.unwrap().call(()));
    tokio::task::yield_now().await;
    assert_eq!(handle.in_flight(), 1);
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(err.downcast_ref::<BulkheadFull>().unwrap().capacity(), 1);
    tx.send(()).unwrap();
    first.await.unwrap().unwrap();
    assert_eq!(handle.available(), 1);
}

#[test]
#[should_panic(expected = "max_concurrent")]
fn bulkhead_new_names_the_bad_setting() {
    let _ = BulkheadLayer::new(0);
}

#[test]
#[should_panic(expected = "max_tokens")]
fn per_second_names_the_bad_setting() {
    let _ = RateLimitLayer::per_second(0);
}

#[tokio::test(start_paused = true)]
async fn default_breaker_opens_after_five_failures() {
    let layer = CircuitBreakerLayer::default();
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut svc = layer.layer(service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), BoxError>("down".into()) }
    }));
    for _ in 0..5 {
        assert!(svc.ready().await.unwrap().call(()).await.is_err());
    }
    assert_eq!(handle.state(), CircuitState::Open);
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn default_retry_makes_three_attempts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = RetryLayer::default().layer(service_fn(move |_: ()| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Err::<usize, BoxError>("flaky".into())
            } else {
                Ok(n)
            }
        }
    }));
    assert_eq!(svc.oneshot(()).await.unwrap(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
