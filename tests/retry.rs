//! The retry layer through its public API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::classify::{Classify, Outcome};
use tower_bulwark::error::BoxError;
use tower_bulwark::retry::{
    AttemptTimedOut, Backoff, GiveUpReason, Jitter, RetryBudget, RetryEvent, RetryLayer,
    RetryReason,
};
use tower_test::mock;

const MS: Duration = Duration::from_millis(1);

type Events = Arc<Mutex<Vec<RetryEvent>>>;

fn recorder() -> (Events, impl Fn(&RetryEvent) + Send + Sync + 'static) {
    let events: Events = Arc::default();
    let sink = events.clone();
    (events, move |e: &RetryEvent| {
        sink.lock().unwrap().push(e.clone())
    })
}

fn delays(events: &Events) -> Vec<(u32, Duration)> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            RetryEvent::Retry { attempt, delay, .. } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect()
}

#[test]
fn public_names() {
    let layer: Result<tower_bulwark::RetryLayer, _> = RetryLayer::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(100))
                .max_delay(Duration::from_secs(60))
                .jitter(Jitter::Full),
        )
        .build();
    assert!(layer.is_ok());
    let _budget: RetryBudget = RetryBudget::default();
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RetryLayer>();
    send_sync::<RetryBudget>();
    send_sync::<AttemptTimedOut>();
    send_sync::<tower_bulwark::retry::Retry<mock::Mock<u8, u8>, tower_bulwark::retry::DefaultPolicy>>(
    );
}

#[test]
fn backoff_sequences_and_caps() {
    let b = Backoff::exponential(Duration::from_millis(100)).max_delay(Duration::from_secs(60));
    let seq: Vec<_> = (1..=11).map(|n| b.delay(n)).collect();
    assert_eq!(seq[..4], [100 * MS, 200 * MS, 400 * MS, 800 * MS]);
    assert_eq!(seq[10], Duration::from_secs(60)); // 102.4 s, capped
    assert_eq!(b.delay(1000), Duration::from_secs(60));
    assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    let lin = Backoff::linear(Duration::from_secs(1)).max_delay(Duration::from_secs(5));
    assert_eq!(lin.delay(1000), Duration::from_secs(5));
    assert_eq!(Backoff::constant(7 * MS).delay(1000), 7 * MS);
}

#[test]
fn config_errors_name_the_field() {
    let e = RetryLayer::builder().max_attempts(0).build().unwrap_err();
    assert_eq!(e.field(), "max_attempts");
    let e = RetryLayer::builder()
        .backoff(Backoff::exponential(Duration::from_secs(2)).max_delay(Duration::from_secs(1)))
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "backoff");
    let e = RetryLayer::builder()
        .attempt_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "attempt_timeout");
    let e = RetryLayer::builder()
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "deadline");
}

/// Failures are retried after exactly the back-off's delays (no jitter),
/// readiness is driven before each attempt, and the third answer wins.
#[tokio::test(start_paused = true)]
async fn retries_after_the_backoff_delays() {
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .name("delays")
        .max_attempts(3)
        .backoff(Backoff::exponential(100 * MS))
        .on_event(listener)
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(layer);

    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call("hi"));
    assert_pending!(fut.poll());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, "hi");
    send.send_error("boom");

    // Waiting 100 ms: nothing reaches the upstream before then.
    assert_pending!(fut.poll());
    time::advance(99 * MS).await;
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    // The upstream is not ready when the delay ends: the attempt waits.
    handle.allow(0);
    time::advance(MS).await;
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    handle.allow(10);
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");

    assert_pending!(fut.poll());
    time::advance(199 * MS).await;
    assert_pending!(fut.poll());
    time::advance(MS).await;
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("ok");
    assert_eq!(assert_ready_ok!(fut.poll()), "ok");

    assert_eq!(delays(&events), [(2, 100 * MS), (3, 200 * MS)]);
    let reasons: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            RetryEvent::Retry { reason, name, .. } => {
                assert_eq!(&**name, "delays");
                *reason
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(reasons, [RetryReason::Error, RetryReason::Error]);
}

