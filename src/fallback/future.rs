//! The fallback layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::entry::{BoxFuture, BoxService, Shared};
use super::{AllFailed, FailedResponse, FallbackEvent, NotReady};
use crate::circuit_breaker::{record_success, Ticket};
use crate::classify::{Classify, Outcome};
use crate::clock::Nanos;
use crate::error::BoxError;
use crate::slot::SlotRef;

/// The attempt in progress: which entry, its breaker admission and when it
/// started. Dropping it before the attempt finished (the caller went away,
/// or a service panicked) gives a half-open probe slot back.
pub(crate) struct Guard<Req, Res, C> {
    pub(crate) shared: Arc<Shared<Req, Res, C>>,
    pub(crate) idx: usize,
    pub(crate) ticket: Option<Ticket>,
    pub(crate) start: Option<Nanos>,
}

impl<Req, Res, C> Drop for Guard<Req, Res, C> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.shared.release(self.idx, t);
        }
    }
}

pin_project! {
    /// The general path: probes, timed calls, window-mode breakers, and
    /// everything after the primary has failed. Failing over clones the
    /// next entry's service, drives its readiness, then calls it.
    pub(crate) struct SlowFuture<F, Req, Res, C> {
        #[pin]
        state: State<F, Req, Res>,
        guard: Guard<Req, Res, C>,
        req: Option<Req>,
        errors: Vec<(Arc<str>, BoxError)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, Req, Res> {
        // The primary's call.
        Primary { #[pin] fut: F },
        // Find the next entry after `guard.idx` whose breaker admits a call.
        Next,
        // Drive the chosen entry's readiness.
        Ready { svc: BoxService<Req, Res> },
        // The chosen entry's call.
        Calling { fut: BoxFuture<Res> },
        Done,
    }
}

impl<F, Req, Res, C> SlowFuture<F, Req, Res, C> {
    pub(crate) fn primary(
        fut: F,
        shared: Arc<Shared<Req, Res, C>>,
        ticket: Ticket,
        start: Option<Nanos>,
        req: Option<Req>,
    ) -> Self {
        Self {
            state: State::Primary { fut },
            guard: Guard {
                shared,
                idx: 0,
                ticket: Some(ticket),
                start,
            },
            req,
            errors: Vec::new(),
        }
    }

    /// The primary was skipped (open breaker, or not ready) with `err`.
    pub(crate) fn skipped(
        shared: Arc<Shared<Req, Res, C>>,
        err: BoxError,
        req: Option<Req>,
    ) -> Self {
        let name = shared.name().clone();
        shared.listeners.emit(&FallbackEvent::EntryFailed {
            name: name.clone(),
            entry: name.clone(),
        });
        Self {
            state: State::Next,
            guard: Guard {
                shared,
                idx: 0,
                ticket: None,
                start: None,
            },
            req,
            errors: vec![(name, err)],
        }
    }
}

impl<F, Req, Res, C, E> Future for SlowFuture<F, Req, Res, C>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    Req: Clone,
    C: Classify<Res, BoxError>,
{
    type Output = Result<Res, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let res: Result<Res, BoxError> = match this.state.as_mut().project() {
                StateProj::Primary { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Calling { fut } => ready!(fut.as_mut().poll(cx)),
                StateProj::Ready { svc } => match svc.poll_ready(cx) {
                    Poll::Pending if !this.guard.shared.skip_not_ready => return Poll::Pending,
                    Poll::Pending => {
                        let g = &mut *this.guard;
                        if let Some(t) = g.ticket.take() {
                            g.shared.release(g.idx, t);
                        }
                        let name = g.shared.entries[g.idx].name.clone();
                        entry_failed(g, &name);
                        this.errors.push((name.clone(), NotReady::new(name).into()));
                        this.state.set(State::Next);
                        continue;
                    }
                    // A broken entry is a failed attempt.
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Ready(Ok(())) => {
                        let g = &mut *this.guard;
                        let last = g.idx + 1 == g.shared.entries.len();
                        let req = if last {
                            this.req.take()
                        } else {
                            this.req.clone()
                        }
                        .expect("request kept until the last attempt");
                        g.start = g
                            .shared
                            .timed(g.idx)
                            .then(|| g.shared.entries[g.idx].breaker.core.clock.now());
                        let fut = svc.call(req);
                        this.state.set(State::Calling { fut });
                        continue;
                    }
                },
                StateProj::Next => {
                    let g = &mut *this.guard;
                    let shared = g.shared.clone();
                    let mut next = None;
                    for i in g.idx + 1..shared.entries.len() {
                        let entry = &shared.entries[i];
                        match entry.breaker.core.acquire_shared() {
                            Ok(t) => {
                                next = Some((i, t));
                                break;
                            }
                            Err(open) => {
                                entry_failed(g, &entry.name);
                                this.errors.push((entry.name.clone(), open.into()));
                            }
                        }
                    }
                    match next {
                        Some((i, t)) => {
                            g.idx = i;
                            g.ticket = Some(t);
                            g.start = None;
                            let svc = shared.entries[i]
                                .service
                                .as_ref()
                                .expect("fallback entries have a service")
                                .clone_box();
                            this.state.set(State::Ready { svc });
                            continue;
                        }
                        None => {
                            this.state.set(State::Done);
                            this.req.take();
                            let all =
                                AllFailed::new(shared.name().clone(), std::mem::take(this.errors));
                            shared.listeners.emit(&FallbackEvent::AllFailed {
                                name: shared.name().clone(),
                                entries: all.errors().len(),
                            });
                            return Poll::Ready(match &shared.or_else {
                                Some(f) => f(all),
                                None => Err(all.into()),
                            });
                        }
                    }
                }
                StateProj::Done => panic!("fallback future polled after completion"),
            };

            // An attempt finished: book it, then answer or move on.
            let g = &mut *this.guard;
            let ticket = g.ticket.take().expect("an attempt holds a ticket");
            let failed = g.shared.finish(g.idx, ticket, g.start, &res);
            if !failed || !g.shared.may_resend(this.req.as_ref()) {
                this.state.set(State::Done);
                if !failed && g.idx > 0 {
                    g.shared.listeners.emit(&FallbackEvent::Answered {
                        name: g.shared.name().clone(),
                        entry: g.shared.entries[g.idx].name.clone(),
                    });
                }
                return Poll::Ready(res);
            }
            let name = g.shared.entries[g.idx].name.clone();
            entry_failed(g, &name);
            let err = match res {
                Err(e) => e,
                Ok(_) => FailedResponse::new(name.clone()).into(),
            };
            this.errors.push((name, err));
            this.state.set(State::Next);
        }
    }
}

fn entry_failed<Req, Res, C>(g: &Guard<Req, Res, C>, entry: &Arc<str>) {
    g.shared.listeners.emit(&FallbackEvent::EntryFailed {
        name: g.shared.name().clone(),
        entry: entry.clone(),
    });
}

impl<F, Req, Res, C> fmt::Debug for SlowFuture<F, Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Primary { .. } => "primary",
            State::Next => "next",
            State::Ready { .. } => "ready",
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_struct("SlowFuture")
            .field("state", &state)
            .field("entry", &self.guard.shared.entries[self.guard.idx].name)
            .field("errors", &self.errors.len())
            .finish()
    }
}

