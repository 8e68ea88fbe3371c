//! Fallback layer, through the public API, with paused time.
#![cfg(feature = "fallback")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitOpen, CircuitState};
use tower_bulwark::classify::{classify_fn, Outcome};
use tower_bulwark::error::{rejection, Rejection};
use tower_bulwark::fallback::{AllFailed, FailedResponse, FallbackEvent, FallbackLayer, NotReady};
use tower_bulwark::CircuitBreakerLayer;
use tower_test::mock;

type Log = Arc<Mutex<Vec<&'static str>>>;

/// A service named `name` that logs each call and answers `Ok(name)` while
/// `up` says so, `Err` otherwise.
fn upstream(
    name: &'static str,
    log: &Log,
    up: Arc<Mutex<bool>>,
) -> impl Service<u32, Response = &'static str, Error = BoxError, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let log = log.clone();
    service_fn(move |_: u32| {
        log.lock().unwrap().push(name);
        let up = *up.lock().unwrap();
        async move {
            if up {
                Ok(name)
            } else {
                Err(BoxError::from(format!("{name} is down")))
            }
        }
    })
}

fn flag(v: bool) -> Arc<Mutex<bool>> {
    Arc::new(Mutex::new(v))
}

#[tokio::test(start_paused = true)]
async fn tries_entries_in_order() {
    let log = Log::default();
    let (a, b, c) = (flag(false), flag(false), flag(true));
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, b.clone()))
        .fallback("c", upstream("c", &log, c.clone()))
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream("a", &log, a.clone()));

    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "c");
    assert_eq!(*log.lock().unwrap(), ["a", "b", "c"]);

    // A healthy primary answers alone.
    log.lock().unwrap().clear();
    *a.lock().unwrap() = true;
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "a");
    assert_eq!(*log.lock().unwrap(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn skips_open_entries_without_calling_them() {
    let log = Log::default();
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, flag(true)))
        .fallback("c", upstream("c", &log, flag(true)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream("a", &log, flag(true)));

    handle.breaker("a").unwrap().force_open();
    handle.breaker("b").unwrap().force_open();
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "c");
    assert_eq!(*log.lock().unwrap(), ["c"]);
}

#[tokio::test(start_paused = true)]
async fn breakers_open_independently_and_recover() {
    let log = Log::default();
    let (a, b) = (flag(false), flag(false));
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, b.clone()))
        .fallback("c", upstream("c", &log, flag(true)))
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(2)
                .open_timeout(Duration::from_secs(10))
                .success_threshold(1),
        )
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(upstream("a", &log, a.clone()));
    let state = |n| h.breaker(n).unwrap().state();

    // b recovers after one failure, so only a's breaker opens.
    svc.ready().await.unwrap().call(1).await.unwrap();
    *b.lock().unwrap() = true;
    svc.ready().await.unwrap().call(1).await.unwrap();
    assert_eq!(state("a"), CircuitState::Open);
    assert_eq!(state("b"), CircuitState::Closed);
    assert_eq!(state("c"), CircuitState::Closed);

    // Now b fails twice in a row: its own breaker opens.
    *b.lock().unwrap() = false;
    for _ in 0..2 {
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "c");
    }
    assert_eq!(state("b"), CircuitState::Open);
    assert_eq!(state("c"), CircuitState::Closed);
    log.lock().unwrap().clear();
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "c");
    assert_eq!(*log.lock().unwrap(), ["c"], "open entries are not called");

    // After the open timeout the recovered primary is probed and closes.
    *a.lock().unwrap() = true;
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(state("a"), CircuitState::HalfOpen);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "a");
    assert_eq!(state("a"), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn all_failed_holds_every_entry_error() {
    let log = Log::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, flag(false)))
        .fallback("c", upstream("c", &log, flag(false)))
        .on_event(move |e: &FallbackEvent| ev.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    layer.handle().breaker("b").unwrap().force_open();
    let mut svc = layer.layer(upstream("a", &log, flag(false)));

    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    let all = err.downcast_ref::<AllFailed>().expect("AllFailed");
    assert_eq!(all.name(), "a");
    let names: Vec<&str> = all.errors().iter().map(|(n, _)| &**n).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(all.errors()[0].1.to_string(), "a is down");
    let open = all.error_of("b").unwrap().downcast_ref::<CircuitOpen>();
    assert_eq!(open.unwrap().name(), "b");
    assert_eq!(all.errors()[2].1.to_string(), "c is down");
    assert_eq!(
        all.to_string(),
        "every entry of fallback `a` failed: a: a is down; b: circuit `b` is forced open; c: c is down"
    );
    // It is the crate's rejection, found through any wrapping.
    let r = rejection(err.as_ref()).unwrap();
    assert_eq!((r.layer(), r.name()), ("fallback", "a"));
    assert!(matches!(
        events.lock().unwrap().last(),
        Some(FallbackEvent::AllFailed { entries: 3, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_the_soonest_reopening_when_all_are_open() {
    let log = Log::default();
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, flag(false)))
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(1)
                .open_timeout(Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream("a", &log, flag(false)));
    svc.ready().await.unwrap().call(1).await.unwrap_err();
    tokio::time::advance(Duration::from_secs(5)).await;
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    let all = err.downcast_ref::<AllFailed>().unwrap();
    assert!(all.errors().iter().all(|(_, e)| e.is::<CircuitOpen>()));
    assert_eq!(all.retry_after(), Some(Duration::from_secs(25)));
}

#[tokio::test(start_paused = true)]
async fn or_else_answers_when_all_failed() {
    let log = Log::default();
    let layer = FallbackLayer::builder()
        .fallback("b", upstream("b", &log, flag(false)))
        .or_else(|all| {
            Ok(if all.errors().len() == 2 {
                "canned"
            } else {
                "?"
            })
        })
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream("a", &log, flag(false)));
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "canned");

    let layer = FallbackLayer::builder().or_value("fixed").build().unwrap();
    let mut svc = layer.layer(upstream("a", &log, flag(false)));
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "fixed");
}

