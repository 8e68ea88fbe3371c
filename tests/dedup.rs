//! Dedup layer, through the public API, with paused time.
#![cfg(feature = "dedup")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::watch;
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::dedup::{DedupEvent, DedupLayer, Panicked, SharedError};

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// An upstream that counts calls and answers `key * 10` after `delay`.
fn slow(
    calls: &Arc<AtomicUsize>,
    delay: Duration,
) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let calls = calls.clone();
    service_fn(move |k: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>(k * 10)
        }
    })
}

fn by_value() -> DedupLayer<impl tower_bulwark::dedup::DedupKey<u32, Key = u32>> {
    DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_identical_calls_make_one() {
    let calls = counter();
    let layer = by_value();
    let handle = layer.handle();
    let svc = layer.layer(slow(&calls, Duration::from_secs(1)));
    let answers = join_all((0..1000).map(|_| svc.clone().oneshot(7))).await;
    assert!(answers.iter().all(|a| *a.as_ref().unwrap() == 70));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.cached(), 0, "no cache unless asked");
}

#[tokio::test(start_paused = true)]
async fn distinct_keys_do_not_coalesce() {
    let calls = counter();
    let svc = by_value().layer(slow(&calls, Duration::from_secs(1)));
    let answers = join_all((0..10).map(|k| svc.clone().oneshot(k))).await;
    for (k, a) in answers.into_iter().enumerate() {
        assert_eq!(a.unwrap(), k as u32 * 10);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn keyless_requests_go_straight_through() {
    let calls = counter();
    let svc = DedupLayer::builder()
        .key(|k: &u32| (*k != 0).then_some(*k))
        .build()
        .unwrap()
        .layer(slow(&calls, Duration::from_secs(1)));
    join_all((0..5).map(|_| svc.clone().oneshot(0))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

/// An upstream whose answer needs `steps` polls and then waits for `go`.
/// Counts calls, and counts inner futures dropped before they finished.
#[derive(Clone)]
struct Gated {
    calls: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    go: watch::Receiver<bool>,
}

struct Cancel(Arc<AtomicUsize>, bool);
impl Drop for Cancel {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Gated {
    fn new() -> (Self, watch::Sender<bool>) {
        let (tx, go) = watch::channel(false);
        let g = Self {
            calls: counter(),
            cancelled: counter(),
            go,
        };
        (g, tx)
    }
}

impl Service<u32> for Gated {
    type Response = u32;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<u32, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut go = self.go.clone();
        let guard = Cancel(self.cancelled.clone(), false);
        Box::pin(async move {
            let mut guard = guard;
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            go.wait_for(|v| *v).await.unwrap();
            guard.1 = true;
            Ok(k + 1)
        })
    }
}

/// The response future of one call, made at once (not on first poll).
async fn called<S: Service<u32> + Clone>(svc: &S, k: u32) -> S::Future
where
    S::Error: std::fmt::Debug,
{
    let mut svc = svc.clone();
    svc.ready().await.unwrap();
    svc.call(k)
}

#[tokio::test(start_paused = true)]
async fn first_caller_dropped_at_every_point_others_still_answered() {
    for polls in 0..6 {
        let (gated, go) = Gated::new();
        let svc = by_value().layer(gated.clone());
        let mut first = tokio_test::task::spawn(called(&svc, 1).await);
        let mut second = tokio_test::task::spawn(called(&svc, 1).await);
        let mut third = tokio_test::task::spawn(called(&svc, 1).await);
        for _ in 0..polls {
            assert_pending!(first.poll());
        }
        assert_pending!(second.poll());
        drop(first);
        assert_pending!(third.poll());
        go.send(true).unwrap();
        // Whoever is polled now drives the shared call to its end.
        let a = poll_to_end(&mut second).await;
        assert_eq!(a.unwrap(), 2);
        assert!(third.is_woken());
        assert_eq!(assert_ready!(third.poll()).unwrap(), 2);
        assert_eq!(gated.calls.load(Ordering::SeqCst), 1, "after {polls} polls");
        assert_eq!(gated.cancelled.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn all_callers_gone_cancels_the_call() {
    for polls in 0..5 {
        let (gated, go) = Gated::new();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let layer = DedupLayer::builder()
            .key(|k: &u32| Some(*k))
            .on_event(move |e: &DedupEvent| ev.lock().unwrap().push(e.clone()))
            .build()
            .unwrap();
        let handle = layer.handle();
        let svc = layer.layer(gated.clone());
        let mut a = tokio_test::task::spawn(called(&svc, 1).await);
        let mut b = tokio_test::task::spawn(called(&svc, 1).await);
        for _ in 0..polls {
            assert_pending!(a.poll());
            assert_pending!(b.poll());
        }
        assert_eq!(handle.in_flight(), 1);
        drop(a);
        assert_eq!(gated.cancelled.load(Ordering::SeqCst), 0);
        drop(b);
        assert_eq!(
            gated.cancelled.load(Ordering::SeqCst),
            1,
            "after {polls} polls"
        );
        assert_eq!(handle.in_flight(), 0);
        assert!(matches!(
            events.lock().unwrap().last(),
            Some(DedupEvent::Cancelled { .. })
        ));

        // The key is free again: a new call starts a new inner call.
        go.send(true).unwrap();
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2);
        assert_eq!(gated.calls.load(Ordering::SeqCst), 2);
    }
}

/// The `Panicked` error inside a dedup error.
fn panicked(err: &BoxError) -> &Panicked {
    err.downcast_ref::<SharedError>()
        .expect("SharedError")
        .get_ref()
        .downcast_ref::<Panicked>()
        .expect("Panicked")
}

/// The message of a caught panic.
fn message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(|s| s.as_str()))
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_panic_reaches_the_waiter_that_polled_and_the_others_get_an_error() {
    let calls = counter();
    let c = calls.clone();
    let layer = by_value();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(move |k: u32| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if n == 0 {
                panic!("upstream bug");
            }
            Ok::<_, BoxError>(k)
        }
    }));
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(3)))
        .collect();
    let mut panics = 0;
    for t in join_all(tasks).await {
        match t {
            Err(join) => {
                assert_eq!(message(&*join.into_panic()), "upstream bug");
                panics += 1;
            }
            Ok(a) => {
                let err = a.unwrap_err();
                assert_eq!(panicked(&err).message(), Some("upstream bug"));
            }
        }
    }
    assert_eq!(panics, 1, "only the waiter that polled the panic sees it");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight(), 0);
    // The table is not wedged.
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn answers_are_cached_for_the_ttl() {
    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .cache_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(slow(&calls, Duration::from_millis(10)));
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 10);
    tokio::time::advance(Duration::from_millis(900)).await;
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 10);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.cached(), 1);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 10);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "expired");
    handle.clear_cache();
    assert_eq!(handle.cached(), 0);
}

