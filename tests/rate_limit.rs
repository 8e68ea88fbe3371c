//! The rate limiter through its public API, on tokio's paused clock.
#![cfg(feature = "rate-limit")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::{advance, pause};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::classify::{Classify, Outcome};
use tower_bulwark::rate_limit::{
    CostTooHigh, RateLimitBuilder, RateLimitEvent, RateLimitLayer, RateLimited,
};
use tower_bulwark::ClockSource;

/// A limiter on tokio's clock, which the paused-time tests drive.
fn bucket(max_tokens: f64, refill_rate: f64) -> RateLimitBuilder {
    RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .max_tokens(max_tokens)
        .refill_rate(refill_rate)
}

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future = impl Send> + Clone {
    service_fn(|n: u32| async move { Ok::<_, BoxError>(n) })
}

/// An echo service that counts its calls; the request `hang` never answers.
fn counting(
    hang: Option<u32>,
) -> (
    Arc<AtomicUsize>,
    impl Service<u32, Response = u32, Error = BoxError, Future = impl Send> + Clone,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |n: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if Some(n) == hang {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(n)
        }
    });
    (calls, svc)
}

async fn call<S: Service<u32, Response = u32, Error = BoxError>>(
    svc: &mut S,
    n: u32,
) -> Result<u32, BoxError> {
    svc.ready().await?.call(n).await
}

fn limited(r: Result<u32, BoxError>) -> RateLimited {
    r.unwrap_err()
        .downcast_ref::<RateLimited>()
        .expect("a RateLimited")
        .clone()
}

#[tokio::test]
async fn burst_reject_then_refill() {
    pause();
    let layer = RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .name("api")
        .max_tokens(3.0)
        .refill_rate(2.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    for i in 0..3 {
        assert_eq!(call(&mut svc, i).await.unwrap(), i);
    }
    let e = limited(call(&mut svc, 9).await);
    assert_eq!(e.name(), "api");
    assert_eq!(e.retry_after(), Duration::from_millis(500));
    assert_eq!(e.limit(), 3.0);
    assert!(e.remaining() < 1.0);
    assert!(e.to_string().starts_with("rate limit `api` exceeded"));
    assert!(tower_bulwark::error::is_rejection(&e));

    advance(Duration::from_millis(499)).await;
    assert!(call(&mut svc, 9).await.is_err());
    advance(Duration::from_millis(1)).await;
    assert!(call(&mut svc, 9).await.is_ok());
    // A long pause refills to the burst, never beyond.
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.tokens(), 3.0);
    for _ in 0..3 {
        call(&mut svc, 0).await.unwrap();
    }
    assert!(call(&mut svc, 0).await.is_err());
}

#[tokio::test]
async fn clones_and_services_share_one_bucket() {
    pause();
    let layer = bucket(2.0, 1.0).build().unwrap();
    let mut a = layer.layer(echo());
    let mut b = layer.clone().layer(echo());
    let mut c = a.clone();
    call(&mut a, 1).await.unwrap();
    call(&mut b, 1).await.unwrap();
    assert!(call(&mut c, 1).await.is_err());
}

#[tokio::test]
async fn cost_from_the_request() {
    pause();
    let layer = bucket(10.0, 1.0)
        .cost(|n: &u32| f64::from(*n))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    call(&mut svc, 7).await.unwrap();
    assert!((handle.tokens() - 3.0).abs() < 1e-9);
    let e = limited(call(&mut svc, 4).await);
    assert_eq!(e.retry_after(), Duration::from_secs(1));
    call(&mut svc, 3).await.unwrap();
    // Above the bucket: a clear error, at once, not a wait.
    let err = call(&mut svc, 11).await.unwrap_err();
    let too = err.downcast_ref::<CostTooHigh>().unwrap();
    assert_eq!((too.cost(), too.max_tokens()), (11.0, 10.0));
    assert!(too.to_string().contains("can never fit"));
}

#[tokio::test]
async fn waits_up_to_max_wait_in_arrival_order() {
    pause();
    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(2))
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let inner = service_fn(move |n: u32| {
        o.lock().unwrap().push(n);
        async move { Ok::<_, BoxError>(n) }
    });
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.unwrap();
    let mut f1 = Box::pin(svc.ready().await.unwrap().call(1));
    let mut f2 = Box::pin(svc.ready().await.unwrap().call(2));
    // A third would wait 3 s > max_wait: rejected at once with that time.
    let e = limited(call(&mut svc, 3).await);
    assert_eq!(e.retry_after(), Duration::from_secs(3));
    assert!((&mut f1).now_or_never().is_none());
    // Nothing reached the inner service yet.
    assert_eq!(*order.lock().unwrap(), vec![0]);
    advance(Duration::from_secs(1)).await;
    assert_eq!(f1.await.unwrap(), 1);
    assert!((&mut f2).now_or_never().is_none());
    advance(Duration::from_secs(1)).await;
    assert_eq!(f2.await.unwrap(), 2);
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
}