#[tokio::test(start_paused = true)]
async fn gives_up_with_the_last_error() {
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .max_attempts(2)
        .backoff(Backoff::constant(10 * MS))
        .on_event(listener)
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: ()| {
            let n = {
                let mut g = c.lock().unwrap();
                *g += 1;
                *g
            };
            async move { Err::<(), _>(std::io::Error::other(format!("failure {n}"))) }
        }));
    let err = svc.oneshot(()).await.unwrap_err();
    assert_eq!(err.to_string(), "failure 2");
    assert!(err.downcast_ref::<std::io::Error>().is_some());
    assert_eq!(*calls.lock().unwrap(), 2);
    let last = events.lock().unwrap().last().cloned().unwrap();
    assert!(matches!(
        last,
        RetryEvent::GaveUp {
            attempts: 2,
            reason: GiveUpReason::Exhausted,
            ..
        }
    ));
}

/// Dropping the response future while it waits out a back-off stops
/// everything: no further attempt reaches the upstream, and the timer goes
/// with the future.
#[tokio::test(start_paused = true)]
async fn dropping_mid_backoff_cancels() {
    let layer = RetryLayer::builder()
        .max_attempts(5)
        .backoff(Backoff::constant(Duration::from_secs(1)))
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<u8, u8, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(1));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");
    assert_pending!(fut.poll()); // now in back-off
    drop(fut);
    time::advance(Duration::from_secs(10)).await;
    assert!(handle.poll_request().is_pending());
    // The service is still usable.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(2));
    assert_pending!(fut.poll());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 2);
    send.send_response(4);
    assert_eq!(assert_ready_ok!(fut.poll()), 4);
}

/// The three shapes a call starts in: plain, reporting to a listener
/// (shared sinks), and timed (boxed from the start).
fn shaped(shape: u8) -> RetryLayer {
    let builder = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(10 * MS));
    match shape {
        0 => builder,
        1 => builder.on_event(|_| {}),
        _ => builder.attempt_timeout(Duration::from_secs(60)),
    }
    .build()
    .unwrap()
}

/// Dropping at every await point: mid-attempt, mid-back-off, while
/// waiting for readiness; in every shape a call can start in.
#[tokio::test(start_paused = true)]
async fn dropping_at_any_point_cancels() {
    for shape in 0..3 {
        for stage in 0..3 {
            let (mut svc, mut handle) = mock::spawn_layer::<u8, u8, _>(shaped(shape));
            assert_ready_ok!(svc.poll_ready());
            let mut fut = tokio_test::task::spawn(svc.call(1));
            assert_pending!(fut.poll());
            let (_, send) = handle.next_request().await.unwrap();
            if stage >= 1 {
                send.send_error("boom");
                assert_pending!(fut.poll());
            }
            if stage >= 2 {
                handle.allow(0);
                time::advance(10 * MS).await;
                assert_pending!(fut.poll());
            }
            drop(fut);
            handle.allow(10);
            time::advance(Duration::from_secs(1)).await;
            assert!(
                handle.poll_request().is_pending(),
                "shape {shape} stage {stage}"
            );
        }
    }
}

/// Whatever the shape and wherever the call stops, the copy of the
/// request kept for the next attempt is freed with the future.
#[tokio::test(start_paused = true)]
async fn the_kept_request_is_freed() {
    for shape in 0..3 {
        for fail_first in [false, true] {
            let req = Arc::new(7u8);
            let mut svc = ServiceBuilder::new()
                .layer(shaped(shape))
                .service(service_fn(move |r: Arc<u8>| async move {
                    if fail_first {
                        Err::<u8, _>("boom")
                    } else {
                        Ok(*r)
                    }
                }));
            let fut = svc.ready().await.unwrap().call(req.clone());
            let mut fut = tokio_test::task::spawn(fut);
            if fail_first {
                // The first attempt failed: now in back-off, holding a copy.
                assert_pending!(fut.poll());
                assert!(Arc::strong_count(&req) > 1);
                drop(fut);
            } else {
                assert_eq!(assert_ready_ok!(fut.poll()), 7);
                drop(fut);
            }
            assert_eq!(
                Arc::strong_count(&req),
                1,
                "shape {shape} fail {fail_first}"
            );
        }
    }
}

