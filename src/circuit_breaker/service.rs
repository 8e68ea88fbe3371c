//! The breaker service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::{Permit, ResponseFuture};
use super::state::{closed_generation, Core};
use super::{CircuitBreakerLayer, CircuitHandle};
use crate::classify::Classify;
use crate::error::BoxError;
use crate::slot::SlotRef;

/// A circuit breaker around `S`. Made by [`CircuitBreakerLayer`].
///
/// Every clone shares the breaker state of the layer that made it. The
/// classifier `C` is cloned into each call's response future, so keep it
/// cheap to clone (a unit struct, a closure, or an `Arc`).
pub struct CircuitBreaker<S, C> {
    inner: S,
    core: Arc<Core>,
    classifier: C,
    /// The breaker's slot when every closed call can finish through it
    /// (memory backend, consecutive mode, nothing timed): the hot path
    /// then reads one word without touching `core`.
    slot: Option<SlotRef>,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core>, classifier: C) -> Self {
        let slot = (core.remote.is_memory() && core.slot_path()).then(|| core.lease.get());
        Self {
            inner,
            core,
            classifier,
            slot,
        }
    }

    /// Wraps `inner` in a breaker that shares `layer`'s state.
    pub fn new(inner: S, layer: &CircuitBreakerLayer<C>) -> Self
    where
        C: Clone,
    {
        Self::from_parts(inner, layer.core.clone(), layer.classifier.clone())
    }

    /// A handle on the shared breaker state.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle::new(self.core.clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
            classifier: self.classifier.clone(),
            slot: self.slot,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &self.core.cfg.name)
            .field("state", &self.core.state())
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An open breaker still reports ready: rejections come from `call`,
        // so the caller never throws away a healthy service.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(slot) = self.slot {
            if !Classify::<S::Response, S::Error>::uses_elapsed(&self.classifier)
                && !Classify::<S::Response, S::Error>::defers(&self.classifier)
            {
                let gen = closed_generation(slot.slot);
                if let Some(gen) = gen {
                    let fut = self.inner.call(req);
                    return ResponseFuture::on_slot(fut, slot, gen, self.classifier.clone());
                }
            }
        }
        self.call_core(req)
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// Every call that is not a closed call on the slot path.
    fn call_core<Req>(&mut self, req: Req) -> ResponseFuture<S::Future, C>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        C: Classify<S::Response, S::Error> + Clone,
    {
        let core = &self.core;
        if !core.remote.is_memory() {
            return self.call_shared(req);
        }
        match core.try_acquire() {
            Ok(ticket) => {
                let timed = core.needs_elapsed()
                    || Classify::<S::Response, S::Error>::uses_elapsed(&self.classifier);
                let classifier = self.classifier.clone();
                let defers = Classify::<S::Response, S::Error>::defers(&classifier);
                if !ticket.probe && !timed && !defers && core.slot_path() {
                    let slot = core.lease.get();
                    let fut = self.inner.call(req);
                    return ResponseFuture::on_slot(fut, slot, ticket.gen, classifier);
                }
                let permit = Permit {
                    core: core.clone(),
                    ticket,
                    start: timed.then(|| core.clock.now()),
                };
                ResponseFuture::called(self.inner.call(req), permit, classifier)
            }
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// A call through a file or Redis backend: admitted by the backend, and
    /// always finished through the whole breaker.
    #[cold]
    fn call_shared<Req>(&mut self, req: Req) -> ResponseFuture<S::Future, C>
    where
        S: Service<Req>,
        C: Classify<S::Response, S::Error> + Clone,
    {
        let core = &self.core;
        match core.acquire_shared() {
            Ok(ticket) => {
                let timed = core.needs_elapsed()
                    || Classify::<S::Response, S::Error>::uses_elapsed(&self.classifier);
                let permit = Permit {
                    core: core.clone(),
                    ticket,
                    start: timed.then(|| core.clock.now()),
                };
                ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}
