//! Random histories through retry, rate limit and bulkhead: calls, polls,
//! drops of the response futures at every await point, time passing, and
//! panics in the inner service's `poll_ready`, `call` and response future
//! and in every user closure (key, cost, retry policy, `on_event`
//! listeners). Afterwards every bulkhead slot and every token reservation
//! is back, read through the layers' handles, and later calls work. Run
//! under tokio's current-thread runtime on the paused clock, and under the
//! multi-thread runtime.
#![cfg(all(feature = "rate-limit", feature = "retry", feature = "bulkhead"))]

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadEvent, BulkheadHandle, BulkheadLayer};
use tower_bulwark::rate_limit::{RateLimitEvent, RateLimitHandle, RateLimitLayer};
use tower_bulwark::retry::{Backoff, RetryEvent, RetryLayer};
use tower_bulwark::ClockSource;

#[path = "support/torture.rs"]
mod torture;
use torture::paused;

// What a request asks of the stack, as bits of the request itself.
const BEHAVIOUR: u32 = 0b111;
const OK: u32 = 0;
const FAIL: u32 = 1;
const HOLD: u32 = 2;
const PANIC_IN_CALL: u32 = 3;
const PANIC_IN_FUTURE: u32 = 4;
const PANIC_IN_KEY: u32 = 1 << 4;
const PANIC_IN_COST: u32 = 1 << 5;
const COSTS_TWO: u32 = 1 << 6;
const PANIC_IN_POLICY: u32 = 1 << 7;
const KEY_SHIFT: u32 = 8;

/// Switches shared by the closures of one stack.
#[derive(Default)]
struct Switches {
    /// Listeners panic while set.
    listeners_panic: AtomicBool,
    /// The inner service's `poll_ready` panics while set.
    ready_panics: AtomicBool,
}

/// The inner service: does what each request's low bits say.
#[derive(Clone)]
struct Chaos {
    switches: Arc<Switches>,
    gate: Arc<Semaphore>,
}

impl Service<u32> for Chaos {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.switches.ready_panics.load(SeqCst) {
            panic!("inner poll_ready panicked");
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        let gate = self.gate.clone();
        match req & BEHAVIOUR {
            PANIC_IN_CALL => panic!("inner call panicked"),
            OK => Box::pin(async move { Ok(req) }),
            FAIL => Box::pin(async { Err("upstream failed".into()) }),
            HOLD => Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                Ok(req)
            }),
            _ => Box::pin(async {
                tokio::task::yield_now().await;
                panic!("inner future panicked")
            }),
        }
    }
}

/// Counts the tokens the limiter let through, per key, as the limiter's
/// own inner service: every call here was admitted by the limiter.
#[derive(Clone)]
struct Spent<S> {
    inner: S,
    spent: Arc<Mutex<[f64; 2]>>,
}

impl<S: Service<u32>> Service<u32> for Spent<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: u32) -> S::Future {
        let key = ((req >> KEY_SHIFT) & 1) as usize;
        self.spent.lock().unwrap()[key] += cost(req);
        self.inner.call(req)
    }
}

fn cost(req: u32) -> f64 {
    if req & COSTS_TWO != 0 {
        2.0
    } else {
        1.0
    }
}

const MAX_TOKENS: f64 = 16.0;

type Stack = tower::util::BoxCloneSyncService<u32, u32, BoxError>;

/// Reads a keyed limiter's tokens for a key.
type TokensFor = Box<dyn Fn(u32) -> f64 + Send + Sync>;

struct Built {
    svc: Stack,
    limiter: RateLimitHandle,
    bulkhead: BulkheadHandle,
    switches: Arc<Switches>,
    gate: Arc<Semaphore>,
    spent: Arc<Mutex<[f64; 2]>>,
    keyed: Option<TokensFor>,
}