/// The crate's own rejections are not retried into.
#[tokio::test(start_paused = true)]
async fn rejections_are_not_retried() {
    use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen};
    let breaker = CircuitBreakerLayer::builder().build().unwrap();
    breaker.handle().force_open();
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let (events, listener) = recorder();
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::builder().on_event(listener).build().unwrap())
        .layer(breaker)
        .service(service_fn(move |_: ()| {
            *c.lock().unwrap() += 1;
            async { Ok::<_, BoxError>(()) }
        }));
    let err = svc.oneshot(()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    assert_eq!(*calls.lock().unwrap(), 0);
    assert!(events.lock().unwrap().is_empty());
}

/// An empty budget returns the original failure and says so.
#[tokio::test(start_paused = true)]
async fn budget_exhaustion_returns_the_failure() {
    let budget = RetryBudget::builder()
        .min_per_second(0)
        .percent(50.0)
        .build()
        .unwrap();
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .max_attempts(2)
        .backoff(Backoff::constant(MS))
        .budget(budget.clone())
        .on_event(listener)
        .build()
        .unwrap();
    assert!(layer.handle().budget().is_some());
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: ()| {
            *c.lock().unwrap() += 1;
            async { Err::<(), BoxError>("down".into()) }
        }));
    // Two calls earn one retry (50 %): the first call's failure has half
    // a retry, the second call's a whole one.
    for _ in 0..2 {
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert_eq!(err.to_string(), "down");
    }
    assert_eq!(*calls.lock().unwrap(), 1 + 2);
    let kinds: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| tower_bulwark::observe::Event::kind(e))
        .collect();
    assert_eq!(kinds, ["budget_exhausted", "retry", "gave_up"]);
    assert_eq!(budget.available(), 0);
}

/// A per-attempt timeout cuts a slow attempt short and retries; the last
/// one fails with `AttemptTimedOut`.
#[tokio::test(start_paused = true)]
async fn attempt_timeout_retries_then_fails() {
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .name("slow")
        .max_attempts(2)
        .backoff(Backoff::constant(10 * MS))
        .attempt_timeout(Duration::from_secs(1))
        .on_event(listener)
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_: ()| async {
            time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, BoxError>(())
        }));
    let err = svc.oneshot(()).await.unwrap_err();
    let t = err.downcast_ref::<AttemptTimedOut>().unwrap();
    assert_eq!(
        (t.name(), t.attempt(), t.timeout()),
        ("slow", 2, Duration::from_secs(1))
    );
    assert_eq!(t.to_string(), "retry `slow` attempt 2 timed out after 1s");
    assert!(matches!(
        events.lock().unwrap()[0],
        RetryEvent::Retry {
            reason: RetryReason::Timeout,
            ..
        }
    ));
}

/// A retry that would start after the deadline is not made.
#[tokio::test(start_paused = true)]
async fn deadline_stops_retries() {
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .max_attempts(10)
        .backoff(Backoff::exponential(Duration::from_secs(1)))
        .deadline(Duration::from_secs(5))
        .on_event(listener)
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: ()| {
            *c.lock().unwrap() += 1;
            async { Err::<(), BoxError>("down".into()) }
        }));
    let start = time::Instant::now();
    svc.oneshot(()).await.unwrap_err();
    // Delays 1 + 2 = 3 s; the next (4 s) would start at 7 s > 5 s.
    assert_eq!(*calls.lock().unwrap(), 3);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(matches!(
        events.lock().unwrap().last().unwrap(),
        RetryEvent::GaveUp {
            reason: GiveUpReason::Deadline,
            attempts: 3,
            ..
        }
    ));
}

/// Answers 503 (a failure) with a `retry_after` hint of `.0`; anything
/// else is a success.
#[derive(Clone)]
struct Busy(Duration);