#[tokio::test]
async fn dropped_waiters_give_their_tokens_back() {
    pause();
    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let (calls, inner) = counting(None);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.unwrap();
    // Newest first: every reservation comes back.
    let mut waiters: Vec<_> = Vec::new();
    for i in 0..5 {
        waiters.push(Box::pin(svc.ready().await.unwrap().call(i)));
    }
    // Drop each at a different point: never polled, polled once, polled
    // after part of the wait.
    for (i, mut w) in waiters.into_iter().enumerate().rev() {
        if i % 2 == 0 {
            assert!((&mut w).now_or_never().is_none());
        }
        drop(w);
    }
    advance(Duration::from_millis(1500)).await;
    // Only the first call's token was spent: one is back after a second.
    call(&mut svc, 9).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Dropped behind a later waiter, a reservation goes to the next
    // newcomer; in the end every one comes back. Unkeyed, then keyed.
    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let h = layer.handle();
    hands_a_dropped_turn_on(layer.layer(recorded(&order)), &order, || h.tokens(), false).await;

    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(10))
        .key(|n: &u32| n / 100)
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let keyed = layer.clone();
    let svc = layer.layer(recorded(&order));
    hands_a_dropped_turn_on(svc, &order, || keyed.tokens_for(&0), true).await;
}

/// A service recording the requests it is called with.
fn recorded(
    order: &Arc<Mutex<Vec<u32>>>,
) -> impl Service<u32, Response = u32, Error = BoxError, Future = impl Send> + Clone {
    let order = order.clone();
    service_fn(move |n: u32| {
        order.lock().unwrap().push(n);
        async move { Ok::<_, BoxError>(n) }
    })
}

/// On a bucket of one token a second, a call, then waiters A and B; A is
/// dropped. A newcomer C gets A's turn: it answers at A's time, before B.
/// Then again with B and C dropped as well (in either order): the bucket
/// is back where the first call left it.
async fn hands_a_dropped_turn_on<S>(
    mut svc: S,
    order: &Mutex<Vec<u32>>,
    tokens: impl Fn() -> f64,
    c_first: bool,
) where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    call(&mut svc, 0).await.unwrap();
    let mut a = Box::pin(svc.ready().await.unwrap().call(1));
    let mut b = Box::pin(svc.ready().await.unwrap().call(2));
    assert!((&mut a).now_or_never().is_none());
    drop(a);
    let mut c = Box::pin(svc.ready().await.unwrap().call(3));
    // (Timers fire on whole milliseconds of the runtime's clock, which
    // need not fall on the limiter's: a margin either side.)
    advance(Duration::from_millis(900)).await;
    assert!((&mut c).now_or_never().is_none());
    advance(Duration::from_millis(200)).await;
    assert_eq!((&mut c).now_or_never().unwrap().unwrap(), 3);
    assert!((&mut b).now_or_never().is_none());
    advance(Duration::from_secs(1)).await;
    assert_eq!((&mut b).now_or_never().unwrap().unwrap(), 2);
    assert_eq!(*order.lock().unwrap(), [0, 3, 2]);

    advance(Duration::from_secs(10)).await;
    assert_eq!(tokens(), 1.0);
    call(&mut svc, 0).await.unwrap();
    let a = svc.ready().await.unwrap().call(1);
    let b = svc.ready().await.unwrap().call(2);
    drop(a);
    let c = svc.ready().await.unwrap().call(3);
    advance(Duration::from_millis(500)).await;
    if c_first {
        drop(c);
        drop(b);
    } else {
        drop(b);
        drop(c);
    }
    // Half a second after the call, half a token: nothing else is held.
    assert_eq!(tokens(), 0.5);
    advance(Duration::from_millis(500)).await;
    let now = svc.ready().await.unwrap().call(4).now_or_never();
    assert_eq!(now.expect("admitted at once").unwrap(), 4);
    assert_eq!(*order.lock().unwrap(), [0, 3, 2, 0, 4]);
}

