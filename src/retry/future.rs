//! The retry layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{AttemptTimedOut, GiveUpReason, RetryBudget, RetryEvent, RetryPolicy, RetryReason};
use crate::backoff::Backoff;
use crate::clock::{instant_after, nanos};
use crate::error::BoxError;
use crate::observe::Listeners;
use crate::outline::OutOfLine;

/// The settings a retry plan is made from: plain data, packed (40 bytes)
/// because a plain call carries a copy (see [`Light`]). Durations are in
/// saturating nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    base: u64,
    max_delay: u64,
    max_retry_after: u64,
    seed: u64,
    pub(crate) max_attempts: u32,
    growth: u8,
    jitter: u8,
    seeded: bool,
}

impl Plan {
    pub(crate) fn new(
        max_attempts: u32,
        backoff: Backoff,
        max_retry_after: Duration,
        seed: Option<u64>,
    ) -> Self {
        let (growth, jitter, base, max_delay) = backoff.pack();
        Self {
            base,
            max_delay,
            max_retry_after: nanos(max_retry_after),
            seed: seed.unwrap_or_default(),
            max_attempts,
            growth,
            jitter,
            seeded: seed.is_some(),
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::unpack((self.growth, self.jitter, self.base, self.max_delay))
    }

    pub(crate) fn max_retry_after(&self) -> Duration {
        Duration::from_nanos(self.max_retry_after)
    }

    pub(crate) fn seed(&self) -> Option<u64> {
        self.seeded.then_some(self.seed)
    }
}

/// A layer's settings, budget and listeners, made once by `build()` and
/// shared by the layer, its clones, its services and the futures that
/// need them (behind the `Arc` in [`LayerState`]): they live as long as one of
/// those does, and no longer.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) plan: Plan,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) listeners: Listeners<RetryEvent>,
    /// What a plain call carries instead of the `Arc`, when the layer has
    /// no timer, deadline, budget or listener and a short name.
    pub(crate) light: Option<Light>,
}

impl Config {
    /// The settings a plain call carried, once it has to retry.
    #[cold]
    fn from_light(light: &Light) -> Self {
        Self {
            name: Arc::from(light.name.as_str()),
            plan: light.plan,
            attempt_timeout: None,
            deadline: None,
            budget: None,
            listeners: Listeners::default(),
            light: Some(*light),
        }
    }

    pub(crate) fn emit(&self, event: RetryEvent) {
        self.listeners.emit(&event);
    }
}

/// A layer's name, copied rather than shared: names up to this many bytes
/// travel with a plain call by value.
const INLINE_NAME: usize = 23;

/// A short name by value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct InlineName {
    len: u8,
    bytes: [u8; INLINE_NAME],
}

