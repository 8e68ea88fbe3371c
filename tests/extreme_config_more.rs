//! Every setting of the breaker (plain, keyed, on each backend), fallback,
//! dedup, timeout, hedge and adaptive-limit builders, and of the file and
//! Redis store builders, at its extremes: `build()` either refuses it with
//! a `ConfigError` naming a field, or the layer then serves calls without
//! a panic and keeps its bounds. The layers run on tokio's paused clock;
//! the file store keeps wall-clock time in a temporary directory, and the
//! Redis store meets a real `redis-server` on a free port (or an unused
//! one, where it must degrade).
#![cfg(all(
    feature = "circuit-breaker",
    feature = "fallback",
    feature = "dedup",
    feature = "timeout",
    feature = "hedge",
    feature = "adaptive"
))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::Semaphore;
use tokio::time::{advance, sleep, Instant};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::adaptive::{Aimd, Algorithm, Gradient, LimitReached, Vegas};
use tower_bulwark::backoff::{Backoff, Jitter};
use tower_bulwark::circuit_breaker::{CircuitBreakerBuilder, CircuitOpen, CircuitState, Window};
use tower_bulwark::classify::{Classify, Outcome};
use tower_bulwark::timeout::TimedOut;
use tower_bulwark::{
    AdaptiveLimitLayer, CircuitBreakerLayer, DedupLayer, FallbackLayer, HedgeLayer, TimeoutLayer,
};

#[path = "support/extreme.rs"]
mod extreme;
#[cfg(feature = "redis")]
use extreme::paused_io;
use extreme::{count_u32, count_usize, duration, float, named, paused, poll_once, ratio, waitable};

/// Mostly an ordinary value, sometimes an edge one.
fn usual_u32(lo: u32, hi: u32) -> impl Strategy<Value = u32> {
    prop_oneof![3 => lo..hi, 1 => count_u32()]
}

fn usual_usize(lo: usize, hi: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => lo..hi, 1 => count_usize()]
}

fn usual_f64(lo: f64, hi: f64) -> impl Strategy<Value = f64> {
    prop_oneof![3 => lo..hi, 1 => float()]
}

fn usual_ms(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![3 => (lo..hi).prop_map(Duration::from_millis), 1 => duration()]
}

// --- The breaker -----------------------------------------------------------

const BREAKER_FIELDS: &[&str] = &[
    "failure_threshold",
    "open_timeout",
    "open_backoff",
    "half_open_max_calls",
    "success_threshold",
    "window",
    "failure_rate_threshold",
    "minimum_calls",
    "slow_call_duration",
    "slow_call_rate_threshold",
    "max_retry_after",
    "stale_attempt_timeout",
    "sync_interval",
];

#[derive(Debug, Clone)]
struct BreakerCase {
    failure_threshold: u32,
    open_timeout: Duration,
    // (growth, base, max_delay, jitter)
    open_backoff: Option<(u8, Duration, Duration, u8)>,
    half_open_max_calls: u32,
    success_threshold: u32,
    // Count (true) or time window.
    window: Option<(bool, u32, Duration)>,
    failure_rate_threshold: f64,
    minimum_calls: Option<u32>,
    slow_call_duration: Option<Duration>,
    slow_call_rate_threshold: f64,
    max_retry_after: Duration,
    // An upstream hint on every failure, honoured.
    hint: Option<Duration>,
    stale_attempt_timeout: Option<Duration>,
    sync_interval: Option<Duration>,
    max_keys: usize,
}

// Boxed: the value trees of so many settings, nested, overflow a test
// thread's stack in a debug build.
fn breaker_case() -> BoxedStrategy<BreakerCase> {
    (
        (
            usual_u32(1, 12),
            usual_ms(1, 5_000),
            proptest::option::weighted(
                0.3,
                (0u8..3, usual_ms(1, 3_000), usual_ms(1, 10_000), 0u8..4),
            ),
            usual_u32(1, 5),
            usual_u32(1, 6),
        ),
        (
            proptest::option::weighted(0.4, (any::<bool>(), usual_u32(1, 20), usual_ms(1, 60_000))),
            ratio(),
            proptest::option::weighted(0.5, usual_u32(1, 20)),
            proptest::option::weighted(0.3, duration()),
            ratio(),
        ),
        (
            usual_ms(1, 60_000),
            proptest::option::weighted(0.3, duration()),
            proptest::option::weighted(0.1, duration()),
            proptest::option::weighted(0.05, duration()),
            usual_usize(1, 6),
        ),
    )
        .prop_map(
            |(
                (
                    failure_threshold,
                    open_timeout,
                    open_backoff,
                    half_open_max_calls,
                    success_threshold,
                ),
                (
                    window,
                    failure_rate_threshold,
                    minimum_calls,
                    slow_call_duration,
                    slow_call_rate_threshold,
                ),
                (max_retry_after, hint, stale_attempt_timeout, sync_interval, max_keys),
            )| BreakerCase {
                failure_threshold,
                open_timeout,
                open_backoff,
                half_open_max_calls,
                success_threshold,
                window,
                failure_rate_threshold,
                minimum_calls,
                slow_call_duration,
                slow_call_rate_threshold,
                max_retry_after,
                hint,
                stale_attempt_timeout,
                sync_interval,
                max_keys,
            },
        )
        .boxed()
}

impl BreakerCase {
    fn backoff(&self) -> Option<Backoff> {
        self.open_backoff.map(|(growth, base, max, jitter)| {
            let b = match growth {
                0 => Backoff::constant(base),
                1 => Backoff::linear(base),
                _ => Backoff::exponential(base),
            };
            let kinds = [
                Jitter::None,
                Jitter::Full,
                Jitter::Equal,
                Jitter::Decorrelated,
            ];
            b.max_delay(max).jitter(kinds[jitter as usize % 4])
        })
    }

    fn window(&self) -> Option<Window> {
        self.window.map(|(count, n, d)| {
            if count {
                Window::count(n)
            } else {
                Window::time(d)
            }
        })
    }

    fn builder(&self) -> CircuitBreakerBuilder {
        let mut b = CircuitBreakerLayer::builder()
            .failure_threshold(self.failure_threshold)
            .open_timeout(self.open_timeout)
            .half_open_max_calls(self.half_open_max_calls)
            .success_threshold(self.success_threshold)
            .failure_rate_threshold(self.failure_rate_threshold)
            .slow_call_rate_threshold(self.slow_call_rate_threshold)
            .max_retry_after(self.max_retry_after)
            .honor_retry_after(self.hint.is_some());
        if let Some(backoff) = self.backoff() {
            b = b.open_backoff(backoff);
        }
        if let Some(w) = self.window() {
            b = b.window(w);
        }
        if let Some(m) = self.minimum_calls {
            b = b.minimum_calls(m);
        }
        if let Some(d) = self.slow_call_duration {
            b = b.slow_call_duration(d);
        }
        if let Some(d) = self.stale_attempt_timeout {
            b = b.stale_attempt_timeout(d);
        }
        if let Some(d) = self.sync_interval {
            b = b.sync_interval(d);
        }
        b
    }

