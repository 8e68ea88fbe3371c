//! Random histories through the circuit breaker (plain and keyed), the
//! fallback group, the timeout, the hedge and the adaptive limit, each
//! alone and the last four in one stack: calls, polls, drops of the
//! response futures at every await point, time passing, verdicts a
//! classifier defers, and panics in the inner service's `poll_ready`,
//! `call` and response future and in every user closure the layer takes
//! (classifier and its `retry_after`, key, `fail_over_if`, `or_else`,
//! `hedge_if`, the per-request timeout, every `on_event` listener).
//!
//! Afterwards, read through the layers' handles, every half-open probe
//! slot and every adaptive slot is back, no inner future is left alive,
//! the counts the handles report match what the callers and the upstream
//! saw, and the layers work again: an open breaker half-opens after its
//! open period and closes after successes, each fallback entry's breaker
//! too, a hedge is still sent, and exactly `limit` calls are admitted at
//! once. Histories run on tokio's current-thread runtime on the paused
//! clock, and on the multi-thread runtime (whose survivors are then
//! checked on a paused clock, so no test waits on the wall clock).
#![cfg(all(
    feature = "circuit-breaker",
    feature = "fallback",
    feature = "timeout",
    feature = "hedge",
    feature = "adaptive"
))]

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::adaptive::{
    AdaptiveEvent, AdaptiveHandle, AdaptiveLimitLayer, Aimd, Algorithm, Gradient, LimitReached,
    Vegas,
};
use tower_bulwark::circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerLayer, CircuitEvent, CircuitHandle, CircuitOpen,
    CircuitState, KeyedCircuitHandle, Window,
};
use tower_bulwark::classify::{Classify, Outcome, Verdict};
use tower_bulwark::fallback::{AllFailed, FallbackEvent, FallbackHandle, FallbackLayer};
use tower_bulwark::hedge::{HedgeEvent, HedgeHandle, HedgeLayer};
use tower_bulwark::timeout::{TimedOut, TimeoutEvent, TimeoutHandle, TimeoutLayer};

#[path = "support/torture.rs"]
mod torture;
use torture::{paused, quiet_panics};

const MS: Duration = Duration::from_millis(1);

/// What one attempt at a request does at the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    /// Answers at once.
    Ok,
    /// Fails at once.
    Fail,
    /// Answers once the test releases a permit of the gate.
    Hold,
    /// Answers after this many milliseconds.
    Sleep(u16),
    /// Answers with something the classifier ignores.
    Shrug,
    /// `call` panics.
    PanicInCall,
    /// The response future panics after yielding this many times.
    PanicInFuture(u8),
}

// User closures that panic on a request, as bits of `Req::panics`.
/// The keyed breaker's key closure.
const KEY: u8 = 1;
/// The classifier's `classify`.
const CLASSIFY: u8 = 2;
/// The classifier's `retry_after`.
const RETRY_AFTER: u8 = 4;
/// The request predicate: `fail_over_if`, `hedge_if`, the per-request
/// timeout.
const PREDICATE: u8 = 8;

/// Keys of the keyed breaker's requests: few, so each key's breaker
/// opens and half-opens often, and more than the smallest table holds.
const KEYS: u8 = 2;

/// A request: what each attempt at it does (the first, the second, and
/// every later one), and which user closures panic on it.
#[derive(Clone, Debug)]
struct Req {
    key: u8,
    acts: [Act; 3],
    panics: u8,
    /// The request's own timeout, for the per-request closure.
    timeout: Option<u16>,
    /// A back-off hint its answers carry (`Retry-After`).
    hint: Option<u16>,
    /// A breaker's classifier judges its answers later.
    defer: bool,
    /// Attempts made so far, shared by the request's clones.
    tries: Arc<AtomicU8>,
}

impl Req {
    fn new(key: u8, acts: [Act; 3]) -> Self {
        Self {
            key,
            acts,
            panics: 0,
            timeout: None,
            hint: None,
            defer: false,
            tries: Arc::default(),
        }
    }

    fn ok(key: u8) -> Self {
        Self::new(key, [Act::Ok; 3])
    }
}

/// The entry a fallback's `or_else` answers as.
const OR_ELSE: u8 = 9;

/// An upstream's answer: which attempt and entry answered, and what the
/// classifier must know about the request.
#[derive(Clone, Copy, Debug)]
struct Answer {
    attempt: u8,
    entry: u8,
    panics: u8,
    hint: Option<u16>,
    ignore: bool,
    /// The classifier judges it later.
    defer: bool,
}

/// An upstream's failure, with what the classifier must know.
#[derive(Debug)]
struct Failed {
    panics: u8,
    hint: Option<u16>,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("torture: upstream failed")
    }
}

impl std::error::Error for Failed {}

/// What every part of one history shares: the switches the history
/// flips, the gate held calls wait on, and counts the checks compare
/// with the handles.
struct World {
    listeners_panic: AtomicBool,
    ready_panics: AtomicBool,
    ready_pending: AtomicBool,
    gate: Semaphore,
    /// Response futures of the upstream that are alive.
    alive: AtomicUsize,
    /// Calls made on the stack (its `call` ran, whatever happened then).
    calls: AtomicU64,
    /// Second and later attempts the upstream took (hedges, for the hedge).
    copies: AtomicU64,
    /// `TimedOut` errors the callers got.
    timed_out: AtomicU64,
    /// Deferred verdicts not reported yet.
    verdicts: Arc<Verdicts>,
}

