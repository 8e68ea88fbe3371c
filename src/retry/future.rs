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
use crate::error::BoxError;
use crate::observe::Listeners;

/// The plain settings. Interned for the life of the process (one copy per
/// distinct configuration) so a response future carries them as one
/// `&'static` pointer: no reference count, and a future small enough to
/// move cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Config {
    /// Interned: see `intern`.
    pub(crate) name: &'static str,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) max_retry_after: Duration,
    pub(crate) seed: Option<u64>,
}

/// What retries report to and draw from; shared by every clone. Absent
/// when there is neither a budget nor a listener, so that such a layer's
/// calls take no reference count.
#[derive(Debug)]
pub(crate) struct Sinks {
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) listeners: Listeners<RetryEvent>,
}

/// A layer's state: copied (`cfg`, `policy`) or shared (`sinks`) by every
/// service it makes.
#[derive(Debug, Clone)]
pub(crate) struct Shared<P> {
    pub(crate) cfg: &'static Config,
    pub(crate) policy: P,
    pub(crate) sinks: Option<Arc<Sinks>>,
}

impl<P> Shared<P> {
    fn emit(&self, event: RetryEvent) {
        match &self.sinks {
            Some(sinks) => sinks.listeners.emit(&event),
            None => crate::observe::emit_unlistened(&event),
        }
    }

    fn budget(&self) -> Option<&RetryBudget> {
        self.sinks.as_ref().and_then(|s| s.budget.as_ref())
    }
}

pin_project! {
    /// The response future of [`Retry`](super::Retry).
    ///
    /// The first attempt is polled in place: no box, and no timer unless a
    /// per-attempt timeout is configured. Dropping the future at any point
    /// (mid-attempt or mid-back-off) drops the attempt's future and the
    /// timer; nothing else is held.
    pub struct ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        shared: Shared<P>,
        svc: S,
        // A copy for the next attempt; `None` when there will be none.
        req: Option<Req>,
        started: Option<Instant>,
        // Made at the first retry.
        retrying: Option<Box<Retrying>>,
        #[pin]
        state: State<S::Future>,
        timer: Timer,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] fut: F },
        Waiting,
        Readying,
    }
}

/// The per-attempt timeout and the back-off share one timer, made the
/// first time either is needed. It is boxed so the future stays small: a
/// call that needs neither moves 8 bytes for it, not a whole `Sleep`.
struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    fn arm(&mut self, at: Instant) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    #[inline]
    pub(crate) fn new(shared: Shared<P>, svc: S, fut: S::Future, req: Option<Req>) -> Self {
        let started = shared.cfg.deadline.map(|_| Instant::now());
        let mut timer = Timer(None);
        if let Some(t) = shared.cfg.attempt_timeout {
            timer.arm(Instant::now() + t);
        }
        Self {
            shared,
            svc,
            req,
            started,
            retrying: None,
            state: State::Calling { fut },
            timer,
        }
    }
}

/// What only a call that retries needs, boxed to keep the future small.
struct Retrying {
    attempt: u32,
    prev_delay: Duration,
    rng: fastrand::Rng,
}

