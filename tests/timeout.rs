//! The timeout layer through its public API, on tokio's paused clock.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{advance, sleep};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::error::{rejection, BoxError};
use tower_bulwark::timeout::{TimedOut, TimeoutEvent, TimeoutLayer};
use tower_bulwark::{CircuitBreakerLayer, RetryLayer};

const MS: Duration = Duration::from_millis(1);

/// Sleeps for the requested number of milliseconds, then echoes it.
fn sleeper() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone {
    service_fn(|ms: u64| async move {
        sleep(MS * ms as u32).await;
        Ok::<_, BoxError>(ms)
    })
}

/// Counts drops of the futures it hands out.
struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_times_out_and_a_fast_one_does_not() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let layer = TimeoutLayer::builder()
        .name("search")
        .timeout(100 * MS)
        .on_event(move |e: &TimeoutEvent| seen.lock().unwrap().push(format!("{e:?}")))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(sleeper());

    assert_eq!(svc.clone().oneshot(99).await.unwrap(), 99);
    let start = tokio::time::Instant::now();
    let err = svc.oneshot(101).await.unwrap_err();
    assert_eq!(start.elapsed(), 100 * MS);
    let t = err.downcast_ref::<TimedOut>().expect("a TimedOut");
    assert_eq!(t.name(), "search");
    assert_eq!(t.timeout(), 100 * MS);
    assert_eq!(t.to_string(), "call through `search` timed out after 100ms");
    let r = rejection(err.as_ref()).expect("a rejection");
    assert_eq!(
        (r.layer(), r.name(), r.retry_after()),
        ("timeout", "search", None)
    );
    assert_eq!(handle.timed_out(), 1);
    assert_eq!(handle.timeout(), 100 * MS);
    assert_eq!(events.lock().unwrap().len(), 1);
    assert!(events.lock().unwrap()[0].contains("TimedOut"));
}

#[tokio::test(start_paused = true)]
async fn a_per_request_timeout_is_capped_by_the_configured_one() {
    // The request is (wanted timeout in ms, call duration in ms).
    let layer = TimeoutLayer::builder()
        .timeout(100 * MS)
        .per_request(|req: &(u64, u64)| (req.0 > 0).then(|| MS * req.0 as u32))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|(_, ms): (u64, u64)| async move {
        sleep(MS * ms as u32).await;
        Ok::<_, BoxError>(ms)
    }));
    let timeout_of =
        |r: Result<u64, BoxError>| r.unwrap_err().downcast::<TimedOut>().unwrap().timeout();

    // Shorter than configured: the request's own.
    assert_eq!(timeout_of(svc.clone().oneshot((10, 50)).await), 10 * MS);
    // Longer than configured: capped.
    assert_eq!(
        timeout_of(svc.clone().oneshot((1_000, 500)).await),
        100 * MS
    );
    // None: the configured one.
    assert_eq!(svc.clone().oneshot((0, 99)).await.unwrap(), 99);
    // A huge per-request value is capped, never overflows.
    let huge = TimeoutLayer::builder()
        .timeout(100 * MS)
        .per_request(|_: &u64| Some(Duration::MAX))
        .build()
        .unwrap()
        .layer(sleeper());
    assert!(huge.oneshot(200).await.unwrap_err().is::<TimedOut>());
}

#[tokio::test(start_paused = true)]
async fn a_per_request_timeout_of_zero_answers_a_ready_call_and_times_out_the_rest() {
    let layer = TimeoutLayer::builder()
        .timeout(100 * MS)
        .per_request(|_: &u64| Some(Duration::ZERO))
        .build()
        .unwrap();
    let ready = layer.layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    assert_eq!(ready.oneshot(7).await.unwrap(), 7);
    let err = layer.layer(sleeper()).oneshot(1).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<TimedOut>().unwrap().timeout(),
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn a_timeout_beyond_the_clock_never_fires_and_never_panics() {
    for timeout in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(100 * 365 * 86_400),
    ] {
        let svc = TimeoutLayer::builder()
            .timeout(timeout)
            .build()
            .unwrap()
            .layer(sleeper());
        let mut call = pin!(svc.oneshot(10_000));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(call.as_mut().poll(&mut cx).is_pending());
        advance(Duration::from_secs(9)).await;
        assert!(call.as_mut().poll(&mut cx).is_pending());
        assert_eq!(call.await.unwrap(), 10_000);
    }
}

