//! Resilience middleware for [tower]: circuit breaker, fallback, request
//! dedup, bulkhead, rate limit and retry, each a `Layer` + `Service` pair
//! that stacks with `ServiceBuilder`.
//!
//! ```
//! # #[cfg(feature = "circuit-breaker")] {
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::CircuitBreakerLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::error::BoxError> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .name("payments")
//!     .failure_threshold(5)
//!     .open_timeout(Duration::from_secs(30))
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n * 2) }));
//! assert_eq!(svc.oneshot(21).await?, 42);
//! # Ok(()) }
//! # }
//! ```
//!
//! # Shared state
//!
//! A layer's state lives behind an `Arc` made by its `build()`: every
//! service the layer makes, and every clone, shares it, and the layer's
//! `handle()` reads and steers it from outside the stack.
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
//! | `tracing` | yes | `tracing` events from every layer |
//! | `metrics` | no | counters and gauges through the `metrics` facade |
//! | `http` | no | status classifier, `Retry-After`, error responses |
//! | `axum` | no | `HandleErrorLayer` handler |
//! | `file-store` | no | state shared across processes through a file |
//! | `redis` | no | state shared across a fleet through Redis |
//! | `full` | no | all of the above |
//!
//! [tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_auto_cfg))]

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
mod slot;
mod sync;

#[cfg(feature = "bulkhead")]
pub mod bulkhead;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "dedup")]
pub mod dedup;
#[cfg(feature = "fallback")]
pub mod fallback;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(any(feature = "file-store", feature = "redis"))]
pub mod store;

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
#[cfg(feature = "rate-limit")]
pub use rate_limit::RateLimitLayer;
#[cfg(feature = "retry")]
pub use retry::RetryLayer;
