//! The breaker's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::backend::Remote;
use super::state::{Core, Ticket};
use super::CircuitOpen;
use crate::classify::{Classify, Outcome};
use crate::clock::Nanos;
use crate::error::BoxError;

/// The part of the breaker a call carries: the shared core and the
/// classifier, behind one `Arc` so admission costs one reference count.
#[derive(Debug)]
pub(crate) struct Shared<C> {
    pub(crate) core: Core,
    pub(crate) classifier: C,
    pub(crate) remote: Remote,
}

impl<C> Shared<C> {
    /// Admits a call or says why not. The memory backend goes straight to
    /// the lock-free core.
    #[inline]
    pub(crate) fn acquire(&self) -> Result<Ticket, CircuitOpen> {
        match &self.remote {
            Remote::None => self.core.try_acquire(),
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.acquire(&self.core),
            #[cfg(feature = "redis")]
            Remote::Redis(f) => {
                f.before_call(&self.core);
                self.core.try_acquire()
            }
        }
    }

    #[inline]
    pub(crate) fn record(&self, t: Ticket, failure: bool, slow: bool) {
        match &self.remote {
            Remote::None => self.core.record(t, failure, slow),
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.record(&self.core, t, failure || slow),
            #[cfg(feature = "redis")]
            Remote::Redis(f) => {
                if !t.probe {
                    f.outcome(failure || slow);
                }
                self.core.record(t, failure, slow)
            }
        }
    }

    pub(crate) fn release_probe(&self, t: Ticket) {
        match &self.remote {
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.release(t),
            _ => self.core.release_probe(t),
        }
    }

    pub(crate) fn hold_open(&self, d: Duration) {
        match &self.remote {
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.hold_open(d),
            _ => self.core.hold_open(d),
        }
    }
}

/// An admitted call. Dropping it before the call finished (the caller went
/// away, or the inner service panicked) gives a probe slot back and counts
/// the call as neither success nor failure.
#[derive(Debug)]
pub(crate) struct Permit<C> {
    pub(crate) shared: Arc<Shared<C>>,
    pub(crate) ticket: Ticket,
    /// When the call started, if its duration is needed.
    pub(crate) start: Option<Nanos>,
}

impl<C> Drop for Permit<C> {
    fn drop(&mut self) {
        if self.ticket.probe {
            self.shared.release_probe(self.ticket);
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
            permit: Option<Permit<C>>,
        },
        Rejected {
            err: Option<CircuitOpen>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(fut: F, permit: Permit<C>) -> Self {
        let permit = Some(permit);
        Self {
            kind: Kind::Called { fut, permit },
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { fut, permit } => {
                let res = ready!(fut.poll(cx));
                let mut permit = permit.take().expect("polled after completion");
                finish(&mut permit, &res);
                // The verdict is in: nothing left for the guard to undo.
                permit.ticket.probe = false;
                Poll::Ready(res.map_err(Into::into))
            }
            KindProj::Rejected { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion").into()))
            }
        }
    }
}

#[inline]
fn finish<C, T, E>(permit: &mut Permit<C>, res: &Result<T, E>)
where
    C: Classify<T, E>,
{
    let shared = &*permit.shared;
    let core = &shared.core;
    let elapsed = match permit.start {
        Some(start) => Duration::from_nanos(core.clock.now().saturating_sub(start)),
        None => Duration::ZERO,
    };
    if core.cfg.honor_retry_after {
        if let Some(d) = shared.classifier.retry_after(res) {
            shared.hold_open(d);
        }
    }
    let slow = core.cfg.slow_call_duration.is_some_and(|t| elapsed >= t);
    match shared.classifier.classify(res, elapsed) {
        Outcome::Success => shared.record(permit.ticket, false, slow),
        Outcome::Failure => shared.record(permit.ticket, true, slow),
        Outcome::Ignore => {
            if permit.ticket.probe {
                shared.release_probe(permit.ticket);
            }
        }
    }
}