impl World {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            listeners_panic: AtomicBool::new(false),
            ready_panics: AtomicBool::new(false),
            ready_pending: AtomicBool::new(false),
            gate: Semaphore::new(0),
            alive: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            verdicts: Arc::default(),
        })
    }

    /// A listener for any layer's events that panics while the switch is
    /// on.
    fn listener<E>(self: &Arc<Self>) -> impl Fn(&E) + Send + Sync + 'static {
        let world = self.clone();
        move |_: &E| {
            if world.listeners_panic.load(SeqCst) {
                panic!("torture: listener");
            }
        }
    }

    /// Reports or drops every verdict still waiting, as the callers that
    /// read the answers finish or go away.
    fn settle_verdicts(&self) {
        let mut i = 0;
        while let Some((verdict, outcome)) = self.verdicts.take(0) {
            if i % 2 == 0 {
                verdict.report(outcome);
            }
            i += 1;
        }
    }

    /// Everything off, and the gate shut again.
    fn calm(&self) {
        self.listeners_panic.store(false, SeqCst);
        self.ready_panics.store(false, SeqCst);
        self.ready_pending.store(false, SeqCst);
        self.gate.forget_permits(self.gate.available_permits());
    }
}

struct Alive(Arc<World>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, SeqCst);
    }
}

