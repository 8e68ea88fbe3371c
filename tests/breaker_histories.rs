//! The breaker over long and odd histories, through the public API only:
//! thousands of breakers built and dropped, tens of thousands of resets,
//! late results of dropped breakers, and random mixes of all of these
//! with paused time. Whatever happened before, a breaker that opens
//! half-opens after its open period, and a result only ever counts for
//! the breaker and the generation it started in.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::oneshot;
use tokio::time::advance;
use tokio_test::task::Spawn;
use tower::{service_fn, Layer, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use tower_bulwark::BoxError;

const OPEN: Duration = Duration::from_secs(1);

type Reply = Result<(), &'static str>;
type CallFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

fn layer(threshold: u32) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .failure_threshold(threshold)
        .success_threshold(1)
        .half_open_max_calls(2)
        .open_timeout(OPEN)
        .build()
        .unwrap()
}

/// One call through `layer` that finishes with `reply`.
async fn call(layer: &CircuitBreakerLayer, reply: Reply) -> Result<(), BoxError> {
    let svc = layer.layer(service_fn(move |_: ()| async move { reply }));
    svc.oneshot(()).await
}

/// A call through `layer` that stays pending until its sender answers.
fn pending_call(layer: &CircuitBreakerLayer) -> (Spawn<CallFuture>, oneshot::Sender<Reply>) {
    try_pending_call(layer).expect("the breaker admits the call")
}

/// The same, or `None` if the breaker rejected the call.
fn try_pending_call(
    layer: &CircuitBreakerLayer,
) -> Option<(Spawn<CallFuture>, oneshot::Sender<Reply>)> {
    let (tx, rx) = oneshot::channel::<Reply>();
    let mut rx = Some(rx);
    let svc = layer.layer(service_fn(move |_: ()| {
        let rx = rx.take().expect("called once");
        async move { rx.await.unwrap_or(Ok(())) }
    }));
    // `oneshot` drops the service once it has called it: the future alone
    // keeps what it needs.
    let fut: CallFuture = Box::pin(svc.oneshot(()));
    let mut fut = tokio_test::task::spawn(fut);
    fut.poll().is_pending().then_some((fut, tx))
}

#[tokio::test(start_paused = true)]
async fn thirty_thousand_breakers_built_one_after_another_all_recover() {
    let mut stuck = 0;
    for _ in 0..30_000 {
        let l = layer(1);
        let h = l.handle();
        call(&l, Err("down")).await.unwrap_err();
        assert_eq!(h.state(), CircuitState::Open);
        advance(OPEN).await;
        if call(&l, Ok(())).await.is_err() || h.state() != CircuitState::Closed {
            stuck += 1;
        }
    }
    assert_eq!(stuck, 0, "breakers that never left open");
}