#[derive(Debug)]
struct NotClone(&'static str);
impl std::fmt::Display for NotClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for NotClone {}

fn failing(
    calls: &Arc<AtomicUsize>,
) -> impl Service<u32, Response = u32, Error = NotClone, Future: Send> + Clone + Send + 'static {
    let calls = calls.clone();
    service_fn(move |_: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err::<u32, _>(NotClone("nope"))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn errors_are_shared_but_not_cached_unless_asked() {
    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .cache_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = layer.layer(failing(&calls));
    let answers = join_all((0..3).map(|_| svc.clone().oneshot(1))).await;
    for a in answers {
        let err = a.unwrap_err();
        assert_eq!(err.to_string(), "nope");
        let shared = err.downcast_ref::<SharedError>().unwrap();
        assert!(shared.get_ref().is::<NotClone>());
        let source = std::error::Error::source(shared).unwrap();
        assert!(source.is::<NotClone>());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "errors are not cached");

    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .error_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = layer.layer(failing(&calls));
    svc.clone().oneshot(1).await.unwrap_err();
    svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "negative caching");
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn memory_is_bounded() {
    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .max_entries(2)
        .cache_ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(slow(&calls, Duration::from_millis(10)));
    for k in 0..5 {
        svc.clone().oneshot(k).await.unwrap();
    }
    assert_eq!(handle.cached(), 2, "oldest answers evicted");

    // Full of calls in flight: a new key goes straight through.
    let (gated, go) = Gated::new();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .max_entries(1)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(gated.clone());
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(1));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(2));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    assert_eq!(handle.in_flight(), 1);
    assert_eq!(gated.calls.load(Ordering::SeqCst), 2);
    go.send(true).unwrap();
    drop((a, b));
}