/// The upstream (entry `entry` of a fallback group; 0 everywhere else):
/// each attempt does what the request says for it.
#[derive(Clone)]
struct Chaos {
    entry: u8,
    world: Arc<World>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl Service<Req> for Chaos {
    type Response = Answer;
    type Error = BoxError;
    type Future = BoxFuture<Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.world.ready_panics.load(SeqCst) {
            panic!("torture: poll_ready");
        }
        if self.world.ready_pending.load(SeqCst) {
            // Ready again when the switch goes off; the histories poll
            // again rather than wait for a wake-up.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let attempt = req.tries.fetch_add(1, SeqCst);
        let act = req.acts[usize::from(attempt.min(2))];
        if act == Act::PanicInCall {
            panic!("torture: call");
        }
        let world = self.world.clone();
        world.alive.fetch_add(1, SeqCst);
        // Counted down when the future drops, polled or not.
        let alive = Alive(world);
        if attempt > 0 {
            alive.0.copies.fetch_add(1, SeqCst);
        }
        let answer = Answer {
            attempt,
            entry: self.entry,
            panics: req.panics,
            hint: req.hint,
            ignore: act == Act::Shrug,
            defer: req.defer,
        };
        Box::pin(async move {
            match act {
                Act::Ok | Act::Shrug => {}
                Act::Fail => {
                    return Err(Failed {
                        panics: answer.panics,
                        hint: answer.hint,
                    }
                    .into())
                }
                Act::Hold => alive.0.gate.acquire().await.unwrap().forget(),
                Act::Sleep(ms) => tokio::time::sleep(MS * u32::from(ms)).await,
                Act::PanicInFuture(yields) => {
                    for _ in 0..yields {
                        tokio::task::yield_now().await;
                    }
                    panic!("torture: future");
                }
                Act::PanicInCall => unreachable!(),
            }
            Ok(answer)
        })
    }
}

/// The classifier every layer gets: `Err` fails, a shrug is ignored, and
/// it panics when the request says so. With `verdicts`, it judges the
/// answers of requests that ask for it only later, as a gRPC classifier
/// does at the end of a body: their verdicts wait there, and the history
/// reports or drops them.
#[derive(Clone, Debug, Default)]
struct Judge {
    timed: bool,
    verdicts: Option<Arc<Verdicts>>,
}

/// Verdicts of deferred answers, with the outcome each will report.
#[derive(Debug, Default)]
struct Verdicts(Mutex<Vec<(Verdict, Outcome)>>);

impl Verdicts {
    /// Takes the `i`th waiting verdict, if any.
    fn take(&self, i: usize) -> Option<(Verdict, Outcome)> {
        let mut v = self.0.lock().unwrap();
        (!v.is_empty()).then(|| {
            let n = v.len();
            v.swap_remove(i % n)
        })
    }
}

fn marks(res: &Result<Answer, BoxError>) -> (u8, Option<u16>) {
    match res {
        Ok(a) => (a.panics, a.hint),
        Err(e) => e
            .downcast_ref::<Failed>()
            .map_or((0, None), |f| (f.panics, f.hint)),
    }
}

impl Judge {
    fn timed(timed: bool) -> Self {
        Self {
            timed,
            verdicts: None,
        }
    }
}

impl Classify<Answer, BoxError> for Judge {
    fn classify(&self, res: &Result<Answer, BoxError>, _: Duration) -> Outcome {
        if marks(res).0 & CLASSIFY != 0 {
            panic!("torture: classifier");
        }
        match res {
            Ok(a) if a.ignore => Outcome::Ignore,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }

    fn uses_elapsed(&self) -> bool {
        self.timed
    }

    fn retry_after(&self, res: &Result<Answer, BoxError>) -> Option<Duration> {
        let (panics, hint) = marks(res);
        if panics & RETRY_AFTER != 0 {
            panic!("torture: retry_after");
        }
        hint.map(|ms| MS * u32::from(ms))
    }

    fn defers(&self) -> bool {
        self.verdicts.is_some()
    }

    fn defer(&self, res: &mut Result<Answer, BoxError>, verdict: Verdict) -> Option<Verdict> {
        let (Some(verdicts), Ok(a)) = (&self.verdicts, &*res) else {
            return Some(verdict);
        };
        if !a.defer {
            return Some(verdict);
        }
        let outcome = self.classify(res, Duration::ZERO);
        verdicts.0.lock().unwrap().push((verdict, outcome));
        None
    }
}

type Stack = BoxCloneSyncService<Req, Answer, BoxError>;

/// The layer under test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Breaker,
    Keyed,
    Fallback,
    Timeout,
    Hedge,
    Adaptive,
    /// Timeout over hedge over breaker over adaptive limit: each layer's
    /// drops and panics reach the ones around it.
    Stacked,
}

/// Its handle, and the settings the checks need.
enum Under {
    Breaker {
        handle: CircuitHandle,
    },
    Keyed {
        handle: KeyedCircuitHandle<u8>,
    },
    Fallback {
        handle: FallbackHandle,
    },
    Timeout {
        handle: TimeoutHandle,
    },
    Hedge {
        handle: HedgeHandle,
        share: f64,
    },
    Adaptive {
        handle: AdaptiveHandle,
    },
    Stacked {
        breaker: CircuitHandle,
        adaptive: AdaptiveHandle,
        hedge: HedgeHandle,
        timeout: TimeoutHandle,
    },
}

struct Built {
    svc: Stack,
    under: Under,
    world: Arc<World>,
}

/// The longest a breaker stays open in any history: the open period, a
/// back-off hint (capped), a slow-call window. Recovery waits this long.
const LONGEST_OPEN: Duration = Duration::from_secs(60);

/// A breaker's settings drawn for a history: consecutive or window mode,
/// slow calls, back-off hints honoured or not.
struct BreakerDraw {
    builder: CircuitBreakerBuilder,
    /// Its classifier: timed when slow calls count, and deferring some
    /// verdicts half the time.
    judge: Judge,
}

fn draw_breaker(rng: &mut fastrand::Rng, world: &Arc<World>, multi_thread: bool) -> BreakerDraw {
    // On the multi-thread runtime the clock is not paused: breakers there
    // half-open after a microsecond, so the threads race for probe slots
    // within a round.
    let open_timeout = if multi_thread {
        Duration::from_micros(1)
    } else {
        MS * rng.u32(100..1500)
    };
    let mut builder = CircuitBreakerLayer::builder()
        .name("torture")
        .failure_threshold(rng.u32(1..4))
        .success_threshold(rng.u32(1..3))
        .half_open_max_calls(rng.u32(1..3))
        .open_timeout(open_timeout)
        .honor_retry_after(rng.bool())
        .max_retry_after(Duration::from_secs(10))
        .on_event(world.listener::<CircuitEvent>());
    if rng.bool() {
        builder = builder
            .window(Window::count(4))
            .minimum_calls(2)
            .failure_rate_threshold(0.5);
    }
    let timed = rng.u8(0..3) == 0;
    if timed {
        builder = builder.slow_call_duration(MS * 150);
    }
    let judge = Judge {
        timed,
        verdicts: rng.bool().then(|| world.verdicts.clone()),
    };
    BreakerDraw { builder, judge }
}

/// Builds a stack of `kind` over the chaos upstream, with settings drawn
/// from `seed`. `multi_thread` keeps timers short-lived enough that no
/// task waits on the wall clock for them.
fn build(kind: Kind, seed: u64, multi_thread: bool) -> Built {
    let world = World::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    let chaos = Chaos {
        entry: 0,
        world: world.clone(),
    };
    let (svc, under) = match kind {
        Kind::Breaker => {
            let d = draw_breaker(&mut rng, &world, multi_thread);
            let layer = d.builder.classify(d.judge).build().unwrap();
            let handle = layer.handle();
            (Stack::new(layer.layer(chaos)), Under::Breaker { handle })
        }
        Kind::Keyed => {
            let d = draw_breaker(&mut rng, &world, multi_thread);
            let layer = d
                .builder
                .classify(d.judge)
                .key(|req: &Req| {
                    if req.panics & KEY != 0 {
                        panic!("torture: key");
                    }
                    req.key
                })
                .max_keys(rng.usize(1..3))
                .build()
                .unwrap();
            let handle = layer.handle();
            (Stack::new(layer.layer(chaos)), Under::Keyed { handle })
        }
        Kind::Fallback => {
            let d = draw_breaker(&mut rng, &world, multi_thread);
            let entry = |n: u8| Chaos {
                entry: n,
                world: world.clone(),
            };
            let layer = FallbackLayer::builder()
                .primary_name("a")
                .fallback("b", entry(1))
                .fallback("c", entry(2))
                .breaker(d.builder)
                .classify(d.judge)
                .skip_not_ready(rng.bool())
                .fail_over_if(|req: &Req| {
                    if req.panics & PREDICATE != 0 {
                        panic!("torture: fail_over_if");
                    }
                    true
                })
                .on_event(world.listener::<FallbackEvent>());
            let layer = if rng.bool() {
                // The last resort is user code too: it panics while the
                // listeners do.
                let w = world.clone();
                layer.or_else(move |_| {
                    if w.listeners_panic.load(SeqCst) {
                        panic!("torture: or_else");
                    }
                    Ok(Answer {
                        attempt: 0,
                        entry: OR_ELSE,
                        panics: 0,
                        hint: None,
                        ignore: false,
                        defer: false,
                    })
                })
            } else {
                layer
            };
            let layer = layer.build().unwrap();
            let handle = layer.handle();
            (Stack::new(layer.layer(chaos)), Under::Fallback { handle })
        }
        Kind::Timeout => {
            let timeout = if multi_thread {
                MS
            } else {
                MS * rng.u32(20..200)
            };
            let layer = TimeoutLayer::builder()
                .name("torture")
                .timeout(timeout)
                .per_request(|req: &Req| {
                    if req.panics & PREDICATE != 0 {
                        panic!("torture: per_request");
                    }
                    req.timeout.map(|ms| MS * u32::from(ms))
                })
                .on_event(world.listener::<TimeoutEvent>())
                .build()
                .unwrap();
            let handle = layer.handle();
            (Stack::new(layer.layer(chaos)), Under::Timeout { handle })
        }
        Kind::Hedge => {
            let max_hedges = rng.u32(1..3);
            // Mostly budgets that let many calls be hedged, so hedges are
            // sent, raced and dropped often.
            let share = [0.2, 1.0, f64::from(max_hedges)][rng.usize(0..3)];
            let mut b = HedgeLayer::builder()
                .name("torture")
                .max_hedges(max_hedges)
                .max_extra_load(share);
            b = if multi_thread {
                b.delay(Duration::ZERO)
            } else if rng.u8(0..4) > 0 {
                b.delay(MS * rng.u32(1..20))
            } else {
                b.min_data_points(2).window(8).min_delay(MS)
            };
            let layer = b
                .hedge_if(|req: &Req| {
                    if req.panics & PREDICATE != 0 {
                        panic!("torture: hedge_if");
                    }
                    true
                })
                .classify(Judge::timed(false))
                .on_event(world.listener::<HedgeEvent>())
                .build()
                .unwrap();
            let handle = layer.handle();
            (
                Stack::new(layer.layer(chaos)),
                Under::Hedge { handle, share },
            )
        }
        Kind::Stacked => {
            let d = draw_breaker(&mut rng, &world, multi_thread);
            let breaker = d.builder.classify(d.judge).build().unwrap();
            let max_wait = match (multi_thread, rng.bool()) {
                (_, false) => Duration::ZERO,
                (true, true) => MS,
                (false, true) => MS * rng.u32(1..100),
            };
            let adaptive = AdaptiveLimitLayer::builder()
                .name("torture")
                .min_limit(1)
                .initial_limit(rng.usize(1..5))
                .max_limit(8)
                .max_wait(max_wait)
                .classify(Judge::timed(false))
                .on_event(world.listener::<AdaptiveEvent>())
                .build()
                .unwrap();
            let delay = if multi_thread {
                Duration::ZERO
            } else {
                MS * rng.u32(1..20)
            };
            let hedge = HedgeLayer::builder()
                .name("torture")
                .delay(delay)
                .max_extra_load(1.0)
                .classify(Judge::timed(false))
                .on_event(world.listener::<HedgeEvent>())
                .build()
                .unwrap();
            let timeout = if multi_thread {
                MS
            } else {
                MS * rng.u32(20..200)
            };
            let timeout = TimeoutLayer::builder()
                .name("torture")
                .timeout(timeout)
                .on_event(world.listener::<TimeoutEvent>())
                .build()
                .unwrap();
            let under = Under::Stacked {
                breaker: breaker.handle(),
                adaptive: adaptive.handle(),
                hedge: hedge.handle(),
                timeout: timeout.handle(),
            };
            let svc = ServiceBuilder::new()
                .layer(timeout)
                .layer(hedge)
                .layer(breaker)
                .layer(adaptive)
                .service(chaos);
            (Stack::new(svc), under)
        }
        Kind::Adaptive => {
            let algorithm: Algorithm = match rng.u8(0..3) {
                0 => Gradient::default().into(),
                1 => Vegas::default().into(),
                _ => Aimd::default().latency_threshold(MS * 100).into(),
            };
            let max_wait = match (multi_thread, rng.bool()) {
                (_, false) => Duration::ZERO,
                (true, true) => MS,
                (false, true) => MS * rng.u32(1..100),
            };
            let layer = AdaptiveLimitLayer::builder()
                .name("torture")
                .algorithm(algorithm)
                .min_limit(1)
                .initial_limit(rng.usize(1..5))
                .max_limit(8)
                .max_wait(max_wait)
                .classify(Judge::timed(rng.bool()))
                .on_event(world.listener::<AdaptiveEvent>())
                .build()
                .unwrap();
            let handle = layer.handle();
            (Stack::new(layer.layer(chaos)), Under::Adaptive { handle })
        }
    };
    Built { svc, under, world }
}

type Pending = Pin<Box<dyn Future<Output = Result<Answer, BoxError>> + Send>>;

/// One call on `svc`: readiness first, as a caller would; `None` if
/// readiness or the call panicked or the service was not ready.
fn start(b: &mut Built, req: Req) -> Option<Pending> {
    let svc = &mut b.svc;
    let ready = catch_unwind(AssertUnwindSafe(|| {
        svc.poll_ready(&mut Context::from_waker(Waker::noop()))
    }));
    if !matches!(ready, Ok(Poll::Ready(Ok(())))) {
        return None;
    }
    b.world.calls.fetch_add(1, SeqCst);
    catch_unwind(AssertUnwindSafe(|| b.svc.call(req))).ok()
}

/// Polls `f` once; `None` if it panicked.
fn poll_caught(world: &World, f: &mut Pending) -> Option<Poll<Result<Answer, BoxError>>> {
    let polled = catch_unwind(AssertUnwindSafe(|| {
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }))
    .ok()?;
    if let Poll::Ready(Err(e)) = &polled {
        if e.is::<TimedOut>() {
            world.timed_out.fetch_add(1, SeqCst);
        }
    }
    Some(polled)
}

#[derive(Debug, Clone)]
enum Op {
    Call(Req),
    Poll(usize),
    /// Polls every future once, as a runtime does when time has passed.
    PollAll,
    /// Polls a future this many times, then drops it wherever it is.
    PollThenDrop(usize, u8),
    Drop(usize),
    Advance(u64),
    Release(usize),
    ListenersPanic(bool),
    ReadyPanics(bool),
    ReadyPending(bool),
    /// Reports (or drops, if `false`) a waiting verdict.
    Verdict(usize, bool),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => Just(Act::Ok),
        3 => Just(Act::Fail),
        3 => Just(Act::Hold),
        3 => (1u16..100).prop_map(Act::Sleep),
        1 => Just(Act::Shrug),
        1 => Just(Act::PanicInCall),
        1 => (0u8..3).prop_map(Act::PanicInFuture),
    ]
}