impl InlineName {
    pub(crate) fn new(name: &str) -> Option<Self> {
        let len = name.len();
        if len > INLINE_NAME {
            return None;
        }
        let mut bytes = [0; INLINE_NAME];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(Self {
            len: len as u8,
            bytes,
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        // Always the prefix of a `str` cut at its end: valid UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for InlineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Everything a call of a plain layer needs once its first attempt fails,
/// carried by value: the first attempt then takes no reference count and
/// holds nothing to drop, and yet the call owns its settings outright (it
/// may outlive the layer and every service made from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Light {
    pub(crate) plan: Plan,
    pub(crate) name: InlineName,
}

/// A layer's state: copied (`policy`) or shared (`cfg`) by every service
/// it makes.
#[derive(Debug, Clone)]
pub(crate) struct LayerState<P> {
    pub(crate) cfg: Arc<Config>,
    pub(crate) policy: P,
}

impl<P> LayerState<P> {
    /// A call is starting: it earns the budget its share. Out of line so
    /// a call without a budget carries none of its code.
    #[inline(never)]
    pub(crate) fn on_call(&self) {
        if let Some(budget) = &self.cfg.budget {
            budget.deposit();
        }
    }
}

/// Whether a call can start light: no timer and no clock read before the
/// first attempt answers. Worked out once per layer.
#[inline]
pub(crate) fn starts_light(attempt_timeout: Option<Duration>, deadline: Option<Duration>) -> bool {
    attempt_timeout.is_none() && deadline.is_none()
}

pin_project! {
    /// The response future of [`Retry`](super::Retry).
    ///
    /// A call without a per-attempt timeout starts as its first attempt's
    /// future with the request's copy beside it: no box and no timer (and,
    /// with no budget, listener or deadline, no reference count, no clock
    /// read, and nothing to drop but those). Only when an attempt is to be
    /// retried (or a timeout needs a timer from the start) does the retry
    /// machinery move into one box. Dropping the future at any point
    /// (mid-attempt or mid-back-off) drops the attempt's future and the
    /// timer; nothing else is held.
    pub struct ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        #[pin]
        stage: Stage<S, Req, P>,
    }
}

pin_project! {
    #[project = StageProj]
    #[project_replace = StageTaken]
    enum Stage<S, Req, P>
    where
        S: Service<Req>,
    {
        // The first attempt of a call with no timer, no budget and no
        // listener: nothing here needs dropping unless the request does.
        First {
            #[pin]
            fut: S::Future,
            svc: S,
            // A copy for the next attempt; `None` when there will be none.
            req: Option<Req>,
            light: Light,
            policy: P,
        },
        // The same with a budget or listeners to report to, or a deadline.
        Counted {
            #[pin]
            fut: S::Future,
            svc: S,
            req: Option<Req>,
            shared: LayerState<P>,
            // When the call began, if there is a deadline.
            started: Option<Instant>,
        },
        // Retrying, or with a per-attempt timeout from the start.
        Driven { driver: BoxedDriver<S, Req, P> },
        // Only while moving from the first to the second.
        Moving,
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    /// A call with no timer and nothing shared to report to.
    #[inline]
    pub(crate) fn plain(light: Light, policy: P, svc: S, fut: S::Future, req: Option<Req>) -> Self {
        Self {
            stage: Stage::First {
                fut,
                svc,
                req,
                light,
                policy,
            },
        }
    }

    /// Any call; `timed`: the layer has a per-attempt timeout.
    pub(crate) fn new(
        shared: LayerState<P>,
        timed: bool,
        svc: S,
        fut: S::Future,
        req: Option<Req>,
    ) -> Self {
        let stage = if timed {
            Stage::Driven {
                driver: OutOfLine::new(Driver::timed(shared, svc, fut, req)),
            }
        } else {
            Stage::Counted {
                started: shared.cfg.deadline.map(|_| Instant::now()),
                fut,
                svc,
                req,
                shared,
            }
        };
        Self { stage }
    }
}

impl<S, Req, P> Future for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    /// The success path, inlined into the caller: the first attempt
    /// answered and the policy does not retry it.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut stage = self.project().stage;
        let (fut, req, policy) = match stage.as_mut().project() {
            StageProj::First {
                fut, req, policy, ..
            } => (fut, req, &*policy),
            StageProj::Counted {
                fut, req, shared, ..
            } => (fut, req, &shared.policy),
            _ => return poll_slow(stage, cx, None),
        };
        let res = ready!(fut.poll(cx));
        let again = match req.as_ref() {
            Some(req) => policy.should_retry(req, &res),
            None => false,
        };
        if !again {
            return Poll::Ready(res.map_err(Into::into));
        }
        poll_slow(stage, cx, Some(res))
    }
}

/// The way out of the success path, shaped so that the caller keeps the
/// success's result in registers: the slow path hands its result back
/// through a slot that is read only when it answered.
#[inline(always)]
fn poll_slow<S, Req, P>(
    stage: Pin<&mut Stage<S, Req, P>>,
    cx: &mut Context<'_>,
    first: Option<Result<S::Response, S::Error>>,
) -> Poll<Result<S::Response, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    let mut out = None;
    match first {
        Some(res) => escalate(stage, cx, res, &mut out),
        None => poll_driven(stage, cx, &mut out),
    }
    out.map_or(Poll::Pending, Poll::Ready)
}

/// The first attempt failed and the policy wants another: the retry
/// machinery moves into its box and takes over.
#[cold]
#[inline(never)]
fn escalate<S, Req, P>(
    mut stage: Pin<&mut Stage<S, Req, P>>,
    cx: &mut Context<'_>,
    res: Result<S::Response, S::Error>,
    out: &mut Option<Result<S::Response, BoxError>>,
) where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    let (svc, req, shared, started) = match stage.as_mut().project_replace(Stage::Moving) {
        StageTaken::First {
            svc,
            req,
            light,
            policy,
            ..
        } => (
            svc,
            req,
            LayerState {
                cfg: Arc::new(Config::from_light(&light)),
                policy,
            },
            None,
        ),
        StageTaken::Counted {
            svc,
            req,
            shared,
            started,
            ..
        } => (svc, req, shared, started),
        _ => unreachable!("escalate is called on the first attempt only"),
    };
    let mut driver = Box::pin(Driver {
        shared,
        svc,
        req,
        started,
        attempt: 1,
        prev_delay: Duration::ZERO,
        rng: None,
        state: Step::Readying,
        timer: None,
    });
    *out = driver.as_mut().project().judge(Finished::Done(res), true);
    if out.is_none() {
        stage.set(Stage::Driven {
            driver: OutOfLine::new(driver),
        });
        poll_driven(stage, cx, out);
    }
}

