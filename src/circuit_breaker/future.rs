//! The breaker's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::state::{record_success, Core, Ticket};
use super::CircuitOpen;
use crate::classify::{Classify, Outcome, Verdict};
use crate::clock::Nanos;
use crate::error::BoxError;
use crate::outline::OutOfLine;
use crate::slot::SlotRef;

/// A call admitted by a breaker that is not on the slot path: probes,
/// window mode, timed calls and shared backends. Dropping it before the
/// call finished (the caller went away, or the inner service panicked)
/// gives a probe slot back and counts as neither success nor failure.
#[derive(Debug)]
pub(crate) struct Permit {
    pub(crate) core: Arc<Core>,
    pub(crate) ticket: Ticket,
    /// When the call started, if its duration is needed.
    pub(crate) start: Option<Nanos>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.ticket.probe {
            self.core.release_shared(self.ticket);
        }
    }
}

impl Permit {
    fn finish<C, T, E>(self, classifier: &C, res: &mut Result<T, E>)
    where
        C: Classify<T, E>,
    {
        let core = &self.core;
        let elapsed = match self.start {
            Some(start) => Duration::from_nanos(core.clock.now().saturating_sub(start)),
            None => Duration::ZERO,
        };
        if core.cfg.honor_retry_after {
            if let Some(d) = classifier.retry_after(res) {
                core.hold_open_shared(d);
            }
        }
        let slow = core.cfg.slow_call_duration.is_some_and(|t| elapsed >= t);
        if classifier.defers() {
            // Invariant: an admitted call is booked at most once, in the
            // generation it was admitted in, and its probe slot is given
            // back exactly once. The permit (ticket, probe slot) moves into
            // the verdict: reporting books it, dropping it unreported runs
            // the permit's guard. So deferring is booking late, nothing
            // more (tests/deferred_verdict.rs checks it over histories).
            let verdict = Verdict::new(move |outcome| self.book(outcome, slow));
            if let Some(now) = classifier.defer(res, verdict) {
                now.report(classifier.classify(res, elapsed));
            }
            return;
        }
        self.book(classifier.classify(res, elapsed), slow);
    }

    fn book(mut self, outcome: Outcome, slow: bool) {
        let core = &self.core;
        let ticket = self.ticket;
        match outcome {
            Outcome::Success => core.record_shared(ticket, false, slow),
            Outcome::Failure => core.record_shared(ticket, true, slow),
            Outcome::Ignore => {
                if ticket.probe {
                    core.release_shared(ticket);
                }
            }
        }
        // The verdict is in: nothing left for the guard to undo.
        self.ticket.probe = false;
    }
}

/// Books a closed call that finished on the slot path: a success is one
/// load (and a write only after failures); a failure, the cold path,
/// reaches the whole breaker through the slot.
#[inline]
fn finish_on_slot<C, T, E>(slot: SlotRef, gen: u32, classifier: &C, res: &Result<T, E>)
where
    C: Classify<T, E>,
{
    match classifier.classify(res, Duration::ZERO) {
        Outcome::Success => record_success(&slot.slot.word, gen),
        Outcome::Failure => record_failure_on_slot(slot, gen),
        Outcome::Ignore => {}
    }
}

#[cold]
fn record_failure_on_slot(slot: SlotRef, gen: u32) {
    if let Some(core) = slot.upgrade::<Core>() {
        core.record(Ticket { gen, probe: false }, true, false);
    }
}

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker).
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F, C> {
        // The hot path: nothing here needs dropping but the inner future.
        Slot {
            #[pin]
            fut: F,
            slot: SlotRef,
            gen: u32,
            classifier: C,
        },
        // Out of line, so that the future's drop stays small enough to
        // inline on the hot path.
        Called {
            #[pin]
            fut: F,
            permit: OutOfLine<Permit>,
            classifier: C,
        },
        Rejected {
            err: OutOfLine<CircuitOpen>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn on_slot(fut: F, slot: SlotRef, gen: u32, classifier: C) -> Self {
        Self {
            kind: Kind::Slot {
                fut,
                slot,
                gen,
                classifier,
            },
        }
    }

    pub(crate) fn called(fut: F, permit: Permit, classifier: C) -> Self {
        let permit = OutOfLine::new(permit);
        Self {
            kind: Kind::Called {
                fut,
                permit,
                classifier,
            },
        }
    }

    pub(crate) fn rejected(err: CircuitOpen) -> Self {
        Self {
            kind: Kind::Rejected {
                err: OutOfLine::new(err),
            },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    /// The closed path inline; the others out of line, handing their
    /// result back through a slot so the caller keeps the closed path's in
    /// registers.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        if let KindProj::Slot {
            fut,
            slot,
            gen,
            classifier,
        } = kind.as_mut().project()
        {
            let res = ready!(fut.poll(cx));
            finish_on_slot(*slot, *gen, classifier, &res);
            return Poll::Ready(res.map_err(Into::into));
        }
        let mut out = None;
        poll_cold(kind, cx, &mut out);
        out.map_or(Poll::Pending, Poll::Ready)
    }
}

#[cold]
#[inline(never)]
fn poll_cold<F, C, T, E>(
    kind: Pin<&mut Kind<F, C>>,
    cx: &mut Context<'_>,
    out: &mut Option<Result<T, BoxError>>,
) where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    *out = match kind.project() {
        KindProj::Slot { .. } => unreachable!("the closed path is polled inline"),
        KindProj::Called {
            fut,
            permit,
            classifier,
        } => {
            let Poll::Ready(mut res) = fut.poll(cx) else {
                return;
            };
            permit
                .take()
                .expect("polled after completion")
                .finish(classifier, &mut res);
            Some(res.map_err(Into::into))
        }
        KindProj::Rejected { err } => {
            Some(Err(err.take().expect("polled after completion").into()))
        }
    };
}