#[test]
fn build_validates() {
    let err = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .max_entries(0)
        .build()
        .unwrap_err();
    assert_eq!((err.layer(), err.field()), ("dedup", "max_entries"));
    let err = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .cache_ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "cache_ttl");
}

#[test]
fn send_sync() {
    fn is_send_sync<T: Send + Sync>(_: &T) {}
    fn is_send<T: Send>(_: &T) {}
    let layer = by_value();
    is_send_sync(&layer);
    is_send_sync(&layer.handle());
    let mut svc = layer.layer(slow(&counter(), Duration::ZERO));
    is_send_sync(&svc);
    is_send(&svc.call(1));
}

/// Callers that join before the leader's first poll are answered by the
/// first poll, also when it panics at once (that poll then panics).
#[tokio::test(start_paused = true)]
async fn followers_of_an_immediate_answer_or_panic() {
    let calls = counter();
    let c = calls.clone();
    let svc = by_value().layer(service_fn(move |k: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if k == 0 {
                panic!("at once");
            }
            Ok::<_, BoxError>(k)
        }
    }));
    for k in [0, 5] {
        let mut futs = Vec::new();
        for _ in 0..4 {
            futs.push(tokio_test::task::spawn(called(&svc, k).await));
        }
        for (i, f) in futs.iter_mut().enumerate() {
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.poll()));
            match polled {
                Err(panic) => {
                    assert_eq!((k, i), (0, 0), "only the first poll panics");
                    assert_eq!(message(&*panic), "at once");
                }
                Ok(polled) => match assert_ready!(polled) {
                    Ok(v) => assert_eq!((k, v), (5, 5)),
                    Err(e) => assert_eq!(panicked(&e).message(), Some("at once")),
                },
            }
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The leader's call is pending on its first poll and the leader goes
/// away: the callers that joined before and after carry the same call on.
#[tokio::test(start_paused = true)]
async fn leader_pending_then_dropped_hands_the_call_over() {
    let (gated, go) = Gated::new();
    let svc = by_value().layer(gated.clone());
    // The first call leads; `early` joins before the leader's first poll.
    let mut leader = tokio_test::task::spawn(called(&svc, 1).await);
    let mut early = tokio_test::task::spawn(called(&svc, 1).await);
    assert_pending!(early.poll());
    assert_pending!(leader.poll());
    let mut late = tokio_test::task::spawn(called(&svc, 1).await);
    assert_pending!(late.poll());
    drop(leader);
    go.send(true).unwrap();
    let a = poll_to_end(&mut early).await;
    assert_eq!(a.unwrap(), 2);
    assert_eq!(assert_ready!(late.poll()).unwrap(), 2);
    assert_eq!(gated.calls.load(Ordering::SeqCst), 1);
    assert_eq!(gated.cancelled.load(Ordering::SeqCst), 0);
}

/// An upstream whose `call` panics for key 0 (as tower's `Buffer` and
/// `ConcurrencyLimit` do when misused) and answers `k` at once otherwise.
fn panics_in_call(
    calls: &Arc<AtomicUsize>,
) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let calls = calls.clone();
    service_fn(move |k: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        assert!(k != 0, "call misused");
        async move { Ok::<_, BoxError>(k) }
    })
}

