//! Rejections as gRPC statuses, for servers and clients.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

use super::codes::PUSHBACK;
use crate::error::{find, rejection, BoxError};

/// The status for the errors a resilience stack makes itself: the crate's
/// rejections, tower's `Elapsed` (a timeout) and `Overloaded` (load
/// shedding). `None` for any other error. The status carries the
/// rejection's back-off as `grpc-retry-pushback-ms`.
fn known_status(err: &(dyn Error + 'static)) -> Option<Status> {
    if let Some(r) = rejection(err) {
        let code = match r.layer() {
            // An empty bucket: the caller asks too often.
            "rate_limit" => Code::ResourceExhausted,
            // The call ran out of time.
            "timeout" => Code::DeadlineExceeded,
            // An open circuit, a full bulkhead, every upstream failed:
            // the service cannot take the call now, and nothing ran.
            _ => Code::Unavailable,
        };
        let mut status = Status::new(code, r.to_string());
        if let Some(after) = r.retry_after() {
            let ms = after.as_millis() + u128::from(after.subsec_nanos() % 1_000_000 > 0);
            let value = HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX));
            status.metadata_mut().as_mut().insert(PUSHBACK, value);
        }
        return Some(status);
    }
    if find::<tower::timeout::error::Elapsed>(err).is_some() {
        return Some(Status::deadline_exceeded(err.to_string()));
    }
    if find::<tower::load_shed::error::Overloaded>(err).is_some() {
        return Some(Status::unavailable(err.to_string()));
    }
    None
}

/// The [`tonic::Status`] a client should see for `err`.
///
/// The crate's rejections become `UNAVAILABLE` (open circuit, full
/// bulkhead, every fallback failed) or `RESOURCE_EXHAUSTED` (rate limit),
/// with `grpc-retry-pushback-ms` when the layer knows when to come back;
/// tower's timeout becomes `DEADLINE_EXCEEDED` and its load shedding
/// `UNAVAILABLE`. A `Status` inside the error is returned as it is; an I/O
/// error (the server could not be reached) is `UNAVAILABLE`; anything else
/// `UNKNOWN`.
///
/// tonic's generated clients turn a service error into a status on their
/// own, and an open circuit then arrives as `UNKNOWN`. Map errors with
/// [`into_status`] in the stack instead (see the module docs).
///
/// ```
/// # #[cfg(feature = "circuit-breaker")] {
/// use tower::{service_fn, Service, ServiceExt};
/// use tower_bulwark::{grpc::rejection_status, BoxError, CircuitBreakerLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let breaker = CircuitBreakerLayer::builder().build()?;
/// breaker.handle().force_open();
/// let mut svc = tower::Layer::layer(&breaker, service_fn(|_: ()| async { Ok::<_, BoxError>(()) }));
/// let err = svc.ready().await?.call(()).await.unwrap_err();
/// assert_eq!(rejection_status(&err).code(), tonic::Code::Unavailable);
/// # Ok(()) }
/// # }
/// ```
pub fn rejection_status(err: &BoxError) -> Status {
    let err: &(dyn Error + 'static) = &**err;
    if let Some(status) = known_status(err) {
        return status;
    }
    if let Some(status) = find::<Status>(err) {
        return status.clone();
    }
    if find::<std::io::Error>(err).is_some() {
        return Status::unavailable(err.to_string());
    }
    Status::unknown(err.to_string())
}

/// Like [`rejection_status`], taking the error by value: what is not one
/// of the crate's rejections goes to [`Status::from_error`], which knows
/// tonic's transport errors. Made for `ServiceBuilder::map_err`:
///
/// ```
/// # #[cfg(feature = "circuit-breaker")] {
/// use tower::{service_fn, ServiceBuilder};
/// use tower_bulwark::{grpc, BoxError, CircuitBreakerLayer};
///
/// # fn main() -> Result<(), BoxError> {
/// let upstream = service_fn(|req: http::Request<()>| async move {
///     Ok::<_, BoxError>(http::Response::new(()))
/// });
/// let svc = ServiceBuilder::new()
///     // A tonic client sees an open circuit as `UNAVAILABLE`.
///     .map_err(grpc::into_status)
///     .layer(CircuitBreakerLayer::builder().classify(grpc::GrpcClassifier::new()).build()?)
///     .service(upstream);
/// # let _ = svc;
/// # Ok(()) }
/// # }
/// ```
pub fn into_status(err: BoxError) -> Status {
    match known_status(&*err) {
        Some(status) => status,
        None => Status::from_error(err),
    }
}

/// Answers the crate's rejections with a gRPC status, on a tonic (or any
/// HTTP/2 gRPC) server.
///
/// Without it, an error out of a layer on `tonic::transport::Server`
/// resets the HTTP/2 stream and the client sees `INTERNAL: h2 protocol
/// error`. With it, the call gets a *trailers-only* answer the client can
/// act on:
///
/// | error | `grpc-status` |
/// |---|---|
/// | `CircuitOpen`, `BulkheadFull`, `AllFailed`, tower's `Overloaded` | `UNAVAILABLE` (14) |
/// | `RateLimited`, `CostTooHigh` | `RESOURCE_EXHAUSTED` (8) |
/// | tower's `Elapsed` (a `TimeoutLayer`) | `DEADLINE_EXCEEDED` (4) |
/// | a `tonic::Status` | that status |
/// | anything else | `UNKNOWN` (2) |
///
/// When the rejection knows when to come back (`retry_after()`), the
/// answer carries it as `grpc-retry-pushback-ms`, which
/// [`GrpcRetryPolicy`](super::GrpcRetryPolicy) and gRPC's own retrying
/// clients wait for. Put it outermost, above the layers whose rejections it
/// answers:
///
/// ```no_run
/// # #[cfg(all(feature = "rate-limit", feature = "bulkhead"))] {
/// use tower::ServiceBuilder;
/// use tower_bulwark::{grpc::RejectionStatusLayer, BulkheadLayer, RateLimitLayer};
///
/// # fn main() -> Result<(), tower_bulwark::BoxError> {
/// let layers = ServiceBuilder::new()
///     .layer(RejectionStatusLayer::new())
///     .layer(RateLimitLayer::per_second(100))
///     .layer(BulkheadLayer::new(32))
///     .into_inner();
/// // tonic::transport::Server::builder().layer(layers).add_service(..)
/// # let _ = layers;
/// # Ok(()) }
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RejectionStatusLayer {
    _priv: (),
}

impl RejectionStatusLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for RejectionStatusLayer {
    type Service = RejectionStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectionStatus { inner }
    }
}

