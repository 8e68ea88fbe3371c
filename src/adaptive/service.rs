//! The adaptive limit service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::future::ResponseFuture;
use super::state::Core;
use super::{AdaptiveHandle, AdaptiveLimitLayer};
use crate::classify::{Classify, DefaultClassifier};
use crate::error::BoxError;

/// A concurrency limit around `S` that moves with the upstream's latency
/// and failures. Made by [`AdaptiveLimitLayer`].
///
/// Every clone shares the limit of the layer that made it. `S` must be
/// `Clone` so that a call that waits for a slot can take the readied
/// service along into its response future.
pub struct AdaptiveLimit<S, C = DefaultClassifier> {
    inner: S,
    core: Arc<Core>,
    classifier: C,
}

impl<S, C> AdaptiveLimit<S, C> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core>, classifier: C) -> Self {
        Self {
            inner,
            core,
            classifier,
        }
    }

    /// Wraps `inner` in `layer`'s limit.
    pub fn new(inner: S, layer: &AdaptiveLimitLayer<C>) -> Self
    where
        C: Clone,
    {
        Self::from_parts(inner, layer.core.clone(), layer.classifier.clone())
    }

    /// A handle on the shared limit.
    pub fn handle(&self) -> AdaptiveHandle {
        AdaptiveHandle {
            core: self.core.clone(),
        }
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

impl<S: Clone, C: Clone> Clone for AdaptiveLimit<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for AdaptiveLimit<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimit")
            .field("inner", &self.inner)
            .field("name", &self.core.name)
            .field("limit", &self.core.limit())
            .field("in_flight", &self.core.in_flight())
            .finish()
    }
}

impl<S, C, Req> Service<Req> for AdaptiveLimit<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // No slot is taken here: an idle keep-alive connection that polled
        // readiness must not hold one.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let classifier = self.classifier.clone();
        if let Some(permit) = self.core.try_acquire() {
            return ResponseFuture::called(self.inner.call(req), permit, classifier);
        }
        if self.core.notify.is_none() {
            return ResponseFuture::rejected(self.core.rejected(Duration::ZERO).into(), classifier);
        }
        // The readied service goes into the future; this one gets a fresh
        // clone that will be readied before its own call.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::waiting(self.core.clone(), svc, req, classifier)
    }
}