impl Classify<u32, BoxError> for Busy {
    fn classify(&self, r: &Result<u32, BoxError>, _: Duration) -> Outcome {
        match r {
            Ok(503) | Err(_) => Outcome::Failure,
            Ok(_) => Outcome::Success,
        }
    }
    fn retry_after(&self, r: &Result<u32, BoxError>) -> Option<Duration> {
        matches!(r, Ok(503)).then_some(self.0)
    }
}

/// An upstream that answers 503 once, then 200; and its call count.
fn busy_once() -> (
    Arc<Mutex<u32>>,
    impl Service<(), Response = u32, Error = BoxError, Future = impl Send> + Clone,
) {
    let n = Arc::new(Mutex::new(0u32));
    let c = n.clone();
    let svc = service_fn(move |_: ()| {
        let k = {
            let mut g = c.lock().unwrap();
            *g += 1;
            *g
        };
        async move { Ok::<u32, BoxError>(if k == 1 { 503 } else { 200 }) }
    });
    (n, svc)
}

/// A classifier's `retry_after` hint delays the next attempt at least that
/// long; a closure predicate sees the request.
#[tokio::test(start_paused = true)]
async fn classifier_hint_and_closure_predicate() {
    let (events, listener) = recorder();
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(10 * MS))
        .classify(Busy(Duration::from_secs(2)))
        .on_event(listener)
        .build()
        .unwrap();
    let (n, upstream) = busy_once();
    let svc = tower::ServiceBuilder::new().layer(layer).service(upstream);
    assert_eq!(svc.oneshot(()).await.unwrap(), 200);
    assert_eq!(*n.lock().unwrap(), 2);
    assert_eq!(delays(&events), [(2, Duration::from_secs(2))]);

    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(MS))
        .retry_if(|req: &u32, res: &Result<u32, BoxError>| *req > 0 && res.is_err())
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: u32| {
            *c.lock().unwrap() += 1;
            async { Err::<u32, BoxError>("no".into()) }
        }));
    svc.ready().await.unwrap().call(0).await.unwrap_err();
    assert_eq!(*calls.lock().unwrap(), 1);
    svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(*calls.lock().unwrap(), 1 + 3);
}

/// An upstream's `Retry-After` that would make the next attempt start past
/// the deadline ends the call at once, with the answer in hand; without a
/// deadline, one longer than `max_retry_after` does the same.
#[tokio::test(start_paused = true)]
async fn a_retry_after_too_long_gives_up_at_once() {
    for deadline in [true, false] {
        let (events, listener) = recorder();
        let builder = RetryLayer::builder()
            .max_attempts(5)
            .backoff(Backoff::constant(MS))
            .classify(Busy(Duration::from_secs(10)))
            .on_event(listener);
        let layer = if deadline {
            builder.deadline(Duration::from_secs(5))
        } else {
            builder.max_retry_after(Duration::from_secs(5))
        }
        .build()
        .unwrap();
        let (n, upstream) = busy_once();
        let svc = tower::ServiceBuilder::new().layer(layer).service(upstream);
        let start = time::Instant::now();
        assert_eq!(svc.oneshot(()).await.unwrap(), 503);
        assert_eq!(start.elapsed(), Duration::ZERO, "deadline {deadline}");
        assert_eq!(*n.lock().unwrap(), 1);
        let want = if deadline {
            GiveUpReason::Deadline
        } else {
            GiveUpReason::RetryAfterTooLong(Duration::from_secs(10))
        };
        assert!(
            matches!(
                events.lock().unwrap().as_slice(),
                [RetryEvent::GaveUp { attempts: 1, reason, .. }] if *reason == want
            ),
            "deadline {deadline}: {:?}",
            events.lock().unwrap()
        );
    }
}

/// Jittered delays stay within the back-off's bounds and are reproducible
/// with a seed.
#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_reproducible() {
    async fn run(seed: u64) -> Vec<(u32, Duration)> {
        let (events, listener) = recorder();
        let layer = RetryLayer::builder()
            .max_attempts(6)
            .backoff(Backoff::exponential(100 * MS).jitter(Jitter::Full))
            .seed(seed)
            .on_event(listener)
            .build()
            .unwrap();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_: ()| async {
                Err::<(), BoxError>("x".into())
            }));
        svc.oneshot(()).await.unwrap_err();
        delays(&events)
    }
    let a = run(7).await;
    assert_eq!(a, run(7).await);
    assert_eq!(a.len(), 5);
    for (attempt, d) in a {
        assert!(d <= Backoff::exponential(100 * MS).delay(attempt - 1));
    }
}