/// Retry -> rate limit (keyed or not) -> bulkhead -> the chaos service,
/// every closure and listener able to panic.
fn build(keyed: bool, bulkhead_wait: Duration) -> Built {
    let switches = Arc::new(Switches::default());
    let gate = Arc::new(Semaphore::new(0));
    let spent = Arc::new(Mutex::new([0.0; 2]));
    let s = switches.clone();
    let retry = RetryLayer::builder()
        .max_attempts(2)
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .retry_if(|req: &u32, res: &Result<u32, BoxError>| {
            if req & PANIC_IN_POLICY != 0 {
                panic!("retry policy panicked");
            }
            res.as_ref()
                .is_err_and(|e| !tower_bulwark::error::is_rejection(&**e))
        })
        .on_event(move |_: &RetryEvent| {
            if s.listeners_panic.load(SeqCst) {
                panic!("retry listener panicked");
            }
        })
        .build()
        .unwrap();
    let s = switches.clone();
    let bulkhead = BulkheadLayer::builder()
        .max_concurrent(4)
        .soft_limit(2)
        .max_wait(bulkhead_wait)
        .on_event(move |_: &BulkheadEvent| {
            if s.listeners_panic.load(SeqCst) {
                panic!("bulkhead listener panicked");
            }
        })
        .build()
        .unwrap();
    let bulkhead_handle = bulkhead.handle();
    let s = switches.clone();
    // Practically no refill: what the bucket holds is what was spent.
    let limiter = RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .max_tokens(MAX_TOKENS)
        .refill_rate(1e-6)
        .max_wait(Duration::MAX)
        .cost(|req: &u32| {
            if req & PANIC_IN_COST != 0 {
                panic!("cost closure panicked");
            }
            cost(*req)
        })
        .on_event(move |_: &RateLimitEvent| {
            if s.listeners_panic.load(SeqCst) {
                panic!("rate limit listener panicked");
            }
        });
    let chaos = Chaos {
        switches: switches.clone(),
        gate: gate.clone(),
    };
    let below = bulkhead.layer(chaos);
    let spent_below = Spent {
        inner: below,
        spent: spent.clone(),
    };
    let (svc, limiter_handle, keyed_tokens): (Stack, _, Option<TokensFor>) = if keyed {
        let layer = limiter
            .key(|req: &u32| {
                if req & PANIC_IN_KEY != 0 {
                    panic!("key closure panicked");
                }
                (req >> KEY_SHIFT) & 1
            })
            .build()
            .unwrap();
        let handle = layer.handle();
        let probe = layer.clone();
        let svc = ServiceBuilder::new()
            .layer(retry)
            .layer(layer)
            .service(spent_below);
        (
            Stack::new(svc),
            handle,
            Some(Box::new(move |k: u32| probe.tokens_for(&k))),
        )
    } else {
        let layer = limiter.build().unwrap();
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(retry)
            .layer(layer)
            .service(spent_below);
        (Stack::new(svc), handle, None)
    };
    Built {
        svc,
        limiter: limiter_handle,
        bulkhead: bulkhead_handle,
        switches,
        gate,
        spent,
        keyed: keyed_tokens,
    }
}

impl Built {
    /// Everything is back: no slot held, and each bucket holds exactly what
    /// the calls it let through did not spend.
    fn check_all_back(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.bulkhead.in_flight(), 0);
        let spent = *self.spent.lock().unwrap();
        let close = |have: f64, want: f64| (have - want).abs() < 1e-3;
        match &self.keyed {
            None => {
                let want = MAX_TOKENS - spent[0] - spent[1];
                let have = self.limiter.tokens();
                prop_assert!(close(have, want), "tokens {have}, expected {want}");
            }
            Some(tokens_for) => {
                for k in 0..2 {
                    let want = MAX_TOKENS - spent[k as usize];
                    let have = tokens_for(k);
                    prop_assert!(close(have, want), "key {k}: tokens {have}, expected {want}");
                }
            }
        }
        Ok(())
    }

    /// The stack still answers once the switches are off and the bucket
    /// is refilled.
    async fn later_calls_work(&mut self) -> Result<(), TestCaseError> {
        self.switches.listeners_panic.store(false, SeqCst);
        self.switches.ready_panics.store(false, SeqCst);
        self.limiter.reset();
        for k in 0..2u32 {
            let req = OK | (k << KEY_SHIFT);
            let r = self
                .svc
                .ready()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let r = r.call(req).await;
            prop_assert_eq!(r.ok(), Some(req));
        }
        prop_assert_eq!(self.bulkhead.in_flight(), 0);
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Call(u32),
    Poll(usize),
    Drop(usize),
    Advance(u64),
    Release(usize),
    ListenersPanic(bool),
    ReadyPanics(bool),
}

