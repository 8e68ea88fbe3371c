//! Resilience middleware for [tower]: circuit breaker, fallback, request
//! dedup, bulkhead, rate limit and retry, each a `Layer` + `Service` pair
//! that stacks with `ServiceBuilder`.
//!
//! ```
//! # #[cfg(all(feature = "circuit-breaker", feature = "fallback", feature = "dedup",
//! #           feature = "bulkhead", feature = "rate-limit", feature = "retry"))] {
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::{
//!     BulkheadLayer, CircuitBreakerLayer, DedupLayer, FallbackLayer, RateLimitLayer, RetryLayer,
//! };
//!
//! #[derive(Clone)]
//! struct Req {
//!     id: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! let upstream = service_fn(|req: Req| async move { Ok::<_, std::io::Error>(format!("hello {}", req.id)) });
//! let secondary = service_fn(|req: Req| async move { Ok::<_, std::io::Error>(format!("hi {}", req.id)) });
//!
//! let svc = ServiceBuilder::new()
//!     // A secondary upstream, behind its own breaker, when the rest fails.
//!     .layer(
//!         FallbackLayer::builder()
//!             .fallback("secondary", secondary)
//!             .breaker(CircuitBreakerLayer::builder().failure_threshold(3))
//!             .build()?,
//!     )
//!     .layer(RetryLayer::builder().max_attempts(3).build()?)
//!     .layer(CircuitBreakerLayer::builder().name("payments").build()?)
//!     .layer(RateLimitLayer::builder().max_tokens(50.0).refill_rate(10.0).build()?)
//!     .layer(BulkheadLayer::builder().max_concurrent(10).build()?)
//!     .layer(DedupLayer::builder().key(|req: &Req| Some(req.id.clone())).build()?)
//!     .service(upstream);
//!
//! let answer = svc.oneshot(Req { id: "ada".into() }).await?;
//! assert_eq!(answer, "hello ada");
//! # Ok(()) }
//! # }
//! ```
//!
//! Outermost first: a call meets the fallback, then retry, the breaker, the
//! rate limit, the bulkhead and dedup, in that order. Each layer's error is
//! a [`BoxError`], so they compose in any order; the order above retries
//! through the breaker (an open circuit is not retried into) and fails over
//! only once retries are spent.
//!
//! # Shared state
//!
//! A layer's state lives behind an `Arc` made by its `build()`: every
//! service the layer makes, and every clone, shares it, and the layer's
//! `handle()` reads and steers it from outside the stack.
//! Dedup is the exception: an answer belongs to one upstream, so each
//! service the dedup layer makes keeps its own in-flight calls and cache,
//! shared by its clones, unless the layer is built to share one table
//! between them (see [`dedup`]'s `# Clone`).
//!
//! # Readiness, rejections and errors
//!
//! `poll_ready` forwards to the inner service. A rejection (open circuit,
//! empty bucket, full bulkhead) fails fast from `call` with a ready error
//! future, so the service is never poisoned. Each rejection is its own
//! error type, boxed as [`BoxError`]; every one implements
//! [`Rejection`] and [`error::rejection`] finds it in any
//! boxed error.
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `circuit-breaker` | yes | [`circuit_breaker`] |
//! | `fallback` | yes | [`fallback`]: ordered fallbacks with per-entry breakers |
//! | `dedup` | yes | [`dedup`]: request coalescing (singleflight) and a short cache |
//! | `bulkhead` | yes | concurrency cap |
//! | `rate-limit` | yes | GCRA rate limiter |
//! | `retry` | yes | [`retry`]: back-off, budgets, `Retry-After` |
//! | `timeout` | yes | [`timeout`]: a time limit per call, per-request deadlines |
//! | `hedge` | yes | [`hedge`]: a second copy of a slow request |
//! | `adaptive` | yes | [`adaptive`]: a concurrency limit that finds its own value |
//! | `tracing` | yes | `tracing` events from every layer |
//! | `metrics` | no | counters and gauges through the `metrics` facade |
//! | `http` | no | status classifier, `Retry-After`, error responses |
//! | `axum` | no | `HandleErrorLayer` handler |
//! | `grpc` | no | [tonic](https://docs.rs/tonic): `grpc-status` classifier, gRPC retry policy, rejections as gRPC statuses |
//! | `file-store` | no | state shared across processes through a file |
//! | `redis` | no | state shared across a fleet through Redis |
//! | `full` | no | all of the above |
//!
//! [tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]
// The internal helpers (clock, validation, events) are shared by the
// layers; with only some layers enabled, parts of them go unused. With all
// layers on, as CI lints, dead code is still an error.
#![cfg_attr(
    not(all(
        feature = "circuit-breaker",
        feature = "dedup",
        feature = "bulkhead",
        feature = "rate-limit",
        feature = "retry"
    )),
    allow(dead_code, unused_imports)
)]

#[cfg(any(
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]
mod backend;
pub mod backoff;
pub mod classify;
mod clock;
pub mod error;
pub mod observe;
mod outline;
mod sync;

#[cfg(feature = "adaptive")]
pub mod adaptive;
#[cfg(feature = "bulkhead")]
pub mod bulkhead;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "dedup")]
pub mod dedup;
#[cfg(feature = "fallback")]
pub mod fallback;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "hedge")]
pub mod hedge;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(any(feature = "file-store", feature = "redis"))]
pub mod store;
#[cfg(feature = "timeout")]
pub mod timeout;

#[cfg(feature = "adaptive")]
pub use adaptive::AdaptiveLimitLayer;
#[cfg(feature = "bulkhead")]
pub use bulkhead::BulkheadLayer;
#[cfg(feature = "circuit-breaker")]
pub use circuit_breaker::CircuitBreakerLayer;
pub use classify::{Classify, Outcome};
pub use clock::ClockSource;
#[cfg(feature = "dedup")]
pub use dedup::DedupLayer;
pub use error::{BoxError, ConfigError, Rejection};
#[cfg(feature = "fallback")]
pub use fallback::FallbackLayer;
#[cfg(feature = "hedge")]
pub use hedge::HedgeLayer;
#[cfg(feature = "rate-limit")]
pub use rate_limit::RateLimitLayer;
#[cfg(feature = "retry")]
pub use retry::RetryLayer;
#[cfg(feature = "timeout")]
pub use timeout::TimeoutLayer;

// The README's examples are compiled (and the ones that need no outside
// server run) with the doc tests, so they stay true as the API moves.
#[cfg(all(
    doctest,
    feature = "circuit-breaker",
    feature = "fallback",
    feature = "dedup",
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "retry",
    feature = "axum",
    feature = "grpc",
    feature = "file-store",
    feature = "redis"
))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