fn call_now<S: Service<u32>>(svc: &mut S, k: u32) -> S::Future {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    svc.call(k)
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_call_reaches_the_caller_and_leaves_no_entry() {
    for cache in [false, true] {
        let calls = counter();
        let mut b = DedupLayer::builder().key(|k: &u32| Some(*k % 2));
        if cache {
            b = b.cache_ttl(Duration::from_millis(10));
        }
        let layer = b.build().unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(panics_in_call(&calls));
        if cache {
            // An expired answer for the key: the panicking call replaces it.
            assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(call_now(&mut svc, 0));
        }))
        .unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"call misused"));
        assert_eq!(handle.in_flight(), 0);
        // The key is not wedged: the next call with it leads a new call.
        let next = tokio::time::timeout(Duration::from_secs(60), svc.clone().oneshot(4));
        assert_eq!(next.await.expect("not wedged").unwrap(), 4);
        assert_eq!(handle.in_flight(), 0);
    }
}

/// Listeners that panic on one kind of event, while `armed`.
fn panicking_on(
    kind: &'static str,
    armed: &Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn(&DedupEvent) + Send + Sync + 'static {
    let armed = armed.clone();
    move |e: &DedupEvent| {
        let hit = match e {
            DedupEvent::Leader { .. } => kind == "leader",
            DedupEvent::Joined { .. } => kind == "joined",
            DedupEvent::Cancelled { .. } => true,
            _ => false,
        };
        if hit && armed.load(Ordering::SeqCst) {
            panic!("listener bug");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_panics_on_leader_does_not_wedge_the_key() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (gated, go) = Gated::new();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .on_event(panicking_on("leader", &armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(gated.clone());
    // The listener panics on the leader's event: the panic is contained
    // (see `observe`), and the call goes on as if nothing happened.
    let mut leader = tokio_test::task::spawn(call_now(&mut svc, 1));
    assert_pending!(leader.poll());
    assert_eq!(handle.in_flight(), 1);
    armed.store(false, Ordering::SeqCst);
    go.send(true).unwrap();
    let a = poll_to_end(&mut leader).await;
    assert_eq!(a.unwrap(), 2);
    assert_eq!(handle.in_flight(), 0);
    // And the key is not wedged.
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_panics_on_joined_leaves_the_call_to_the_others() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (gated, go) = Gated::new();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .on_event(panicking_on("joined", &armed))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(gated.clone());
    let mut leader = tokio_test::task::spawn(call_now(&mut svc, 1));
    assert_pending!(leader.poll());
    armed.store(true, Ordering::SeqCst);
    // The follower's listener panics (contained); the follower is dropped.
    drop(call_now(&mut svc, 1));
    armed.store(false, Ordering::SeqCst);
    assert_eq!(handle.in_flight(), 1, "the leader's call goes on");
    go.send(true).unwrap();
    let a = poll_to_end(&mut leader).await;
    assert_eq!(a.unwrap(), 2);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(gated.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_key_closure_reaches_the_caller_only() {
    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| {
            assert!(*k != 9, "bad key");
            Some(*k)
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(slow(&calls, Duration::from_millis(1)));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(call_now(&mut svc, 9));
    }))
    .unwrap_err();
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 30);
}

/// One layer around two upstreams: the same key never gets the other
/// upstream's answer, in flight or cached.
#[tokio::test(start_paused = true)]
async fn one_layer_around_two_services_keeps_them_apart() {
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .cache_ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let upstream = |tag: u32| {
        service_fn(move |k: u32| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(tag + k)
        })
    };
    let a = layer.layer(upstream(100));
    let b = layer.layer(upstream(200));
    let both = join_all([
        a.clone().oneshot(1),
        b.clone().oneshot(1),
        a.clone().oneshot(1),
        b.clone().oneshot(1),
    ])
    .await;
    let both: Vec<u32> = both.into_iter().map(Result::unwrap).collect();
    assert_eq!(both, [101, 201, 101, 201]);
    // Cached answers stay apart too.
    assert_eq!(b.clone().oneshot(1).await.unwrap(), 201);
    assert_eq!(a.clone().oneshot(1).await.unwrap(), 101);
    // The layer's handle sees both services; each service's its own.
    assert_eq!(layer.handle().cached(), 2);
    assert_eq!(a.handle().cached(), 1);
    a.handle().clear_cache();
    assert_eq!((a.handle().cached(), b.handle().cached()), (0, 1));
    drop(b);
    assert_eq!(
        layer.handle().cached(),
        0,
        "a dropped service's table is gone"
    );
}

/// The cache's eviction order, against a model: when the table is full, a
/// new key evicts the answer that expires first (an expired one if any),
/// ties going to the answer cached first, successes before errors; every
/// answer cached drops the ones that have expired; a hit is served only
/// before its answer expires.
mod eviction {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// A call with this key; the upstream answers `Ok` when `true`.
        Call(u32, bool),
        Advance(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u32..12, any::<bool>()).prop_map(|(k, ok)| Op::Call(k, ok)),
            2 => (0u64..40).prop_map(Op::Advance),
            1 => Just(Op::Clear),
        ]
    }

    #[derive(Debug)]
    struct Cached {
        ok: bool,
        until: u64,
        seq: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn follows_the_model(
            max in 1usize..6,
            ok_ttl in prop::option::of(1u64..50),
            err_ttl in prop::option::of(1u64..50),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut b = DedupLayer::builder().key(|r: &(u32, bool)| Some(r.0)).max_entries(max);
                if let Some(t) = ok_ttl {
                    b = b.cache_ttl(Duration::from_millis(t));
                }
                if let Some(t) = err_ttl {
                    b = b.error_ttl(Duration::from_millis(t));
                }
                let layer = b.build().unwrap();
                let handle = layer.handle();
                let calls = counter();
                let c = calls.clone();
                let svc = layer.layer(service_fn(move |(k, ok): (u32, bool)| {
                    c.fetch_add(1, Ordering::SeqCst);
                    async move { if ok { Ok::<_, BoxError>(k) } else { Err(BoxError::from("no")) } }
                }));
                let mut model: HashMap<u32, Cached> = HashMap::new();
                let (mut now, mut seq, mut upstream) = (0u64, 0u64, 0usize);
                for op in ops {
                    match op {
                        Op::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(ms)).await;
                            now += ms;
                        }
                        Op::Clear => {
                            handle.clear_cache();
                            model.clear();
                        }
                        Op::Call(k, ok) => {
                            let got = svc.clone().oneshot((k, ok)).await;
                            let expect_ok = match model.get(&k) {
                                Some(c) if now < c.until => c.ok,
                                present => {
                                    let present = present.is_some();
                                    if !present && model.len() >= max {
                                        let victim = model
                                            .iter()
                                            .min_by_key(|(_, c)| (c.until, !c.ok, c.seq))
                                            .map(|(k, _)| *k)
                                            .unwrap();
                                        model.remove(&victim);
                                    }
                                    upstream += 1;
                                    model.remove(&k);
                                    if let Some(ttl) = if ok { ok_ttl } else { err_ttl } {
                                        model.retain(|_, c| c.until > now);
                                        seq += 1;
                                        model.insert(k, Cached { ok, until: now + ttl, seq });
                                    }
                                    ok
                                }
                            };
                            assert_eq!(got.is_ok(), expect_ok, "answer for {k} at {now}");
                            assert_eq!(calls.load(Ordering::SeqCst), upstream, "calls at {now}");
                        }
                    }
                    assert_eq!(handle.cached(), model.len(), "cached at {now}: {model:?}");
                    assert_eq!(handle.in_flight(), 0);
                }
            });
        }
    }
}