fn request() -> impl Strategy<Value = u32> {
    (
        prop_oneof![
            4 => Just(OK),
            3 => Just(FAIL),
            4 => Just(HOLD),
            1 => Just(PANIC_IN_CALL),
            1 => Just(PANIC_IN_FUTURE),
        ],
        proptest::bool::weighted(0.05),
        proptest::bool::weighted(0.05),
        any::<bool>(),
        proptest::bool::weighted(0.05),
        0u32..2,
    )
        .prop_map(|(b, key, cost, two, policy, k)| {
            b | if key { PANIC_IN_KEY } else { 0 }
                | if cost { PANIC_IN_COST } else { 0 }
                | if two { COSTS_TWO } else { 0 }
                | if policy { PANIC_IN_POLICY } else { 0 }
                | (k << KEY_SHIFT)
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => request().prop_map(Op::Call),
        6 => any::<usize>().prop_map(Op::Poll),
        2 => any::<usize>().prop_map(Op::Drop),
        2 => (0u64..3_000).prop_map(Op::Advance),
        2 => (1usize..4).prop_map(Op::Release),
        1 => any::<bool>().prop_map(Op::ListenersPanic),
        1 => proptest::bool::weighted(0.3).prop_map(Op::ReadyPanics),
    ]
}

type Pending = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

fn poll_caught(f: &mut Pending) -> Option<Poll<Result<u32, BoxError>>> {
    catch_unwind(AssertUnwindSafe(|| {
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }))
    .ok()
}

/// Plays `ops` on the paused clock; a future that panicked or finished is
/// dropped, as its caller would.
async fn play(b: &mut Built, ops: &[Op]) {
    let mut live: Vec<Pending> = Vec::new();
    for op in ops {
        match op {
            Op::Call(req) => {
                if live.len() >= 12 {
                    continue;
                }
                let svc = &mut b.svc;
                let ready = catch_unwind(AssertUnwindSafe(|| {
                    svc.poll_ready(&mut Context::from_waker(Waker::noop()))
                }));
                if !matches!(ready, Ok(Poll::Ready(Ok(())))) {
                    continue;
                }
                let req = *req;
                if let Ok(f) = catch_unwind(AssertUnwindSafe(|| b.svc.call(req))) {
                    live.push(f);
                }
            }
            Op::Poll(i) if !live.is_empty() => {
                let i = i % live.len();
                if !matches!(poll_caught(&mut live[i]), Some(Poll::Pending)) {
                    drop(live.swap_remove(i));
                }
            }
            Op::Drop(i) if !live.is_empty() => {
                let i = i % live.len();
                drop(live.swap_remove(i));
            }
            Op::Advance(ms) => tokio::time::advance(Duration::from_millis(*ms)).await,
            Op::Release(n) => b.gate.add_permits(*n),
            Op::ListenersPanic(on) => b.switches.listeners_panic.store(*on, SeqCst),
            Op::ReadyPanics(on) => b.switches.ready_panics.store(*on, SeqCst),
            _ => {}
        }
    }
    // The callers go away; whatever was mid-flight is dropped where it is.
    drop(live);
}

fn quiet_panics() {
    // The panics are the point; their messages are noise.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn current_thread_histories_give_everything_back(
        keyed in any::<bool>(),
        bulkhead_wait in prop_oneof![Just(Duration::ZERO), Just(Duration::from_secs(2))],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        quiet_panics();
        paused(async {
            let mut b = build(keyed, bulkhead_wait);
            play(&mut b, &ops).await;
            b.check_all_back()?;
            b.later_calls_work().await
        })?;
    }
}

/// Tasks on a multi-thread runtime run calls through clones of one stack
/// at once; some panic, some are aborted or dropped mid-await (a waiting
/// caller of the limiter or the bulkhead, an attempt in flight), the rest
/// finish. Then everything is back.
#[test]
fn multi_thread_histories_give_everything_back() {
    quiet_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for round in 0..24u64 {
            let keyed = round % 2 == 1;
            let wait = if round % 3 == 0 {
                Duration::ZERO
            } else {
                Duration::MAX
            };
            let mut b = build(keyed, wait);
            let mut rng = fastrand::Rng::with_seed(round);
            // Listeners panic from the start in some rounds, from midway in
            // others.
            b.switches.listeners_panic.store(round % 4 == 1, SeqCst);
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let mut svc = b.svc.clone();
                let reqs: Vec<(u32, u32)> = (0..5)
                    .map(|_| {
                        let behaviour =
                            [OK, FAIL, HOLD, HOLD, PANIC_IN_CALL, PANIC_IN_FUTURE][rng.usize(..6)];
                        let mut req = behaviour | (rng.u32(0..2) << KEY_SHIFT);
                        if rng.u8(..20) == 0 {
                            req |= [PANIC_IN_KEY, PANIC_IN_COST, PANIC_IN_POLICY][rng.usize(..3)];
                        }
                        if rng.bool() {
                            req |= COSTS_TWO;
                        }
                        (req, rng.u32(0..6))
                    })
                    .collect();
                tasks.push(tokio::spawn(async move {
                    for (req, yields) in reqs {
                        let call = async {
                            let svc = svc.ready().await?;
                            svc.call(req).await
                        };
                        // Dropped after a few turns of the scheduler if not
                        // done by then: wherever it is waiting.
                        let give_up = async {
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                        };
                        tokio::select! {
                            _ = call => {}
                            _ = give_up => {}
                        }
                    }
                }));
            }
            if round % 4 == 2 {
                b.switches.listeners_panic.store(true, SeqCst);
            }
            for _ in 0..rng.usize(0..8) {
                tokio::task::yield_now().await;
            }
            b.gate.add_permits(rng.usize(0..6));
            if rng.bool() {
                tasks[rng.usize(..tasks.len())].abort();
            }
            for t in tasks {
                // A task may end in a panic of its own request's making.
                let _ = t.await;
            }
            b.check_all_back().unwrap();
            b.later_calls_work().await.unwrap();
        }
    });
}
