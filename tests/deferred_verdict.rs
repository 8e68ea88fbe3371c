//! A classifier that judges calls later (`Classify::defer`): the breaker
//! books the late verdict in the call's own generation, and holds a
//! half-open probe slot until the verdict comes or is dropped.
#![cfg(feature = "circuit-breaker")]

#[path = "support/breaker_ops.rs"]
mod breaker_ops;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitOpen, CircuitState};
use tower_bulwark::classify::{Classify, Outcome, Verdict};
use tower_bulwark::CircuitBreakerLayer;

/// Defers every `Ok` answer, keeping the verdicts for the test to report.
#[derive(Clone, Default)]
struct Later {
    held: Arc<Mutex<Vec<Verdict>>>,
}

impl Classify<u32, BoxError> for Later {
    fn classify(&self, result: &Result<u32, BoxError>, _: Duration) -> Outcome {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }

    fn defers(&self) -> bool {
        true
    }

    fn defer(&self, result: &mut Result<u32, BoxError>, verdict: Verdict) -> Option<Verdict> {
        if result.is_err() {
            return Some(verdict);
        }
        self.held.lock().unwrap().push(verdict);
        None
    }
}

fn take(later: &Later) -> Verdict {
    later.held.lock().unwrap().pop().expect("a held verdict")
}

#[tokio::test(start_paused = true)]
async fn late_verdicts_count_and_hold_the_probe_slot() {
    let later = Later::default();
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(2)
        .success_threshold(1)
        .open_timeout(Duration::from_secs(10))
        .classify(later.clone())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|n: u32| async move {
        if n == 0 {
            Err::<u32, BoxError>("down".into())
        } else {
            Ok(n)
        }
    }));

    // Two answers that look fine, judged failures when they end.
    for n in [1, 2] {
        assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    take(&later).report(Outcome::Failure);
    assert_eq!(handle.state(), CircuitState::Closed);
    take(&later).report(Outcome::Failure);
    assert_eq!(handle.state(), CircuitState::Open);

    // Half-open: the probe's slot is held until its verdict.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);
    let err = svc.ready().await.unwrap().call(4).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    // Dropped unreported: neither success nor failure, the slot is free.
    drop(take(&later));
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    take(&later).report(Outcome::Success);
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_late_verdict_from_an_older_generation_is_not_counted() {
    let later = Later::default();
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .classify(later.clone())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
    svc.ready().await.unwrap().call(1).await.unwrap();
    // The breaker moves on (opened and reset) while the answer streams.
    handle.force_open();
    handle.reset();
    take(&later).report(Outcome::Failure);
    assert_eq!(handle.state(), CircuitState::Closed);
}

/// A fallback entry's breaker books late verdicts as the plain breaker
/// does; a deferred answer is the caller's and is never failed over, an
/// error (known at once) is.
#[cfg(feature = "fallback")]
#[tokio::test(start_paused = true)]
async fn a_fallback_entry_breaker_books_late_verdicts() {
    use tower_bulwark::FallbackLayer;

    let later = Later::default();
    let secondary = service_fn(|n: u32| async move { Ok::<_, BoxError>(n + 100) });
    let layer = FallbackLayer::builder()
        .primary_name("primary")
        .fallback("secondary", secondary)
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(2)
                .success_threshold(1)
                .open_timeout(Duration::from_secs(10)),
        )
        .classify(later.clone())
        .build()
        .unwrap();
    let handle = layer.handle();
    let primary_breaker = handle.breaker("primary").unwrap().clone();
    let mut svc = layer.layer(service_fn(|n: u32| async move {
        if n == 0 {
            Err::<u32, BoxError>("down".into())
        } else {
            Ok(n)
        }
    }));

    // An error is known at once: failed over, booked now.
    assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 100);
    assert_eq!(primary_breaker.metrics().consecutive_failures, 1);
    // The secondary's answer is deferred too; it is its own breaker's.
    take(&later).report(Outcome::Success);

    // Answers judged later are the caller's, whatever the verdict.
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(primary_breaker.state(), CircuitState::Closed);
    take(&later).report(Outcome::Failure);
    assert_eq!(primary_breaker.state(), CircuitState::Open);
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 102);
    drop(take(&later));

    // Half-open: the probe's slot is held until its verdict, even with the
    // fallback's services gone.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);
    assert_eq!(svc.ready().await.unwrap().call(4).await.unwrap(), 104);
    drop(take(&later)); // the secondary's
    drop(svc);
    drop(handle);
    take(&later).report(Outcome::Success);
    assert_eq!(primary_breaker.state(), CircuitState::Closed);
    assert!(later.held.lock().unwrap().is_empty());
}

