//! The breaker service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::state::{Admission, Core};
use super::{CircuitBreakerLayer, CircuitHandle};
use crate::classify::Classify;
use crate::error::BoxError;

/// A circuit breaker around `S`. Made by [`CircuitBreakerLayer`].
///
/// Every clone shares the breaker state of the layer that made it. The
/// classifier `C` is cloned into each call's response future, so keep it
/// cheap to clone (a unit struct, a closure, or an `Arc`).
pub struct CircuitBreaker<S, C> {
    inner: S,
    core: Arc<Core>,
    classifier: C,
    /// A half-open probe taken in `poll_ready` (file backend).
    reserve: Reserve,
}

#[cfg(feature = "file-store")]
use super::file::Reserve;

/// Nothing is reserved in `poll_ready` without a file backend.
/// (Braced, so both builds make it with `Reserve::default()`.)
#[cfg(not(feature = "file-store"))]
#[derive(Debug, Default)]
struct Reserve {}

#[cfg(not(feature = "file-store"))]
impl Reserve {
    #[inline]
    fn poll(&mut self, _: &Arc<Core>, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    #[inline]
    fn holds_probe(&self) -> bool {
        false
    }

    #[inline]
    fn take(&mut self, _: &Core) -> Option<Admission<Arc<Core>>> {
        None
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core>, classifier: C) -> Self {
        Self {
            inner,
            core,
            classifier,
            reserve: Reserve::default(),
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
            reserve: Reserve::default(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &self.core.cfg.name)
            .field("classifier", &std::any::type_name::<C>())
            .field("reserve", &self.reserve)
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
        match self.inner.poll_ready(cx) {
            // A half-open state file's probe is taken here, where waiting
            // for a peer's lock can yield to the runtime (`call` cannot
            // wait); and last, so it is not held while the inner service
            // is not ready.
            Poll::Ready(Ok(())) => self.reserve.poll(&self.core, cx).map(Ok),
            other => other.map_err(Into::into),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if self.reserve.holds_probe() {
            return call_reserved(
                &mut self.reserve,
                &self.core,
                &self.classifier,
                &mut self.inner,
                req,
            );
        }
        call_through(self.core.clone(), &self.classifier, &mut self.inner, req)
    }
}

/// One call through breaker `core`: admitted and sent to `inner`, or
/// rejected with a ready error. Never waits. Shared by the plain and
/// keyed breakers.
#[inline]
pub(crate) fn call_through<S, C, Req>(
    core: Arc<Core>,
    classifier: &C,
    inner: &mut S,
    req: Req,
) -> ResponseFuture<S::Future, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    let timed = Classify::<S::Response, S::Error>::uses_elapsed(classifier);
    // Never waits: a probe that needs a peer's lock is reserved in
    // `poll_ready`, with tokio timers.
    Admission::admit_then(
        core,
        timed,
        req,
        |admission, req| ResponseFuture::admitted(inner.call(req), admission, classifier.clone()),
        |_, open, _| ResponseFuture::rejected(open),
    )
}

/// [`call_through`] for a service that reserved a probe in `poll_ready`:
/// the call is that probe, if the reservation still stands.
#[cold]
#[inline(never)]
fn call_reserved<S, C, Req>(
    reserve: &mut Reserve,
    core: &Arc<Core>,
    classifier: &C,
    inner: &mut S,
    req: Req,
) -> ResponseFuture<S::Future, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    match reserve.take(core) {
        Some(mut admission) => {
            admission.start_clock(Classify::<S::Response, S::Error>::uses_elapsed(classifier));
            let fut = inner.call(req);
            ResponseFuture::admitted(fut, admission, classifier.clone())
        }
        None => call_through(core.clone(), classifier, inner, req),
    }
}