fn request() -> impl Strategy<Value = Req> {
    let rarely = || proptest::bool::weighted(0.06);
    (
        0u8..KEYS,
        proptest::array::uniform3(act()),
        (rarely(), rarely(), rarely(), rarely()),
        proptest::option::weighted(0.3, 1u16..300),
        proptest::option::weighted(0.1, 1u16..60_000),
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(key, acts, (k, c, r, p), timeout, hint, defer)| {
            let bit = |on: bool, b: u8| if on { b } else { 0 };
            Req {
                panics: bit(k, KEY) | bit(c, CLASSIFY) | bit(r, RETRY_AFTER) | bit(p, PREDICATE),
                timeout,
                hint,
                defer,
                ..Req::new(key, acts)
            }
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => request().prop_map(Op::Call),
        6 => any::<usize>().prop_map(Op::Poll),
        2 => Just(Op::PollAll),
        2 => (any::<usize>(), 0u8..4).prop_map(|(i, n)| Op::PollThenDrop(i, n)),
        1 => any::<usize>().prop_map(Op::Drop),
        3 => prop_oneof![0u64..50, 0u64..5_000].prop_map(Op::Advance),
        2 => (1usize..4).prop_map(Op::Release),
        1 => any::<bool>().prop_map(Op::ListenersPanic),
        // On a fifth of the time: a switch left on stops every call.
        2 => proptest::bool::weighted(0.2).prop_map(Op::ReadyPanics),
        2 => proptest::bool::weighted(0.2).prop_map(Op::ReadyPending),
        2 => (any::<usize>(), proptest::bool::weighted(0.7)).prop_map(|(i, r)| Op::Verdict(i, r)),
    ]
}

/// Plays `ops` on the paused clock; a future that panicked or finished is
/// dropped, as its caller would.
async fn play(b: &mut Built, ops: &[Op]) {
    let mut live: Vec<Pending> = Vec::new();
    for op in ops {
        match op {
            Op::Call(req) if live.len() < 12 => {
                // Attempts are counted per call.
                let req = Req {
                    tries: Arc::default(),
                    ..req.clone()
                };
                live.extend(start(b, req));
            }
            Op::Poll(i) if !live.is_empty() => {
                let i = i % live.len();
                if !matches!(poll_caught(&b.world, &mut live[i]), Some(Poll::Pending)) {
                    drop(live.swap_remove(i));
                }
            }
            Op::PollAll => {
                live.retain_mut(|f| matches!(poll_caught(&b.world, f), Some(Poll::Pending)))
            }
            Op::PollThenDrop(i, n) if !live.is_empty() => {
                let mut f = live.swap_remove(i % live.len());
                for _ in 0..*n {
                    if !matches!(poll_caught(&b.world, &mut f), Some(Poll::Pending)) {
                        break;
                    }
                }
                drop(f);
            }
            Op::Drop(i) if !live.is_empty() => {
                drop(live.swap_remove(i % live.len()));
            }
            Op::Advance(ms) => tokio::time::advance(MS * *ms as u32).await,
            Op::Release(n) => b.world.gate.add_permits(*n),
            Op::ListenersPanic(on) => b.world.listeners_panic.store(*on, SeqCst),
            Op::ReadyPanics(on) => b.world.ready_panics.store(*on, SeqCst),
            Op::ReadyPending(on) => b.world.ready_pending.store(*on, SeqCst),
            Op::Verdict(i, report) => {
                if let Some((verdict, outcome)) = b.world.verdicts.take(*i) {
                    if *report {
                        verdict.report(outcome);
                    }
                }
            }
            _ => {}
        }
    }
    // The callers go away; whatever was mid-flight is dropped where it is.
    drop(live);
    b.world.settle_verdicts();
}

/// No probe slot of `h` is held: no call is in flight any more.
fn probes(h: &CircuitHandle) -> Result<(), TestCaseError> {
    let m = h.metrics();
    prop_assert_eq!(
        m.half_open_in_flight,
        0,
        "breaker {} holds probe slots with no call in flight: {:?}",
        h.name(),
        m
    );
    Ok(())
}

/// The breaker refusals in a call's error: the breaker's own, or every
/// entry's in a fallback's [`AllFailed`].
fn refusals<'a>(e: &'a (dyn std::error::Error + 'static)) -> Vec<&'a CircuitOpen> {
    if let Some(open) = e.downcast_ref::<CircuitOpen>() {
        return vec![open];
    }
    let Some(all) = e.downcast_ref::<AllFailed>() else {
        return Vec::new();
    };
    all.errors()
        .iter()
        .filter_map(|(_, e)| e.downcast_ref::<CircuitOpen>())
        .collect()
}

impl Built {
    /// Right after the history, before any time passes: nothing is held,
    /// and the handles' counts match what the callers and the upstream
    /// saw.
    fn check_all_back(&self) -> Result<(), TestCaseError> {
        let w = &self.world;
        prop_assert_eq!(w.alive.load(SeqCst), 0, "upstream futures still alive");
        match &self.under {
            Under::Breaker { handle } => probes(handle)?,
            Under::Keyed { handle } => {
                for k in handle.keys() {
                    probes(&handle.breaker(&k).unwrap())?;
                }
                probes(&handle.overflow())?;
            }
            Under::Fallback { handle } => {
                for (_, h) in handle.breakers() {
                    probes(h)?;
                }
            }
            Under::Timeout { handle } => {
                prop_assert_eq!(handle.timed_out(), w.timed_out.load(SeqCst));
            }
            Under::Hedge { handle, share } => {
                let (hedges, calls) = (handle.hedges(), w.calls.load(SeqCst));
                prop_assert_eq!(hedges, w.copies.load(SeqCst), "hedges counted vs sent");
                prop_assert!(
                    hedges as f64 <= calls as f64 * share + 1e-6,
                    "{} hedges for {} calls at {}",
                    hedges,
                    calls,
                    share
                );
            }
            Under::Adaptive { handle } => {
                prop_assert_eq!(handle.in_flight(), 0, "adaptive slots held");
                prop_assert!((1..=8).contains(&handle.limit()));
            }
            Under::Stacked {
                breaker,
                adaptive,
                hedge,
                timeout,
            } => {
                probes(breaker)?;
                prop_assert_eq!(adaptive.in_flight(), 0, "adaptive slots held");
                prop_assert_eq!(timeout.timed_out(), w.timed_out.load(SeqCst));
                let (hedges, calls) = (hedge.hedges(), w.calls.load(SeqCst));
                prop_assert!(hedges <= calls, "{} hedges for {} calls", hedges, calls);
            }
        }
        Ok(())
    }

    /// Calls `req` and waits for its answer (on the paused clock, time
    /// moves on by itself while every task waits).
    async fn call(&mut self, req: Req) -> Result<Answer, BoxError> {
        self.svc.ready().await?.call(req).await
    }

    /// Calls that must succeed, answered by entry `entry`.
    async fn ok(&mut self, req: Req, entry: u8) -> Result<(), TestCaseError> {
        let what = format!("{req:?}");
        match self.call(req).await {
            Ok(a) => {
                prop_assert_eq!(a.entry, entry, "{} answered by the wrong entry", what);
                Ok(())
            }
            Err(e) => Err(TestCaseError::fail(format!("{what}: {e}"))),
        }
    }

    /// Calls with successful requests for `key` until `breaker()` (which
    /// answers as entry `entry`) is closed after a success, waiting out
    /// each open period it is in. With no other call in flight, a
    /// half-open breaker must admit: a refusal from one means a probe slot
    /// was never given back.
    async fn close(
        &mut self,
        key: u8,
        entry: u8,
        breaker: impl Fn() -> CircuitHandle,
    ) -> Result<(), TestCaseError> {
        // A window of failures may open the breaker once more on the
        // first successes; it then closes after its probes.
        for _ in 0..16 {
            let res = self.call(Req::ok(key)).await;
            let h = breaker();
            match res {
                Ok(a) if a.entry == entry => {
                    if h.state() == CircuitState::Closed {
                        return Ok(());
                    }
                    continue;
                }
                // Skipped: a later entry answered.
                Ok(_) => {}
                Err(e) => {
                    let refused = refusals(&*e);
                    if refused.is_empty() {
                        return Err(TestCaseError::fail(format!("key {key}: {e}")));
                    }
                    for open in refused {
                        prop_assert_ne!(
                            open.state(),
                            CircuitState::HalfOpen,
                            "{} refused a lone call while half-open",
                            open.name()
                        );
                    }
                }
            }
            prop_assert_ne!(
                h.state(),
                CircuitState::HalfOpen,
                "{} refused a lone call while half-open",
                h.name()
            );
            tokio::time::advance(LONGEST_OPEN).await;
        }
        let h = breaker();
        Err(TestCaseError::fail(format!(
            "{} never closed: {:?}",
            h.name(),
            h.metrics()
        )))
    }

    /// After the history, on the paused clock: the switches go off, every
    /// open period passes, and the layer works again.
    async fn later_calls_work(&mut self) -> Result<(), TestCaseError> {
        self.world.calm();
        tokio::time::advance(LONGEST_OPEN).await;
        match &self.under {
            Under::Breaker { handle } => {
                let handle = handle.clone();
                self.close(0, 0, || handle.clone()).await?;
                probes(&handle)?;
            }
            Under::Keyed { handle } => {
                let handle = handle.clone();
                for key in 0..KEYS {
                    let breaker = || handle.breaker(&key).unwrap_or_else(|| handle.overflow());
                    self.close(key, 0, breaker).await?;
                }
                for k in handle.keys() {
                    let h = handle.breaker(&k).unwrap();
                    prop_assert_eq!(h.state(), CircuitState::Closed, "key {}", k);
                    probes(&h)?;
                }
                // The overflow breaker takes calls only while every key is
                // busy, which no later call makes happen: its open period
                // has passed, so its next call probes.
                let overflow = handle.overflow();
                let state = overflow.state();
                prop_assert!(
                    matches!(state, CircuitState::Closed | CircuitState::HalfOpen),
                    "overflow {:?}",
                    state
                );
                probes(&overflow)?;
            }
            Under::Fallback { handle } => {
                let handle = handle.clone();
                // Each entry's breaker in turn closes; once it has, it is
                // forced open so that the next calls reach the entry
                // after it. Then they are all reset to where they were.
                let names: Vec<String> = handle.names().map(str::to_owned).collect();
                for (entry, name) in names.iter().enumerate() {
                    let h = handle.breaker(name).unwrap().clone();
                    self.close(0, entry as u8, || h.clone()).await?;
                    h.force_open();
                }
                for name in &names {
                    handle.breaker(name).unwrap().reset();
                }
                self.ok(Req::ok(0), 0).await?;
                for (name, h) in handle.breakers() {
                    prop_assert_eq!(h.state(), CircuitState::Closed, "entry {}", name);
                    probes(h)?;
                }
            }
            Under::Timeout { handle } => {
                let handle = handle.clone();
                let before = handle.timed_out();
                self.ok(Req::ok(0), 0).await?;
                let held = self.call(Req::new(0, [Act::Hold; 3])).await;
                let err = held.expect_err("a held call times out");
                prop_assert!(err.is::<TimedOut>(), "{}", err);
                prop_assert_eq!(handle.timed_out(), before + 1);
            }
            Under::Hedge { handle, .. } => {
                let handle = handle.clone();
                // Enough calls to earn a hedge at any share, and to learn
                // a delay in percentile mode.
                for _ in 0..20 {
                    self.ok(Req::ok(0), 0).await?;
                }
                prop_assert!(handle.delay().is_some());
                let before = handle.hedges();
                let a = self
                    .call(Req::new(0, [Act::Hold, Act::Ok, Act::Ok]))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(a.attempt, 1, "the hedge answers a held call");
                prop_assert_eq!(handle.hedges(), before + 1);
            }
            Under::Stacked {
                breaker, adaptive, ..
            } => {
                let (breaker, adaptive) = (breaker.clone(), adaptive.clone());
                self.close(0, 0, || breaker.clone()).await?;
                probes(&breaker)?;
                prop_assert_eq!(adaptive.in_flight(), 0);
            }
            Under::Adaptive { handle } => {
                let handle = handle.clone();
                // Exactly `limit` calls are admitted at once: every slot
                // is back, and no more than the limit.
                let limit = handle.limit();
                let mut held = Vec::new();
                for _ in 0..limit {
                    let mut f = start(self, Req::new(0, [Act::Hold; 3])).unwrap();
                    let first = poll_caught(&self.world, &mut f);
                    prop_assert!(matches!(first, Some(Poll::Pending)), "{:?}", first);
                    held.push(f);
                }
                prop_assert_eq!(handle.in_flight(), limit);
                let over = self.call(Req::ok(0)).await;
                let err = over.expect_err("a call over the limit is refused");
                prop_assert!(err.is::<LimitReached>(), "{}", err);
                self.world.gate.add_permits(limit);
                for f in held {
                    f.await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                prop_assert_eq!(handle.in_flight(), 0);
                self.ok(Req::ok(0), 0).await?;
            }
        }
        prop_assert_eq!(self.world.alive.load(SeqCst), 0);
        Ok(())
    }
}

fn current_thread_history(kind: Kind, seed: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    quiet_panics();
    paused(async {
        let mut b = build(kind, seed, false);
        play(&mut b, ops).await;
        b.check_all_back()?;
        b.later_calls_work().await
    })
}

macro_rules! current_thread_histories {
    ($($name:ident: $kind:expr, $cases:expr;)*) => {
        $(
            proptest! {
                #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]
                #[test]
                fn $name(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..120)) {
                    current_thread_history($kind, seed, &ops)?;
                }
            }
        )*
    };
}

// The breakers get more histories: a probe needs a history to open a
// breaker, let its open period pass and call again.
current_thread_histories! {
    breaker_histories_give_everything_back: Kind::Breaker, 128;
    keyed_breaker_histories_give_everything_back: Kind::Keyed, 128;
    fallback_histories_give_everything_back: Kind::Fallback, 128;
    timeout_histories_give_everything_back: Kind::Timeout, 64;
    hedge_histories_give_everything_back: Kind::Hedge, 96;
    adaptive_histories_give_everything_back: Kind::Adaptive, 64;
    stacked_histories_give_everything_back: Kind::Stacked, 64;
}

/// A random request for the multi-thread rounds: no upstream sleeps (they
/// would run on the wall clock), panics as in the paused histories.
fn random_request(rng: &mut fastrand::Rng) -> Req {
    let mut act = || {
        [
            Act::Ok,
            Act::Ok,
            Act::Fail,
            Act::Fail,
            Act::Hold,
            Act::Hold,
            Act::Shrug,
            Act::PanicInCall,
            Act::PanicInFuture(rng.u8(0..3)),
        ][rng.usize(0..9)]
    };
    let acts = [act(), act(), act()];
    let mut req = Req::new(rng.u8(0..KEYS), acts);
    if rng.u8(0..10) == 0 {
        req.panics = [KEY, CLASSIFY, RETRY_AFTER, PREDICATE][rng.usize(0..4)];
    }
    if rng.u8(0..10) == 0 {
        req.hint = Some(rng.u16(1..60_000));
    }
    req.defer = rng.u8(0..10) < 3;
    req
}

/// Tasks on a multi-thread runtime call through clones of one stack at
/// once; some calls panic, some tasks are aborted, every call is dropped
/// after a few turns of the scheduler if it has not answered by then.
/// Then, on a paused clock, everything is back and the layer works.
fn multi_thread_rounds(kind: Kind, rounds: u64) {
    quiet_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    for round in 0..rounds {
        let seed = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ kind as u64;
        let mut b = rt.block_on(async {
            let b = build(kind, seed, true);
            let mut rng = fastrand::Rng::with_seed(seed);
            b.world.listeners_panic.store(round % 4 == 1, SeqCst);
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let mut svc = b.svc.clone();
                let world = b.world.clone();
                let reqs: Vec<(Req, u32)> = (0..6)
                    .map(|_| (random_request(&mut rng), rng.u32(0..6)))
                    .collect();
                tasks.push(tokio::spawn(async move {
                    for (req, yields) in reqs {
                        let call = AssertUnwindSafe(async {
                            world.calls.fetch_add(1, SeqCst);
                            svc.ready().await?.call(req).await
                        });
                        let give_up = async {
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                        };
                        tokio::select! {
                            res = futures::FutureExt::catch_unwind(call) => {
                                if let Ok(Err(e)) = res {
                                    if e.is::<TimedOut>() {
                                        world.timed_out.fetch_add(1, SeqCst);
                                    }
                                }
                            }
                            _ = give_up => {}
                        }
                    }
                }));
            }
            if round % 4 == 2 {
                b.world.listeners_panic.store(true, SeqCst);
            }
            for _ in 0..rng.usize(0..8) {
                tokio::task::yield_now().await;
            }
            b.world.gate.add_permits(rng.usize(0..6));
            if rng.bool() {
                tasks[rng.usize(..tasks.len())].abort();
            }
            for t in tasks {
                let _ = t.await;
            }
            b.world.settle_verdicts();
            b
        });
        let checked = paused(async {
            b.check_all_back()?;
            b.later_calls_work().await
        });
        if let Err(e) = checked {
            panic!("{kind:?} round {round}: {e}");
        }
    }
}

#[test]
fn breaker_multi_thread() {
    multi_thread_rounds(Kind::Breaker, 100);
}

#[test]
fn keyed_breaker_multi_thread() {
    multi_thread_rounds(Kind::Keyed, 100);
}

#[test]
fn fallback_multi_thread() {
    multi_thread_rounds(Kind::Fallback, 100);
}

#[test]
fn timeout_multi_thread() {
    multi_thread_rounds(Kind::Timeout, 100);
}

#[test]
fn hedge_multi_thread() {
    multi_thread_rounds(Kind::Hedge, 100);
}

#[test]
fn adaptive_multi_thread() {
    multi_thread_rounds(Kind::Adaptive, 100);
}

#[test]
fn stacked_multi_thread() {
    multi_thread_rounds(Kind::Stacked, 100);
}

/// Opens `handle`'s breaker with one failure through `svc`, then lets its
/// open period pass.
async fn open_then_wait(svc: &mut Stack, handle: &CircuitHandle) {
    let failing = Req::new(0, [Act::Fail; 3]);
    assert!(svc.ready().await.unwrap().call(failing).await.is_err());
    assert_eq!(handle.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
}

/// A probe whose classifier panics (in `classify`, or in `retry_after`
/// with back-off hints honoured): its caller sees the panic, and the probe
/// slot comes back, so the next call probes and closes the breaker. The
/// slot used to stay taken, refusing every later call.
async fn probe_classifier_panics(
    mut svc: Stack,
    handle: CircuitHandle,
    panics: u8,
) -> Result<(), String> {
    open_then_wait(&mut svc, &handle).await;
    let probe = Req {
        panics,
        ..Req::ok(0)
    };
    let fut = svc.ready().await.unwrap().call(probe);
    let caught = futures::FutureExt::catch_unwind(AssertUnwindSafe(fut)).await;
    if caught.is_ok() {
        return Err("the caller did not see the classifier's panic".into());
    }
    let m = handle.metrics();
    if m.half_open_in_flight != 0 || m.state != CircuitState::HalfOpen {
        return Err(format!("after the panic: {m:?}"));
    }
    let answer = svc.ready().await.unwrap().call(Req::ok(0)).await;
    answer.map_err(|e| format!("the next probe: {e}"))?;
    match handle.state() {
        CircuitState::Closed => Ok(()),
        s => Err(format!("not closed after a successful probe: {s}")),
    }
}

fn one_strike() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .name("one-strike")
        .failure_threshold(1)
        .success_threshold(1)
        .honor_retry_after(true)
        .open_timeout(Duration::from_secs(1))
}

#[tokio::test(start_paused = true)]
async fn a_breaker_classifier_that_panics_on_a_probe_gives_the_slot_back() {
    quiet_panics();
    for panics in [CLASSIFY, RETRY_AFTER] {
        let layer = one_strike().classify(Judge::timed(false)).build().unwrap();
        let handle = layer.handle();
        let chaos = Chaos {
            entry: 0,
            world: World::new(),
        };
        let svc = Stack::new(layer.layer(chaos));
        probe_classifier_panics(svc, handle, panics).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_keyed_breaker_classifier_that_panics_on_a_probe_gives_the_slot_back() {
    quiet_panics();
    for panics in [CLASSIFY, RETRY_AFTER] {
        let layer = one_strike()
            .classify(Judge::timed(false))
            .key(|req: &Req| req.key)
            .build()
            .unwrap();
        let keyed = layer.handle();
        let chaos = Chaos {
            entry: 0,
            world: World::new(),
        };
        let mut svc = Stack::new(layer.layer(chaos));
        // The key's breaker exists once it has seen a call.
        svc.ready().await.unwrap().call(Req::ok(0)).await.unwrap();
        let handle = keyed.breaker(&0).unwrap();
        probe_classifier_panics(svc, handle, panics).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_fallback_classifier_that_panics_on_a_probe_gives_the_slot_back() {
    quiet_panics();
    for panics in [CLASSIFY, RETRY_AFTER] {
        let world = World::new();
        let layer = FallbackLayer::builder()
            .fallback(
                "spare",
                Chaos {
                    entry: 1,
                    world: world.clone(),
                },
            )
            .breaker(one_strike())
            .classify(Judge::timed(false))
            .build()
            .unwrap();
        let handle = layer.handle().breaker("primary").unwrap().clone();
        let svc = Stack::new(layer.layer(Chaos { entry: 0, world }));
        probe_classifier_panics(svc, handle, panics).await.unwrap();
    }
}