/// A flood of distinct keys through a full cache finishes: each new key
/// evicts one answer at a constant cost (it used to scan the table).
#[tokio::test(start_paused = true)]
async fn a_flood_of_distinct_keys_through_a_full_cache() {
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .cache_ttl(Duration::from_secs(3600))
        .max_entries(10_000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = counter();
    let c = calls.clone();
    let mut svc = layer.layer(service_fn(move |k: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(k) }
    }));
    let n = 100_000u32;
    for k in 0..n {
        assert_eq!(svc.ready().await.unwrap().call(k).await.unwrap(), k);
    }
    assert_eq!(handle.cached(), 10_000);
    // The newest answers are the ones kept.
    for k in [n - 1, n - 10_000] {
        assert_eq!(svc.ready().await.unwrap().call(k).await.unwrap(), k);
    }
    assert_eq!(calls.load(Ordering::SeqCst), n as usize);
    assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), n as usize + 1);
}

/// Built to share one table between its services, a layer's services
/// answer each other's equal keys (and the layer's handle sees one table).
#[tokio::test(start_paused = true)]
async fn a_layer_can_share_one_table_between_its_services() {
    let calls = counter();
    let layer = DedupLayer::builder()
        .key(|k: &u32| Some(*k))
        .share_between_services()
        .build()
        .unwrap();
    let a = layer.layer(slow(&calls, Duration::from_millis(10)));
    let b = layer.layer(slow(&calls, Duration::from_millis(10)));
    let both = join_all([a.clone().oneshot(1), b.clone().oneshot(1)]).await;
    assert!(both.iter().all(|r| *r.as_ref().unwrap() == 10));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.handle().len(), 0);
}

