//! Every setting of the rate limit, retry and bulkhead builders (memory
//! backend) at its extremes: `build()` either refuses it with a
//! `ConfigError` naming a field, or the layer then never panics at call
//! time and keeps its bounds, on tokio's paused clock.
#![cfg(all(feature = "rate-limit", feature = "retry", feature = "bulkhead"))]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::Semaphore;
use tokio::time::{advance, Instant};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
use tower_bulwark::classify::{Classify, Outcome};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
use tower_bulwark::ClockSource;

#[path = "support/extreme.rs"]
mod extreme;
use extreme::{count_u32, count_usize, duration, float, named, paused, poll_once};

#[derive(Debug, Clone)]
struct LimitCase {
    max_tokens: f64,
    refill_rate: f64,
    tokens_per_request: f64,
    max_wait: Duration,
    max_retry_after: Duration,
    max_keys: usize,
    keyed: bool,
    hint: Duration,
    // Gaps between arrivals, in ms.
    gaps: Vec<u64>,
}

fn limit_case() -> impl Strategy<Value = LimitCase> {
    (
        (
            float(),
            float(),
            // Mostly a share of the bucket, so that most cases run.
            prop_oneof![3 => (0.01f64..=1.0).prop_map(|f| -f), 1 => float()],
        ),
        (
            duration(),
            duration(),
            count_usize(),
            any::<bool>(),
            duration(),
        ),
        proptest::collection::vec(prop_oneof![Just(0u64), 0u64..2_000], 1..60),
    )
        .prop_map(
            |(
                (max_tokens, refill_rate, tokens_per_request),
                (max_wait, max_retry_after, max_keys, keyed, hint),
                gaps,
            )| LimitCase {
                max_tokens,
                refill_rate,
                // A negative draw from the first arm is a share of max_tokens.
                tokens_per_request: if (-1.0..=-0.01).contains(&tokens_per_request) {
                    -tokens_per_request * max_tokens
                } else {
                    tokens_per_request
                },
                max_wait,
                max_retry_after,
                max_keys,
                keyed,
                hint,
                gaps,
            },
        )
}

/// Answers `Ok`, except request 0, which carries an upstream hint.
#[derive(Clone, Copy)]
struct Hint(Duration);

impl Classify<u32, BoxError> for Hint {
    fn classify(&self, r: &Result<u32, BoxError>, _: Duration) -> Outcome {
        if r.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
    fn retry_after(&self, r: &Result<u32, BoxError>) -> Option<Duration> {
        matches!(r, Ok(0)).then_some(self.0)
    }
}

/// Runs a limiter through `c.gaps` arrivals (waiting ones kept until time
/// reaches them) and returns when the inner service was called.
/// A waiting request is its own task, so the runtime polls it when its
/// timer fires, as it would in a server; time moves by the paused clock's
/// auto-advance, timer by timer.
async fn run_limiter<S>(mut svc: S, c: &LimitCase)
where
    S: Service<u32, Response = u32, Error = BoxError>,
    S::Future: Send + 'static,
{
    let mut waiting = Vec::new();
    for (i, gap) in c.gaps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*gap)).await;
        let mut f = Box::pin(svc.ready().await.unwrap().call(i as u32 + 1));
        match poll_once(&mut f) {
            Poll::Pending => waiting.push(tokio::spawn(f)),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => assert!(e.is::<RateLimited>(), "{e}"),
        }
    }
    // Requests still waiting when the history ends are dropped.
    for w in waiting {
        w.abort();
    }
}

