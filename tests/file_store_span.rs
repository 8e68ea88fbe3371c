//! One lock round per call through the documented file stack (rate limit,
//! bulkhead, breaker on one store): the outermost file-backed layer keeps
//! its round open while the layers below are admitted inside its `call`.
//! A slot given back joins the next round. A fail-closed store keeps one
//! round per admitting layer (each admission is on disk before its call
//! goes through); both decide every call alike.
#![cfg(all(
    feature = "file-store",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::oneshot;
use tower::util::BoxService;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::BulkheadFull;
use tower_bulwark::rate_limit::RateLimited;
use tower_bulwark::store::file::FileStore;
use tower_bulwark::store::Degrade;

#[path = "support/file_layers.rs"]
mod file_layers;
use file_layers::{breaker, bulkhead, limiter};

type Call = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;
type Stack = BoxService<(u32, Option<oneshot::Receiver<()>>), u32, BoxError>;

fn store(dir: &Path, degrade: Degrade) -> FileStore {
    FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_secs(10))
        .degrade(degrade)
        .build()
        .unwrap()
}

/// The README's stack on `store`. A request carrying a receiver is held
/// until it fires (or is dropped).
fn stack(store: &FileStore, tokens: f64, slots: usize) -> impl Fn() -> Stack {
    let limiter = limiter(store, tokens);
    let bulkhead = bulkhead(store, slots);
    let breaker = breaker(store);
    move || {
        let svc = ServiceBuilder::new()
            .layer(limiter.clone())
            .layer(bulkhead.clone())
            .layer(breaker.clone())
            .service(service_fn(
                |(n, hold): (u32, Option<oneshot::Receiver<()>>)| async move {
                    if let Some(rx) = hold {
                        let _ = rx.await;
                    }
                    Ok::<_, BoxError>(n)
                },
            ));
        BoxService::new(svc)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Answered,
    Held,
    RateLimited,
    Full,
}

fn seen(r: Poll<Result<u32, BoxError>>) -> Seen {
    match r {
        Poll::Pending => Seen::Held,
        Poll::Ready(Ok(_)) => Seen::Answered,
        Poll::Ready(Err(e)) if e.is::<RateLimited>() => Seen::RateLimited,
        Poll::Ready(Err(e)) if e.is::<BulkheadFull>() => Seen::Full,
        Poll::Ready(Err(e)) => panic!("unexpected error: {e}"),
    }
}

fn poll_once(call: &mut Call) -> Poll<Result<u32, BoxError>> {
    call.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test(start_paused = true)]
async fn a_call_through_the_file_stack_is_admitted_in_one_round() {
    for (degrade, per_call) in [(Degrade::FailOpenToLocal, 1), (Degrade::FailClosed, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), degrade);
        let make = stack(&s, 100.0, 1);
        for n in 0..20 {
            let before = s.lock_rounds();
            assert_eq!(make().oneshot((n, None)).await.unwrap(), n);
            // The bucket's token, the bulkhead's slot (the one the call
            // before gave back) and that give-back in one round; a closed
            // breaker reads nothing. Failing closed, the bucket and the
            // bulkhead are each on disk before the call goes on.
            assert_eq!(s.lock_rounds() - before, per_call, "{degrade:?}");
        }
        assert_eq!(s.load().bulkheads["api"].holders.len(), 0);
        // The last slot is written back after the delay, in a round of
        // its own.
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(s.lock_rounds(), 20 * per_call + 1);
        let peer = store(dir.path(), degrade);
        assert_eq!(peer.load().bulkheads["api"].holders.len(), 0);
        let left = s.rate_limiter(100.0, 1e-6).unwrap().named("api").tokens();
        assert!((left - 80.0).abs() < 0.01, "{left}");
    }
}

/// A panic in the call below the layers still writes the round: the slot
/// the bulkhead took and gave back during the unwind nets out, and the
/// token stays spent.
#[tokio::test]
async fn a_panic_inside_the_round_still_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), Degrade::FailOpenToLocal);
    let limiter = limiter(&s, 5.0);
    let bulkhead = bulkhead(&s, 1);
    let mut svc = ServiceBuilder::new()
        .layer(limiter)
        .layer(bulkhead.clone())
        .service(service_fn(
            |n: u32| -> std::future::Ready<Result<u32, BoxError>> {
                assert!(n != 0, "the inner call panics");
                std::future::ready(Ok(n))
            },
        ));
    svc.ready().await.unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(0));
    }));
    assert!(panicked.is_err());
    assert_eq!(bulkhead.handle().in_flight(), 0, "the slot came back");
    assert_eq!(s.load().bulkheads["api"].holders.len(), 0);
    // The next call works, in its own round, with one token fewer.
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
    let left = s.rate_limiter(5.0, 1e-6).unwrap().named("api").tokens();
    assert!((left - 3.0).abs() < 0.01, "{left}");
}

#[derive(Debug, Clone)]
enum Op {
    /// A call, held open (`true`) or answering at once.
    Call(bool),
    /// Lets the `n`th call still held answer.
    Release(usize),
    /// Drops the `n`th call still held, unanswered.
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(Op::Call),
        1 => (0usize..8).prop_map(Op::Release),
        1 => (0usize..8).prop_map(Op::Drop),
    ]
}

/// Plays `ops` on a stack over a fresh state file; what each call saw,
/// and the tokens and slots left at the end.
fn play(degrade: Degrade, tokens: f64, slots: usize, ops: &[Op]) -> (Vec<Seen>, i64, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), degrade);
        let make = stack(&s, tokens, slots);
        let mut held: Vec<(Call, oneshot::Sender<()>)> = Vec::new();
        let mut seen_all = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Call(hold) => {
                    let (tx, rx) = oneshot::channel();
                    let mut call: Call = Box::pin(make().oneshot((n as u32, hold.then_some(rx))));
                    let seen = seen(poll_once(&mut call));
                    seen_all.push(seen);
                    if seen == Seen::Held {
                        held.push((call, tx));
                    }
                }
                Op::Release(i) if i < held.len() => {
                    let (mut call, tx) = held.remove(i);
                    tx.send(()).unwrap();
                    assert_eq!(seen(poll_once(&mut call)), Seen::Answered);
                }
                Op::Drop(i) if i < held.len() => drop(held.remove(i)),
                _ => {}
            }
        }
        drop(held);
        let left = s.rate_limiter(tokens, 1e-6).unwrap().named("api").tokens();
        let holders = s.load().bulkheads.get("api").map_or(0, |b| b.holders.len());
        (seen_all, left.round() as i64, holders)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Joined rounds decide exactly as one round per layer does: the same
    /// answer for every call, the same tokens and slots left.
    #[test]
    fn joined_rounds_decide_as_separate_rounds(
        tokens in 1u32..8,
        slots in 1usize..4,
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let joined = play(Degrade::FailOpenToLocal, f64::from(tokens), slots, &ops);
        let separate = play(Degrade::FailClosed, f64::from(tokens), slots, &ops);
        prop_assert_eq!(&joined, &separate);
        prop_assert_eq!(joined.2, 0, "every slot given back");
    }
}