enum Finished<T, E> {
    Done(Result<T, E>),
    TimedOut,
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
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.as_mut().project();
        if let StateProj::Calling { fut } = this.state.project() {
            match fut.poll(cx) {
                Poll::Ready(res) => {
                    let again = match this.req.as_ref() {
                        Some(req) => this.shared.policy.should_retry(req, &res),
                        None => false,
                    };
                    if !again {
                        return Poll::Ready(res.map_err(Into::into));
                    }
                    return self.drive(cx, Some(res));
                }
                Poll::Pending if this.shared.cfg.attempt_timeout.is_none() => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        self.drive(cx, None)
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    /// Everything but the success path. `first`, when given, is an
    /// attempt's result that the policy already chose to retry.
    #[inline(never)]
    fn drive(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut first: Option<Result<S::Response, S::Error>>,
    ) -> Poll<Result<S::Response, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let (finished, decided) = match first.take() {
                        Some(res) => (Finished::Done(res), true),
                        None => match fut.poll(cx) {
                            Poll::Ready(res) => (Finished::Done(res), false),
                            Poll::Pending => {
                                if this.shared.cfg.attempt_timeout.is_none() {
                                    return Poll::Pending;
                                }
                                ready!(this.timer.poll_elapsed(cx));
                                (Finished::TimedOut, false)
                            }
                        },
                    };
                    let shared = &*this.shared;
                    let attempt = this.retrying.as_ref().map_or(1, |r| r.attempt);
                    let (retry, reason, hint) = match (&finished, this.req.as_ref()) {
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
                    let give_up =
                        |fin: Finished<S::Response, S::Error>| -> Result<S::Response, BoxError> {
                            match fin {
                                Finished::Done(res) => res.map_err(Into::into),
                                Finished::TimedOut => Err(AttemptTimedOut::new(
                                    shared.cfg.name,
                                    attempt,
                                    shared.cfg.attempt_timeout.unwrap_or_default(),
                                )
                                .into()),
                            }
                        };
                    if !retry {
                        return Poll::Ready(give_up(finished));
                    }
                    let r = this.retrying.get_or_insert_with(|| {
                        Box::new(Retrying {
                            attempt: 1,
                            prev_delay: Duration::ZERO,
                            rng: shared
                                .cfg
                                .seed
                                .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
                        })
                    });
                    match plan(
                        shared,
                        attempt,
                        r.prev_delay,
                        hint,
                        *this.started,
                        &mut r.rng,
                    ) {
                        Ok(delay) => {
                            r.prev_delay = delay;
                            r.attempt = attempt + 1;
                            shared.emit(RetryEvent::Retry {
                                name: shared.cfg.name,
                                attempt: attempt + 1,
                                delay,
                                reason,
                            });
                            // The failed attempt (and any response body) goes now.
                            drop(finished);
                            if delay.is_zero() {
                                this.state.set(State::Readying);
                            } else {
                                this.timer.arm(Instant::now() + delay);
                                this.state.set(State::Waiting);
                            }
                        }
                        Err(stop) => {
                            match stop {
                                Stop::GiveUp(reason) => {
                                    shared.emit(RetryEvent::GaveUp {
                                        name: shared.cfg.name,
                                        attempts: attempt,
                                        reason,
                                    });
                                }
                                Stop::Budget => {
                                    shared.emit(RetryEvent::BudgetExhausted {
                                        name: shared.cfg.name,
                                        attempts: attempt,
                                    });
                                }
                            }
                            return Poll::Ready(give_up(finished));
                        }
                    }
                }
                StateProj::Waiting => {
                    ready!(this.timer.poll_elapsed(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
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
                        this.timer.arm(Instant::now() + t);
                    }
                    this.state.set(State::Calling { fut });
                }
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
    shared: &Shared<P>,
    attempt: u32,
    prev: Duration,
    hint: Option<Duration>,
    started: Option<Instant>,
    rng: &mut fastrand::Rng,
) -> Result<Duration, Stop> {
    let cfg = shared.cfg;
    if attempt >= cfg.max_attempts {
        return Err(Stop::GiveUp(GiveUpReason::Exhausted));
    }
    let mut delay = cfg.backoff.jittered(attempt, prev, rng);
    if let Some(hint) = hint {
        if cfg.deadline.is_none() && hint > cfg.max_retry_after {
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
    if let Some(budget) = shared.budget() {
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
        let state = match self.state {
            State::Calling { .. } => "calling",
            State::Waiting => "waiting",
            State::Readying => "readying",
        };
        f.debug_struct("ResponseFuture")
            .field("name", &self.shared.cfg.name)
            .field("attempt", &self.retrying.as_ref().map_or(1, |r| r.attempt))
            .field("state", &state)
            .finish()
    }
}