#[tokio::test(start_paused = true)]
async fn tens_of_thousands_of_resets_and_forced_opens_then_an_opening_half_opens() {
    let l = layer(1);
    let h = l.handle();
    for i in 0..50_000 {
        if i % 2 == 0 {
            h.force_open();
        } else {
            h.reset();
        }
    }
    h.reset();
    call(&l, Err("down")).await.unwrap_err();
    assert_eq!(h.state(), CircuitState::Open);
    assert_eq!(h.metrics().open_remaining, Some(OPEN));
    advance(OPEN).await;
    assert_eq!(h.state(), CircuitState::HalfOpen);
    call(&l, Ok(())).await.unwrap();
    assert_eq!(h.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_late_result_of_a_dropped_breaker_changes_no_other() {
    let old = layer(5);
    let (mut late, answer) = pending_call(&old);
    drop(old);
    let others: Vec<_> = (0..2_000).map(|_| layer(5)).collect();
    for l in &others {
        call(l, Err("down")).await.unwrap_err();
    }
    answer.send(Ok(())).unwrap();
    assert!(late.poll().is_ready());
    for l in &others {
        assert_eq!(l.handle().metrics().consecutive_failures, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_result_counts_only_in_the_generation_it_started_in() {
    let l = layer(2);
    let h = l.handle();
    let (mut before_reset, answer) = pending_call(&l);
    call(&l, Err("down")).await.unwrap_err();
    h.reset();
    answer.send(Err("down")).unwrap();
    let _ = before_reset.poll();
    assert_eq!(h.metrics().consecutive_failures, 0);
    call(&l, Err("down")).await.unwrap_err();
    assert_eq!(
        h.state(),
        CircuitState::Closed,
        "one failure since the reset"
    );
}

/// What a random history does.
#[derive(Debug, Clone)]
enum Op {
    /// Replaces breaker `b` with a new one (the old one is dropped).
    Rebuild(usize),
    /// A call on breaker `b` that finishes at once.
    Call(usize, bool),
    /// A call on breaker `b` left pending.
    Start(usize),
    /// Answers pending call `k` (if any) with success or failure.
    Finish(usize, bool),
    /// Drops pending call `k` (if any) unanswered.
    Abandon(usize),
    Reset(usize),
    ForceOpen(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3usize).prop_map(Op::Rebuild),
        6 => (0..3usize, any::<bool>()).prop_map(|(b, ok)| Op::Call(b, ok)),
        3 => (0..3usize).prop_map(Op::Start),
        3 => (0..8usize, any::<bool>()).prop_map(|(k, ok)| Op::Finish(k, ok)),
        2 => (0..8usize).prop_map(Op::Abandon),
        1 => (0..3usize).prop_map(Op::Reset),
        1 => (0..3usize).prop_map(Op::ForceOpen),
        2 => (0..1500u64).prop_map(Op::Advance),
    ]
}

struct Pending {
    fut: Spawn<CallFuture>,
    answer: oneshot::Sender<Reply>,
    /// Which breaker admitted it: slot and build number.
    from: (usize, u32),
}

fn metrics_of(handles: &[CircuitHandle]) -> Vec<(CircuitState, u32, u32)> {
    handles
        .iter()
        .map(|h| {
            let m = h.metrics();
            (m.state, m.consecutive_failures, m.half_open_in_flight)
        })
        .collect()
}

async fn run(ops: Vec<Op>) {
    let mut layers: Vec<_> = (0..3).map(|_| layer(2)).collect();
    let mut builds = [0u32; 3];
    let mut calls: Vec<Pending> = Vec::new();
    for op in ops {
        match op {
            Op::Rebuild(b) => {
                // Pending calls of the old breaker keep its state alive;
                // nothing else does.
                layers[b] = layer(2);
                builds[b] += 1;
            }
            Op::Call(b, ok) => {
                let _ = call(&layers[b], if ok { Ok(()) } else { Err("down") }).await;
            }
            Op::Start(b) => {
                if calls.len() < 8 {
                    if let Some((fut, answer)) = try_pending_call(&layers[b]) {
                        calls.push(Pending {
                            fut,
                            answer,
                            from: (b, builds[b]),
                        });
                    }
                }
            }
            Op::Finish(k, ok) => {
                if k < calls.len() {
                    let mut c = calls.swap_remove(k);
                    let handles: Vec<_> = layers.iter().map(|l| l.handle()).collect();
                    let before = metrics_of(&handles);
                    let _ = c.answer.send(if ok { Ok(()) } else { Err("down") });
                    assert!(c.fut.poll().is_ready());
                    let (b, build) = c.from;
                    if builds[b] != build {
                        // A dropped breaker's late result reaches no one else.
                        assert_eq!(metrics_of(&handles), before);
                    }
                }
            }
            Op::Abandon(k) => {
                if k < calls.len() {
                    drop(calls.swap_remove(k));
                }
            }
            Op::Reset(b) => layers[b].handle().reset(),
            Op::ForceOpen(b) => layers[b].handle().force_open(),
            Op::Advance(ms) => advance(Duration::from_millis(ms)).await,
        }
        for l in &layers {
            assert!(l.handle().metrics().half_open_in_flight <= 2);
        }
    }
    // Whatever happened: once the calls are gone and the open period is
    // over, every breaker that is not forced open admits a call, and a
    // success closes it.
    drop(calls);
    advance(OPEN).await;
    for l in &layers {
        let h = l.handle();
        assert_eq!(h.metrics().half_open_in_flight, 0, "probe slots came back");
        match h.state() {
            CircuitState::ForcedOpen => {
                assert!(call(l, Ok(())).await.is_err());
                h.reset();
            }
            s => assert!(
                matches!(s, CircuitState::Closed | CircuitState::HalfOpen),
                "{s:?} after the open period"
            ),
        }
        call(l, Ok(())).await.unwrap();
        assert_eq!(h.state(), CircuitState::Closed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_history_ends_in_a_breaker_that_recovers(ops in prop::collection::vec(op(), 1..120)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(run(ops));
    }
}

/// Breakers of different names on one state file each keep their own
/// entry: a fallback's secondary, answering well, must not clear the
/// failures of its primary.
#[cfg(all(feature = "file-store", feature = "fallback"))]
#[tokio::test]
async fn breakers_of_different_names_on_one_file_keep_their_own_counts() {
    use tower_bulwark::fallback::FallbackLayer;
    use tower_bulwark::store::file::FileStore;

    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::builder().dir(dir.path()).build().unwrap();
    let layer = FallbackLayer::builder()
        .fallback(
            "secondary",
            service_fn(|_: u32| async { Ok::<_, BoxError>("secondary") }),
        )
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(2)
                .backend(store.clone()),
        )
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_: u32| async {
        Err::<&'static str, BoxError>("primary down".into())
    }));
    for _ in 0..5 {
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "secondary");
    }
    let primary = handle.breaker("primary").unwrap();
    assert_eq!(primary.state(), CircuitState::Open);
    assert_eq!(
        handle.breaker("secondary").unwrap().state(),
        CircuitState::Closed
    );
    // Each entry under its own name (a success with nothing to clear
    // writes nothing, so the secondary has none yet).
    let breakers = store.load().breakers;
    assert_eq!(breakers["primary"].state, CircuitState::Open.code());
    assert!(!breakers.contains_key(""));
}

/// An upstream's absurd back-off hint holds the breaker open for the cap,
/// not for years, and an event says so.
#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_is_cut_to_max_retry_after() {
    use std::sync::{Arc, Mutex};
    use tower_bulwark::circuit_breaker::CircuitEvent;
    use tower_bulwark::classify::{Classify, Outcome};

    /// Every answer says "come back in 3,000 years".
    #[derive(Clone)]
    struct Hint;
    impl<T, E> Classify<T, E> for Hint {
        fn classify(&self, r: &Result<T, E>, _: Duration) -> Outcome {
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            }
        }
        fn retry_after(&self, _: &Result<T, E>) -> Option<Duration> {
            Some(Duration::from_secs(99_999_999_999))
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let l = CircuitBreakerLayer::builder()
        .honor_retry_after(true)
        .classify(Hint)
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let h = l.handle();
    let svc = l.layer(service_fn(|_: ()| async { Err::<(), _>("busy") }));
    svc.oneshot(()).await.unwrap_err();
    assert_eq!(h.state(), CircuitState::Open);
    assert_eq!(h.metrics().open_remaining, Some(Duration::from_secs(3600)));
    let clamped = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, CircuitEvent::RetryAfterClamped { used, .. } if *used == Duration::from_secs(3600)))
        .count();
    assert_eq!(clamped, 1);
    advance(Duration::from_secs(3600)).await;
    assert_eq!(h.state(), CircuitState::HalfOpen);
}