/// Where a waiter handed a dropped turn is itself dropped.
#[derive(Debug, Clone, Copy)]
enum DropAt {
    NeverPolled,
    PolledOnce,
    MidWait,
    /// Its time came, but it was not polled again.
    DueNotPolled,
    /// Its time came and the inner service was called: the tokens are spent.
    InFlight,
}

#[tokio::test]
async fn a_handed_on_turn_is_given_back_wherever_its_waiter_is_dropped() {
    pause();
    for at in [
        DropAt::NeverPolled,
        DropAt::PolledOnce,
        DropAt::MidWait,
        DropAt::DueNotPolled,
        DropAt::InFlight,
    ] {
        let layer = bucket(1.0, 1.0)
            .max_wait(Duration::from_secs(10))
            .build()
            .unwrap();
        let (calls, inner) = counting(Some(3));
        let mut svc = layer.layer(inner);
        call(&mut svc, 0).await.unwrap();
        let a = svc.ready().await.unwrap().call(1);
        let b = svc.ready().await.unwrap().call(2);
        drop(a);
        // C takes A's turn, due in a second.
        let mut c = Box::pin(svc.ready().await.unwrap().call(3));
        let elapsed = match at {
            DropAt::NeverPolled => 0,
            DropAt::PolledOnce => {
                assert!((&mut c).now_or_never().is_none());
                0
            }
            DropAt::MidWait => {
                assert!((&mut c).now_or_never().is_none());
                advance(Duration::from_millis(500)).await;
                assert!((&mut c).now_or_never().is_none());
                500
            }
            DropAt::DueNotPolled => {
                advance(Duration::from_millis(1100)).await;
                1100
            }
            DropAt::InFlight => {
                advance(Duration::from_millis(1100)).await;
                assert!((&mut c).now_or_never().is_none());
                1100
            }
        };
        drop(c);
        drop(b);
        let h = layer.handle();
        let tokens = h.tokens();
        if let DropAt::InFlight = at {
            // C's call holds the bucket until 2 s.
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{at:?}");
            assert!((tokens - 0.1).abs() < 1e-9, "{at:?}: {tokens}");
        } else {
            // Only the first call holds the bucket, until 1 s.
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{at:?}");
            let want = (elapsed as f64 / 1000.0).min(1.0);
            assert!((tokens - want).abs() < 1e-9, "{at:?}: {tokens}");
        }
    }
}

#[tokio::test]
async fn waiter_dropped_mid_wait_never_calls_inner() {
    pause();
    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let (calls, inner) = counting(None);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.unwrap();
    let mut w = Box::pin(svc.ready().await.unwrap().call(1));
    assert!((&mut w).now_or_never().is_none());
    advance(Duration::from_millis(500)).await;
    assert!((&mut w).now_or_never().is_none());
    drop(w);
    advance(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.handle().tokens(), 1.0);
}

#[tokio::test]
async fn handle_set_retry_after_and_reset() {
    pause();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .name("up")
        .max_tokens(5.0)
        .refill_rate(1.0)
        .on_event(move |e| ev.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    handle.set_retry_after(Duration::from_secs(3));
    assert_eq!(handle.blocked_for(), Some(Duration::from_secs(3)));
    let e = limited(call(&mut svc, 1).await);
    assert_eq!(e.retry_after(), Duration::from_secs(3));
    advance(Duration::from_secs(3)).await;
    // Then a slow start: one request, then the refill rate.
    call(&mut svc, 1).await.unwrap();
    assert!(call(&mut svc, 1).await.is_err());
    handle.reset();
    assert_eq!(handle.tokens(), 5.0);
    assert_eq!(handle.blocked_for(), None);
    call(&mut svc, 1).await.unwrap();
    let ev = events.lock().unwrap();
    assert!(ev
        .iter()
        .any(|e| matches!(e, RateLimitEvent::Blocked { .. })));
    assert!(ev
        .iter()
        .any(|e| matches!(e, RateLimitEvent::Rejected { .. })));
}

/// An upstream error asking for a pause of so many seconds.
#[derive(Debug)]
struct Busy(u64);
impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "busy for {}s", self.0)
    }
}
impl std::error::Error for Busy {}

#[derive(Clone, Copy)]
struct Hint;

