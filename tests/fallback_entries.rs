//! A fallback's entries under a half-open breaker: probe slots come back
//! and each result is booked once, whatever the classifier does; and an
//! entry whose readiness fails never saw the request, so the request goes
//! on to the next entry whatever `fail_over_if` says.
#![cfg(feature = "fallback")]

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_bulwark::circuit_breaker::CircuitState;
use tower_bulwark::classify::{classify_fn, Outcome};
use tower_bulwark::fallback::FallbackLayer;
use tower_bulwark::CircuitBreakerLayer;

fn quiet() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !format!("{info}").contains("on purpose:") {
            prev(info)
        }
    }));
}

async fn drive<F: std::future::Future>(f: F) -> std::thread::Result<F::Output> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(f).catch_unwind().await
}

#[tokio::test(start_paused = true)]
async fn probes_come_back_and_book_once() {
    quiet();
    let fail_a = Arc::new(AtomicBool::new(true));
    let fail_b = Arc::new(AtomicBool::new(false));
    let panic_classify = Arc::new(AtomicU8::new(0));
    let resend = Arc::new(AtomicBool::new(true));
    let (fa, fb, pc, rs) = (
        fail_a.clone(),
        fail_b.clone(),
        panic_classify.clone(),
        resend.clone(),
    );
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback(
            "b",
            service_fn(move |_: u32| {
                let f = fb.load(SeqCst);
                async move {
                    if f {
                        Err::<u32, BoxError>("b down".into())
                    } else {
                        Ok(2)
                    }
                }
            }),
        )
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(1)
                .open_timeout(Duration::from_secs(1))
                .half_open_max_calls(1),
        )
        .classify(classify_fn(move |r: &Result<u32, BoxError>| {
            match (pc.load(SeqCst), r) {
                (1, _) | (2, Ok(2)) => panic!("on purpose: classifier panics"),
                _ => {}
            }
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            }
        }))
        .fail_over_if(move |_| rs.load(SeqCst))
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(service_fn(move |_: u32| {
        let f = fa.load(SeqCst);
        async move {
            if f {
                Err::<u32, BoxError>("a down".into())
            } else {
                Ok(1)
            }
        }
    }));
    let a = || h.breaker("a").unwrap();
    let b = || h.breaker("b").unwrap();

    // Open a, then half-open.
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 2);
    assert_eq!(a().state(), CircuitState::Open);
    tokio::time::advance(Duration::from_secs(1)).await;

    // 1. The primary's probe: the classifier panics. Slot back.
    panic_classify.store(1, SeqCst);
    assert!(drive(svc.clone().oneshot(1)).await.is_err());
    panic_classify.store(0, SeqCst);
    assert_eq!(
        a().metrics().half_open_in_flight,
        0,
        "1: primary probe after classifier panic"
    );

    // 2. The primary's probe fails, fail_over_if says no: booked once, reopens.
    let before = a().metrics().failures_total;
    resend.store(false, SeqCst);
    assert!(svc.clone().oneshot(2).await.is_err());
    resend.store(true, SeqCst);
    assert_eq!(a().metrics().half_open_in_flight, 0, "2: in flight");
    assert_eq!(a().metrics().failures_total, before + 1, "2: booked once");
    assert_eq!(
        a().state(),
        CircuitState::Open,
        "2: the failed probe reopens"
    );

    // 3. b half-open; a's probe fails, b's answer makes the classifier panic.
    fail_b.store(true, SeqCst);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(svc.clone().oneshot(3).await.is_err()); // a's probe fails, b fails: b opens
    assert_eq!(b().state(), CircuitState::Open);
    assert_eq!(a().metrics().half_open_in_flight, 0);
    tokio::time::advance(Duration::from_secs(5)).await;
    fail_b.store(false, SeqCst);
    panic_classify.store(2, SeqCst);
    assert!(drive(svc.clone().oneshot(4)).await.is_err());
    panic_classify.store(0, SeqCst);
    assert_eq!(a().metrics().half_open_in_flight, 0, "3: a");
    assert_eq!(b().metrics().half_open_in_flight, 0, "3: b");
    assert_eq!(
        b().state(),
        CircuitState::HalfOpen,
        "3: b's result unbooked"
    );

    // 4. b answers now: closes.
    assert_eq!(svc.clone().oneshot(5).await.unwrap(), 2);
    assert_ne!(b().state(), CircuitState::Open);
    assert_eq!(b().metrics().half_open_in_flight, 0, "4: b");
}

/// An entry whose readiness fails never saw the request, yet the call asks
/// `fail_over_if` before moving past it; a "no" ends the call with that
/// readiness error, though no entry was ever sent the request.
#[tokio::test(start_paused = true)]
async fn an_entry_whose_readiness_fails_passes_the_request_on() {
    use std::task::{Context, Poll};
    #[derive(Clone)]
    struct Broken;
    impl tower::Service<u32> for Broken {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Err("b: connection pool closed".into()))
        }
        fn call(&mut self, _: u32) -> Self::Future {
            unreachable!("never ready")
        }
    }
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = sent.clone();
    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", Broken)
        .fallback("c", service_fn(|_: u32| async { Ok::<u32, BoxError>(3) }))
        .fail_over_if(|_| false) // e.g. a non-idempotent request
        .build()
        .unwrap();
    let h = layer.handle();
    h.breaker("a").unwrap().hold_open(Duration::from_secs(60)); // a skipped: never sent
    let svc = layer.layer(service_fn(move |_: u32| {
        s2.fetch_add(1, SeqCst);
        async { Ok::<u32, BoxError>(1) }
    }));
    let r = svc.oneshot(9).await;
    assert_eq!(sent.load(SeqCst), 0);
    assert_eq!(
        r.map_err(|e| e.to_string()).unwrap(),
        3,
        "nobody saw the request: c should get it"
    );
}
