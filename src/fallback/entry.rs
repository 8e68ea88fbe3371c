//! The entries of a fallback group: type-erased fallback services and the
//! state every service of one layer shares.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::slot::Lease;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::{AllFailed, FallbackEvent};
use crate::circuit_breaker::{CircuitBreakerLayer, Ticket};
use crate::classify::{Classify, Outcome};
use crate::clock::Nanos;
use crate::error::BoxError;
use crate::observe::Listeners;

pub(crate) type BoxFuture<Res> = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

/// A fallback service with its type erased, so entries of different types
/// fit in one list. Only used once the primary has failed.
pub(crate) trait ErasedService<Req, Res>: Send + Sync {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(&mut self, req: Req) -> BoxFuture<Res>;
    fn clone_box(&self) -> BoxService<Req, Res>;
}

pub(crate) type BoxService<Req, Res> = Box<dyn ErasedService<Req, Res>>;

impl<S, Req, Res> ErasedService<Req, Res> for S
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::poll_ready(self, cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> BoxFuture<Res> {
        let fut = Service::call(self, req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }

    fn clone_box(&self) -> BoxService<Req, Res> {
        Box::new(self.clone())
    }
}

pub(crate) type OrElse<Res> = dyn Fn(AllFailed) -> Result<Res, BoxError> + Send + Sync;

/// Whether a request that reached an entry may be sent to the next one.
pub(crate) type Resend<Req> = dyn Fn(&Req) -> bool + Send + Sync;

/// One entry: its name, its own breaker, and (for fallbacks) its service.
pub(crate) struct Entry<Req, Res> {
    pub(crate) name: Arc<str>,
    pub(crate) breaker: CircuitBreakerLayer,
    pub(crate) service: Option<BoxService<Req, Res>>,
}

/// What every service of one layer shares. Entry 0 is the primary.
pub(crate) struct Shared<Req, Res, C> {
    /// Lets a healthy call's future find its way back here without a
    /// reference count (see `crate::slot`).
    pub(crate) lease: Lease,
    pub(crate) entries: Box<[Entry<Req, Res>]>,
    pub(crate) classifier: C,
    pub(crate) skip_not_ready: bool,
    pub(crate) or_else: Option<Arc<OrElse<Res>>>,
    pub(crate) listeners: Listeners<FallbackEvent>,
    /// Asked before a request an entry was sent is failed over; `None`
    /// fails over every request.
    pub(crate) resend: Option<Arc<Resend<Req>>>,
}

impl<Req, Res, C> Shared<Req, Res, C> {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.entries[0].name
    }

    /// Whether a failed primary has anywhere to go: if not, the request
    /// need not be cloned.
    pub(crate) fn can_fail_over(&self) -> bool {
        self.entries.len() > 1 || self.or_else.is_some()
    }

    /// Whether `req`, already sent to an entry that failed, may go to the
    /// next one.
    pub(crate) fn may_resend(&self, req: Option<&Req>) -> bool {
        match (&self.resend, req) {
            (Some(f), Some(req)) => f(req),
            _ => true,
        }
    }

    /// Whether calls need their duration measured.
    pub(crate) fn timed(&self, idx: usize) -> bool
    where
        C: Classify<Res, BoxError>,
    {
        self.entries[idx].breaker.core.needs_elapsed() || self.classifier.uses_elapsed()
    }

    /// Books a finished attempt with entry `idx`'s breaker and says whether
    /// the result fails over.
    pub(crate) fn finish(
        &self,
        idx: usize,
        ticket: Ticket,
        start: Option<Nanos>,
        res: &Result<Res, BoxError>,
    ) -> bool
    where
        C: Classify<Res, BoxError>,
    {
        let core = &self.entries[idx].breaker.core;
        let elapsed = match start {
            Some(start) => Duration::from_nanos(core.clock.now().saturating_sub(start)),
            None => Duration::ZERO,
        };
        if core.cfg.honor_retry_after {
            if let Some(d) = self.classifier.retry_after(res) {
                core.hold_open_shared(d);
            }
        }
        let slow = core.cfg.slow_call_duration.is_some_and(|t| elapsed >= t);
        match self.classifier.classify(res, elapsed) {
            Outcome::Success => {
                core.record_shared(ticket, false, slow);
                false
            }
            Outcome::Failure => {
                core.record_shared(ticket, true, slow);
                true
            }
            Outcome::Ignore => {
                if ticket.probe {
                    core.release_shared(ticket);
                }
                false
            }
        }
    }

    /// Gives back a probe slot whose attempt ended without a verdict.
    pub(crate) fn release(&self, idx: usize, ticket: Ticket) {
        if ticket.probe {
            self.entries[idx].breaker.core.release_shared(ticket);
        }
    }
}

impl<Req, Res, C> fmt::Debug for Shared<Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field(
                "entries",
                &self.entries.iter().map(|e| &*e.name).collect::<Vec<_>>(),
            )
            .field("classifier", &std::any::type_name::<C>())
            .field("skip_not_ready", &self.skip_not_ready)
            .field("or_else", &self.or_else.is_some())
            .finish()
    }
}
