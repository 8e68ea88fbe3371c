//! The retry layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Everything a call needs, behind one `Arc` made by `build()`.
#[derive(Debug)]
pub(crate) struct Shared<P> {
    pub(crate) name: Arc<str>,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) max_retry_after: Duration,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) seed: Option<u64>,
    pub(crate) listeners: Listeners<RetryEvent>,
    pub(crate) counts: Counts,
    pub(crate) policy: P,
}

/// Totals kept for the handle; only touched off the success path.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) retries: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
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
        shared: Arc<Shared<P>>,
        svc: S,
        // A copy for the next attempt; `None` when there will be none.
        req: Option<Req>,
        attempt: u32,
        started: Option<Instant>,
        prev_delay: Duration,
        rng: Option<fastrand::Rng>,
        #[pin]
        state: State<S::Future>,
        #[pin]
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

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Off,
        On { #[pin] sleep: Sleep },
    }
}

impl Timer {
    fn arm(mut self: Pin<&mut Self>, at: Instant) {
        match self.as_mut().project() {
            TimerProj::On { sleep } => sleep.reset(at),
            TimerProj::Off => self.set(Timer::On {
                sleep: tokio::time::sleep_until(at),
            }),
        }
    }

    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            TimerProj::On { sleep } => sleep.poll(cx),
            TimerProj::Off => Poll::Ready(()),
        }
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    pub(crate) fn new(shared: Arc<Shared<P>>, svc: S, fut: S::Future, req: Option<Req>) -> Self {
        let started = shared.deadline.map(|_| Instant::now());
        let mut this = Self {
            shared,
            svc,
            req,
            attempt: 1,
            started,
            prev_delay: Duration::ZERO,
            rng: None,
            state: State::Calling { fut },
            timer: Timer::Off,
        };
        if let Some(t) = this.shared.attempt_timeout {
            // Not pinned yet, so a fresh timer is simply stored.
            this.timer = Timer::On {
                sleep: tokio::time::sleep(t),
            };
        }
        this
    }
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let finished = match fut.poll(cx) {
                        Poll::Ready(res) => Finished::Done(res),
                        Poll::Pending => {
                            if this.shared.attempt_timeout.is_none() {
                                return Poll::Pending;
                            }
                            ready!(this.timer.as_mut().poll_elapsed(cx));
                            Finished::TimedOut
                        }
                    };
                    let shared = &**this.shared;
                    let attempt = *this.attempt;
                    // Success path: one policy check and out.
                    let (retry, reason, hint) = match (&finished, this.req.as_ref()) {
                        (_, None) => (false, RetryReason::Error, None),
                        (Finished::Done(res), Some(req)) => {
                            if !shared.policy.should_retry(req, res) {
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
                    let give_up = |fin: Finished<S::Response, S::Error>| -> Self::Output {
                        match fin {
                            Finished::Done(res) => res.map_err(Into::into),
                            Finished::TimedOut => Err(AttemptTimedOut::new(
                                shared.name.clone(),
                                attempt,
                                shared.attempt_timeout.unwrap_or_default(),
                            )
                            .into()),
                        }
                    };
                    if !retry {
                        return Poll::Ready(give_up(finished));
                    }
                    let rng = this.rng.get_or_insert_with(|| {
                        shared
                            .seed
                            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed)
                    });
                    match plan(shared, attempt, *this.prev_delay, hint, *this.started, rng) {
                        Ok(delay) => {
                            *this.prev_delay = delay;
                            *this.attempt = attempt + 1;
                            shared.counts.retries.fetch_add(1, Ordering::Relaxed);
                            shared.listeners.emit(&RetryEvent::Retry {
                                name: shared.name.clone(),
                                attempt: attempt + 1,
                                delay,
                                reason,
                            });
                            // The failed attempt (and any response body) goes now.
                            drop(finished);
                            if delay.is_zero() {
                                this.state.set(State::Readying);
                            } else {
                                this.timer.as_mut().arm(Instant::now() + delay);
                                this.state.set(State::Waiting);
                            }
                        }
                        Err(stop) => {
                            match stop {
                                Stop::GiveUp(reason) => {
                                    shared.counts.gave_up.fetch_add(1, Ordering::Relaxed);
                                    shared.listeners.emit(&RetryEvent::GaveUp {
                                        name: shared.name.clone(),
                                        attempts: attempt,
                                        reason,
                                    });
                                }
                                Stop::Budget => {
                                    shared
                                        .counts
                                        .budget_exhausted
                                        .fetch_add(1, Ordering::Relaxed);
                                    shared.listeners.emit(&RetryEvent::BudgetExhausted {
                                        name: shared.name.clone(),
                                        attempts: attempt,
                                    });
                                }
                            }
                            return Poll::Ready(give_up(finished));
                        }
                    }
                }
                StateProj::Waiting => {
                    ready!(this.timer.as_mut().poll_elapsed(cx));
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
                    if let Some(t) = this.shared.attempt_timeout {
                        this.timer.as_mut().arm(Instant::now() + t);
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
    if attempt >= shared.max_attempts {
        return Err(Stop::GiveUp(GiveUpReason::Exhausted));
    }
    let mut delay = shared.backoff.jittered(attempt, prev, rng);
    if let Some(hint) = hint {
        if shared.deadline.is_none() && hint > shared.max_retry_after {
            return Err(Stop::GiveUp(GiveUpReason::RetryAfterTooLong(hint)));
        }
        delay = delay.max(hint);
    }
    if let (Some(deadline), Some(started)) = (shared.deadline, started) {
        if Instant::now()
            .saturating_duration_since(started)
            .saturating_add(delay)
            > deadline
        {
            return Err(Stop::GiveUp(GiveUpReason::Deadline));
        }
    }
    if let Some(budget) = &shared.budget {
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
            .field("name", &self.shared.name)
            .field("attempt", &self.attempt)
            .field("state", &state)
            .finish()
    }
}