/// A service of two request types keeps a table per type, and the handle
/// sees both.
#[tokio::test(start_paused = true)]
async fn a_service_of_two_request_types_keeps_a_table_for_each() {
    use tower_bulwark::dedup::DedupKey;

    #[derive(Debug)]
    struct Both;
    impl DedupKey<u32> for Both {
        type Key = u32;
        fn key(&self, r: &u32) -> Option<u32> {
            Some(*r)
        }
    }
    impl DedupKey<u64> for Both {
        type Key = u64;
        fn key(&self, r: &u64) -> Option<u64> {
            Some(*r)
        }
    }

    #[derive(Clone)]
    struct Echo;
    impl Service<u32> for Echo {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: u32) -> Self::Future {
            std::future::ready(Ok(r + 1))
        }
    }
    impl Service<u64> for Echo {
        type Response = u64;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u64, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: u64) -> Self::Future {
            std::future::ready(Ok(r + 2))
        }
    }

    let layer = DedupLayer::builder()
        .key_by(Both)
        .cache_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = layer.layer(Echo);
    assert_eq!(Service::<u32>::call(&mut svc, 1).await.unwrap(), 2);
    assert_eq!(Service::<u64>::call(&mut svc, 1).await.unwrap(), 3);
    assert_eq!(Service::<u64>::call(&mut svc, 1).await.unwrap(), 3);
    assert_eq!(svc.handle().cached(), 2);
    assert_eq!(layer.handle().cached(), 2);
    svc.handle().clear_cache();
    assert_eq!(layer.handle().cached(), 0);
}

/// Polls `f` until it is ready, letting the runtime run in between (the
/// shared call it waits on runs as its own task).
async fn poll_to_end<F: std::future::Future>(f: &mut tokio_test::task::Spawn<F>) -> F::Output {
    loop {
        if let std::task::Poll::Ready(r) = f.poll() {
            return r;
        }
        tokio::task::yield_now().await;
    }
}