impl Classify<u32, Busy> for Hint {
    fn classify(&self, r: &Result<u32, Busy>, _: Duration) -> Outcome {
        if r.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
    fn retry_after(&self, r: &Result<u32, Busy>) -> Option<Duration> {
        r.as_ref().err().map(|b| Duration::from_secs(b.0))
    }
}

#[tokio::test]
async fn upstream_retry_after_blocks_the_limiter() {
    pause();
    let layer = bucket(10.0, 10.0).retry_after_from(Hint).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|n: u32| async move {
        if n == 0 {
            Err::<u32, Busy>(Busy(4))
        } else {
            Ok(n)
        }
    }));
    assert!(svc.ready().await.unwrap().call(0).await.is_err());
    assert_eq!(handle.blocked_for(), Some(Duration::from_secs(4)));
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(err.is::<RateLimited>());
    advance(Duration::from_secs(4)).await;
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
}

#[tokio::test]
async fn keyed_buckets_are_independent_and_bounded() {
    pause();
    let layer = bucket(2.0, 1.0)
        .max_keys(1000)
        .key(|n: &u32| n % 10_000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(echo());
    call(&mut svc, 1).await.unwrap();
    call(&mut svc, 1).await.unwrap();
    assert!(call(&mut svc, 1).await.is_err());
    call(&mut svc, 2).await.unwrap();
    assert_eq!(layer.tokens_for(&1), 0.0);
    assert_eq!(layer.tokens_for(&2), 1.0);
    for k in 0..20_000u32 {
        let _ = call(&mut svc, k).await;
    }
    assert!(handle.keys() <= 1000, "{} keys", handle.keys());
    // A block from upstream covers every key.
    handle.set_retry_after(Duration::from_secs(1));
    assert!(call(&mut svc, 77).await.is_err());
    handle.reset();
    assert_eq!(handle.keys(), 0);
    call(&mut svc, 1).await.unwrap();
}

#[test]
fn config_is_validated() {
    let e = RateLimitLayer::builder()
        .max_tokens(0.0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_tokens");
    let e = RateLimitLayer::builder()
        .refill_rate(f64::NAN)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "refill_rate");
    let e = RateLimitLayer::builder()
        .tokens_per_request(-1.0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "tokens_per_request");
    let e = RateLimitLayer::builder()
        .max_tokens(1.0)
        .tokens_per_request(2.0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "tokens_per_request");
    let e = RateLimitLayer::builder()
        .max_keys(0)
        .key(|n: &u32| *n)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_keys");
}

#[test]
fn public_types_are_send_sync() {
    fn ok<T: Send + Sync>() {}
    ok::<RateLimitLayer>();
    ok::<RateLimited>();
    ok::<CostTooHigh>();
    ok::<tower_bulwark::rate_limit::RateLimitHandle>();
}

/// A flood of new keys must not give an abusive key, or any key, a fresh
/// bucket: forgotten keys come back no fuller than they left.
#[tokio::test]
async fn eviction_never_lets_a_key_start_over() {
    pause();
    // 2 tokens, one every 10 s; room for 64 keys.
    let layer = bucket(2.0, 0.1)
        .max_keys(64)
        .key(|n: &u32| *n)
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    const ABUSER: u32 = 7;
    let mut admitted_abuser = 0;
    let mut next_flood = 1_000_000u32;
    for round in 0..20 {
        // The abuser drains its bucket and keeps knocking.
        for _ in 0..5 {
            if call(&mut svc, ABUSER).await.is_ok() {
                admitted_abuser += 1;
            }
        }
        // A flood of one-shot keys, each draining its bucket, forces
        // evictions of live buckets.
        for _ in 0..200 {
            let k = next_flood;
            next_flood += 1;
            let _ = call(&mut svc, k).await;
            let _ = call(&mut svc, k).await;
        }
        if round % 4 == 3 {
            advance(Duration::from_secs(1)).await;
        }
    }
    // 5 s in all: 2 tokens and half a token of refill at most.
    assert!(
        admitted_abuser <= 2,
        "abuser admitted {admitted_abuser} times"
    );

    // A hundred normal keys under the same flood get at most their limit
    // (2 each, nothing refills without time passing).
    let layer = bucket(2.0, 0.1)
        .max_keys(64)
        .key(|n: &u32| *n)
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    let mut admitted = 0;
    for _ in 0..20 {
        for k in 0..100u32 {
            if call(&mut svc, k).await.is_ok() {
                admitted += 1;
            }
        }
        for _ in 0..200 {
            let k = next_flood;
            next_flood += 1;
            let _ = call(&mut svc, k).await;
        }
    }
    assert!(admitted <= 200, "100 keys admitted {admitted} times");
    // Time heals: once the flood's buckets have refilled, every key starts
    // full again.
    advance(Duration::from_secs(25)).await;
    assert!(call(&mut svc, 5_000_000).await.is_ok());
    assert!(call(&mut svc, 5_000_000).await.is_ok());
    assert!(call(&mut svc, 5_000_000).await.is_err());
}

/// A bucket too slow to represent is refused rather than admitting
/// everything; a merely slow one holds its bound.
#[tokio::test]
async fn a_very_slow_bucket_is_refused_or_exact() {
    pause();
    for rate in [1e-12, 1e-300, f64::MIN_POSITIVE] {
        let e = bucket(50.0, rate).build().unwrap_err();
        assert_eq!(e.field(), "refill_rate", "{rate}");
    }
    // One token every ~3 years: the burst, then nothing.
    let layer = bucket(5.0, 1e-8).build().unwrap();
    let mut svc = layer.layer(echo());
    let mut ok = 0;
    for i in 0..20 {
        if call(&mut svc, i).await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 5);
}

/// A hint longer than the cap blocks for the cap (and no longer), through
/// any classifier.
#[tokio::test]
async fn retry_after_from_is_capped() {
    pause();
    let layer = bucket(10.0, 10.0)
        .retry_after_from(Hint)
        .max_retry_after(Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|n: u32| async move {
        if n == 0 {
            Err::<u32, Busy>(Busy(u64::MAX))
        } else {
            Ok(n)
        }
    }));
    assert!(svc.ready().await.unwrap().call(0).await.is_err());
    assert_eq!(handle.blocked_for(), Some(Duration::from_secs(5)));
    advance(Duration::from_secs(5)).await;
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    // The application's own block is its word: not capped.
    handle.set_retry_after(Duration::from_secs(3600));
    assert_eq!(handle.blocked_for(), Some(Duration::from_secs(3600)));
}