/// The service made by [`RejectionStatusLayer`].
#[derive(Debug, Clone)]
pub struct RejectionStatus<S> {
    inner: S,
}

impl<S> RejectionStatus<S> {
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for RejectionStatus<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`RejectionStatus`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: Default,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(self.project().inner.poll(cx)) {
            Ok(res) => Poll::Ready(Ok(res)),
            Err(e) => Poll::Ready(Ok(into_status(e.into()).into_http())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn errors_become_trailers_only_answers() {
        let svc = RejectionStatusLayer::new().layer(service_fn(
            |req: Request<&'static str>| async move {
                match *req.body() {
                    "timeout" => Err::<Response<String>, BoxError>(Box::new(
                        tower::timeout::error::Elapsed::new(),
                    )),
                    "shed" => Err(Box::new(tower::load_shed::error::Overloaded::new()) as BoxError),
                    "status" => Err(Box::new(Status::not_found("gone")) as BoxError),
                    "other" => Err("boom".into()),
                    _ => Ok(Response::new("ok".to_owned())),
                }
            },
        ));
        let code = |res: &Response<String>| super::super::codes::status_code(res.headers());
        let res = svc.clone().oneshot(Request::new("timeout")).await.unwrap();
        assert_eq!(code(&res), Some(Code::DeadlineExceeded));
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        let res = svc.clone().oneshot(Request::new("shed")).await.unwrap();
        assert_eq!(code(&res), Some(Code::Unavailable));
        let res = svc.clone().oneshot(Request::new("status")).await.unwrap();
        assert_eq!(code(&res), Some(Code::NotFound));
        let res = svc.clone().oneshot(Request::new("other")).await.unwrap();
        assert_eq!(code(&res), Some(Code::Unknown));
        let res = svc.oneshot(Request::new("fine")).await.unwrap();
        assert_eq!(code(&res), None);
        assert_eq!(res.body(), "ok");
    }

    #[test]
    fn client_side_mapping() {
        let io: BoxError = Box::new(std::io::Error::other("refused"));
        assert_eq!(rejection_status(&io).code(), Code::Unavailable);
        let other: BoxError = "boom".into();
        assert_eq!(rejection_status(&other).code(), Code::Unknown);
        let status: BoxError = Box::new(Status::permission_denied("no"));
        assert_eq!(rejection_status(&status).code(), Code::PermissionDenied);
        assert_eq!(
            into_status(Box::new(tower::timeout::error::Elapsed::new())).code(),
            Code::DeadlineExceeded
        );
    }
}
