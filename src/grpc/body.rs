//! Back to tonic's body type, at the bottom of a client stack.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;

/// Turns any request body back into [`tonic::body::Body`], so a tonic
/// `Channel` can sit below layers that changed the body type, such as
/// [`ReplayBodyLayer`](crate::http::ReplayBodyLayer). Put it right above
/// the channel; see the [module docs](super) for the whole client stack.
#[derive(Debug, Clone, Copy, Default)]
pub struct TonicBodyLayer {
    _priv: (),
}

impl TonicBodyLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TonicBodyLayer {
    type Service = TonicBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TonicBody { inner }
    }
}

/// The service made by [`TonicBodyLayer`].
#[derive(Debug, Clone)]
pub struct TonicBody<S> {
    inner: S,
}

impl<S> TonicBody<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for TonicBody<S>
where
    S: Service<Request<tonic::body::Body>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        self.inner.call(req.map(tonic::body::Body::new))
    }
}