#[cold]
#[inline(never)]
fn poll_driven<S, Req, P>(
    stage: Pin<&mut Stage<S, Req, P>>,
    cx: &mut Context<'_>,
    out: &mut Option<Result<S::Response, BoxError>>,
) where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    match stage.project() {
        StageProj::Driven { driver } => {
            let driver = driver.get_mut().expect("a driven future has its driver");
            if let Poll::Ready(done) = driver.as_mut().poll_drive(cx) {
                *out = Some(done);
            }
        }
        StageProj::First { .. } | StageProj::Counted { .. } => {
            unreachable!("the first attempt is polled in place")
        }
        StageProj::Moving => panic!("retry future polled after a panic"),
    }
}

/// The boxed driver, dropped out of line: the response future's own drop
/// then stays small enough to inline into the caller, where the success
/// path (which never has a driver) drops nothing.
type BoxedDriver<S, Req, P> = OutOfLine<Pin<Box<Driver<S, Req, P>>>>;

pin_project! {
    /// Everything a call that retries (or is timed) needs, in one box.
    #[project = DriverProj]
    struct Driver<S, Req, P>
    where
        S: Service<Req>,
    {
        shared: LayerState<P>,
        svc: S,
        req: Option<Req>,
        // When the call began, for the deadline.
        started: Option<Instant>,
        // The attempt running or last finished, 1-based.
        attempt: u32,
        prev_delay: Duration,
        // Made at the first jittered delay.
        rng: Option<fastrand::Rng>,
        #[pin]
        state: Step<S::Future>,
        // The per-attempt timeout and the back-off share one timer.
        #[pin]
        timer: Option<Sleep>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<F> {
        Calling { #[pin] fut: F },
        Waiting,
        Readying,
    }
}

impl<S, Req, P> Driver<S, Req, P>
where
    S: Service<Req>,
{
    /// A call with a per-attempt timeout: its timer (and clock, with a
    /// deadline) starts with the first attempt.
    #[cold]
    fn timed(shared: LayerState<P>, svc: S, fut: S::Future, req: Option<Req>) -> Pin<Box<Self>> {
        let now = Instant::now();
        let cfg = &*shared.cfg;
        Box::pin(Self {
            started: cfg.deadline.map(|_| now),
            timer: cfg
                .attempt_timeout
                .map(|t| tokio::time::sleep_until(instant_after(now, t))),
            shared,
            svc,
            req,
            attempt: 1,
            prev_delay: Duration::ZERO,
            rng: None,
            state: Step::Calling { fut },
        })
    }
}

enum Finished<T, E> {
    Done(Result<T, E>),
    TimedOut,
}

impl<S, Req, P> Driver<S, Req, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    fn poll_drive(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StepProj::Calling { fut } => {
                    let finished = match fut.poll(cx) {
                        Poll::Ready(res) => Finished::Done(res),
                        Poll::Pending => {
                            // The timer times this attempt only when a
                            // timeout is set; otherwise it is a spent
                            // back-off.
                            let timer = match this.timer.as_mut().as_pin_mut() {
                                Some(t) if this.shared.cfg.attempt_timeout.is_some() => t,
                                _ => return Poll::Pending,
                            };
                            ready!(timer.poll(cx));
                            Finished::TimedOut
                        }
                    };
                    if let Some(out) = this.judge(finished, false) {
                        return Poll::Ready(out);
                    }
                }
                StepProj::Waiting => {
                    if let Some(timer) = this.timer.as_mut().as_pin_mut() {
                        ready!(timer.poll(cx));
                    }
                    this.state.set(Step::Readying);
                }
                StepProj::Readying => {
                    // Readiness is driven on the very service this attempt
                    // will call.
                    if let Err(e) = ready!(this.svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e.into()));
                    }
                    let req = this
                        .req
                        .as_ref()
                        .expect("a retry keeps its request")
                        .clone();
                    let fut = this.svc.call(req);
                    if let Some(t) = this.shared.cfg.attempt_timeout {
                        arm(this.timer.as_mut(), instant_after(Instant::now(), t));
                    }
                    this.state.set(Step::Calling { fut });
                }
            }
        }
    }
}

/// Points the shared timer at `at`, making it the first time.
fn arm(mut timer: Pin<&mut Option<Sleep>>, at: Instant) {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) => sleep.reset(at),
        None => timer.set(Some(tokio::time::sleep_until(at))),
    }
}