#[tokio::test(start_paused = true)]
async fn the_inner_call_is_dropped_at_the_deadline_or_with_the_future() {
    let drops = Arc::new(AtomicUsize::new(0));
    let d = drops.clone();
    let layer = TimeoutLayer::builder().timeout(100 * MS).build().unwrap();
    let svc = layer.layer(service_fn(move |ms: u64| {
        let guard = DropCounter(d.clone());
        async move {
            let _guard = guard;
            sleep(MS * ms as u32).await;
            Ok::<_, BoxError>(ms)
        }
    }));

    // Timed out: the inner call goes with the response future, nothing
    // keeps running in the background.
    let mut call = Box::pin(svc.clone().oneshot(1_000));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(call.as_mut().poll(&mut cx).is_pending());
    advance(100 * MS).await;
    assert!(matches!(call.as_mut().poll(&mut cx), Poll::Ready(Err(_))));
    drop(call);
    assert_eq!(drops.load(SeqCst), 1);

    // Dropped by the caller before and after its first poll.
    let mut s = svc.clone();
    let fut = s.ready().await.unwrap().call(1_000);
    drop(fut);
    assert_eq!(drops.load(SeqCst), 2);
    let mut fut = Box::pin(s.ready().await.unwrap().call(1_000));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut);
    assert_eq!(drops.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_answer_and_the_deadline_in_the_same_poll_go_to_the_answer() {
    let svc = TimeoutLayer::builder()
        .timeout(100 * MS)
        .build()
        .unwrap()
        .layer(sleeper());
    let mut call = pin!(svc.oneshot(100));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(call.as_mut().poll(&mut cx).is_pending());
    advance(100 * MS).await;
    assert_eq!(call.await.unwrap(), 100);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_goes_to_the_caller_and_leaves_the_layer_working() {
    let layer = TimeoutLayer::builder().timeout(100 * MS).build().unwrap();
    let svc = layer.layer(service_fn(|n: u64| async move {
        assert!(n != 0, "upstream panicked");
        Ok::<_, BoxError>(n)
    }));
    let caught =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(svc.clone().oneshot(0)))
            .await;
    assert!(caught.is_err());
    assert_eq!(svc.oneshot(3).await.unwrap(), 3);
    assert_eq!(layer.handle().timed_out(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_above_counts_a_timeout_as_a_failure() {
    let breaker = CircuitBreakerLayer::builder()
        .failure_threshold(2)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .layer(TimeoutLayer::builder().timeout(10 * MS).build().unwrap())
        .service(sleeper());
    for _ in 0..2 {
        assert!(svc.clone().oneshot(50).await.unwrap_err().is::<TimedOut>());
    }
    assert_eq!(
        handle.state(),
        tower_bulwark::circuit_breaker::CircuitState::Open
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_above_tries_a_timed_out_call_again() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::builder().max_attempts(3).build().unwrap())
        .layer(TimeoutLayer::builder().timeout(10 * MS).build().unwrap())
        .service(service_fn(move |_: u64| {
            // The first attempt hangs, the second answers at once.
            let n = a.fetch_add(1, SeqCst);
            async move {
                if n == 0 {
                    sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, BoxError>(n)
            }
        }));
    assert_eq!(svc.oneshot(0).await.unwrap(), 1);
    assert_eq!(attempts.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_forwarded_and_not_timed() {
    let (mock, mut upstream) = tower_test::mock::pair::<u64, u64>();
    let mut svc = tower_test::mock::Spawn::new(
        TimeoutLayer::builder()
            .timeout(10 * MS)
            .build()
            .unwrap()
            .layer(mock),
    );
    upstream.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    advance(Duration::from_secs(1)).await;
    tokio_test::assert_pending!(svc.poll_ready());
    upstream.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
}

#[test]
fn build_refuses_a_missing_or_zero_timeout() {
    let err = TimeoutLayer::builder().build().unwrap_err();
    assert_eq!((err.layer(), err.field()), ("timeout", "timeout"));
    let err = TimeoutLayer::builder()
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "timeout");
    assert!(TimeoutLayer::builder()
        .timeout(Duration::MAX)
        .build()
        .is_ok());
}

#[test]
fn public_types_are_send_sync_and_debug() {
    fn send_sync<T: Send + Sync + std::fmt::Debug>() {}
    send_sync::<TimeoutLayer>();
    send_sync::<TimedOut>();
    send_sync::<tower_bulwark::timeout::TimeoutHandle>();
    let layer = TimeoutLayer::builder().timeout(MS).build().unwrap();
    assert!(format!("{layer:?}").contains("TimeoutLayer"));
}

/// A timeout reaches an HTTP client as `504 Gateway Timeout` and a gRPC
/// client as `DEADLINE_EXCEEDED`, not as an unavailable upstream.
#[cfg(any(feature = "http", feature = "grpc"))]
#[tokio::test(start_paused = true)]
async fn a_timeout_maps_to_504_and_deadline_exceeded() {
    let layer = TimeoutLayer::builder()
        .timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    let err = layer.layer(sleeper()).oneshot(60_000).await.unwrap_err();
    assert!(err.is::<TimedOut>());
    #[cfg(feature = "http")]
    {
        let res: http::Response<String> = tower_bulwark::http::error_response(&*err);
        assert_eq!(res.status(), http::StatusCode::GATEWAY_TIMEOUT);
    }
    #[cfg(feature = "grpc")]
    {
        let status = tower_bulwark::grpc::rejection_status(&err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}