/// Deferring is the same as booking late: one breaker whose calls finish
/// when the history says so, and one whose calls answer at once and whose
/// verdicts are reported at that same point, agree after every step of
/// any history (starts, finishes with each outcome, drops, time passing).
/// So does a fallback's entry breaker, which books through the same path.
mod same_as_finishing_late {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use proptest::prelude::*;
    use tokio::sync::oneshot;

    use super::*;
    use tower_bulwark::classify::classify_fn;

    use crate::breaker_ops::{op, Op};

    type Late = Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>;

    fn builder() -> tower_bulwark::circuit_breaker::CircuitBreakerBuilder {
        CircuitBreakerLayer::builder()
            .failure_threshold(3)
            .open_timeout(Duration::from_millis(1_000))
            .half_open_max_calls(2)
            .success_threshold(2)
    }

    fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            // A: the outcome is the call's answer, sent when it finishes.
            let by_value: fn(&Result<Outcome, BoxError>) -> Outcome =
                |r| *r.as_ref().unwrap_or(&Outcome::Failure);
            let a = builder().classify(classify_fn(by_value)).build().unwrap();
            let ha = a.handle();
            let mut sa = a.layer(service_fn(|rx: oneshot::Receiver<Outcome>| {
                Box::pin(async move { rx.await.map_err(|_| BoxError::from("gone")) }) as Late
            }));
            // B: every call answers at once; its verdict comes later.
            let later = Later::default();
            let b = builder().classify(later.clone()).build().unwrap();
            let hb = b.handle();
            let mut sb = b.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
            // C: as B, through a fallback's primary entry.
            #[cfg(feature = "fallback")]
            let (mut sc, hc, later_c) = {
                let later_c = Later::default();
                let c = tower_bulwark::FallbackLayer::builder()
                    .breaker(builder())
                    .classify(later_c.clone())
                    .build()
                    .unwrap();
                let hc = c.handle().breaker("primary").unwrap().clone();
                let sc = c.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
                (sc, hc, later_c)
            };

            let mut running = Vec::new();
            for op in ops {
                match op {
                    Op::Start => {
                        let (tx, rx) = oneshot::channel();
                        let mut fa = tokio_test::task::spawn(sa.call(rx));
                        let admitted = fa.poll().is_pending();
                        let fb = sb.ready().await.unwrap().call(1).await;
                        prop_assert_eq!(admitted, fb.is_ok(), "admission differs");
                        #[cfg(feature = "fallback")]
                        {
                            let fc = sc.ready().await.unwrap().call(1).await;
                            prop_assert_eq!(admitted, fc.is_ok(), "fallback admission differs");
                        }
                        if admitted {
                            #[cfg(feature = "fallback")]
                            let vc = Some(take(&later_c));
                            #[cfg(not(feature = "fallback"))]
                            let vc: Option<Verdict> = None;
                            running.push((tx, fa, take(&later), vc));
                        }
                    }
                    Op::Finish(i, outcome) if !running.is_empty() => {
                        let (tx, mut fa, verdict, vc) = running.remove(i % running.len());
                        match outcome {
                            Some(o) => {
                                tx.send(o).unwrap();
                                prop_assert!(matches!(fa.poll(), Poll::Ready(_)));
                                verdict.report(o);
                                if let Some(vc) = vc {
                                    vc.report(o);
                                }
                            }
                            None => {
                                drop(fa);
                                drop(verdict);
                                drop(vc);
                            }
                        }
                    }
                    Op::Finish(..) => {}
                    Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                }
                prop_assert_eq!(ha.metrics(), hb.metrics());
                #[cfg(feature = "fallback")]
                prop_assert_eq!(ha.metrics(), hc.metrics());
            }
            // Whatever is still running ends unjudged: no probe slot leaks.
            running.clear();
            prop_assert_eq!(hb.metrics().half_open_in_flight, 0);
            prop_assert_eq!(ha.metrics(), hb.metrics());
            #[cfg(feature = "fallback")]
            prop_assert_eq!(ha.metrics(), hc.metrics());
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn deferred_matches_late_finish(ops in proptest::collection::vec(op(), 1..120)) {
            run(ops)?;
        }
    }
}
