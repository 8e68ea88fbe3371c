//! gRPC support (feature `grpc`, for [tonic] 0.14): classify gRPC
//! statuses, retry as gRPC's retry design says, and answer the crate's
//! rejections with gRPC statuses.
//!
//! A gRPC call that fails still comes back as HTTP `200 OK`, with the
//! failure in `grpc-status`; every call is a `POST`; and a server that
//! answers an error from a layer with nothing resets the stream. So the
//! HTTP pieces do not fit, and this module has the gRPC ones:
//!
//! - [`GrpcClassifier`]: which `grpc-status` codes are failures, for the
//!   breaker and fallback.
//! - [`GrpcRetryPolicy`]: retries `UNAVAILABLE` (configurable), honours
//!   `grpc-retry-pushback-ms`, never resends a body over its replay limit.
//! - [`RejectionStatusLayer`]: on a server, the crate's rejections and
//!   tower's timeouts and load shedding become gRPC statuses.
//! - [`rejection_status`] and [`into_status`]: on a client, the same
//!   mapping, so an open circuit reaches the caller as `UNAVAILABLE`.
//! - [`TonicBodyLayer`]: puts a tonic `Channel` under layers that changed
//!   the request body type.
//!
//! # A server
//!
//! ```no_run
//! # #[cfg(all(feature = "rate-limit", feature = "bulkhead"))] {
//! use tower::ServiceBuilder;
//! use tower_bulwark::{grpc::RejectionStatusLayer, BulkheadLayer, RateLimitLayer};
//!
//! # async fn run<S>(svc: S) -> Result<(), tower_bulwark::BoxError>
//! # where S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = std::convert::Infallible>
//! #     + tonic::server::NamedService + Clone + Send + Sync + 'static, S::Future: Send + 'static {
//! let layers = ServiceBuilder::new()
//!     // Rejections below become UNAVAILABLE / RESOURCE_EXHAUSTED answers.
//!     .layer(RejectionStatusLayer::new())
//!     .layer(RateLimitLayer::per_second(100))
//!     .layer(BulkheadLayer::new(32))
//!     .into_inner();
//! tonic::transport::Server::builder()
//!     .layer(layers)
//!     .add_service(svc) // your generated `FooServer::new(..)`
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! # }
//! ```
//!
//! # A client
//!
//! Retry and fallback send a request again, so its body must be
//! replayable: [`ReplayBodyLayer`](crate::http::ReplayBodyLayer) at the
//! top makes it so, and [`TonicBodyLayer`] gives the channel its own body
//! type back at the bottom. `map_err(into_status)` on top makes the
//! crate's rejections arrive as the right status.
//!
//! ```no_run
//! # #[cfg(all(feature = "retry", feature = "circuit-breaker"))] {
//! use tower::ServiceBuilder;
//! use tower_bulwark::grpc::{self, GrpcClassifier, GrpcRetryPolicy, TonicBodyLayer};
//! use tower_bulwark::http::ReplayBodyLayer;
//! use tower_bulwark::{CircuitBreakerLayer, RetryLayer};
//!
//! # async fn run() -> Result<(), tower_bulwark::BoxError> {
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
//! let svc = ServiceBuilder::new()
//!     .map_err(grpc::into_status)
//!     .layer(ReplayBodyLayer::new(64 * 1024))
//!     .layer(RetryLayer::builder().policy(GrpcRetryPolicy::new()).max_attempts(3).build()?)
//!     .layer(CircuitBreakerLayer::builder().name("greeter").classify(GrpcClassifier::new()).build()?)
//!     .layer(TonicBodyLayer::new())
//!     .service(channel);
//! // A generated client takes it as it takes a channel:
//! // let mut client = GreeterClient::new(svc);
//! let mut client = tonic::client::Grpc::new(svc);
//! # let _ = &mut client;
//! # Ok(()) }
//! # }
//! ```
//!
//! `examples/grpc.rs` runs both on 127.0.0.1, with a fallback server.
//!
//! [tonic]: https://docs.rs/tonic

mod body;
mod classify;
mod codes;
#[cfg(feature = "retry")]
mod retry;
mod status;

pub use body::{TonicBody, TonicBodyLayer};
pub use classify::GrpcClassifier;
#[cfg(feature = "retry")]
pub use retry::GrpcRetryPolicy;
pub use status::{
    into_status, rejection_status, RejectionStatus, RejectionStatusLayer, ResponseFuture,
};
