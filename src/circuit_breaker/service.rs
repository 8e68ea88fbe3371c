//! The breaker service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::{Permit, ResponseFuture, Shared};
use super::{CircuitBreakerLayer, CircuitHandle};
use crate::classify::Classify;
use crate::error::BoxError;

/// A circuit breaker around `S`. Made by [`CircuitBreakerLayer`].
///
/// Every clone shares the breaker state of the layer that made it.
pub struct CircuitBreaker<S, C> {
    inner: S,
    shared: Arc<Shared<C>>,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<C>>) -> Self {
        Self { inner, shared }
    }

    /// Wraps `inner` in a breaker made from `layer`'s shared state.
    pub fn new(inner: S, layer: &CircuitBreakerLayer<C>) -> Self {
        Self::from_shared(inner, layer.shared.clone())
    }

    /// A handle on the shared breaker state.
    pub fn handle(&self) -> CircuitHandle
    where
        C: Send + Sync + 'static,
    {
        CircuitHandle::new(self.shared.clone())
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

impl<S: Clone, C> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &self.shared.core.cfg.name)
            .field("state", &self.shared.core.state())
            .finish()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
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
        let core = &self.shared.core;
        match self.shared.acquire() {
            Ok(ticket) => {
                let timed = core.needs_elapsed()
                    || Classify::<S::Response, S::Error>::uses_elapsed(&self.shared.classifier);
                let start = timed.then(|| core.clock.now());
                let permit = Permit {
                    shared: self.shared.clone(),
                    ticket,
                    start,
                };
                ResponseFuture::called(self.inner.call(req), permit)
            }
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}
