//! The bulkhead through its public API.
#![cfg(feature = "bulkhead")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::time::{advance, pause};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadEvent, BulkheadFull, BulkheadLayer};

/// A service whose calls hold until the test lets them go, one permit of
/// `gate` per call; a request of 0 panics.
fn gated(
    gate: Arc<Semaphore>,
) -> impl Service<u32, Response = u32, Error = BoxError, Future = impl Send> + Clone {
    service_fn(move |n: u32| {
        let gate = gate.clone();
        async move {
            if n == 0 {
                panic!("inner service panicked");
            }
            gate.acquire().await.unwrap().forget();
            Ok::<_, BoxError>(n)
        }
    })
}

fn full(r: Result<u32, BoxError>) -> BulkheadFull {
    r.unwrap_err()
        .downcast_ref::<BulkheadFull>()
        .expect("a BulkheadFull")
        .clone()
}

#[tokio::test]
async fn fails_fast_when_full_and_frees_on_completion() {
    let gate = Arc::new(Semaphore::new(0));
    let layer = BulkheadLayer::builder()
        .name("db")
        .max_concurrent(2)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(gated(gate.clone()));
    let a = tokio::spawn(svc.ready().await.unwrap().call(1));
    let b = tokio::spawn(svc.ready().await.unwrap().call(2));
    assert_eq!((h.in_flight(), h.available()), (2, 0));
    let e = full(svc.ready().await.unwrap().call(3).await);
    assert_eq!(
        (e.name(), e.capacity(), e.waited()),
        ("db", 2, Duration::ZERO)
    );
    assert_eq!(e.to_string(), "bulkhead `db` is full (2 calls in flight)");
    assert!(tower_bulwark::error::is_rejection(&e));
    gate.add_permits(2);
    assert_eq!(a.await.unwrap().unwrap(), 1);
    assert_eq!(b.await.unwrap().unwrap(), 2);
    assert_eq!(h.in_flight(), 0);
}

#[tokio::test]
async fn poll_ready_takes_no_slot() {
    let layer = BulkheadLayer::builder().max_concurrent(1).build().unwrap();
    let h = layer.handle();
    let mut idle: Vec<_> = (0..10)
        .map(|_| layer.layer(gated(Arc::new(Semaphore::new(1)))))
        .collect();
    for s in &mut idle {
        s.ready().await.unwrap();
    }
    assert_eq!(h.in_flight(), 0);
    assert_eq!(idle[3].call(7).await.unwrap(), 7);
}

#[tokio::test]
async fn slot_freed_on_drop_and_on_panic() {
    let gate = Arc::new(Semaphore::new(0));
    let layer = BulkheadLayer::builder().max_concurrent(1).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(gated(gate.clone()));
    // Dropped before polling, and after a poll.
    let f = svc.ready().await.unwrap().call(1);
    assert_eq!(h.in_flight(), 1);
    drop(f);
    assert_eq!(h.in_flight(), 0);
    let mut f = Box::pin(svc.ready().await.unwrap().call(1));
    assert!((&mut f).now_or_never().is_none());
    drop(f);
    assert_eq!(h.in_flight(), 0);
    // A panicking inner future.
    let j = tokio::spawn(svc.ready().await.unwrap().call(0));
    assert!(j.await.unwrap_err().is_panic());
    assert_eq!(h.in_flight(), 0);
}

#[tokio::test]
async fn one_set_of_slots_per_layer() {
    let gate = Arc::new(Semaphore::new(0));
    let layer = BulkheadLayer::builder().max_concurrent(1).build().unwrap();
    let mut a = layer.layer(gated(gate.clone()));
    let mut b = layer.clone().layer(gated(gate.clone()));
    let _held = a.ready().await.unwrap().call(1);
    assert!(b.ready().await.unwrap().call(2).await.is_err());
    let mut c = a.clone();
    assert!(c.ready().await.unwrap().call(2).await.is_err());
}

#[tokio::test]
async fn waits_fifo_up_to_max_wait() {
    pause();
    let gate = Arc::new(Semaphore::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let g = gate.clone();
    let inner = service_fn(move |n: u32| {
        o.lock().unwrap().push(n);
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok::<_, BoxError>(n)
        }
    });
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(inner);
    let first = tokio::spawn(svc.ready().await.unwrap().call(1));
    let mut waiters = Vec::new();
    for n in 2..=4 {
        waiters.push(tokio::spawn(svc.ready().await.unwrap().call(n)));
        tokio::task::yield_now().await;
    }
    tokio::task::yield_now().await;
    assert_eq!(*order.lock().unwrap(), vec![1]);
    assert_eq!(h.in_flight(), 1);
    gate.add_permits(4);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    for w in waiters.drain(..2) {
        w.await.unwrap().unwrap();
    }
    // Served in arrival order.
    assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 4]);
    waiters.pop().unwrap().await.unwrap().unwrap();

    // Nobody lets go: a waiter gives up after max_wait.
    let _hold = tokio::spawn(svc.ready().await.unwrap().call(5));
    tokio::task::yield_now().await;
    let w = tokio::spawn(svc.ready().await.unwrap().call(6));
    advance(Duration::from_secs(5)).await;
    let e = full(w.await.unwrap());
    assert!(e.waited() >= Duration::from_secs(5));
}

