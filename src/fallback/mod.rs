//! Fallback: a primary service and ordered fallbacks of the same kind, each
//! behind its own circuit breaker.
//!
//! A call goes to the first entry (primary first, then the fallbacks in the
//! order they were added) whose breaker admits it. When that entry fails,
//! the next one is tried with a clone of the request. When every entry has
//! failed or was skipped, the call fails with [`AllFailed`], which holds
//! every entry's error, unless an [`or_else`](FallbackBuilder::or_else)
//! answers instead.
//!
//! **HTTP clients**: build with `FallbackLayer::http_builder()` (feature
//! `http`), not [`FallbackLayer::builder`]. It fails over on 5xx answers
//! as well as errors, and only requests that may be sent twice: an
//! idempotent method (or an idempotency key) and a body that can still be
//! replayed. The plain builder is generic over the request and fails
//! every request over, a `POST` included. See [# Requests](#requests).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use tower_bulwark::circuit_breaker::CircuitState;
//! use tower_bulwark::fallback::{AllFailed, FallbackLayer};
//! use tower_bulwark::CircuitBreakerLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let down = service_fn(|_: String| async { Err::<String, _>("openai is down") });
//! let anthropic = service_fn(|q: String| async move { Ok::<_, std::io::Error>(format!("anthropic: {q}")) });
//! let local = service_fn(|q: String| async move { Ok::<_, std::io::Error>(format!("local: {q}")) });
//!
//! let layer = FallbackLayer::builder()
//!     .primary_name("openai")
//!     .fallback("anthropic", anthropic)
//!     .fallback("local", local)
//!     .breaker(CircuitBreakerLayer::builder().failure_threshold(3))
//!     .build()?;
//! let handle = layer.handle();
//! let mut svc = layer.layer(down);
//!
//! for _ in 0..3 {
//!     let answer = svc.ready().await?.call("hi".to_owned()).await?;
//!     assert_eq!(answer, "anthropic: hi");
//! }
//! // The primary's own breaker opened; it is now skipped without a call.
//! assert_eq!(handle.breaker("openai").unwrap().state(), CircuitState::Open);
//! assert_eq!(handle.breaker("anthropic").unwrap().state(), CircuitState::Closed);
//!
//! // With every entry down, the error says what happened to each.
//! handle.breaker("anthropic").unwrap().force_open();
//! handle.breaker("local").unwrap().force_open();
//! let err = svc.ready().await?.call("hi".to_owned()).await.unwrap_err();
//! let all = err.downcast_ref::<AllFailed>().unwrap();
//! let names: Vec<&str> = all.errors().iter().map(|(n, _)| &**n).collect();
//! assert_eq!(names, ["openai", "anthropic", "local"]);
//! # Ok(()) }
//! ```
//!
//! # Breakers
//!
//! Every entry, the primary included, gets its own breaker, built from the
//! [`breaker`](FallbackBuilder::breaker) configuration and named after the
//! entry. An entry whose breaker is open is skipped without a call, and
//! its [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) goes into
//! [`AllFailed`]. The [`FallbackHandle`] reaches each breaker (state,
//! metrics, reset, force open).
//!
//! Entries are fixed when the layer is built: nothing can be added while
//! calls are in flight.
//!
//! # Classification
//!
//! A [`Classify`](crate::classify::Classify) decides which results fail
//! over and what the breakers count as failures: by default every `Err`.
//! With the `http` feature, `.classify(http::StatusClassifier::new())`
//! also fails over on 5xx responses (recorded as [`FailedResponse`]). An
//! `Ignore` outcome is handed to the caller as it is.
//!
//! # Readiness
//!
//! `poll_ready` forwards to the primary. A fallback is cloned when the call
//! reaches it, and its readiness is driven before it is called. By default
//! an entry that is not ready is waited for; with
//! [`skip_not_ready`](FallbackBuilder::skip_not_ready) it is skipped
//! ([`NotReady`]) so a saturated entry never holds the call up.
//!
//! # Streaming
//!
//! Failover covers getting the response. When the response is a stream
//! (chunks from an LLM, an HTTP body), an error in the middle of the stream
//! reaches the caller: the layer has already handed the stream out and
//! cannot replay it from another entry. See `examples/llm_failover.rs`.
//!
//! A classifier that judges an answer only when its body ends (with the
//! `grpc` feature, `grpc::GrpcClassifier` reading a status from the
//! trailers) is asked as the breaker asks it: the entry's breaker books
//! that late verdict, in the generation the call was admitted in and
//! holding its half-open probe slot until then, so a primary whose
//! streams keep failing half-way opens and is skipped. The answer itself
//! is the caller's.
//!
//! # Requests
//!
//! Each attempt gets a clone of the request. An `http::Request` with a
//! streaming body fails over when its body is wrapped in
//! `http::ReplayBody` (feature `http`): the clone replays the bytes the
//! primary already read, then the rest of the stream.
//!
//! A request an entry was sent may have taken effect there. With
//! [`fail_over_if`](FallbackBuilder::fail_over_if) the next entry gets it
//! only when a predicate allows; for HTTP, `FallbackLayer::http_builder()`
//! allows idempotent requests whose body can still be replayed, the rule
//! retry follows.
//!
//! # Errors
//!
//! The service's error is [`BoxError`](crate::error::BoxError): the
//! primary's or a fallback's own error when the classifier does not fail
//! over on it (`Ignore`), [`AllFailed`] when every entry failed.
//! [`AllFailed`] is a [`Rejection`](crate::error::Rejection) whose
//! `retry_after()` is the soonest breaker reopening when every entry was
//! skipped for an open breaker.
//!
//! # Cancellation
//!
//! Dropping the response future drops the attempt in progress. A half-open
//! probe slot it held is given back, and the attempt counts as neither
//! success nor failure; so does an attempt whose service or classifier
//! panicked.
//!
//! # Clone
//!
//! The fallback services, the breakers and the classifier live behind an
//! `Arc` made by `build()`: the layer, its clones, every service it makes
//! and their clones share them. Each service owns its own primary. Every
//! call's response future holds a reference to that shared state until it
//! has answered, so a primary that fails always fails over, even when the
//! layer value and the service that made the call are long gone (as with
//! `ServiceBuilder::new().layer(..).service(primary).oneshot(req)`).
//!
//! # Cost
//!
//! While the primary answers through a closed breaker, a call costs one
//! reference count on the shared state, one breaker admission (an atomic
//! load), one more load when it succeeds, the classifier's clone, and a
//! clone of the request (kept in case the primary fails; skipped when
//! there is nowhere to fail over to). Nothing is boxed and no lock is
//! held. Failing over boxes the fallback's future. The classifier must be
//! `Clone`.