/// Every clone shares one budget.
#[tokio::test(start_paused = true)]
async fn clones_share_the_budget() {
    let budget = RetryBudget::builder()
        .min_per_second(0)
        .percent(100.0)
        .build()
        .unwrap();
    let layer = RetryLayer::builder()
        .max_attempts(2)
        .backoff(Backoff::constant(MS))
        .budget(budget.clone())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|ok: bool| async move {
            if ok {
                Ok(())
            } else {
                Err::<(), BoxError>("x".into())
            }
        }));
    let mut a = svc.clone();
    let mut b = svc;
    a.ready().await.unwrap().call(true).await.unwrap();
    b.ready().await.unwrap().call(true).await.unwrap();
    assert_eq!(budget.available(), 2);
    assert!(a.ready().await.unwrap().call(false).await.is_err());
    // Three calls earned three retries; one was spent.
    assert_eq!(budget.available(), 2);
}

/// Settings at `Duration::MAX` are "as long as it takes", never a panic:
/// an attempt timeout that long, and a back-off and upstream hint that long
/// under a deadline that long.
#[tokio::test(start_paused = true)]
async fn durations_at_their_maximum_do_not_panic() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = calls.clone();
    let flaky = service_fn(move |n: u32| {
        let k = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if k == 0 {
                Err::<u32, BoxError>("flaky".into())
            } else {
                Ok(n)
            }
        }
    });
    let layer = RetryLayer::builder()
        .attempt_timeout(Duration::MAX)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(flaky.clone());
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);

    #[derive(Clone)]
    struct Forever;
    impl Classify<u32, BoxError> for Forever {
        fn classify(&self, r: &Result<u32, BoxError>, _: Duration) -> Outcome {
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            }
        }
        fn retry_after(&self, _: &Result<u32, BoxError>) -> Option<Duration> {
            Some(Duration::MAX)
        }
    }
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::MAX))
        .deadline(Duration::MAX)
        .classify(Forever)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(flaky);
    // Paused time jumps to the (far) timer; the second attempt answers.
    assert_eq!(svc.ready().await.unwrap().call(4).await.unwrap(), 4);
}

/// A layer and every service made from it may go before the call does: the
/// call owns its settings and still retries.
#[tokio::test(start_paused = true)]
async fn a_call_outlives_its_layer_and_still_retries() {
    let (events, sink) = recorder();
    for (name, layer) in [
        ("short", RetryLayer::builder().name("short")),
        (
            "a-name-longer-than-twenty-three-bytes",
            RetryLayer::builder().name("a-name-longer-than-twenty-three-bytes"),
        ),
    ]
    .map(|(n, b)| (n, b.max_attempts(2).backoff(Backoff::constant(MS))))
    {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let svc = ServiceBuilder::new()
            .layer(layer.build().unwrap())
            .service(service_fn(move |n: u32| {
                let k = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if k == 0 {
                        Err::<u32, BoxError>("flaky".into())
                    } else {
                        Ok(n)
                    }
                }
            }));
        // `oneshot` drops the service once called; the layer is gone too.
        assert_eq!(svc.oneshot(8).await.unwrap(), 8);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "{name}");
    }
    // With a listener the same holds, and events carry the name.
    let layer = RetryLayer::builder()
        .name("heard")
        .max_attempts(2)
        .backoff(Backoff::constant(MS))
        .on_event(sink)
        .build()
        .unwrap();
    let failing = service_fn(|_: u32| async { Err::<u32, BoxError>("down".into()) });
    let svc = ServiceBuilder::new().layer(layer).service(failing);
    assert!(svc.oneshot(1).await.is_err());
    let names: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            RetryEvent::Retry { name, .. } | RetryEvent::GaveUp { name, .. } => name.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["heard", "heard"]);
}