#[tokio::test(start_paused = true)]
async fn classifier_decides_what_fails_over() {
    // 500 fails over, 404 is the caller's, "ignore" (0) is handed back.
    let code = |c: u16| service_fn(move |_: u32| async move { Ok::<u16, BoxError>(c) });
    let classify = classify_fn(|r: &Result<u16, BoxError>| match r {
        Ok(0) => Outcome::Ignore,
        Ok(c) if *c >= 500 => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    });
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", code(200))
        .classify(classify)
        .build()
        .unwrap();
    assert_eq!(layer.layer(code(500)).oneshot(1).await.unwrap(), 200);
    assert_eq!(layer.layer(code(404)).oneshot(1).await.unwrap(), 404);
    assert_eq!(layer.layer(code(0)).oneshot(1).await.unwrap(), 0);

    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", code(503))
        .classify(classify)
        .build()
        .unwrap();
    let err = layer.layer(code(500)).oneshot(1).await.unwrap_err();
    let all = err.downcast_ref::<AllFailed>().unwrap();
    assert!(all.errors().iter().all(|(_, e)| e.is::<FailedResponse>()));
}

#[tokio::test(start_paused = true)]
async fn drives_fallback_readiness_and_waits_by_default() {
    let log = Log::default();
    let (fb, mut fb_handle) = mock::pair::<u32, &'static str>();
    fb_handle.allow(0);
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", fb)
        .build()
        .unwrap();
    let mut svc = mock::Spawn::new(layer.layer(upstream("a", &log, flag(false))));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(1));
    // The fallback is not ready: the call waits for it (no call without
    // readiness: the mock would panic).
    assert_pending!(fut.poll());
    assert_pending!(fut.poll());
    fb_handle.allow(1);
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    let (req, send) = fb_handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    send.send_response("b");
    assert_eq!(assert_ready!(fut.poll()).unwrap(), "b");
}

#[tokio::test(start_paused = true)]
async fn skip_not_ready_moves_on() {
    let log = Log::default();
    let (fb, mut fb_handle) = mock::pair::<u32, &'static str>();
    fb_handle.allow(0);
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", fb)
        .fallback("c", upstream("c", &log, flag(true)))
        .skip_not_ready(true)
        .build()
        .unwrap();

    // A fallback that is not ready is skipped.
    let svc = layer.layer(upstream("a", &log, flag(false)));
    assert_eq!(svc.oneshot(1).await.unwrap(), "c");

    // So is a primary that is not ready: the service reports ready anyway.
    let (primary, mut p_handle) = mock::pair::<u32, &'static str>();
    p_handle.allow(0);
    let mut svc = mock::Spawn::new(layer.layer(primary));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(7));
    assert_eq!(assert_ready!(fut.poll()).unwrap(), "c");
    assert_eq!(*log.lock().unwrap(), ["a", "c", "c"]);
}

