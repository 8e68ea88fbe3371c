//! The adaptive limit through its public API: rejections, waiting, slots
//! given back on every path, configuration at its extremes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::advance;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::adaptive::{
    AdaptiveEvent, AdaptiveLimitLayer, Aimd, Gradient, LimitReached, Vegas,
};
use tower_bulwark::classify::{classify_fn, Outcome};
use tower_bulwark::error::{rejection, BoxError};

type Gate = Arc<Mutex<Vec<oneshot::Receiver<()>>>>;

/// Calls that each wait for their own `oneshot` to fire (or to be dropped).
fn gated() -> (
    impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone,
    impl FnMut() -> oneshot::Sender<()>,
) {
    let gates: Gate = Arc::default();
    let g = gates.clone();
    let svc = service_fn(move |n: u32| {
        let rx = g.lock().unwrap().pop();
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(n)
        }
    });
    let open = move || {
        let (tx, rx) = oneshot::channel();
        gates.lock().unwrap().push(rx);
        tx
    };
    (svc, open)
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

fn fixed(limit: usize) -> tower_bulwark::adaptive::AdaptiveLimitBuilder {
    // AIMD that nothing in these tests moves: no failures, no slow calls,
    // and growth too small to reach the next whole call.
    AdaptiveLimitLayer::builder()
        .algorithm(Aimd::default().increase(1e-9))
        .min_limit(1)
        .initial_limit(limit)
        .max_limit(limit.max(1) * 2)
}

