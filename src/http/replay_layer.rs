//! Replayable request bodies as a layer.

use std::task::{Context, Poll};

use http::Request;
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::ReplayBody;

/// Wraps every request body in a [`ReplayBody`], so the layers below it
/// can send the request more than once: retry and fallback need a request
/// they can clone, and a streaming body (hyper's `Incoming`, tonic's
/// `Body`) cannot be cloned.
///
/// Each body is buffered as it is sent, up to `limit` bytes. A body that
/// goes over the limit is still sent in full once, but is never sent
/// again: [`HttpRetryPolicy`](super::HttpRetryPolicy) and the
/// `grpc::GrpcRetryPolicy` stop retrying it, and the fallback layer, with
/// `http::HttpFailover`, does not fail it over.
///
/// The layers below see `Request<ReplayBody<B>>`. A hyper client takes
/// that body type as it is (`Client<_, ReplayBody<B>>`); a tonic `Channel`
/// takes only its own body type, which `grpc::TonicBodyLayer` restores
/// at the bottom of the stack.
///
/// ```
/// # #[cfg(feature = "retry")] {
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_bulwark::http::{HttpRetryPolicy, ReplayBody, ReplayBodyLayer};
/// use tower_bulwark::RetryLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_bulwark::BoxError> {
/// let upstream = service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
///     let body = req.into_body().collect().await?.to_bytes();
///     Ok::<_, tower_bulwark::BoxError>(http::Response::new(body))
/// });
/// let client = ServiceBuilder::new()
///     .layer(ReplayBodyLayer::new(64 * 1024))
///     .layer(RetryLayer::builder().policy(HttpRetryPolicy::new()).build()?)
///     .service(upstream);
/// let req = http::Request::put("/doc").body(Full::new(Bytes::from_static(b"v2")))?;
/// assert_eq!(client.oneshot(req).await?.into_body(), "v2");
/// # Ok(()) }
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ReplayBodyLayer {
    limit: usize,
}

impl ReplayBodyLayer {
    /// Buffers up to `limit` bytes of each request body for replays.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }

    /// The buffer limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl<S> Layer<S> for ReplayBodyLayer {
    type Service = ReplayBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplayBodyService {
            inner,
            limit: self.limit,
        }
    }
}

/// The service made by [`ReplayBodyLayer`].
#[derive(Debug, Clone)]
pub struct ReplayBodyService<S> {
    inner: S,
    limit: usize,
}

impl<S> ReplayBodyService<S> {
    /// Wraps `inner`, buffering up to `limit` bytes of each request body.
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
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

impl<S, B> Service<Request<B>> for ReplayBodyService<S>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let limit = self.limit;
        self.inner.call(req.map(|b| ReplayBody::new(b, limit)))
    }
}
