//! The timeout service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::{Core, NoRequestTimeout, RequestTimeout};
use super::{TimeoutHandle, TimeoutLayer};
use crate::error::BoxError;

/// A time limit around `S`. Made by [`TimeoutLayer`].
pub struct Timeout<S, T = NoRequestTimeout> {
    inner: S,
    core: Arc<Core>,
    per_request: T,
}

impl<S, T> Timeout<S, T> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core>, per_request: T) -> Self {
        Self {
            inner,
            core,
            per_request,
        }
    }

    /// Wraps `inner` with `layer`'s settings.
    pub fn new(inner: S, layer: &TimeoutLayer<T>) -> Self
    where
        T: Clone,
    {
        Self::from_parts(inner, layer.core.clone(), layer.per_request.clone())
    }

    /// A handle on the layer's settings and counts.
    pub fn handle(&self) -> TimeoutHandle {
        TimeoutHandle {
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

impl<S: Clone, T: Clone> Clone for Timeout<S, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
            per_request: self.per_request.clone(),
        }
    }
}

impl<S: fmt::Debug, T> fmt::Debug for Timeout<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("name", &self.core.name)
            .field("timeout", &self.core.timeout)
            .finish()
    }
}

impl<S, T, Req> Service<Req> for Timeout<S, T>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    T: RequestTimeout<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is not timed: a caller bounds its own wait for it.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let timeout = match self.per_request.timeout(&req) {
            Some(t) => t.min(self.core.timeout),
            None => self.core.timeout,
        };
        ResponseFuture::new(self.inner.call(req), timeout, self.core.clone())
    }
}