/// A leader that is made and kept but never polled does not hold up the
/// callers that join it: whichever of them is polled drives the call, and
/// the leader, polled late, gets the same answer (also once the answer is
/// cached, and also when the call answers at once).
#[tokio::test(start_paused = true)]
async fn followers_of_a_leader_never_polled_are_answered() {
    for cache in [false, true] {
        let (gated, go) = Gated::new();
        let mut b = DedupLayer::builder().key(|k: &u32| Some(*k));
        if cache {
            b = b.cache_ttl(Duration::from_secs(1));
        }
        let layer = b.build().unwrap();
        let handle = layer.handle();
        let svc = layer.layer(gated.clone());
        let leader = called(&svc, 1).await;
        let mut follower = tokio_test::task::spawn(called(&svc, 1).await);
        assert_pending!(follower.poll());
        go.send(true).unwrap();
        assert_eq!(poll_to_end(&mut follower).await.unwrap(), 2);
        assert_eq!(handle.in_flight(), 0);
        let mut leader = tokio_test::task::spawn(leader);
        assert_eq!(assert_ready!(leader.poll()).unwrap(), 2);
        assert_eq!(gated.calls.load(Ordering::SeqCst), 1);
        assert_eq!(gated.cancelled.load(Ordering::SeqCst), 0);
    }

    // An inner call that answers at once, to a follower's first poll.
    let calls = counter();
    let c = calls.clone();
    let svc = by_value().layer(service_fn(move |k: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(k) }
    }));
    let leader = called(&svc, 7).await;
    let mut follower = tokio_test::task::spawn(called(&svc, 7).await);
    assert_eq!(assert_ready!(follower.poll()).unwrap(), 7);
    // A caller after the answer starts a new call, the leader still waits
    // for its own.
    assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let mut leader = tokio_test::task::spawn(leader);
    assert_eq!(assert_ready!(leader.poll()).unwrap(), 7);
}

/// A leader polled once (its inner call pending) and then never again:
/// the callers that join it are woken by the inner call and answered.
#[tokio::test(start_paused = true)]
async fn followers_of_a_leader_polled_once_then_parked_are_answered() {
    let (gated, go) = Gated::new();
    let layer = by_value();
    let handle = layer.handle();
    let svc = layer.layer(gated.clone());
    let mut leader = tokio_test::task::spawn(called(&svc, 1).await);
    assert_pending!(leader.poll());
    let mut follower = tokio_test::task::spawn(called(&svc, 1).await);
    assert_pending!(follower.poll());
    go.send(true).unwrap();
    assert_eq!(poll_to_end(&mut follower).await.unwrap(), 2);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(gated.calls.load(Ordering::SeqCst), 1);
    // The parked leader was woken and has its answer too.
    assert!(leader.is_woken());
    assert_eq!(assert_ready!(leader.poll()).unwrap(), 2);
}

/// Whatever each waiter did before (never polled, polled once or twice),
/// dropping all of them, in either order, drops the inner future once the
/// last one is gone, and the key starts a new call afterwards.
#[tokio::test(start_paused = true)]
async fn all_waiters_dropped_drop_the_inner_future_and_free_the_key() {
    for leader_polls in 0..3 {
        for follower_polls in 0..3 {
            for leader_first in [true, false] {
                let case = (leader_polls, follower_polls, leader_first);
                let (gated, go) = Gated::new();
                let layer = by_value();
                let handle = layer.handle();
                let svc = layer.layer(gated.clone());
                let mut leader = tokio_test::task::spawn(called(&svc, 1).await);
                let mut follower = tokio_test::task::spawn(called(&svc, 1).await);
                for _ in 0..leader_polls {
                    assert_pending!(leader.poll());
                }
                for _ in 0..follower_polls {
                    assert_pending!(follower.poll());
                }
                let (first, last) = if leader_first {
                    (leader, follower)
                } else {
                    (follower, leader)
                };
                drop(first);
                assert_eq!(gated.cancelled.load(Ordering::SeqCst), 0, "{case:?}");
                assert_eq!(handle.in_flight(), 1, "{case:?}");
                drop(last);
                assert_eq!(gated.cancelled.load(Ordering::SeqCst), 1, "{case:?}");
                assert_eq!(handle.in_flight(), 0, "{case:?}");
                go.send(true).unwrap();
                assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2, "{case:?}");
                assert_eq!(gated.calls.load(Ordering::SeqCst), 2, "{case:?}");
            }
        }
    }
    // A leader never polled and alone.
    let (gated, go) = Gated::new();
    let layer = by_value();
    let handle = layer.handle();
    let svc = layer.layer(gated.clone());
    drop(called(&svc, 1).await);
    assert_eq!(gated.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight(), 0);
    go.send(true).unwrap();
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2);
}

