//! The hedge's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::state::Core;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Hedge`](super::Hedge): the first call and,
    /// once its delay passes, up to `max_hedges` copies. The first copy to
    /// answer wins; the others are dropped (cancelled) at once. An error
    /// is returned only when no other copy is still running.
    ///
    /// The first call, the timer and the copy's service and request live
    /// inline: a call answered before the delay allocates nothing. Each
    /// hedge sent is boxed.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        primary: Option<S::Future>,
        started: Option<Instant>,
        // Set while another hedge may still be sent.
        #[pin]
        sleep: Option<Sleep>,
        delay: Duration,
        svc: Option<S>,
        req: Option<Req>,
        hedges: Vec<(Pin<Box<S::Future>>, Instant)>,
        left: u32,
        last_err: Option<BoxError>,
        core: Option<Arc<Core>>,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    #[inline]
    pub(crate) fn single(fut: S::Future) -> Self {
        Self::new(fut, None, None)
    }

    pub(crate) fn recorded(fut: S::Future, core: Arc<Core>) -> Self {
        Self::new(fut, Some(Instant::now()), Some(core))
    }

    pub(crate) fn hedged(
        fut: S::Future,
        core: Arc<Core>,
        delay: Duration,
        svc: S,
        req: Req,
    ) -> Self {
        let now = Instant::now();
        let started = core.records().then_some(now);
        let left = core.max_hedges;
        let mut this = Self::new(fut, started, Some(core));
        // A delay too long for the clock never comes: no hedge.
        this.sleep = now.checked_add(delay).map(tokio::time::sleep_until);
        this.delay = delay;
        this.svc = Some(svc);
        this.req = Some(req);
        this.left = left;
        this
    }

    #[inline]
    fn new(fut: S::Future, started: Option<Instant>, core: Option<Arc<Core>>) -> Self {
        Self {
            primary: Some(fut),
            started,
            sleep: None,
            delay: Duration::ZERO,
            svc: None,
            req: None,
            hedges: Vec::new(),
            left: 0,
            last_err: None,
            core,
        }
    }
}

fn record(core: &Option<Arc<Core>>, start: Option<Instant>) {
    if let (Some(core), Some(start)) = (core, start) {
        if core.records() {
            core.record(start.elapsed());
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(fut) = this.primary.as_mut().as_pin_mut() {
                if let Poll::Ready(res) = fut.poll(cx) {
                    this.primary.set(None);
                    record(this.core, *this.started);
                    match res {
                        Ok(resp) => {
                            this.hedges.clear();
                            return Poll::Ready(Ok(resp));
                        }
                        Err(e) => *this.last_err = Some(e.into()),
                    }
                }
            }
            let mut i = 0;
            while i < this.hedges.len() {
                let (fut, start) = &mut this.hedges[i];
                let Poll::Ready(res) = fut.as_mut().poll(cx) else {
                    i += 1;
                    continue;
                };
                record(this.core, Some(*start));
                drop(this.hedges.swap_remove(i));
                match res {
                    Ok(resp) => {
                        // The losers are cancelled now, not when the
                        // caller gets round to dropping this future.
                        this.primary.set(None);
                        this.hedges.clear();
                        return Poll::Ready(Ok(resp));
                    }
                    Err(e) => *this.last_err = Some(e.into()),
                }
            }
            if this.primary.is_none() && this.hedges.is_empty() {
                // Every copy sent has failed: a failure is not hedged
                // (that is a retry's job), so the last error is the answer.
                this.sleep.set(None);
                let err = this.last_err.take().expect("polled after completion");
                return Poll::Ready(Err(err));
            }

            // Send a hedge once the delay has passed and its service is
            // ready.
            let Some(sleep) = this.sleep.as_mut().as_pin_mut() else {
                return Poll::Pending;
            };
            if sleep.poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (Some(svc), Some(core)) = (this.svc.as_mut(), this.core.as_ref()) else {
                this.sleep.set(None);
                return Poll::Pending;
            };
            match svc.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    // The copy's service failed: the first call goes on alone.
                    this.sleep.set(None);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
            }
            if !core.budget.withdraw() {
                core.over_budget();
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
            let now = Instant::now();
            this.hedges.push((Box::pin(ready.call(req)), now));
            core.hedged(attempt, *this.delay);
            match now.checked_add(*this.delay) {
                Some(next) if *this.left > 0 => {
                    if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
                        sleep.reset(next);
                    }
                }
                _ => {
                    this.sleep.set(None);
                    *this.svc = None;
                }
            }
            // Poll the new copy at once, so it can wake this task.
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("primary_running", &self.primary.is_some())
            .field("hedges_running", &self.hedges.len())
            .field("hedges_left", &self.left)
            .finish_non_exhaustive()
    }
}
