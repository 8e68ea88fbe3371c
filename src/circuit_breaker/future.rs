//! The breaker's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::state::{record_success, Core, Ticket};
use super::CircuitOpen;
use crate::classify::{Classify, Outcome};
use crate::clock::Nanos;
use crate::error::BoxError;
use crate::slot::SlotRef;

/// An admitted call.
#[derive(Debug)]
pub(crate) enum Permit {
    /// A closed-breaker call in consecutive mode: it reaches the breaker
    /// through its slot, without holding a reference count.
    Slot { slot: SlotRef, gen: u32 },
    /// Everything else: probes, window mode, timed calls.
    Core {
        core: Arc<Core>,
        ticket: Ticket,
        /// When the call started, if its duration is needed.
        start: Option<Nanos>,
    },
}

impl Drop for Permit {
    /// A call dropped before it finished (the caller went away, or the
    /// inner service panicked) gives its probe slot back and counts as
    /// neither success nor failure.
    fn drop(&mut self) {
        if let Permit::Core { core, ticket, .. } = self {
            if ticket.probe {
                core.release_shared(*ticket);
            }
        }
    }
}

impl Permit {
    #[inline]
    fn finish<C, T, E>(mut self, classifier: &C, res: &Result<T, E>)
    where
        C: Classify<T, E>,
    {
        match &mut self {
            Permit::Slot { slot, gen } => match classifier.classify(res, Duration::ZERO) {
                Outcome::Success => record_success(&slot.slot.word, *gen),
                Outcome::Failure => {
                    // Cold: reach the whole breaker to count it, and maybe open.
                    if let Some(core) = slot.upgrade::<Core>() {
                        let ticket = Ticket {
                            gen: *gen,
                            probe: false,
                        };
                        core.record(ticket, true, false);
                    }
                }
                Outcome::Ignore => {}
            },
            Permit::Core {
                core,
                ticket,
                start,
            } => {
                let elapsed = match start {
                    Some(start) => Duration::from_nanos(core.clock.now().saturating_sub(*start)),
                    None => Duration::ZERO,
                };
                if core.cfg.honor_retry_after {
                    if let Some(d) = classifier.retry_after(res) {
                        core.hold_open_shared(d);
                    }
                }
                let slow = core.cfg.slow_call_duration.is_some_and(|t| elapsed >= t);
                match classifier.classify(res, elapsed) {
                    Outcome::Success => core.record_shared(*ticket, false, slow),
                    Outcome::Failure => core.record_shared(*ticket, true, slow),
                    Outcome::Ignore => {
                        if ticket.probe {
                            core.release_shared(*ticket);
                        }
                    }
                }
                // The verdict is in: nothing left for the guard to undo.
                ticket.probe = false;
            }
        }
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
        Called {
            #[pin]
            fut: F,
            permit: Option<Permit>,
            classifier: C,
        },
        Rejected {
            err: Option<CircuitOpen>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn called(fut: F, permit: Permit, classifier: C) -> Self {
        let permit = Some(permit);
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
            kind: Kind::Rejected { err: Some(err) },
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called {
                fut,
                permit,
                classifier,
            } => {
                let res = ready!(fut.poll(cx));
                permit
                    .take()
                    .expect("polled after completion")
                    .finish(classifier, &res);
                Poll::Ready(res.map_err(Into::into))
            }
            KindProj::Rejected { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion").into()))
            }
        }
    }
}