fn check_bound(c: &LimitCase, calls: &[Instant]) -> Result<(), TestCaseError> {
    // Every window of calls [i, j] spends at most max_tokens + rate x its
    // length. The slack: a waiting request calls when its timer fires, and
    // tokio's timers round up to the millisecond.
    for i in 0..calls.len() {
        for j in i..calls.len() {
            let n = (j - i + 1) as f64;
            let secs = (calls[j] - calls[i]).as_secs_f64() + 1e-3;
            let bound = c.max_tokens + c.refill_rate * secs;
            let spent = n * c.tokens_per_request;
            prop_assert!(
                spent <= bound * (1.0 + 1e-9),
                "{spent} tokens spent over {secs} s, bound {bound}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn rate_limit_refused_or_sound(c in limit_case()) {
        paused(async {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let seen = calls.clone();
            let inner = service_fn(move |n: u32| {
                seen.lock().unwrap().push((Instant::now(), n));
                async move { Ok::<u32, BoxError>(n) }
            });
            let builder = RateLimitLayer::builder()
                .clock(ClockSource::Tokio)
                .max_tokens(c.max_tokens)
                .refill_rate(c.refill_rate)
                .tokens_per_request(c.tokens_per_request)
                .max_wait(c.max_wait)
                .max_retry_after(c.max_retry_after)
                .max_keys(c.max_keys);
            let fields = ["max_tokens", "refill_rate", "tokens_per_request", "max_keys"];
            if c.keyed {
                match builder.key(|n: &u32| n % 3).build() {
                    Err(e) => return named(&e, &fields),
                    Ok(layer) => run_limiter(layer.layer(inner), &c).await,
                }
            } else {
                match builder.retry_after_from(Hint(c.hint)).build() {
                    Err(e) => return named(&e, &fields),
                    Ok(layer) => {
                        let handle = layer.handle();
                        let mut svc = layer.layer(inner);
                        // An upstream hint of any size blocks at most the cap.
                        let _ = svc.ready().await.unwrap().call(0).await;
                        if let Some(left) = handle.blocked_for() {
                            prop_assert!(left <= c.max_retry_after.min(c.hint));
                        }
                        handle.reset();
                        calls.lock().unwrap().clear();
                        run_limiter(svc, &c).await;
                    }
                }
            }
            // Waiters left when the history ends are dropped; the bound
            // covers every call made.
            // A keyed limiter bounds each key's bucket (the key is n % 3).
            let calls = calls.lock().unwrap().clone();
            for key in 0..3 {
                let mine: Vec<Instant> = calls
                    .iter()
                    .filter(|(_, n)| !c.keyed || n % 3 == key)
                    .map(|(t, _)| *t)
                    .collect();
                check_bound(&c, &mine)?;
            }
            Ok(())
        })?;
    }
}

#[derive(Debug, Clone)]
struct RetryCase {
    max_attempts: u32,
    base: Duration,
    max_delay: Duration,
    jitter: u8,
    attempt_timeout: Option<Duration>,
    deadline: Option<Duration>,
    max_retry_after: Duration,
    hint: Option<Duration>,
    budget: Option<(u32, f64, Duration)>,
    failures: u32,
    hang: bool,
}

fn retry_case() -> impl Strategy<Value = RetryCase> {
    (
        (count_u32(), duration(), duration(), 0u8..4),
        (
            proptest::option::of(duration()),
            proptest::option::of(duration()),
            duration(),
            proptest::option::of(duration()),
        ),
        proptest::option::of((count_u32(), float(), duration())),
        (0u32..5, proptest::bool::weighted(0.2)),
    )
        .prop_map(
            |(
                (max_attempts, base, max_delay, jitter),
                (attempt_timeout, deadline, max_retry_after, hint),
                budget,
                (failures, hang),
            )| RetryCase {
                max_attempts,
                base,
                max_delay,
                jitter,
                attempt_timeout,
                deadline,
                max_retry_after,
                hint,
                budget,
                failures,
                hang,
            },
        )
}

/// Retries every error, waiting at least the hint.
#[derive(Clone, Copy)]
struct Upstream(Option<Duration>);

impl Classify<u32, BoxError> for Upstream {
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn retry_refused_or_sound(c in retry_case()) {
        paused(async {
            let jitter = [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated][c.jitter as usize];
            let mut b = RetryLayer::builder()
                .max_attempts(c.max_attempts)
                .backoff(Backoff::exponential(c.base).max_delay(c.max_delay).jitter(jitter))
                .max_retry_after(c.max_retry_after)
                .seed(7);
            if let Some(t) = c.attempt_timeout {
                b = b.attempt_timeout(t);
            }
            if let Some(d) = c.deadline {
                b = b.deadline(d);
            }
            if let Some((min, percent, window)) = c.budget {
                let budget = RetryBudget::builder()
                    .min_per_second(min)
                    .percent(percent)
                    .window(window)
                    .build();
                match budget {
                    Ok(budget) => b = b.budget(budget),
                    Err(e) => return named(&e, &["budget.min_per_second", "budget.percent", "budget.window"]),
                }
            }
            let layer = match b.classify(Upstream(c.hint)).build() {
                Err(e) => return named(&e, &["max_attempts", "backoff", "attempt_timeout", "deadline", "max_retry_after"]),
                Ok(layer) => layer,
            };
            let attempts = Arc::new(AtomicU32::new(0));
            let seen = attempts.clone();
            let (failures, hang) = (c.failures, c.hang);
            let mut svc = layer.layer(service_fn(move |n: u32| {
                let k = seen.fetch_add(1, SeqCst);
                async move {
                    if hang && k == 0 {
                        std::future::pending::<()>().await;
                    }
                    if k < failures {
                        Err::<u32, BoxError>("flaky".into())
                    } else {
                        Ok(n)
                    }
                }
            }));
            // Paused time jumps to every timer, however far: the call ends
            // (answered, given up or timed out) without a panic...
            let fut = svc.ready().await.unwrap().call(5);
            let one_call = async {
                let r = fut.await;
                if let Err(e) = &r {
                    let ok = e.is::<tower_bulwark::retry::AttemptTimedOut>() || e.to_string() == "flaky";
                    assert!(ok, "{e}");
                }
            };
            // ...unless an attempt hangs with no timeout to cut it: then it
            // is simply still pending, and is dropped.
            let hangs_forever = c.hang && c.attempt_timeout.is_none();
            if hangs_forever {
                let mut one_call = Box::pin(one_call);
                prop_assert!(poll_once(&mut one_call).is_pending());
            } else {
                one_call.await;
            }
            // ...and never makes more attempts than allowed.
            prop_assert!(attempts.load(SeqCst) <= c.max_attempts.max(1));
            Ok(())
        })?;
    }
}

#[derive(Debug, Clone)]
struct BulkheadCase {
    max_concurrent: usize,
    max_wait: Duration,
    soft_limit: Option<usize>,
    calls: usize,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn bulkhead_refused_or_sound(
        c in (count_usize(), duration(), proptest::option::of(count_usize()), 1usize..30)
            .prop_map(|(max_concurrent, max_wait, soft_limit, calls)| BulkheadCase { max_concurrent, max_wait, soft_limit, calls })
    ) {
        paused(async {
            let mut b = BulkheadLayer::builder()
                .max_concurrent(c.max_concurrent)
                .max_wait(c.max_wait);
            if let Some(s) = c.soft_limit {
                b = b.soft_limit(s);
            }
            let layer = match b.build() {
                Err(e) => return named(&e, &["max_concurrent", "soft_limit", "max_wait"]),
                Ok(layer) => layer,
            };
            let h = layer.handle();
            let gate = Arc::new(Semaphore::new(0));
            let g = gate.clone();
            let mut svc = layer.layer(service_fn(move |n: u32| {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                    Ok::<u32, BoxError>(n)
                }
            }));
            let mut held = Vec::new();
            for i in 0..c.calls {
                let mut f = Box::pin(svc.ready().await.unwrap().call(i as u32));
                match poll_once(&mut f) {
                    Poll::Pending => held.push(f),
                    Poll::Ready(r) => {
                        let e = r.unwrap_err();
                        prop_assert!(e.is::<BulkheadFull>(), "{e}");
                    }
                }
                prop_assert!(h.in_flight() <= c.max_concurrent);
            }
            prop_assert_eq!(h.in_flight(), c.calls.min(c.max_concurrent));
            // Time passing (past any finite wait) rejects or keeps waiters,
            // and never panics.
            advance(Duration::from_secs(3600)).await;
            held.retain_mut(|f| poll_once(f).is_pending());
            prop_assert!(h.in_flight() <= c.max_concurrent);
            // Let every call finish: all slots come back.
            gate.add_permits(c.calls);
            for f in held {
                prop_assert!(f.await.is_ok());
            }
            prop_assert_eq!(h.in_flight(), 0);
            Ok(())
        })?;
    }
}