/// A listener that panics on `KeysEvicted` unwinds into the caller whose
/// new key caused the eviction, and that caller's reservation goes back.
#[tokio::test]
async fn a_panicking_eviction_listener_strands_no_reservation() {
    pause();
    let panicking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p = panicking.clone();
    // One token a second; waits up to an hour; room for 64 keys.
    let layer = bucket(1.0, 1.0)
        .max_wait(Duration::from_secs(3600))
        .max_keys(64)
        .key(|n: &u32| n / 10)
        .on_event(move |e| {
            if matches!(e, RateLimitEvent::KeysEvicted { .. }) && p.load(Ordering::SeqCst) {
                panic!("listener panicked");
            }
        })
        .build()
        .unwrap();
    let (calls, inner) = counting(None);
    let mut svc = layer.layer(inner);
    // Keys 0..16 spend their token first, keys 16..64 half a second later:
    // the map is full of live buckets, the first sixteen closest to full.
    for k in 0..16u32 {
        call(&mut svc, k * 10).await.unwrap();
    }
    advance(Duration::from_millis(500)).await;
    for k in 16..64u32 {
        call(&mut svc, k * 10).await.unwrap();
    }
    // Key 100 forgets keys 0..16 (their buckets end at 1 s); keys 101..116
    // fill the map again. A new key may start from a raised floor and
    // wait: such requests are kept waiting, so time stands still.
    let mut fillers = Vec::new();
    for k in 100..116u32 {
        let mut f = tokio_test::task::spawn(svc.ready().await.unwrap().call(k * 10));
        if f.poll().is_pending() {
            fillers.push(f);
        }
    }
    let before = calls.load(Ordering::SeqCst);
    panicking.store(true, Ordering::SeqCst);
    // Key 0 comes back, no fuller than it left (its bucket ends at 1 s or
    // later): its request waits, and its eviction's listener panics.
    // The panic is contained (as every listener's is); the caller then
    // gives up, dropping its waiting request.
    svc.ready().await.unwrap();
    drop(svc.call(1));
    panicking.store(false, Ordering::SeqCst);
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // Key 0's next request waits half a second or a second; had the
    // panicking caller's reservation leaked, it would wait a second longer.
    let mut waiter = tokio_test::task::spawn(svc.ready().await.unwrap().call(2));
    assert!(waiter.poll().is_pending());
    advance(Duration::from_millis(1250)).await;
    match waiter.poll() {
        std::task::Poll::Ready(r) => assert_eq!(r.unwrap(), 2),
        std::task::Poll::Pending => panic!("a reservation was stranded"),
    }
}