/// An upstream whose future waits for `go` and then panics for key 0.
fn bomb(
    go: &watch::Receiver<bool>,
) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let go = go.clone();
    service_fn(move |k: u32| {
        let mut go = go.clone();
        async move {
            go.wait_for(|v| *v).await.unwrap();
            assert!(k != 0, "bomb");
            Ok::<_, BoxError>(k + 1)
        }
    })
}

/// A panic in the inner future with two waiters: the one whose poll ran
/// into it panics, the other gets a `Panicked` error (also a leader never
/// polled before), the entry is gone, the panic is not cached, and the key
/// answers again.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_future_with_two_waiters() {
    // Polls of the leader before the panic, and whether the leader is the
    // one that runs into it.
    for (leader_polls, leader_drives) in [(0, false), (1, false), (1, true), (0, true)] {
        let case = (leader_polls, leader_drives);
        let (tx, go) = watch::channel(false);
        let layer = DedupLayer::builder()
            .key(|k: &u32| Some(*k))
            .error_ttl(Duration::from_secs(60))
            .build()
            .unwrap();
        let handle = layer.handle();
        let svc = layer.layer(bomb(&go));
        let mut leader = tokio_test::task::spawn(called(&svc, 0).await);
        let mut follower = tokio_test::task::spawn(called(&svc, 0).await);
        for _ in 0..leader_polls {
            assert_pending!(leader.poll());
        }
        if !leader_drives {
            assert_pending!(follower.poll());
        }
        tx.send(true).unwrap();
        let (driver, other) = if leader_drives {
            (&mut leader, &mut follower)
        } else {
            (&mut follower, &mut leader)
        };
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.poll()))
            .expect_err("the poll that ran into the panic panics");
        assert_eq!(message(&*panic), "bomb", "{case:?}");
        assert_eq!(handle.in_flight(), 0, "{case:?}");
        assert_eq!(handle.cached(), 0, "a panic is not cached: {case:?}");
        let err = assert_ready!(other.poll()).unwrap_err();
        assert_eq!(panicked(&err).message(), Some("bomb"), "{case:?}");
        // The key is not wedged: a new call leads and answers.
        assert_eq!(svc.clone().oneshot(4).await.unwrap(), 5);
        let again = tokio::spawn(svc.clone().oneshot(0)).await;
        assert_eq!(message(&*again.unwrap_err().into_panic()), "bomb");
        assert_eq!(handle.in_flight(), 0, "{case:?}");
    }
}

/// An inner future that wakes itself and returns `Pending` (a yield) is
/// polled once per poll of the caller that drives it: the caller gives the
/// executor back instead of polling it again in a loop.
#[test]
fn a_shared_call_that_yields_gives_the_executor_back() {
    let polls = counter();
    let inner = {
        let polls = polls.clone();
        service_fn(move |k: u32| {
            let polls = polls.clone();
            std::future::poll_fn(move |cx| {
                if polls.fetch_add(1, Ordering::SeqCst) < 1_000 {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(Ok::<_, BoxError>(k))
                }
            })
        })
    };
    let mut svc = by_value().layer(inner);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut leader = Box::pin(svc.call(7));
    let mut follower = Box::pin(svc.call(7));
    for turn in 1..=5 {
        assert!(std::future::Future::poll(follower.as_mut(), &mut cx).is_pending());
        assert!(std::future::Future::poll(leader.as_mut(), &mut cx).is_pending());
        assert!(
            polls.load(Ordering::SeqCst) <= 2 * turn,
            "the inner future was polled {} times in {turn} turns",
            polls.load(Ordering::SeqCst)
        );
    }
}
