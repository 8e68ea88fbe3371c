//! The hedge's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::state::Core;
use crate::classify::{Classify, Outcome};
use crate::clock::{nanos, Nanos};
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Hedge`](super::Hedge): the first call and,
    /// once its delay passes, up to `max_hedges` copies. The first copy to
    /// answer wins; the others are dropped (cancelled) at once. A failed
    /// copy (by the classifier) is the answer only when no other copy is
    /// still running.
    ///
    /// The first call, the timer and the copy's service and request live
    /// inline: a call answered before the delay allocates nothing. Each
    /// hedge sent is boxed.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        primary: Option<S::Future>,
        // When the call was made, on the layer's clock (with `core`).
        start: Nanos,
        // When the next hedge is due, while one may still be sent.
        next_hedge: Option<Nanos>,
        // The timer for `next_hedge`, made on the first poll that finds
        // the call pending: a call that answers at once builds none.
        #[pin]
        sleep: Option<Sleep>,
        delay: Duration,
        svc: Option<S>,
        req: Option<Req>,
        hedges: Vec<(Pin<Box<S::Future>>, Nanos)>,
        left: u32,
        // The last copy the classifier called a failure: the answer if no
        // other copy is left running.
        last_failed: Option<Result<S::Response, BoxError>>,
        classifier: C,
        core: Option<Arc<Core>>,
    }
}

impl<S: Service<Req>, Req, C> ResponseFuture<S, Req, C> {
    #[inline]
    pub(crate) fn single(fut: S::Future, classifier: C) -> Self {
        Self::new(fut, 0, None, classifier)
    }

    pub(crate) fn recorded(fut: S::Future, core: Arc<Core>, classifier: C) -> Self {
        let start = core.clock.now();
        Self::new(fut, start, Some(core), classifier)
    }

    pub(crate) fn hedged(
        fut: S::Future,
        core: Arc<Core>,
        delay: Duration,
        svc: S,
        req: Req,
        classifier: C,
    ) -> Self {
        let start = core.clock.now();
        let left = core.max_hedges;
        let mut this = Self::new(fut, start, Some(core), classifier);
        // A delay too long for the clock never comes: no hedge.
        this.next_hedge = start.checked_add(nanos(delay));
        this.delay = delay;
        this.svc = Some(svc);
        this.req = Some(req);
        this.left = left;
        this
    }

    #[inline]
    fn new(fut: S::Future, start: Nanos, core: Option<Arc<Core>>, classifier: C) -> Self {
        Self {
            primary: Some(fut),
            start,
            next_hedge: None,
            sleep: None,
            delay: Duration::ZERO,
            svc: None,
            req: None,
            hedges: Vec::new(),
            left: 0,
            last_failed: None,
            classifier,
            core,
        }
    }
}

/// Records the latency of an attempt made at `start`, in percentile mode.
/// Whether a copy's result is a failure, which leaves the other copies
/// running rather than answering the call.
fn failed<C: Classify<R, E>, R, E>(classifier: &C, res: &Result<R, E>) -> bool {
    classifier.classify(res, Duration::ZERO) == Outcome::Failure
}

fn record(core: &Option<Arc<Core>>, start: Nanos) {
    if let Some(core) = core {
        if core.records() {
            core.record(Duration::from_nanos(core.clock.now().saturating_sub(start)));
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(fut) = this.primary.as_mut().as_pin_mut() {
                if let Poll::Ready(res) = fut.poll(cx) {
                    this.primary.set(None);
                    record(this.core, *this.start);
                    if !failed(this.classifier, &res) {
                        this.hedges.clear();
                        return Poll::Ready(res.map_err(Into::into));
                    }
                    *this.last_failed = Some(res.map_err(Into::into));
                }
            }
            let mut i = 0;
            while i < this.hedges.len() {
                let (fut, start) = &mut this.hedges[i];
                let Poll::Ready(res) = fut.as_mut().poll(cx) else {
                    i += 1;
                    continue;
                };
                record(this.core, *start);
                drop(this.hedges.swap_remove(i));
                if !failed(this.classifier, &res) {
                    // The losers are cancelled now, not when the caller
                    // gets round to dropping this future.
                    this.primary.set(None);
                    this.hedges.clear();
                    return Poll::Ready(res.map_err(Into::into));
                }
                *this.last_failed = Some(res.map_err(Into::into));
            }
            if this.primary.is_none() && this.hedges.is_empty() {
                // Every copy sent has failed: a failure is not hedged
                // (that is a retry's job), so the last one is the answer.
                *this.next_hedge = None;
                this.sleep.set(None);
                return Poll::Ready(this.last_failed.take().expect("polled after completion"));
            }

            // Send a hedge once the delay has passed and its service is
            // ready.
            let (Some(due), Some(core)) = (*this.next_hedge, this.core.as_ref()) else {
                return Poll::Pending;
            };
            if this.sleep.is_none() {
                let deadline = core.clock.instant(due);
                this.sleep.set(Some(tokio::time::sleep_until(deadline)));
            }
            if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
                if sleep.poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            let Some(svc) = this.svc.as_mut() else {
                *this.next_hedge = None;
                return Poll::Pending;
            };
            match svc.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    // The copy's service failed: the first call goes on alone.
                    *this.next_hedge = None;
                    this.sleep.set(None);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
            }
            if !core.budget.withdraw() {
                core.over_budget();
                *this.next_hedge = None;
                this.sleep.set(None);
                return Poll::Pending;
            }
            let attempt = core.max_hedges - *this.left + 1;
            *this.left -= 1;
            let req = if *this.left > 0 {
                this.req.clone()
            } else {
                this.req.take()
            };
            let req = req.expect("a request is kept while hedges are left");
            // The readied instance is called; a fresh clone stays for the
            // next hedge, to be readied in its turn.
            let fresh = svc.clone();
            let mut ready = std::mem::replace(svc, fresh);
            let now = core.clock.now();
            this.hedges.push((Box::pin(ready.call(req)), now));
            core.hedged(attempt, *this.delay);
            *this.next_hedge = now
                .checked_add(nanos(*this.delay))
                .filter(|_| *this.left > 0);
            match (*this.next_hedge, this.sleep.as_mut().as_pin_mut()) {
                (Some(next), Some(sleep)) => sleep.reset(core.clock.instant(next)),
                _ => {
                    this.sleep.set(None);
                    *this.svc = None;
                }
            }
            // Poll the new copy at once, so it can wake this task.
        }
    }
}

impl<S: Service<Req>, Req, C> fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("primary_running", &self.primary.is_some())
            .field("hedges_running", &self.hedges.len())
            .field("hedges_left", &self.left)
            .finish_non_exhaustive()
    }
}