pin_project! {
    /// The response future of [`Fallback`](super::Fallback).
    ///
    /// While the primary answers through a closed breaker, this is the
    /// primary's own future, the request kept for a failover, and two
    /// plain slot references: nothing is boxed and no reference count is
    /// taken. Only a failure reaches for the layer's shared state.
    pub struct ResponseFuture<F, Req, Res, C> {
        #[pin]
        inner: Inner<F, Req, Res, C>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<F, Req, Res, C> {
        Fast {
            #[pin]
            fut: F,
            classifier: C,
            // The layer's shared state, for a failover.
            layer: SlotRef,
            // The primary's breaker and the generation it admitted us in.
            breaker: SlotRef,
            gen: u32,
            req: Option<Req>,
        },
        Slow {
            #[pin]
            slow: SlowFuture<F, Req, Res, C>,
        },
    }
}

impl<F, Req, Res, C> ResponseFuture<F, Req, Res, C> {
    pub(crate) fn fast(
        fut: F,
        classifier: C,
        layer: SlotRef,
        breaker: SlotRef,
        gen: u32,
        req: Option<Req>,
    ) -> Self {
        Self {
            inner: Inner::Fast {
                fut,
                classifier,
                layer,
                breaker,
                gen,
                req,
            },
        }
    }

    pub(crate) fn slow(slow: SlowFuture<F, Req, Res, C>) -> Self {
        Self {
            inner: Inner::Slow { slow },
        }
    }
}

impl<F, Req, Res, C, E> Future for ResponseFuture<F, Req, Res, C>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    Req: Clone + Send + 'static,
    Res: Send + 'static,
    C: Classify<Res, BoxError> + Send + Sync + 'static,
{
    type Output = Result<Res, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.project().inner;
        let (shared, err, req) = match inner.as_mut().project() {
            InnerProj::Slow { slow } => return slow.poll(cx),
            InnerProj::Fast {
                fut,
                classifier,
                layer,
                breaker,
                gen,
                req,
            } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                match classifier.classify(&res, std::time::Duration::ZERO) {
                    Outcome::Success => {
                        record_success(&breaker.slot.word, *gen);
                        return Poll::Ready(res);
                    }
                    Outcome::Ignore => return Poll::Ready(res),
                    Outcome::Failure => {}
                }
                // Cold: the primary failed. Book it, then fail over.
                let Some(shared) = layer.upgrade::<Shared<Req, Res, C>>() else {
                    return Poll::Ready(res); // the layer is gone
                };
                let ticket = Ticket {
                    gen: *gen,
                    probe: false,
                };
                shared.entries[0].breaker.core.record(ticket, true, false);
                if !shared.may_resend(req.as_ref()) {
                    return Poll::Ready(res);
                }
                let err = match res {
                    Err(e) => e,
                    Ok(_) => FailedResponse::new(shared.name().clone()).into(),
                };
                (shared, err, req.take())
            }
        };
        inner.set(Inner::Slow {
            slow: SlowFuture::skipped(shared, err, req),
        });
        match inner.project() {
            InnerProj::Slow { slow } => slow.poll(cx),
            InnerProj::Fast { .. } => unreachable!("just switched to the slow path"),
        }
    }
}

impl<F, Req, Res, C> fmt::Debug for ResponseFuture<F, Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Fast { .. } => f.write_str("ResponseFuture(primary)"),
            Inner::Slow { slow } => fmt::Debug::fmt(slow, f),
        }
    }
}
