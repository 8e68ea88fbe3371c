//! The retry service.

use std::fmt;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::{LayerState, Light, ResponseFuture};
use super::{RetryHandle, RetryLayer, RetryPolicy};
use crate::error::BoxError;

/// Retries calls to `S` according to the policy `P`. Made by
/// [`RetryLayer`].
///
/// Every clone shares the layer's configuration, budget and counts.
pub struct Retry<S, P> {
    inner: S,
    shared: LayerState<P>,
    // Read from `shared.cfg` once, so a call need not follow the pointer.
    retries: bool,
    // No timeout, no deadline, no budget, no listener, a short name: what
    // a call carries by value instead of the shared `Arc`.
    light: Option<Light>,
}

impl<S, P> Retry<S, P> {
    pub(crate) fn from_shared(inner: S, shared: LayerState<P>) -> Self {
        Self {
            inner,
            retries: shared.cfg.plan.max_attempts > 1,
            light: shared.cfg.light,
            shared,
        }
    }

    /// Wraps `inner` with `layer`'s configuration.
    pub fn new(inner: S, layer: &RetryLayer<P>) -> Self
    where
        P: Clone,
    {
        Self::from_shared(inner, layer.shared.clone())
    }

    /// A handle on the layer's name and budget.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle::new(&self.shared)
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

impl<S: Clone, P: Clone> Clone for Retry<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            retries: self.retries,
            light: self.light,
        }
    }
}

impl<S: fmt::Debug, P> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("name", &self.shared.cfg.name)
            .field("max_attempts", &self.shared.cfg.plan.max_attempts)
            .finish()
    }
}

impl<S, P> Retry<S, P> {
    /// A call that is timed or reports to shared sinks: kept out of line so
    /// that the plain call stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn call_full<Req>(
        &mut self,
        mut svc: S,
        req: Req,
        keep: Option<Req>,
    ) -> ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
        P: Clone,
    {
        if self.shared.cfg.budget.is_some() {
            self.shared.on_call();
        }
        let fut = svc.call(req);
        let timed = self.shared.cfg.attempt_timeout.is_some();
        ResponseFuture::new(self.shared.clone(), timed, svc, fut, keep)
    }
}

impl<S, P, Req> Service<Req> for Retry<S, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
    P: RetryPolicy<Req, S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // The readied service makes the first attempt; the clone left in
        // its place serves the next caller. Later attempts ready their own
        // service inside the future.
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let keep = (self.retries && self.shared.policy.may_retry(&req)).then(|| req.clone());
        if let Some(light) = self.light {
            let fut = svc.call(req);
            let policy = self.shared.policy.clone();
            return ResponseFuture::plain(light, policy, svc, fut, keep);
        }
        self.call_full(svc, req, keep)
    }
}