#[tokio::test]
async fn dropped_waiters_leave_nothing_behind() {
    pause();
    let gate = Arc::new(Semaphore::new(0));
    let layer = BulkheadLayer::builder()
        .max_concurrent(2)
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(gated(gate.clone()));
    let a = svc.ready().await.unwrap().call(1);
    let b = svc.ready().await.unwrap().call(2);
    // Waiters dropped unpolled, polled once, and after some waiting.
    let w1 = svc.ready().await.unwrap().call(3);
    let mut w2 = Box::pin(svc.ready().await.unwrap().call(4));
    assert!((&mut w2).now_or_never().is_none());
    let mut w3 = Box::pin(svc.ready().await.unwrap().call(5));
    assert!((&mut w3).now_or_never().is_none());
    advance(Duration::from_secs(1)).await;
    assert!((&mut w3).now_or_never().is_none());
    drop((w1, w2, w3));
    // A slot handed to a waiter that is then dropped comes back too.
    let mut w4 = Box::pin(svc.ready().await.unwrap().call(6));
    assert!((&mut w4).now_or_never().is_none());
    drop(a);
    drop(w4);
    drop(b);
    assert_eq!(h.in_flight(), 0);
    gate.add_permits(2);
    let x = svc.ready().await.unwrap().call(7);
    let y = svc.ready().await.unwrap().call(8);
    assert_eq!((x.await.unwrap(), y.await.unwrap()), (7, 8));
    assert_eq!(h.available(), 2);
}

#[tokio::test]
async fn soft_limit_warns_once_per_climb() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = BulkheadLayer::builder()
        .name("q")
        .max_concurrent(3)
        .soft_limit(2)
        .on_event(move |e| ev.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let mut svc = layer.layer(gated(Arc::new(Semaphore::new(0))));
    let a = svc.ready().await.unwrap().call(1);
    assert!(events.lock().unwrap().is_empty());
    let b = svc.ready().await.unwrap().call(1);
    let c = svc.ready().await.unwrap().call(1);
    let soft = |ev: &Vec<BulkheadEvent>| {
        ev.iter()
            .filter(|e| {
                matches!(
                    e,
                    BulkheadEvent::SoftLimitReached {
                        in_flight: 2,
                        capacity: 3,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(soft(&events.lock().unwrap()), 1);
    drop((b, c));
    let _b = svc.ready().await.unwrap().call(1);
    assert_eq!(soft(&events.lock().unwrap()), 2);
    drop(a);
}

#[test]
fn config_is_validated() {
    let e = BulkheadLayer::builder()
        .max_concurrent(0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_concurrent");
    let e = BulkheadLayer::builder()
        .max_concurrent(4)
        .soft_limit(4)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "soft_limit");
    let e = BulkheadLayer::builder().soft_limit(0).build().unwrap_err();
    assert_eq!(e.field(), "soft_limit");
}

#[test]
fn public_types_are_send_sync() {
    fn ok<T: Send + Sync>() {}
    ok::<BulkheadLayer>();
    ok::<BulkheadFull>();
    ok::<tower_bulwark::bulkhead::BulkheadHandle>();
}

/// A listener that panics on the soft-limit event propagates to the call
/// that crossed it and leaks nothing: the slot was already in its guard.
#[tokio::test]
async fn a_panicking_soft_limit_listener_leaks_no_slot() {
    for max_wait in [Duration::ZERO, Duration::from_secs(1)] {
        let layer = BulkheadLayer::builder()
            .max_concurrent(10)
            .soft_limit(8)
            .max_wait(max_wait)
            .on_event(|e| {
                if matches!(e, BulkheadEvent::SoftLimitReached { .. }) {
                    panic!("listener panicked");
                }
            })
            .build()
            .unwrap();
        let h = layer.handle();
        let gate = Arc::new(Semaphore::new(0));
        let mut svc = layer.layer(gated(gate.clone()));
        for _burst in 0..8 {
            let mut held = Vec::new();
            for n in 1..=7 {
                held.push(svc.ready().await.unwrap().call(n));
            }
            // The eighth crosses the soft limit: the listener's panic is
            // contained and the call holds its slot like any other.
            svc.ready().await.unwrap();
            let mut crossed = tokio_test::task::spawn(svc.call(8));
            assert!(crossed.poll().is_pending(), "waits on the gate");
            assert_eq!(h.in_flight(), 8, "max_wait {max_wait:?}");
            drop(crossed);
            assert_eq!(h.in_flight(), 7, "max_wait {max_wait:?}");
            drop(held);
            assert_eq!(h.in_flight(), 0, "max_wait {max_wait:?}");
        }
        // All ten slots are there for the taking.
        let held: Vec<_> = (1..=7).map(|n| svc.call(n)).collect();
        drop(held);
        assert_eq!(h.available(), 10);
    }
}

/// A full bulkhead that may wait "forever" waits, and does not panic.
#[tokio::test]
async fn max_wait_of_duration_max_waits_without_panicking() {
    pause();
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let h = layer.handle();
    let gate = Arc::new(Semaphore::new(0));
    let mut svc = layer.layer(gated(gate.clone()));
    let first = tokio::spawn(svc.ready().await.unwrap().call(1));
    tokio::task::yield_now().await;
    let mut second = tokio_test::task::spawn(svc.ready().await.unwrap().call(2));
    assert!(second.poll().is_pending());
    advance(Duration::from_secs(86_400 * 365)).await;
    assert!(second.poll().is_pending());
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap(), 2);
    assert_eq!(h.in_flight(), 0);
}
