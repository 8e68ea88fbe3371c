//! Histories in which the dedup table grows and shrinks under calls in
//! flight, so that entries move between buckets while their callers hold
//! on to them: many keys at once, leaders left unpolled, joined, dropped
//! and polled in any order, inner futures that answer at once or later.
//! Every caller gets its own key's answer, and afterwards no call is left
//! in flight.
#![cfg(feature = "dedup")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tower::{BoxError, Layer, Service};
use tower_bulwark::dedup::DedupLayer;

const KEYS: usize = 48;

/// Answers key `k` with `k`, once key `k` is released.
#[derive(Clone)]
struct Gated(Arc<Vec<AtomicBool>>);

impl Service<usize> for Gated {
    type Response = usize;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<usize, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, k: usize) -> Self::Future {
        let gates = self.0.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            if gates[k].load(Ordering::Relaxed) {
                Poll::Ready(Ok(k))
            } else {
                // Asks to be polled again, as a future waiting on a
                // resource would once it is ready.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }))
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Call(usize),
    Poll(usize),
    Drop(usize),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS).prop_map(Op::Call),
        3 => any::<usize>().prop_map(Op::Poll),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => (0..KEYS).prop_map(Op::Release),
    ]
}

type Caller = (
    usize,
    Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>,
);

fn poll_one(caller: &mut Caller) -> Option<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    match caller.1.as_mut().poll(&mut cx) {
        Poll::Ready(res) => Some(res.expect("the inner service never fails")),
        Poll::Pending => None,
    }
}

fn run(ops: &[Op], cache: bool) {
    let gates = Arc::new(
        (0..KEYS)
            .map(|_| AtomicBool::new(false))
            .collect::<Vec<_>>(),
    );
    let mut builder = DedupLayer::builder().key(|k: &usize| Some(*k));
    if cache {
        builder = builder.cache_ttl(Duration::from_secs(3600));
    }
    let layer = builder.build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(Gated(gates.clone()));
    let mut callers: Vec<Caller> = Vec::new();
    for op in ops {
        match *op {
            Op::Call(k) => {
                let mut cx = Context::from_waker(Waker::noop());
                assert!(svc.poll_ready(&mut cx).is_ready());
                let fut = svc.call(k);
                callers.push((k, Box::pin(fut)));
            }
            Op::Poll(i) if !callers.is_empty() => {
                let i = i % callers.len();
                if let Some(answer) = poll_one(&mut callers[i]) {
                    assert_eq!(answer, callers[i].0, "a caller got another key's answer");
                    drop(callers.swap_remove(i));
                }
            }
            Op::Drop(i) if !callers.is_empty() => {
                let i = i % callers.len();
                drop(callers.swap_remove(i));
            }
            Op::Release(k) => gates[k].store(true, Ordering::Relaxed),
            _ => {}
        }
    }
    for gate in gates.iter() {
        gate.store(true, Ordering::Relaxed);
    }
    // Whichever caller of a call is polled drives it, so one pass answers
    // everyone.
    for mut caller in callers {
        let answer = poll_one(&mut caller).expect("a released call answers when polled");
        assert_eq!(answer, caller.0, "a caller got another key's answer");
    }
    assert_eq!(handle.in_flight(), 0, "a call was left in flight");
    if !cache {
        assert!(handle.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn calls_keep_their_answers_while_the_table_moves(
        ops in proptest::collection::vec(op(), 1..400),
        cache in any::<bool>(),
    ) {
        run(&ops, cache);
    }
}

/// A table that grows from empty to `KEYS` calls in flight, each leader
/// unpolled, then answers them in the reverse order.
#[test]
fn leaders_find_their_calls_after_the_table_grew() {
    let mut ops: Vec<Op> = (0..KEYS).map(Op::Call).collect();
    ops.extend((0..KEYS).map(Op::Release));
    ops.extend((0..KEYS).rev().map(Op::Poll));
    run(&ops, false);
    run(&ops, true);
}