mod entry;
mod error;
pub mod future;
mod layer;
mod service;

use std::sync::Arc;

pub use error::{AllFailed, FailedResponse, NotReady};
pub use layer::{FallbackBuilder, FallbackHandle, FallbackLayer};
pub use service::Fallback;

use crate::observe::Event;

/// Something the fallback layer did, sent to `on_event` listeners, `tracing`
/// and `metrics`. The entries' breakers report their own
/// [`CircuitEvent`](crate::circuit_breaker::CircuitEvent)s.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FallbackEvent {
    /// An entry failed, or was skipped (open breaker, not ready); the call
    /// moves on to the next entry.
    EntryFailed {
        /// The group's name (its primary's).
        name: Arc<str>,
        /// The entry that failed.
        entry: Arc<str>,
    },
    /// A fallback answered.
    Answered {
        /// The group's name (its primary's).
        name: Arc<str>,
        /// The fallback that answered.
        entry: Arc<str>,
    },
    /// Every entry failed.
    AllFailed {
        /// The group's name (its primary's).
        name: Arc<str>,
        /// How many entries were tried or skipped.
        entries: usize,
    },
}

impl Event for FallbackEvent {
    fn layer(&self) -> &'static str {
        "fallback"
    }

    fn name(&self) -> &str {
        match self {
            FallbackEvent::EntryFailed { name, .. }
            | FallbackEvent::Answered { name, .. }
            | FallbackEvent::AllFailed { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            FallbackEvent::EntryFailed { .. } => "entry_failed",
            FallbackEvent::Answered { .. } => "answered_by_fallback",
            FallbackEvent::AllFailed { .. } => "all_failed",
        }
    }

    fn is_warning(&self) -> bool {
        matches!(self, FallbackEvent::AllFailed { .. })
    }
}
