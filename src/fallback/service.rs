//! The fallback service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::entry::Shared;
use super::future::{ResponseFuture, SlowFuture};
use super::{FallbackHandle, FallbackLayer, NotReady};
use crate::circuit_breaker::closed_generation;
use crate::classify::Classify;
use crate::error::BoxError;
use crate::slot::SlotRef;

/// A primary service with ordered fallbacks, each behind its own circuit
/// breaker. Made by [`FallbackLayer`].
///
/// Every clone shares the layer's fallback services and breakers.
pub struct Fallback<S, Req, Res, C> {
    primary: S,
    shared: Arc<Shared<Req, Res, C>>,
    handle: FallbackHandle,
    /// Whether the primary reported ready (always, unless `skip_not_ready`).
    primary_ready: bool,
    /// The layer's and the primary breaker's slots, when a healthy call can
    /// run on them alone (memory breaker in consecutive mode, nothing
    /// timed, no readiness skipping).
    fast: Option<(SlotRef, SlotRef)>,
}

impl<S, Req, Res, C> Fallback<S, Req, Res, C> {
    /// Wraps `primary` with the fallbacks of `layer`.
    pub fn new(primary: S, layer: &FallbackLayer<Req, Res, C>) -> Self {
        let shared = &layer.shared;
        let core = &shared.entries[0].breaker.core;
        let fast = (core.remote.is_memory() && core.slot_path() && !shared.skip_not_ready)
            .then(|| (shared.lease.get(), core.lease.get()));
        Self {
            primary,
            shared: shared.clone(),
            handle: layer.handle.clone(),
            primary_ready: true,
            fast,
        }
    }

    /// A handle on the entries' breakers.
    pub fn handle(&self) -> FallbackHandle {
        self.handle.clone()
    }

    /// The primary service.
    pub fn get_ref(&self) -> &S {
        &self.primary
    }

    /// The primary service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.primary
    }

    /// Unwraps the primary service.
    pub fn into_inner(self) -> S {
        self.primary
    }
}

impl<S: Clone, Req, Res, C> Clone for Fallback<S, Req, Res, C> {
    fn clone(&self) -> Self {
        Self {
            primary: self.primary.clone(),
            shared: self.shared.clone(),
            handle: self.handle.clone(),
            primary_ready: true,
            fast: self.fast,
        }
    }
}

impl<S: fmt::Debug, Req, Res, C> fmt::Debug for Fallback<S, Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("primary", &self.primary)
            .field("handle", &self.handle)
            .finish()
    }
}

impl<S, Req, Res, C> Service<Req> for Fallback<S, Req, Res, C>
where
    S: Service<Req, Response = Res>,
    S::Error: Into<BoxError>,
    Req: Clone + Send + 'static,
    Res: Send + 'static,
    C: Classify<Res, BoxError> + Clone + Send + Sync + 'static,
{
    type Response = Res;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Req, Res, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.shared.skip_not_ready {
            return self.primary.poll_ready(cx).map_err(Into::into);
        }
        // A primary that is not ready is skipped rather than waited for.
        match self.primary.poll_ready(cx) {
            Poll::Pending => {
                self.primary_ready = false;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                self.primary_ready = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some((layer, breaker)) = self.fast {
            if !self.shared.classifier.uses_elapsed() {
                if let Some(gen) = closed_generation(breaker.slot) {
                    // The healthy path: no reference count, nothing boxed.
                    let backup = self.shared.can_fail_over().then(|| req.clone());
                    let fut = self.primary.call(req);
                    let c = self.shared.classifier.clone();
                    return ResponseFuture::fast(fut, c, layer, breaker, gen, backup);
                }
            }
        }
        let shared = &self.shared;
        if !std::mem::replace(&mut self.primary_ready, true) {
            let err = NotReady::new(shared.name().clone()).into();
            return ResponseFuture::slow(SlowFuture::skipped(shared.clone(), err, Some(req)));
        }
        let core = &shared.entries[0].breaker.core;
        match core.acquire_shared() {
            Ok(ticket) => {
                let timed = shared.timed(0);
                let backup = shared.can_fail_over().then(|| req.clone());
                let fut = self.primary.call(req);
                if !ticket.probe && !timed && core.remote.is_memory() && core.slot_path() {
                    // The healthy path: no reference count, nothing boxed.
                    let breaker = core.lease.get();
                    let layer = shared.lease.get();
                    let c = shared.classifier.clone();
                    return ResponseFuture::fast(fut, c, layer, breaker, ticket.gen, backup);
                }
                let start = timed.then(|| core.clock.now());
                let slow = SlowFuture::primary(fut, shared.clone(), ticket, start, backup);
                ResponseFuture::slow(slow)
            }
            Err(open) => {
                let slow = SlowFuture::skipped(shared.clone(), open.into(), Some(req));
                ResponseFuture::slow(slow)
            }
        }
    }
}