#[tokio::test(start_paused = true)]
async fn not_ready_entries_are_reported() {
    let (fb, mut fb_handle) = mock::pair::<u32, &'static str>();
    fb_handle.allow(0);
    let (primary, mut p_handle) = mock::pair::<u32, &'static str>();
    p_handle.allow(0);
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", fb)
        .skip_not_ready(true)
        .build()
        .unwrap();
    let err = layer.layer(primary).oneshot(1).await.unwrap_err();
    let all = err.downcast_ref::<AllFailed>().unwrap();
    assert_eq!(all.errors().len(), 2);
    assert!(all.errors().iter().all(|(_, e)| e.is::<NotReady>()));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_probe_gives_its_slot_back() {
    let (primary, mut p_handle) = mock::pair::<u32, &'static str>();
    let log = Log::default();
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream("b", &log, flag(true)))
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(1)
                .open_timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = mock::Spawn::new(layer.layer(primary));

    // Open a's breaker, then let it go half-open.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(1));
    assert_pending!(fut.poll());
    p_handle.next_request().await.unwrap().1.send_error("boom");
    assert_eq!(assert_ready!(fut.poll()).unwrap(), "b");
    tokio::time::advance(Duration::from_secs(1)).await;

    // The probe is dropped mid-call: the slot comes back.
    assert_ready_ok!(svc.poll_ready());
    let mut probe = tokio_test::task::spawn(svc.call(2));
    assert_pending!(probe.poll());
    assert_eq!(h.breaker("a").unwrap().metrics().half_open_in_flight, 1);
    drop(probe);
    assert_eq!(h.breaker("a").unwrap().metrics().half_open_in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_during_failover_at_every_point_leaks_nothing() {
    // Drop the call after each poll; every probe slot must come back.
    for polls in 0..4 {
        let (fb, mut fb_handle) = mock::pair::<u32, &'static str>();
        let log = Log::default();
        let layer = FallbackLayer::builder()
            .primary_name("a")
            .fallback("b", fb)
            .breaker(
                CircuitBreakerLayer::builder()
                    .failure_threshold(1)
                    .open_timeout(Duration::from_secs(1))
                    .half_open_max_calls(1),
            )
            .build()
            .unwrap();
        let h = layer.handle();
        let mut svc = layer.layer(upstream("a", &log, flag(false)));
        h.breaker("b").unwrap().hold_open(Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        fb_handle.allow(if polls == 0 { 0 } else { 1 });
        let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(1));
        for _ in 0..polls {
            let _ = fut.poll();
        }
        drop(fut);
        let m = h.breaker("b").unwrap().metrics();
        assert_eq!(m.half_open_in_flight, 0, "after {polls} polls");
    }
}

#[test]
fn build_validates() {
    let s = || service_fn(|_: u32| async { Ok::<u32, BoxError>(0) });
    let err = FallbackLayer::builder()
        .primary_name("a")
        .fallback("a", s())
        .build()
        .unwrap_err();
    assert_eq!((err.layer(), err.field()), ("fallback", "fallback"));
    let err = FallbackLayer::builder()
        .primary_name("")
        .fallback("b", s())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "primary_name");
    let err = FallbackLayer::builder()
        .fallback("b", s())
        .breaker(CircuitBreakerLayer::builder().failure_threshold(0))
        .build()
        .unwrap_err();
    assert_eq!(
        (err.layer(), err.field()),
        ("circuit_breaker", "failure_threshold")
    );
}

#[test]
fn send_sync() {
    fn is_send_sync<T: Send + Sync>(_: &T) {}
    fn is_send<T: Send>(_: &T) {}
    let s = || service_fn(|_: u32| async { Ok::<u32, BoxError>(0) });
    let layer = FallbackLayer::builder().fallback("b", s()).build().unwrap();
    is_send_sync(&layer);
    is_send_sync(&layer.handle());
    let mut svc = layer.layer(s());
    is_send_sync(&svc);
    is_send(&svc.call(1));
}

#[tokio::test(start_paused = true)]
async fn a_call_outliving_its_layer_still_fails_over() {
    // A primary failure that finishes after every service and the layer
    // are gone still fails over: the call holds what it needs.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let layer = FallbackLayer::builder()
        .fallback("b", service_fn(|_: u32| async { Ok::<_, BoxError>("b") }))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(move |_: u32| {
        let rx = rx.clone();
        async move {
            let rx = rx.lock().await.take().unwrap();
            rx.await.unwrap();
            Err::<&'static str, BoxError>("primary failed late".into())
        }
    }));
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(1));
    assert_pending!(fut.poll());
    drop(svc);
    drop(layer);
    tx.send(()).unwrap();
    assert_eq!(assert_ready!(fut.poll()).unwrap(), "b");
    assert_eq!(
        handle.breaker("primary").unwrap().metrics().failures_total,
        1
    );
}

#[tokio::test]
async fn a_oneshot_through_service_builder_fails_over() {
    // The layer value is gone before the call: `oneshot` consumes the
    // service and drops it once the call is made.
    let answer = ServiceBuilder::new()
        .layer(
            FallbackLayer::builder()
                .fallback("b", service_fn(|_: u32| async { Ok::<_, BoxError>("b") }))
                .build()
                .unwrap(),
        )
        .service(service_fn(|_: u32| async {
            tokio::task::yield_now().await;
            Err::<&'static str, BoxError>("primary down".into())
        }))
        .oneshot(1)
        .await
        .unwrap();
    assert_eq!(answer, "b");
}
