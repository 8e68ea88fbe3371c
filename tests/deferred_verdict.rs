//! A classifier that judges calls later (`Classify::defer`): the breaker
//! books the late verdict in the call's own generation, and holds a
//! half-open probe slot until the verdict comes or is dropped.
#![cfg(feature = "circuit-breaker")]

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