#[tokio::test(start_paused = true)]
async fn calls_above_the_limit_fail_fast_with_limit_reached() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let layer = fixed(2)
        .name("db")
        .on_event(move |e: &AdaptiveEvent| seen.lock().unwrap().push(format!("{e:?}")))
        .build()
        .unwrap();
    let handle = layer.handle();
    let (svc, mut open) = gated();
    let svc = layer.layer(svc);
    let (a, b) = (open(), open());
    let mut first = Box::pin(svc.clone().oneshot(1));
    let mut second = Box::pin(svc.clone().oneshot(2));
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    assert_eq!(handle.in_flight(), 2);

    let err = svc.clone().oneshot(3).await.unwrap_err();
    let full = err.downcast_ref::<LimitReached>().unwrap();
    assert_eq!(
        (full.name(), full.limit(), full.waited()),
        ("db", 2, Duration::ZERO)
    );
    assert_eq!(
        full.to_string(),
        "adaptive limit `db` reached (2 calls in flight)"
    );
    let r = rejection(err.as_ref()).unwrap();
    assert_eq!((r.layer(), r.name()), ("adaptive_limit", "db"));
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.contains("Rejected")));

    a.send(()).unwrap();
    b.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(second.await.unwrap(), 2);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(svc.oneshot(4).await.unwrap(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_gets_a_freed_slot_or_gives_up_after_max_wait() {
    let layer = fixed(1)
        .max_wait(Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = layer.handle();
    let (svc, mut open) = gated();
    let svc = layer.layer(svc);
    let gate = open();
    let mut first = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(first.as_mut()).is_pending());

    // Waits, then gets the slot the first call gives back.
    let mut second = Box::pin(svc.clone().oneshot(2));
    assert!(poll_once(second.as_mut()).is_pending());
    advance(Duration::from_millis(50)).await;
    gate.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(second.await.unwrap(), 2);

    // Nothing frees up: gives up after max_wait.
    let _gate = open();
    let mut holder = Box::pin(svc.clone().oneshot(3));
    assert!(poll_once(holder.as_mut()).is_pending());
    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(4).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(
        err.downcast_ref::<LimitReached>().unwrap().waited(),
        Duration::from_millis(100)
    );
    drop(holder);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_call_at_every_await_point_gives_its_slot_back() {
    let layer = fixed(1).max_wait(Duration::from_secs(1)).build().unwrap();
    let handle = layer.handle();
    let (svc, mut open) = gated();
    let mut svc = layer.layer(svc);

    // Dropped before its first poll.
    let _g = open();
    let fut = svc.ready().await.unwrap().call(1);
    assert_eq!(handle.in_flight(), 1);
    drop(fut);
    assert_eq!(handle.in_flight(), 0);

    // Dropped while the inner call is pending.
    let _g = open();
    let mut fut = Box::pin(svc.ready().await.unwrap().call(2));
    assert!(poll_once(fut.as_mut()).is_pending());
    drop(fut);
    assert_eq!(handle.in_flight(), 0);

    // Dropped while waiting for a slot, and just after being woken with
    // one: neither leaks, and the next waiter still gets the slot.
    let gate = open();
    let mut holder = Box::pin(svc.ready().await.unwrap().call(3));
    assert!(poll_once(holder.as_mut()).is_pending());
    let mut waiter = Box::pin(svc.ready().await.unwrap().call(4));
    assert!(poll_once(waiter.as_mut()).is_pending());
    drop(waiter);
    let mut woken = Box::pin(svc.ready().await.unwrap().call(5));
    assert!(poll_once(woken.as_mut()).is_pending());
    let mut next = Box::pin(svc.ready().await.unwrap().call(6));
    assert!(poll_once(next.as_mut()).is_pending());
    gate.send(()).unwrap();
    assert_eq!(holder.await.unwrap(), 3);
    drop(woken); // notified, never polled again
    assert_eq!(next.await.unwrap(), 6);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_or_future_gives_the_slot_back() {
    let layer = fixed(1).build().unwrap();
    let handle = layer.handle();
    // Panics in its future.
    let svc = layer.layer(service_fn(|n: u32| async move {
        assert!(n != 0, "upstream panicked");
        Ok::<_, BoxError>(n)
    }));
    let caught =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(svc.clone().oneshot(0)))
            .await;
    assert!(caught.is_err());
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(svc.oneshot(1).await.unwrap(), 1);

    // Panics in `call` itself, after the slot was taken.
    #[derive(Clone)]
    struct Explodes;
    impl Service<u32> for Explodes {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: u32) -> Self::Future {
            panic!("call panicked")
        }
    }
    let mut svc = layer.layer(Explodes);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(svc.call(1))));
    assert!(caught.is_err());
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn failures_shrink_the_limit_and_ignored_or_cancelled_calls_do_not_move_it() {
    let layer = AdaptiveLimitLayer::builder()
        .algorithm(Aimd::default())
        .initial_limit(10)
        .classify(classify_fn(|r: &Result<u32, BoxError>| match r {
            Ok(0) => Outcome::Ignore,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|n: u32| async move {
        if n == 99 {
            Err::<u32, BoxError>("overloaded".into())
        } else {
            Ok(n)
        }
    }));
    // Ignored outcomes feed nothing.
    for _ in 0..50 {
        svc.clone().oneshot(0).await.unwrap();
    }
    assert_eq!(handle.limit(), 10);
    svc.clone().oneshot(99).await.unwrap_err();
    assert_eq!(handle.limit(), 9);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_forwarded_and_takes_no_slot() {
    let (mock, mut upstream) = tower_test::mock::pair::<u32, u32>();
    let layer = fixed(1).build().unwrap();
    let handle = layer.handle();
    let mut svc = tower_test::mock::Spawn::new(layer.layer(mock));
    upstream.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    upstream.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn extreme_but_valid_configs_work() {
    for layer in [
        AdaptiveLimitLayer::builder()
            .min_limit(1)
            .initial_limit(1)
            .max_limit(1)
            .build()
            .unwrap(),
        AdaptiveLimitLayer::builder()
            .max_limit(1 << 32)
            .initial_limit(1 << 32)
            .algorithm(Vegas::default().probe_interval(1))
            .build()
            .unwrap(),
        AdaptiveLimitLayer::builder()
            .algorithm(
                Gradient::default()
                    .window(1)
                    .long_window(1)
                    .smoothing(1.0)
                    .queue_size(0.0),
            )
            .max_wait(Duration::MAX)
            .build()
            .unwrap(),
    ] {
        let handle = layer.handle();
        let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
        for n in 0..100 {
            assert_eq!(svc.clone().oneshot(n).await.unwrap(), n);
        }
        assert!(handle.limit() >= 1);
        assert_eq!(handle.in_flight(), 0);
    }
}

#[test]
fn build_refuses_unsound_configs_naming_the_field() {
    let field = |b: tower_bulwark::adaptive::AdaptiveLimitBuilder| b.build().unwrap_err().field();
    let b = AdaptiveLimitLayer::builder;
    assert_eq!(field(b().min_limit(0).initial_limit(0)), "min_limit");
    assert_eq!(field(b().min_limit(10).max_limit(5)), "max_limit");
    assert_eq!(field(b().max_limit((1 << 32) + 1)), "max_limit");
    assert_eq!(field(b().initial_limit(5000)), "initial_limit");
    assert_eq!(field(b().min_limit(30)), "initial_limit");
    assert_eq!(
        field(b().algorithm(Aimd::default().backoff_ratio(1.0))),
        "backoff_ratio"
    );
    assert_eq!(
        field(b().algorithm(Aimd::default().backoff_ratio(f64::NAN))),
        "backoff_ratio"
    );
    assert_eq!(
        field(b().algorithm(Aimd::default().increase(0.0))),
        "increase"
    );
    assert_eq!(
        field(b().algorithm(Aimd::default().increase(f64::INFINITY))),
        "increase"
    );
    assert_eq!(
        field(b().algorithm(Aimd::default().latency_threshold(Duration::ZERO))),
        "latency_threshold"
    );
    assert_eq!(
        field(b().algorithm(Gradient::default().tolerance(0.5))),
        "tolerance"
    );
    assert_eq!(
        field(b().algorithm(Gradient::default().smoothing(0.0))),
        "smoothing"
    );
    assert_eq!(
        field(b().algorithm(Gradient::default().window(0))),
        "window"
    );
    assert_eq!(
        field(b().algorithm(Gradient::default().long_window(5))),
        "long_window"
    );
    assert_eq!(
        field(b().algorithm(Gradient::default().queue_size(-1.0))),
        "queue_size"
    );
    assert_eq!(
        field(b().algorithm(Vegas::default().alpha(f64::NAN))),
        "alpha"
    );
    assert_eq!(field(b().algorithm(Vegas::default().beta(2.0))), "beta");
    assert_eq!(
        field(b().algorithm(Vegas::default().probe_interval(0))),
        "probe_interval"
    );
    let err = b().min_limit(0).build().unwrap_err();
    assert_eq!(err.layer(), "adaptive_limit");
}

#[test]
fn public_types_are_send_sync_and_debug() {
    fn send_sync<T: Send + Sync + std::fmt::Debug>() {}
    send_sync::<AdaptiveLimitLayer>();
    send_sync::<LimitReached>();
    send_sync::<tower_bulwark::adaptive::AdaptiveHandle>();
    let layer = AdaptiveLimitLayer::builder().build().unwrap();
    assert!(format!("{:?}", layer.handle()).contains("limit: 20"));
}

mod histories {
    //! Random histories of calls started, finished, dropped at any point,
    //! and time passing: the slots held always equal the inner calls
    //! running, and every slot comes back.

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[derive(Debug, Clone)]
    enum Op {
        Start,
        Finish(usize),
        Fail(usize),
        Drop(usize),
        PollAll,
        Advance(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => Just(Op::Start),
                2 => any::<usize>().prop_map(Op::Finish),
                1 => any::<usize>().prop_map(Op::Fail),
                2 => any::<usize>().prop_map(Op::Drop),
                1 => Just(Op::PollAll),
                1 => (0u64..200).prop_map(Op::Advance),
            ],
            0..120,
        )
    }

    struct Live(Arc<AtomicUsize>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }

    type Gates = Arc<Mutex<HashMap<u32, oneshot::Receiver<bool>>>>;

    fn check(history: Vec<Op>, max_wait: Duration, limit: usize) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let live = Arc::new(AtomicUsize::new(0));
            let gates: Gates = Arc::default();
            let (l, g) = (live.clone(), gates.clone());
            let layer = AdaptiveLimitLayer::builder()
                .algorithm(Aimd::default().latency_threshold(Duration::from_millis(50)))
                .initial_limit(limit)
                .max_limit(limit * 2)
                .max_wait(max_wait)
                .build()
                .unwrap();
            let handle = layer.handle();
            let mut svc = layer.layer(service_fn(move |n: u32| {
                l.fetch_add(1, SeqCst);
                let guard = Live(l.clone());
                let gate = g.lock().unwrap().remove(&n);
                async move {
                    let _guard = guard;
                    let ok = match gate {
                        Some(rx) => rx.await.unwrap_or(true),
                        None => true,
                    };
                    if ok {
                        Ok::<_, BoxError>(n)
                    } else {
                        Err("failed".into())
                    }
                }
            }));
            type Call = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;
            let mut calls: Vec<(Call, oneshot::Sender<bool>)> = Vec::new();
            let mut next = 0u32;
            for op in history {
                match op {
                    Op::Start => {
                        let (tx, rx) = oneshot::channel();
                        gates.lock().unwrap().insert(next, rx);
                        let mut call: Call = Box::pin(svc.ready().await.unwrap().call(next));
                        next += 1;
                        if poll_once(call.as_mut()).is_pending() {
                            calls.push((call, tx));
                        }
                    }
                    Op::Finish(i) | Op::Fail(i) if !calls.is_empty() => {
                        let (mut call, tx) = calls.swap_remove(i % calls.len());
                        let _ = tx.send(matches!(op, Op::Finish(_)));
                        match poll_once(call.as_mut()) {
                            Poll::Ready(_) => {}
                            // Still waiting for a slot: its gate stays open.
                            Poll::Pending => {
                                let (tx, _) = oneshot::channel();
                                calls.push((call, tx));
                            }
                        }
                    }
                    Op::Drop(i) if !calls.is_empty() => {
                        drop(calls.swap_remove(i % calls.len()));
                    }
                    Op::PollAll => {
                        calls.retain_mut(|(call, _)| poll_once(call.as_mut()).is_pending());
                    }
                    Op::Advance(ms) => {
                        advance(Duration::from_millis(ms)).await;
                        calls.retain_mut(|(call, _)| poll_once(call.as_mut()).is_pending());
                    }
                    _ => {}
                }
                prop_assert_eq!(handle.in_flight(), live.load(SeqCst));
                prop_assert!(handle.in_flight() <= limit * 2);
                prop_assert!(handle.limit() >= 1 && handle.limit() <= limit * 2);
            }
            drop(calls);
            prop_assert_eq!(handle.in_flight(), 0);
            prop_assert_eq!(live.load(SeqCst), 0);
            // Every slot came back: the limit's worth of calls is admitted.
            let mut held = Vec::new();
            for n in 0..handle.limit() as u32 {
                let (_tx, rx) = oneshot::channel::<bool>();
                gates.lock().unwrap().insert(1_000_000 + n, rx);
                let mut call: Call = Box::pin(svc.ready().await.unwrap().call(1_000_000 + n));
                prop_assert!(poll_once(call.as_mut()).is_pending());
                held.push((call, _tx));
            }
            prop_assert_eq!(handle.in_flight(), handle.limit());
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn slots_match_running_calls_and_all_come_back_failing_fast(history in ops(), limit in 1usize..6) {
            check(history, Duration::ZERO, limit)?;
        }

        #[test]
        fn slots_match_running_calls_and_all_come_back_waiting(history in ops(), limit in 1usize..6) {
            check(history, Duration::from_millis(100), limit)?;
        }
    }
}