impl<S, Req, P> DriverProj<'_, S, Req, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    /// Decides what follows an attempt: the call's result (`Some`), or the
    /// next attempt, set up to wait or to ready its service. `decided`: the
    /// policy has already chosen to retry this result.
    fn judge(
        &mut self,
        finished: Finished<S::Response, S::Error>,
        decided: bool,
    ) -> Option<Result<S::Response, BoxError>> {
        let shared = &*self.shared;
        let attempt = *self.attempt;
        let (retry, reason, hint) = match (&finished, self.req.as_ref()) {
            (_, None) => (false, RetryReason::Error, None),
            (Finished::Done(res), Some(req)) => {
                if !decided && !shared.policy.should_retry(req, res) {
                    (false, RetryReason::Error, None)
                } else {
                    let reason = if res.is_ok() {
                        RetryReason::Response
                    } else {
                        RetryReason::Error
                    };
                    (true, reason, shared.policy.retry_after(res))
                }
            }
            (Finished::TimedOut, Some(req)) => {
                (shared.policy.retry_timeout(req), RetryReason::Timeout, None)
            }
        };
        let give_up = |fin: Finished<S::Response, S::Error>| -> Result<S::Response, BoxError> {
            match fin {
                Finished::Done(res) => res.map_err(Into::into),
                Finished::TimedOut => Err(AttemptTimedOut::new(
                    shared.cfg.name.clone(),
                    attempt,
                    shared.cfg.attempt_timeout.unwrap_or_default(),
                )
                .into()),
            }
        };
        if !retry {
            return Some(give_up(finished));
        }
        let rng = self.rng.get_or_insert_with(|| {
            shared
                .cfg
                .plan
                .seed()
                .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed)
        });
        match plan(shared, attempt, *self.prev_delay, hint, *self.started, rng) {
            Ok(delay) => {
                *self.prev_delay = delay;
                *self.attempt = attempt + 1;
                shared.cfg.emit(RetryEvent::Retry {
                    name: shared.cfg.name.clone(),
                    attempt: attempt + 1,
                    delay,
                    reason,
                });
                // The failed attempt (and any response body) goes now.
                drop(finished);
                if delay.is_zero() {
                    self.state.set(Step::Readying);
                } else {
                    arm(self.timer.as_mut(), instant_after(Instant::now(), delay));
                    self.state.set(Step::Waiting);
                }
                None
            }
            Err(stop) => {
                match stop {
                    Stop::GiveUp(reason) => shared.cfg.emit(RetryEvent::GaveUp {
                        name: shared.cfg.name.clone(),
                        attempts: attempt,
                        reason,
                    }),
                    Stop::Budget => shared.cfg.emit(RetryEvent::BudgetExhausted {
                        name: shared.cfg.name.clone(),
                        attempts: attempt,
                    }),
                }
                Some(give_up(finished))
            }
        }
    }
}

enum Stop {
    GiveUp(GiveUpReason),
    Budget,
}

/// Decides the delay before attempt `attempt + 1`, or why there is none.
fn plan<P>(
    shared: &LayerState<P>,
    attempt: u32,
    prev: Duration,
    hint: Option<Duration>,
    started: Option<Instant>,
    rng: &mut fastrand::Rng,
) -> Result<Duration, Stop> {
    let cfg = &*shared.cfg;
    if attempt >= cfg.plan.max_attempts {
        return Err(Stop::GiveUp(GiveUpReason::Exhausted));
    }
    let mut delay = cfg.plan.backoff().jittered(attempt, prev, rng);
    if let Some(hint) = hint {
        if cfg.deadline.is_none() && hint > cfg.plan.max_retry_after() {
            return Err(Stop::GiveUp(GiveUpReason::RetryAfterTooLong(hint)));
        }
        delay = delay.max(hint);
    }
    if let (Some(deadline), Some(started)) = (cfg.deadline, started) {
        if Instant::now()
            .saturating_duration_since(started)
            .saturating_add(delay)
            > deadline
        {
            return Err(Stop::GiveUp(GiveUpReason::Deadline));
        }
    }
    if let Some(budget) = &cfg.budget {
        if !budget.try_withdraw() {
            return Err(Stop::Budget);
        }
    }
    Ok(delay)
}

impl<S, Req, P> fmt::Debug for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, attempt, state) = match &self.stage {
            Stage::First { light, .. } => (light.name.as_str(), 1, "calling"),
            Stage::Counted { shared, .. } => (&*shared.cfg.name, 1, "calling"),
            Stage::Driven { driver } => match driver.get() {
                Some(driver) => (
                    &*driver.shared.cfg.name,
                    driver.attempt,
                    match driver.state {
                        Step::Calling { .. } => "calling",
                        Step::Waiting => "waiting",
                        Step::Readying => "readying",
                    },
                ),
                None => ("", 0, "moving"),
            },
            Stage::Moving => ("", 0, "moving"),
        };
        f.debug_struct("ResponseFuture")
            .field("name", &name)
            .field("attempt", &attempt)
            .field("state", &state)
            .finish()
    }
}