    /// Failed calls in a row that open the breaker.
    fn opens_after(&self) -> u32 {
        if self.hint.is_some() {
            // The first failure's hint holds it open.
            return 1;
        }
        match (self.window(), self.minimum_calls) {
            (None, _) => self.failure_threshold,
            (_, Some(m)) => m,
            (Some(Window::Count(n)), None) => n.min(10),
            (Some(_), None) => 10,
        }
    }

    /// The shortest and longest the first opening can last (`None`: no
    /// lower bound beyond zero).
    fn open_for(&self) -> (Option<Duration>, Duration) {
        if let Some(h) = self.hint {
            let used = h.min(self.max_retry_after);
            return (Some(used), used);
        }
        let Some(b) = self.backoff() else {
            return (Some(self.open_timeout), self.open_timeout);
        };
        let d = b.delay(1);
        match b.jitter_kind() {
            Jitter::None => (Some(d), d),
            Jitter::Full => (None, d),
            Jitter::Equal => (Some(d / 2), d),
            _ => {
                let hi = b.base().saturating_mul(3).min(b.max());
                (Some(b.base().min(hi)), hi)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Fail,
    Answer,
    /// Answers once the gate lets it.
    Hang,
}

#[derive(Debug, Clone, Copy)]
struct Req {
    key: u8,
    act: Act,
}

/// Every `Err` fails, and carries the upstream's hint.
#[derive(Debug, Clone, Copy)]
struct Hinted(Option<Duration>);

impl Classify<u32, BoxError> for Hinted {
    fn classify(&self, r: &Result<u32, BoxError>, _: Duration) -> Outcome {
        if r.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
    fn retry_after(&self, r: &Result<u32, BoxError>) -> Option<Duration> {
        r.as_ref().err().and(self.0)
    }
}

fn upstream(
    gate: Arc<Semaphore>,
) -> impl Service<
    Req,
    Response = u32,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<u32, BoxError>> + Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |r: Req| {
        let gate = gate.clone();
        async move {
            match r.act {
                Act::Fail => Err::<u32, BoxError>("upstream down".into()),
                Act::Answer => Ok(u32::from(r.key)),
                Act::Hang => {
                    gate.acquire().await.unwrap().forget();
                    Ok(u32::from(r.key))
                }
            }
        }
    })
}

fn is_open(r: &Result<u32, BoxError>) -> bool {
    matches!(r, Err(e) if e.is::<CircuitOpen>())
}

async fn send<S>(svc: &mut S, act: Act) -> Result<u32, BoxError>
where
    S: Service<Req, Response = u32, Error = BoxError>,
{
    svc.ready().await?.call(Req { key: 0, act }).await
}

/// Drives a breaker through one opening and its recovery, checking at each
/// step what the settings promise. `state` reads key 0's breaker.
async fn run_breaker<S>(
    svc: &mut S,
    state: impl Fn() -> CircuitState,
    gate: &Semaphore,
    c: &BreakerCase,
) -> Result<(), TestCaseError>
where
    S: Service<Req, Response = u32, Error = BoxError>,
    S::Future: Unpin,
{
    let k = c.opens_after();
    // Closed: every call is let through until the threshold.
    for _ in 0..k.min(40) {
        prop_assert_eq!(state(), CircuitState::Closed);
        let r = send(svc, Act::Fail).await;
        prop_assert!(!is_open(&r), "rejected while closed");
    }
    if k > 40 {
        prop_assert_eq!(state(), CircuitState::Closed);
        return Ok(());
    }
    let (lo, hi) = c.open_for();
    let opened = Instant::now();
    if lo.is_some_and(|lo| !lo.is_zero()) {
        // Open: rejected, with a wait that the opening can cover.
        prop_assert_eq!(state(), CircuitState::Open);
        let r = send(svc, Act::Fail).await;
        let Err(e) = &r else {
            return Err(TestCaseError::fail("open breaker answered"));
        };
        let open = e.downcast_ref::<CircuitOpen>();
        prop_assert!(open.is_some(), "not a rejection: {e}");
        if let Some(after) = open.and_then(|o| o.retry_after()) {
            prop_assert!(after <= hi, "retry in {after:?}, open for at most {hi:?}");
        }
    } else {
        prop_assert!(matches!(
            state(),
            CircuitState::Open | CircuitState::HalfOpen
        ));
    }
    // Still open just before the shortest opening ends.
    if let Some(lo) = lo.filter(|lo| *lo > Duration::from_millis(1) && waitable(*lo)) {
        advance(lo - Duration::from_millis(1)).await;
        prop_assert_eq!(state(), CircuitState::Open);
        prop_assert!(is_open(&send(svc, Act::Fail).await));
    }
    if !waitable(hi) {
        // Too long to wait out: still open a day later.
        if lo.is_some_and(|lo| lo > Duration::from_secs(86_400 * 2)) {
            advance(Duration::from_secs(86_400)).await;
            prop_assert_eq!(state(), CircuitState::Open);
        }
        return Ok(());
    }
    // Half-open once the longest opening has passed.
    let waited = opened.elapsed();
    if hi > waited {
        advance(hi - waited).await;
    }
    prop_assert_eq!(state(), CircuitState::HalfOpen);
    // At most `half_open_max_calls` probes at once.
    let tries = c.half_open_max_calls.min(8) + 1;
    let mut probes = Vec::new();
    for _ in 0..tries {
        let mut f = svc.ready().await.unwrap().call(Req {
            key: 0,
            act: Act::Hang,
        });
        match poll_once(&mut f) {
            Poll::Pending => probes.push(f),
            Poll::Ready(r) => prop_assert!(is_open(&r), "a probe failed: {:?}", r.err()),
        }
    }
    prop_assert_eq!(probes.len() as u32, c.half_open_max_calls.min(tries));
    gate.add_permits(probes.len());
    let mut successes = 0u32;
    for f in probes {
        prop_assert!(f.await.is_ok());
        successes += 1;
    }
    // Closed after `success_threshold` probe successes.
    while successes < c.success_threshold && successes < 40 {
        prop_assert_eq!(state(), CircuitState::HalfOpen);
        prop_assert!(send(svc, Act::Answer).await.is_ok());
        successes += 1;
    }
    if successes >= c.success_threshold {
        prop_assert_eq!(state(), CircuitState::Closed);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn breaker_refused_or_sound(c in breaker_case()) {
        paused(async {
            let layer = match c.builder().classify(Hinted(c.hint)).build() {
                Err(e) => return named(&e, BREAKER_FIELDS),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let gate = Arc::new(Semaphore::new(0));
            let mut svc = layer.layer(upstream(gate.clone())).map_future(Box::pin);
            run_breaker(&mut svc, || handle.state(), &gate, &c).await
        })?;
    }

    #[test]
    fn keyed_breaker_refused_or_sound(c in breaker_case()) {
        paused(async {
            let built = c
                .builder()
                .classify(Hinted(c.hint))
                .key(|r: &Req| r.key)
                .max_keys(c.max_keys)
                .build();
            let layer = match built {
                Err(e) => {
                    let mut fields = BREAKER_FIELDS.to_vec();
                    fields.push("max_keys");
                    return named(&e, &fields);
                }
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let gate = Arc::new(Semaphore::new(0));
            let mut svc = layer.layer(upstream(gate.clone())).map_future(Box::pin);
            let state = || handle.state(&0).unwrap_or(CircuitState::Closed);
            run_breaker(&mut svc, state, &gate, &c).await?;
            // Other keys: served, and the table never outgrows its bound.
            for key in 1..8u8 {
                let r = svc.ready().await.unwrap().call(Req { key, act: Act::Answer }).await;
                prop_assert!(r.is_ok() || is_open(&r));
                prop_assert!(handle.len() <= c.max_keys);
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Calls that answer, but slowly: slow by `slow_call_duration`, they
    /// open the breaker as failures would (consecutive mode) or by their
    /// rate (window mode); never slow, they never open it.
    #[test]
    fn breaker_slow_calls_refused_or_sound(
        c in breaker_case(),
        slow in prop_oneof![3 => usual_ms(1, 100).prop_map(Some), 1 => Just(None)],
        latency in 0u64..120,
    ) {
        paused(async {
            let mut c = c;
            c.hint = None;
            c.slow_call_duration = slow;
            let layer = match c.builder().build() {
                Err(e) => return named(&e, BREAKER_FIELDS),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let mut svc = layer.layer(service_fn(move |n: u32| async move {
                sleep(Duration::from_millis(latency)).await;
                Ok::<u32, BoxError>(n)
            }));
            let is_slow = slow.is_some_and(|t| t <= Duration::from_millis(latency));
            let k = c.opens_after();
            let mut rejected = false;
            for n in 0..k.min(40) {
                prop_assert_eq!(handle.state(), CircuitState::Closed);
                match svc.ready().await.unwrap().call(n).await {
                    Ok(v) => prop_assert_eq!(v, n),
                    Err(e) => {
                        prop_assert!(e.is::<CircuitOpen>(), "{e}");
                        rejected = true;
                    }
                }
            }
            prop_assert!(!rejected, "rejected while closed");
            // An opening shorter than the last call's latency may already
            // have passed.
            let opened = !matches!(handle.state(), CircuitState::Closed);
            // A time window shorter than the calls' run lets the first
            // ones leave it before the last one ends.
            let window_holds_them = match c.window() {
                Some(Window::Time(d)) => {
                    d >= Duration::from_millis(latency).saturating_mul(k)
                }
                _ => true,
            };
            if is_slow && k <= 40 && window_holds_them {
                prop_assert!(opened, "{k} slow calls did not open it");
            } else if !is_slow {
                prop_assert!(!opened, "opened by calls that were not slow");
            }
            Ok(())
        })?;
    }
}

// --- Fallback --------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fallback_refused_or_sound(
        c in breaker_case(),
        primary in prop_oneof![6 => Just(None), 6 => Just(Some("p")), 1 => Just(Some("")), 1 => Just(Some("fb"))],
        second in prop_oneof![3 => Just("fb"), 1 => Just("")],
    ) {
        paused(async {
            let mut b = FallbackLayer::<Req, u32>::builder()
                .fallback(second, service_fn(|_: Req| async { Ok::<u32, BoxError>(99) }))
                .breaker(c.builder());
            if let Some(p) = primary {
                b = b.primary_name(p);
            }
            let layer = match b.build() {
                Err(e) => {
                    let mut fields = BREAKER_FIELDS.to_vec();
                    fields.extend(["primary_name", "fallback"]);
                    return named(&e, &fields);
                }
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let primary = handle.breaker(primary.unwrap_or("primary")).unwrap().clone();
            let gate = Arc::new(Semaphore::new(0));
            let mut svc = layer.layer(upstream(gate));
            // The primary always fails: every call is answered by the
            // fallback, and the primary's breaker opens at its threshold.
            // (The fallback's classifier gives no upstream hints.)
            let mut plain = c.clone();
            plain.hint = None;
            let k = plain.opens_after();
            for _ in 0..k.min(12) {
                let r = svc.ready().await.unwrap().call(Req { key: 0, act: Act::Fail }).await;
                prop_assert_eq!(r.ok(), Some(99));
            }
            if k <= 12 && plain.open_for().0.is_some_and(|d| !d.is_zero()) {
                prop_assert_eq!(primary.state(), CircuitState::Open);
            }
            let r = svc.ready().await.unwrap().call(Req { key: 0, act: Act::Fail }).await;
            prop_assert_eq!(r.ok(), Some(99));
            Ok(())
        })?;
    }
}

// --- Dedup -----------------------------------------------------------------

#[derive(Debug, Clone)]
struct DedupCase {
    cache_ttl: Option<Duration>,
    error_ttl: Option<Duration>,
    max_entries: usize,
    shared: bool,
    // (gap ms, key, latency ms)
    calls: Vec<(u64, u8, u64)>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn dedup_refused_or_sound(
        c in (
            proptest::option::of(duration()),
            proptest::option::of(duration()),
            usual_usize(1, 4),
            any::<bool>(),
            proptest::collection::vec((0u64..300, 0u8..5, 0u64..500), 1..40),
        ).prop_map(|(cache_ttl, error_ttl, max_entries, shared, calls)| DedupCase {
            cache_ttl, error_ttl, max_entries, shared, calls,
        })
    ) {
        paused(async {
            let mut b = DedupLayer::builder()
                .key(|r: &(u8, u64)| (r.0 != 4).then_some(r.0))
                .max_entries(c.max_entries);
            if let Some(d) = c.cache_ttl {
                b = b.cache_ttl(d);
            }
            if let Some(d) = c.error_ttl {
                b = b.error_ttl(d);
            }
            if c.shared {
                b = b.share_between_services();
            }
            let layer = match b.build() {
                Err(e) => return named(&e, &["max_entries", "cache_ttl", "error_ttl"]),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let calls = Arc::new(AtomicUsize::new(0));
            let seen = calls.clone();
            // Key 2 always fails; every other key answers from its key.
            let svc = layer.layer(service_fn(move |(key, latency): (u8, u64)| {
                seen.fetch_add(1, SeqCst);
                async move {
                    sleep(Duration::from_millis(latency)).await;
                    if key == 2 {
                        Err::<u32, BoxError>("boom".into())
                    } else {
                        Ok(u32::from(key) * 7)
                    }
                }
            }));
            let mut tasks = Vec::new();
            for &(gap, key, latency) in &c.calls {
                sleep(Duration::from_millis(gap)).await;
                let svc = svc.clone();
                tasks.push((key, tokio::spawn(svc.oneshot((key, latency)))));
                prop_assert!(handle.len() <= c.max_entries);
            }
            for (key, task) in tasks {
                match task.await.unwrap() {
                    Ok(v) => prop_assert_eq!(v, u32::from(key) * 7),
                    Err(e) => {
                        prop_assert_eq!(key, 2);
                        prop_assert!(e.to_string().contains("boom"), "{e}");
                    }
                }
            }
            prop_assert!(calls.load(SeqCst) <= c.calls.len());
            prop_assert_eq!(handle.in_flight(), 0);
            prop_assert!(handle.len() <= c.max_entries);
            Ok(())
        })?;
    }
}

// --- Timeout ---------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn timeout_refused_or_sound(
        timeout in proptest::option::weighted(0.95, duration()),
        own in proptest::option::of(duration()),
        latency in proptest::option::of(0u64..6_000),
    ) {
        paused(async {
            let mut b = TimeoutLayer::builder();
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            let layer = match b.per_request(move |_: &u32| own).build() {
                Err(e) => return named(&e, &["timeout"]),
                Ok(layer) => layer,
            };
            let timeout = timeout.unwrap();
            let limit = own.map_or(timeout, |o| o.min(timeout));
            let mut svc = layer.layer(service_fn(move |n: u32| async move {
                match latency {
                    Some(ms) => sleep(Duration::from_millis(ms)).await,
                    None => std::future::pending().await,
                }
                Ok::<u32, BoxError>(n)
            }));
            let start = Instant::now();
            let mut f = Box::pin(svc.ready().await.unwrap().call(1));
            let fires = latency.is_some() || waitable(limit);
            if !fires {
                // A timeout too long for the clock: still waiting a day on.
                prop_assert!(poll_once(&mut f).is_pending());
                advance(Duration::from_secs(86_400)).await;
                prop_assert!(poll_once(&mut f).is_pending());
                return Ok(());
            }
            let r = f.await;
            let took = start.elapsed();
            match r {
                Ok(n) => {
                    prop_assert_eq!(n, 1);
                    // An answer due when the deadline's timer fires wins.
                    let round = Duration::from_millis(1);
                    prop_assert!(latency.is_some_and(|ms| Duration::from_millis(ms) < limit.saturating_add(round)));
                }
                Err(e) => {
                    prop_assert!(e.is::<TimedOut>(), "{e}");
                    // Never before its time, and at it when the upstream
                    // would be later (timers round up to the millisecond).
                    prop_assert!(took >= limit, "fired after {took:?} of {limit:?}");
                    prop_assert!(took <= limit + Duration::from_millis(1));
                    prop_assert!(latency.is_none_or(|ms| Duration::from_millis(ms) >= limit));
                }
            }
            Ok(())
        })?;
    }
}

// --- Hedge -----------------------------------------------------------------

#[derive(Debug, Clone)]
struct HedgeCase {
    delay: Option<Duration>,
    percentile: f64,
    min_delay: Duration,
    min_data_points: usize,
    window: usize,
    max_hedges: u32,
    max_extra_load: f64,
    // Each attempt's latency, in ms, in turn.
    latencies: Vec<u64>,
    calls: usize,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn hedge_refused_or_sound(
        c in (
            (
                proptest::option::of(usual_ms(1, 200)),
                ratio(),
                usual_ms(0, 50),
                usual_usize(1, 10),
                usual_usize(1, 40),
            ),
            (usual_u32(1, 4), usual_f64(0.01, 2.0)),
            proptest::collection::vec(0u64..400, 1..30),
            1usize..40,
        ).prop_map(|((delay, percentile, min_delay, min_data_points, window), (max_hedges, max_extra_load), latencies, calls)| HedgeCase {
            delay, percentile, min_delay, min_data_points, window, max_hedges, max_extra_load, latencies, calls,
        })
    ) {
        paused(async {
            let mut b = HedgeLayer::builder()
                .percentile(c.percentile)
                .min_delay(c.min_delay)
                .min_data_points(c.min_data_points)
                .window(c.window)
                .max_hedges(c.max_hedges)
                .max_extra_load(c.max_extra_load);
            if let Some(d) = c.delay {
                b = b.delay(d);
            }
            let layer = match b.build() {
                Err(e) => return named(&e, &["delay", "percentile", "min_delay", "min_data_points", "window", "max_hedges", "max_extra_load"]),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let attempts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
            let seen = attempts.clone();
            let next = Arc::new(AtomicUsize::new(0));
            let latencies = Arc::new(c.latencies.clone());
            let mut svc = layer.layer(service_fn(move |n: u32| {
                *seen.lock().unwrap().entry(n).or_default() += 1;
                let i = next.fetch_add(1, SeqCst);
                let ms = latencies[i % latencies.len()];
                async move {
                    sleep(Duration::from_millis(ms)).await;
                    Ok::<u32, BoxError>(n)
                }
            }));
            for n in 0..c.calls as u32 {
                prop_assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
            }
            let attempts = attempts.lock().unwrap();
            let total: u32 = attempts.values().sum();
            let hedges = u64::from(total) - c.calls as u64;
            // Each copy counted, no call copied more than `max_hedges`
            // times, and copies within the extra load paid for by calls.
            prop_assert_eq!(handle.hedges(), hedges);
            prop_assert!(attempts.values().all(|&a| a <= 1 + c.max_hedges));
            prop_assert!(
                hedges as f64 <= c.calls as f64 * c.max_extra_load * (1.0 + 1e-9),
                "{hedges} hedges for {} calls at {}", c.calls, c.max_extra_load
            );
            Ok(())
        })?;
    }
}

// --- Adaptive limit --------------------------------------------------------

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        (usual_f64(0.5, 1.0), usual_f64(0.1, 5.0), usual_ms(1, 500)).prop_map(|(r, i, t)| {
            Algorithm::from(
                Aimd::default()
                    .backoff_ratio(r)
                    .increase(i)
                    .latency_threshold(t),
            )
        }),
        (
            usual_f64(1.0, 3.0),
            ratio(),
            usual_u32(1, 20),
            usual_u32(1, 100),
            usual_f64(0.0, 10.0)
        )
            .prop_map(|(t, s, w, lw, q)| {
                Algorithm::from(
                    Gradient::default()
                        .tolerance(t)
                        .smoothing(s)
                        .window(w)
                        .long_window(lw)
                        .queue_size(q),
                )
            }),
        (usual_f64(0.0, 5.0), usual_f64(0.0, 10.0), usual_u32(1, 50)).prop_map(|(a, b, p)| {
            Algorithm::from(Vegas::default().alpha(a).beta(b).probe_interval(p))
        }),
    ]
}

#[derive(Debug, Clone)]
struct AdaptiveCase {
    algorithm: Algorithm,
    min: usize,
    initial: usize,
    max: usize,
    max_wait: Duration,
    // (gap ms, latency ms, fails)
    calls: Vec<(u64, u64, bool)>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn adaptive_refused_or_sound(
        c in (
            algorithm(),
            prop_oneof![
                3 => (1usize..6, 0usize..6, 0usize..10).prop_map(|(min, a, b)| (min, min + a, min + a + b)),
                1 => (count_usize(), count_usize(), count_usize()),
            ],
            usual_ms(0, 300),
            proptest::collection::vec((0u64..50, 0u64..400, proptest::bool::weighted(0.2)), 1..60),
        ).prop_map(|(algorithm, (min, initial, max), max_wait, calls)| AdaptiveCase {
            algorithm, min, initial, max, max_wait, calls,
        })
    ) {
        paused(async {
            let b = AdaptiveLimitLayer::builder()
                .algorithm(c.algorithm)
                .min_limit(c.min)
                .initial_limit(c.initial)
                .max_limit(c.max)
                .max_wait(c.max_wait);
            let layer = match b.build() {
                Err(e) => return named(&e, &[
                    "min_limit", "max_limit", "initial_limit", "max_wait",
                    "backoff_ratio", "increase", "latency_threshold",
                    "tolerance", "smoothing", "window", "long_window", "queue_size",
                    "alpha", "beta", "probe_interval",
                ]),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let (min, max) = (c.min, c.max);
            let h = handle.clone();
            let running = Arc::new(AtomicUsize::new(0));
            let broken: Arc<Mutex<Option<String>>> = Arc::default();
            let (r, bad) = (running.clone(), broken.clone());
            let svc = layer.layer(service_fn(move |(latency, fails): (u64, bool)| {
                // On entry: within the limit, and the limit within bounds.
                let now = r.fetch_add(1, SeqCst) + 1;
                let limit = h.limit();
                if now > limit || !(min..=max).contains(&limit) {
                    *bad.lock().unwrap() = Some(format!("{now} running, limit {limit} in [{min}, {max}]"));
                }
                let r = r.clone();
                async move {
                    sleep(Duration::from_millis(latency)).await;
                    r.fetch_sub(1, SeqCst);
                    if fails {
                        Err::<(), BoxError>("overloaded".into())
                    } else {
                        Ok(())
                    }
                }
            }));
            let mut tasks = Vec::new();
            for &(gap, latency, fails) in &c.calls {
                sleep(Duration::from_millis(gap)).await;
                tasks.push(tokio::spawn(svc.clone().oneshot((latency, fails))));
                prop_assert!(handle.in_flight() <= max);
            }
            for t in tasks {
                if let Err(e) = t.await.unwrap() {
                    prop_assert!(e.is::<LimitReached>() || e.to_string() == "overloaded", "{e}");
                }
            }
            if let Some(msg) = broken.lock().unwrap().take() {
                return Err(TestCaseError::fail(msg));
            }
            prop_assert!((min..=max).contains(&handle.limit()));
            prop_assert_eq!(handle.in_flight(), 0);
            Ok(())
        })?;
    }
}

// --- Stores ----------------------------------------------------------------

/// A bucket the limiters can keep exactly: both settings finite and above
/// zero, refilling from empty within 2^61 ns (about 73 years).
#[cfg(all(any(feature = "file-store", feature = "redis"), feature = "rate-limit"))]
fn bucket_ok(max_tokens: f64, refill_rate: f64) -> bool {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    positive(max_tokens)
        && positive(refill_rate)
        && max_tokens / refill_rate * 1e9 <= (1u64 << 61) as f64
}

#[cfg(all(feature = "file-store", feature = "rate-limit"))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn file_store_refused_or_sound(
        lock_timeout in usual_ms(1, 200),
        slot_timeout in usual_ms(1, 60_000),
        max_tokens in usual_f64(1.0, 20.0),
        refill_rate in usual_f64(0.001, 10.0),
        max_concurrent in usual_u32(1, 6),
        c in breaker_case(),
    ) {
        use tower_bulwark::store::file::FileStore;
        let dir = tempfile::tempdir().unwrap();
        paused(async {
            let store = FileStore::builder()
                .dir(dir.path())
                .lock_timeout(lock_timeout)
                .slot_timeout(slot_timeout)
                .build();
            let store = match store {
                Err(e) => {
                    prop_assert!(slot_timeout < Duration::from_millis(1) || lock_timeout.is_zero());
                    return named(&e, &["lock_timeout", "slot_timeout"]);
                }
                Ok(store) => store,
            };
            // A bucket: never more taken than it holds plus its refill.
            match store.rate_limiter(max_tokens, refill_rate) {
                Err(e) => named(&e, &["max_tokens", "refill_rate"])?,
                Ok(bucket) => {
                    prop_assert!(bucket_ok(max_tokens, refill_rate));
                    let start = std::time::Instant::now();
                    let taken = (0..30).filter(|_| bucket.try_acquire(1.0).is_ok()).count();
                    let secs = start.elapsed().as_secs_f64();
                    let bound = max_tokens + refill_rate * secs;
                    prop_assert!(taken as f64 <= bound + 1e-9, "{taken} taken, bound {bound}");
                    let left = bucket.tokens();
                    prop_assert!(left.is_finite() && left <= max_tokens, "{left} tokens");
                }
            }
            // A bulkhead: never more slots held than it has.
            match store.bulkhead(max_concurrent) {
                Err(e) => named(&e, &["max_concurrent"])?,
                Ok(bulkhead) => {
                    let want = max_concurrent.min(6) + 1;
                    let held: Vec<_> = (0..want).filter_map(|_| bulkhead.try_acquire()).collect();
                    prop_assert!(bulkhead.in_use() <= max_concurrent);
                    // A slot is reclaimed once it is older than
                    // slot_timeout on the wall clock, so a short one may
                    // free a slot between two takes.
                    if slot_timeout >= Duration::from_secs(60) {
                        prop_assert_eq!(held.len() as u32, max_concurrent.min(want));
                    }
                }
            }
            // A breaker on the file: opens at its threshold. (The file's
            // clock is the wall clock, so only the opening is checked.)
            let mut c = c;
            c.window = None;
            c.hint = None;
            let layer = match c.builder().backend(store).build() {
                Err(e) => return named(&e, BREAKER_FIELDS),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let mut svc = layer.layer(upstream(Arc::new(Semaphore::new(0))));
            for _ in 0..c.failure_threshold.min(12) {
                let r = send(&mut svc, Act::Fail).await;
                prop_assert!(!is_open(&r) || handle.state() != CircuitState::Closed);
            }
            if c.failure_threshold <= 12 {
                prop_assert_ne!(handle.state(), CircuitState::Closed);
            }
            Ok(())
        })?;
    }
}

#[cfg(all(feature = "redis", feature = "rate-limit"))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Building needs no server: every setting is checked up front.
    #[test]
    fn redis_store_refused_or_built(
        timeout in usual_ms(1, 200),
        retry_interval in usual_ms(1, 5_000),
        prefix in prop_oneof![Just("bulwark"), Just(""), Just("a{b}")],
        max_tokens in usual_f64(1.0, 20.0),
        refill_rate in usual_f64(0.001, 10.0),
        max_concurrent in usual_u32(1, 6),
        lease_ttl in duration(),
        c in breaker_case(),
    ) {
        use tower_bulwark::store::redis::RedisStore;
        paused_io(async {
            let store = RedisStore::builder("redis://127.0.0.1:1/")
                .timeout(timeout)
                .retry_interval(retry_interval)
                .prefix(prefix)
                .build();
            let store = match store {
                Err(e) => return named(&e, &["timeout", "retry_interval", "prefix"]),
                Ok(store) => store,
            };
            match store.rate_limiter("r", max_tokens, refill_rate) {
                Err(e) => named(&e, &["max_tokens", "refill_rate"])?,
                Ok(_) => prop_assert!(bucket_ok(max_tokens, refill_rate)),
            }
            match store.bulkhead("b", max_concurrent) {
                Err(e) => named(&e, &["max_concurrent"])?,
                Ok(b) => drop(b.lease_ttl(lease_ttl)),
            }
            let mut c = c;
            c.window = None;
            match c.builder().classify(Hinted(c.hint)).backend(store.clone()).build() {
                Err(e) => named(&e, BREAKER_FIELDS)?,
                Ok(layer) => {
                    // The fleet cannot be reached: the breaker goes on
                    // locally, whatever its timings, and still opens.
                    let handle = layer.handle();
                    let mut svc = layer.layer(upstream(Arc::new(Semaphore::new(0))));
                    prop_assert!(send(&mut svc, Act::Answer).await.is_ok());
                    for _ in 0..c.failure_threshold.min(12) {
                        sleep(Duration::from_millis(100)).await;
                        let _ = send(&mut svc, Act::Fail).await;
                    }
                    if c.failure_threshold <= 12 {
                        prop_assert_ne!(handle.state(), CircuitState::Closed);
                    }
                }
            }
            // Nothing listens there: the store degrades, for
            // retry_interval, however long, and answers from its policy.
            if let Ok(limiter) = store.rate_limiter("r", 5.0, 1.0) {
                let _ = limiter.try_acquire("k", 1).await;
                let _ = limiter.try_acquire("k", 1).await;
                prop_assert!(store.is_degraded());
            }
            Ok(())
        })?;
    }
}

// --- Failing cases found above, kept -------------------------------------

#[cfg(feature = "redis")]
#[test]
fn redis_store_builds_with_the_longest_timeouts() {
    use tower_bulwark::store::redis::RedisStore;
    paused_io(async {
        let store = RedisStore::builder("redis://127.0.0.1:1/")
            .timeout(Duration::MAX)
            .retry_interval(Duration::MAX)
            .build();
        assert!(store.is_ok());
        // Unreachable: degraded for a retry interval too long to count.
        let store = RedisStore::builder("redis://127.0.0.1:1/")
            .retry_interval(Duration::MAX)
            .build()
            .unwrap();
        let limiter = store.rate_limiter("r", 5.0, 1.0).unwrap();
        let _ = limiter.try_acquire("k", 1).await;
        assert!(store.is_degraded());
        advance(Duration::from_secs(86_400)).await;
        let _ = limiter.try_acquire("k", 1).await;
        assert!(store.is_degraded());
    });
}

#[cfg(feature = "file-store")]
#[test]
fn file_store_refuses_a_slot_timeout_it_cannot_time() {
    use tower_bulwark::store::file::FileStore;
    let dir = tempfile::tempdir().unwrap();
    let build = |d| FileStore::builder().dir(dir.path()).slot_timeout(d).build();
    // Slots are timed in milliseconds: below one, every slot was stale at
    // once and the bulkhead admitted everything.
    let e = build(Duration::from_nanos(999_999)).unwrap_err();
    assert_eq!(e.field(), "slot_timeout");
    assert!(build(Duration::from_millis(1)).is_ok());
    let store = build(Duration::from_secs(600)).unwrap();
    let bulkhead = store.bulkhead(1).unwrap();
    let held = bulkhead.try_acquire();
    assert!(held.is_some());
    assert!(bulkhead.try_acquire().is_none());
}

#[test]
fn breaker_refuses_a_stale_attempt_timeout_it_cannot_time() {
    // Shared backends time probe reservations in milliseconds.
    let e = CircuitBreakerLayer::builder()
        .stale_attempt_timeout(Duration::from_nanos(1))
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "stale_attempt_timeout");
    let ok = CircuitBreakerLayer::builder().stale_attempt_timeout(Duration::from_millis(1));
    assert!(ok.build().is_ok());
}

#[test]
fn breaker_refuses_an_open_backoff_that_never_holds_open() {
    // An opening of zero, then zero again: the breaker never rejected.
    for backoff in [
        Backoff::constant(Duration::ZERO),
        Backoff::exponential(Duration::ZERO).max_delay(Duration::from_secs(1)),
    ] {
        let e = CircuitBreakerLayer::builder()
            .open_backoff(backoff)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "open_backoff");
    }
}

#[test]
fn keyed_breaker_with_a_huge_count_window_serves_many_keys() {
    // Each key's window reserved its whole size up front: 4 GiB a key, so
    // a few tens of thousands of keys ran out of address space.
    paused(async {
        let layer = CircuitBreakerLayer::builder()
            .window(Window::count(u32::MAX))
            .key(|r: &u32| *r)
            .max_keys(40_000)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(service_fn(|n: u32| async move { Ok::<u32, BoxError>(n) }));
        for key in 0..40_000u32 {
            assert_eq!(svc.ready().await.unwrap().call(key).await.unwrap(), key);
        }
        assert_eq!(handle.len(), 40_000);
    });
}

#[cfg(all(feature = "file-store", feature = "rate-limit"))]
#[test]
fn a_bucket_faster_than_a_token_a_nanosecond_reports_at_most_its_size() {
    use tower_bulwark::store::file::FileStore;
    use tower_bulwark::RateLimitLayer;
    // Time is kept in whole nanoseconds: such a bucket's burst rounded up
    // to 1 ns, which read back as 1e291 tokens.
    let layer = RateLimitLayer::builder()
        .max_tokens(1.0)
        .refill_rate(1e300)
        .build()
        .unwrap();
    assert!(layer.handle().tokens() <= 1.0);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::builder().dir(dir.path()).build().unwrap();
    let bucket = store.rate_limiter(1.0, 1e300).unwrap();
    assert!(bucket.tokens() <= 1.0);
}

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_ttl_too_long_for_redis_still_takes_a_fleet_lease() {
    use tower_bulwark::store::redis::RedisStore;
    let Some(server) = redis_server::RedisServer::start("a_lease_ttl_too_long_for_redis") else {
        return;
    };
    // The lease script set an expiry Redis refused, so every lease was a
    // local one and the store reported itself degraded.
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let bulkhead = store.bulkhead("db", 1).unwrap().lease_ttl(Duration::MAX);
    let lease = bulkhead.try_acquire().await.unwrap();
    assert!(lease.is_fleet_wide());
    assert!(!store.is_degraded());
    assert_eq!(bulkhead.in_use().await, Some(1));
    assert!(bulkhead.try_acquire().await.is_none());
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_breaker_open_for_longer_than_redis_can_expire_still_syncs() {
    use tower_bulwark::store::redis::RedisStore;
    let Some(server) = redis_server::RedisServer::start("a_fleet_breaker_open_for_longer") else {
        return;
    };
    // The sync script was handed an expiry Redis refused: every round
    // failed, and the opening never reached the fleet.
    let store = || {
        RedisStore::builder(server.url())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let breaker = |store: RedisStore| {
        CircuitBreakerLayer::builder()
            .name("pay")
            .failure_threshold(1)
            .open_timeout(Duration::MAX)
            .backend(store)
            .sync_interval(Duration::from_millis(20))
            .build()
            .unwrap()
    };
    let (sa, sb) = (store(), store());
    let (a, b) = (breaker(sa.clone()), breaker(sb.clone()));
    let gate = Arc::new(Semaphore::new(0));
    let mut svc_b = b.layer(upstream(gate.clone()));
    assert!(send(&mut svc_b, Act::Answer).await.is_ok());
    let mut svc_a = a.layer(upstream(gate));
    assert!(!is_open(&send(&mut svc_a, Act::Fail).await));
    assert_eq!(a.handle().state(), CircuitState::Open);
    redis_server::eventually("the fleet to see the opening", async || {
        b.handle().state() == CircuitState::Open
    })
    .await;
    assert!(!sa.is_degraded() && !sb.is_degraded());
    assert!(is_open(&send(&mut svc_b, Act::Answer).await));
}

// --- The Redis store against a real server -------------------------------

#[cfg(all(feature = "redis", feature = "rate-limit"))]
#[derive(Debug, Clone)]
struct RedisCase {
    timeout: Duration,
    retry_interval: Duration,
    max_tokens: f64,
    refill_rate: f64,
    max_concurrent: u32,
    lease_ttl: Duration,
    breaker: BreakerCase,
}

/// The Redis store's settings at their edges against a real server: a
/// limiter never admits more than its bucket and refill allow, a bulkhead
/// never holds more leases than it has, and a fleet breaker opens.
#[cfg(all(feature = "redis", feature = "rate-limit"))]
#[test]
fn redis_backends_refused_or_sound() {
    use proptest::test_runner::{Config, TestRunner};
    use tower_bulwark::store::redis::RedisStore;
    let Some(server) = redis_server::RedisServer::start("redis_backends_refused_or_sound") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let case = (
        (usual_ms(20, 2_000), usual_ms(1, 5_000)),
        (
            usual_f64(1.0, 20.0),
            usual_f64(0.001, 10.0),
            usual_u32(1, 6),
        ),
        duration(),
        (breaker_case(), proptest::option::of(usual_ms(1, 1_000))),
    )
        .prop_map(
            |(
                (timeout, retry_interval),
                (max_tokens, refill_rate, max_concurrent),
                lease_ttl,
                (mut breaker, sync_interval),
            )| {
                breaker.sync_interval = sync_interval;
                RedisCase {
                    timeout,
                    retry_interval,
                    max_tokens,
                    refill_rate,
                    max_concurrent,
                    lease_ttl,
                    breaker,
                }
            },
        )
        .boxed();
    let seq = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case, |c| {
        rt.block_on(async {
            let prefix = format!("x{}", seq.fetch_add(1, SeqCst));
            let store = RedisStore::builder(server.url())
                .prefix(prefix)
                .timeout(c.timeout)
                .retry_interval(c.retry_interval)
                .build();
            let store = match store {
                Err(e) => return named(&e, &["timeout", "retry_interval"]),
                Ok(store) => store,
            };
            // A timeout too short for a round trip degrades the store; then
            // the policy answers, which bounds nothing fleet-wide.
            let reachable = c.timeout >= Duration::from_millis(20);
            match store.rate_limiter("r", c.max_tokens, c.refill_rate) {
                Err(e) => named(&e, &["max_tokens", "refill_rate"])?,
                Ok(limiter) => {
                    prop_assert!(bucket_ok(c.max_tokens, c.refill_rate));
                    let limiter = limiter.local_cache(false);
                    let start = std::time::Instant::now();
                    let mut taken = 0u32;
                    for _ in 0..30 {
                        if limiter.try_acquire("k", 1).await.is_ok() {
                            taken += 1;
                        }
                    }
                    let secs = start.elapsed().as_secs_f64() + 0.01;
                    let bound = c.max_tokens + c.refill_rate * secs;
                    if reachable && !store.is_degraded() {
                        prop_assert!(
                            f64::from(taken) <= bound + 1e-9,
                            "{taken} taken, bound {bound}"
                        );
                    }
                }
            }
            match store.bulkhead("b", c.max_concurrent) {
                Err(e) => named(&e, &["max_concurrent"])?,
                Ok(bulkhead) => {
                    let bulkhead = bulkhead.lease_ttl(c.lease_ttl);
                    let mut held = Vec::new();
                    for _ in 0..c.max_concurrent.min(5) + 1 {
                        if let Some(lease) = bulkhead.try_acquire().await {
                            held.push(lease);
                        }
                    }
                    if reachable && !store.is_degraded() {
                        prop_assert!(held.iter().all(|l| l.is_fleet_wide()));
                        prop_assert_eq!(held.len() as u32, c.max_concurrent.min(5 + 1));
                        prop_assert_eq!(bulkhead.in_use().await, Some(held.len() as u32));
                    }
                }
            }
            // The rate limit layer on the same store: never past its bucket.
            let limiter = tower_bulwark::RateLimitLayer::builder()
                .name("api")
                .max_tokens(c.max_tokens)
                .refill_rate(c.refill_rate)
                .backend(store.clone())
                .build();
            match limiter {
                Err(e) => named(&e, &["max_tokens", "refill_rate", "tokens_per_request"])?,
                Ok(layer) => {
                    let mut svc =
                        layer.layer(service_fn(|n: u32| async move { Ok::<u32, BoxError>(n) }));
                    let start = std::time::Instant::now();
                    let mut taken = 0u32;
                    for n in 0..20 {
                        if svc.ready().await.unwrap().call(n).await.is_ok() {
                            taken += 1;
                        }
                    }
                    let secs = start.elapsed().as_secs_f64() + 0.01;
                    let bound = c.max_tokens + c.refill_rate * secs;
                    if reachable && !store.is_degraded() {
                        prop_assert!(
                            f64::from(taken) <= bound + 1e-9,
                            "{taken} taken, bound {bound}"
                        );
                    }
                }
            }
            let mut b = c.breaker.clone();
            b.window = None;
            let layer = match b
                .builder()
                .classify(Hinted(b.hint))
                .backend(store.clone())
                .build()
            {
                Err(e) => return named(&e, BREAKER_FIELDS),
                Ok(layer) => layer,
            };
            let handle = layer.handle();
            let mut svc = layer.layer(upstream(Arc::new(Semaphore::new(0))));
            prop_assert!(send(&mut svc, Act::Answer).await.is_ok());
            for _ in 0..b.opens_after().min(12) {
                let _ = send(&mut svc, Act::Fail).await;
            }
            if b.opens_after() <= 12 && b.open_for().0.is_some_and(|d| d >= Duration::from_secs(60))
            {
                prop_assert_eq!(handle.state(), CircuitState::Open);
            }
            if reachable {
                prop_assert!(!store.is_degraded());
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// --- Layers on the file store ------------------------------------------------

/// The rate limiter and bulkhead layers on a file store, over edge
/// settings: refused with the field named, or they never let more through
/// than the bucket (plus its refill, on the wall clock) or the slots allow.
/// A call still waiting after its first poll is dropped, so no case waits.
#[cfg(all(feature = "file-store", feature = "rate-limit", feature = "bulkhead"))]
mod file_layers {
    use super::*;
    use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
    use tower_bulwark::rate_limit::RateLimited;
    use tower_bulwark::store::file::FileStore;
    use tower_bulwark::RateLimitLayer;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn file_layers_refused_or_sound(
            (max_tokens, refill_rate, tokens_per_request) in (
                usual_f64(1.0, 20.0),
                usual_f64(0.001, 10.0),
                prop_oneof![3 => 0.01f64..=1.0, 1 => float()],
            ),
            limit_wait in prop_oneof![3 => Just(Duration::ZERO), 1 => duration()],
            max_concurrent in usual_usize(1, 6),
            bulkhead_wait in duration(),
            slot_timeout in prop_oneof![Just(Duration::from_secs(600)), usual_ms(1, 60_000)],
            calls in 1usize..30,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let store = FileStore::builder()
                    .dir(dir.path())
                    .slot_timeout(slot_timeout)
                    .build();
                let store = match store {
                    Err(e) => return named(&e, &["slot_timeout"]),
                    Ok(store) => store,
                };
                let limiter = RateLimitLayer::builder()
                    .name("api")
                    .max_tokens(max_tokens)
                    .refill_rate(refill_rate)
                    .tokens_per_request(tokens_per_request)
                    .max_wait(limit_wait)
                    .backend(store.clone())
                    .build();
                match limiter {
                    Err(e) => named(&e, &["max_tokens", "refill_rate", "tokens_per_request", "max_wait"])?,
                    Ok(layer) => {
                        prop_assert!(bucket_ok(max_tokens, refill_rate));
                        let mut svc = layer.layer(service_fn(|n: u32| async move { Ok::<u32, BoxError>(n) }));
                        let start = std::time::Instant::now();
                        let mut taken = 0u32;
                        for n in 0..calls as u32 {
                            let mut f = Box::pin(svc.ready().await.unwrap().call(n));
                            match poll_once(&mut f) {
                                Poll::Ready(Ok(_)) => taken += 1,
                                Poll::Ready(Err(e)) => prop_assert!(e.is::<RateLimited>(), "{e}"),
                                Poll::Pending => {}
                            }
                        }
                        let secs = start.elapsed().as_secs_f64() + 1e-3;
                        let bound = max_tokens + refill_rate * secs;
                        let spent = f64::from(taken) * tokens_per_request;
                        prop_assert!(spent <= bound * (1.0 + 1e-9), "{spent} tokens spent, bound {bound}");
                    }
                }
                let bulkhead = BulkheadLayer::builder()
                    .name("db")
                    .max_concurrent(max_concurrent)
                    .max_wait(bulkhead_wait)
                    .backend(store)
                    .build();
                match bulkhead {
                    Err(e) => named(&e, &["max_concurrent", "max_wait"])?,
                    Ok(layer) => {
                        let gate = Arc::new(Semaphore::new(0));
                        let entered = Arc::new(AtomicUsize::new(0));
                        let (g, inside) = (gate.clone(), entered.clone());
                        let mut svc = layer.layer(service_fn(move |n: u32| {
                            let g = g.clone();
                            inside.fetch_add(1, SeqCst);
                            async move {
                                g.acquire().await.unwrap().forget();
                                Ok::<u32, BoxError>(n)
                            }
                        }));
                        let mut held = Vec::new();
                        for n in 0..calls as u32 {
                            let mut f = Box::pin(svc.ready().await.unwrap().call(n));
                            match poll_once(&mut f) {
                                Poll::Pending => held.push(f),
                                Poll::Ready(r) => {
                                    let e = r.unwrap_err();
                                    prop_assert!(e.is::<BulkheadFull>(), "{e}");
                                }
                            }
                        }
                        // Slots held past slot_timeout may be reclaimed.
                        if slot_timeout >= Duration::from_secs(60) {
                            prop_assert!(entered.load(SeqCst) <= max_concurrent);
                        }
                        gate.add_permits(calls);
                        drop(held);
                    }
                }
                Ok(())
            })?;
        }
    }
}
