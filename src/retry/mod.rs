//! Retry: call again when an attempt fails, with back-off, a shared budget,
//! timeouts, and the upstream's `Retry-After`.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::retry::{Backoff, Jitter, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = RetryLayer::builder()
//!     .max_attempts(3) // total, including the first
//!     .backoff(
//!         Backoff::exponential(Duration::from_millis(1))
//!             .max_delay(Duration::from_secs(60))
//!             .jitter(Jitter::Full),
//!     )
//!     .build()?;
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(move |n: u32| {
//!     // Fails twice, then answers.
//!     let k = counter.fetch_add(1, Ordering::SeqCst);
//!     async move { if k < 2 { Err("flaky") } else { Ok(n * 2) } }
//! }));
//! assert_eq!(svc.ready().await?.call(21).await?, 42);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # Ok(()) }
//! ```
//!
//! # What is retried
//!
//! A [`RetryPolicy`] decides, from the request and the attempt's result.
//! By default ([`DefaultPolicy`]) every `Err` is retried except the
//! crate's own rejections: an open circuit or an empty bucket is not
//! retried into. [`RetryBuilder::classify`] retries what a
//! [`Classify`](crate::classify::Classify) calls a failure and honours its
//! `retry_after` hint; [`RetryBuilder::retry_if`] takes a closure over
//! `(&Req, &Result<Res, Err>)`. With the `http` feature,
//! `http::HttpRetryPolicy` retries idempotent requests on 5xx, 429 and
//! connection errors and waits out `Retry-After`.
//!
//! An answer is judged when it arrives, at its headers. An outcome that
//! is only known at the end of the body, such as a gRPC status in the
//! trailers of a unary success or a stream that fails half-way, cannot
//! cause a retry: the response is already the caller's. A
//! [`CircuitBreakerLayer`](crate::circuit_breaker::CircuitBreakerLayer)
//! (or a fallback entry's breaker) with `grpc::GrpcClassifier` below the
//! retry layer still counts it when the body ends. The retry budget is
//! earned per call and spent per retry, so such late failures change
//! neither it nor the retry events.
//!
//! # Delays
//!
//! The `n`th retry waits [`Backoff::delay`]`(n)` with its [`Jitter`]
//! (seedable with [`RetryBuilder::seed`]), and at least the upstream's
//! `Retry-After` when the policy reports one. A retry is not made when:
//! the attempts are used up ([`max_attempts`](RetryBuilder::max_attempts),
//! the first included); it would start after the
//! [`deadline`](RetryBuilder::deadline) (delay included); the
//! `Retry-After` is longer than [`max_retry_after`](RetryBuilder::max_retry_after)
//! and no deadline is set; or the [`RetryBudget`] is empty. The last
//! attempt's result is then returned as is.
//!
//! [`attempt_timeout`](RetryBuilder::attempt_timeout) cuts off a slow
//! attempt, which is retried like a failure (if the policy's
//! [`retry_timeout`](RetryPolicy::retry_timeout) agrees) or ends the call
//! with [`AttemptTimedOut`].
//!
//! # Requests
//!
//! Requests must be `Clone`: one copy is kept while the first attempt runs.
//! An `http::Request` with a streaming body can be retried by wrapping its
//! body in `http::ReplayBody` (feature `http`), which buffers what the first
//! attempt sends, up to a limit; a larger body is sent once and not
//! retried.
//!
//! # Readiness and errors
//!
//! `poll_ready` forwards to the inner service. The readied service makes
//! the first attempt; later attempts drive `poll_ready` on the service they
//! will call (a clone taken in `call`) before calling it, and a readiness
//! error ends the call with that error. Errors are boxed into
//! [`BoxError`](crate::error::BoxError); the inner error is returned
//! unchanged inside it, so `downcast_ref` finds it.
//!
//! # Events
//!
//! Each retry (the attempt about to be made, its delay and the reason),
//! each give-up and each refusal by the budget is a [`RetryEvent`], sent to
//! `on_event` listeners, `tracing` and `metrics`. A call whose first
//! attempt succeeds raises none.
//!
//! # Cancellation
//!
//! Dropping the response future at any point, mid-attempt or mid-back-off,
//! drops the attempt in flight and the timer; a budget unit already spent
//! stays spent.
//!
//! # Clone
//!
//! The configuration and budget are made by `build()`: the layer, its
//! clones, every service it makes and their clones share them. A [`RetryBudget`] is itself a shared handle: give the
//! same one to several layers to limit them together.
//!
//! # Cost
//!
//! A call whose first attempt succeeds clones the inner service and the
//! request (as tower's `Retry` does) and makes one policy check: no lock,
//! no allocation, no boxed future, no clock read, no timer, and no
//! reference count unless a budget, a listener, a timeout or a deadline is
//! configured, or the layer's name is longer than 23 bytes. A budget adds
//! one clock read and one compare-and-swap per call, a deadline one clock
//! read, a per-attempt timeout one timer (in the one box a call that
//! retries needs anyway). The retry machinery (attempt count, RNG,
//! back-off timer) is boxed when a first attempt is to be retried.
//!
//! To get there, a plain layer's settings (attempts, back-off, the
//! `Retry-After` cap, a short name) are copied into each call as plain
//! data; everything else lives behind the one `Arc` that `build()` makes.
//! Nothing outlives the layer, its services and their calls: building a
//! layer per tenant or per host costs memory only while it is in use.
//!
//! # Panics
//!
//! A policy, classifier or `on_event` listener that panics unwinds into
//! the caller that polled the call's future, and only there: the attempt
//! in flight, the timer and the kept request are dropped with the future,
//! and nothing the layer shares (the budget, other calls) is left holding
//! anything. A budget unit already withdrawn stays spent.

mod budget;
mod error;
pub mod future;
mod layer;
pub(crate) mod policy;
mod service;

use std::sync::Arc;
use std::time::Duration;

pub use crate::backoff::{Backoff, Jitter};
pub use budget::{RetryBudget, RetryBudgetBuilder};
pub use error::AttemptTimedOut;
pub use layer::{RetryBuilder, RetryHandle, RetryLayer};
pub use policy::{ClassifyPolicy, DefaultPolicy, RetryFn, RetryPolicy};
pub use service::Retry;

use crate::observe::Event;

/// Why an attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// The attempt returned an error.
    Error,
    /// The attempt returned a response the policy retries (a 503, say).
    Response,
    /// The attempt ran past the per-attempt timeout.
    Timeout,
}

impl RetryReason {
    /// A snake_case label: `error`, `response`, `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Error => "error",
            RetryReason::Response => "response",
            RetryReason::Timeout => "timeout",
        }
    }
}

/// Why a call that wanted another attempt did not get one (an empty budget
/// is its own event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// `max_attempts` were made.
    Exhausted,
    /// The next attempt would start after the deadline.
    Deadline,
    /// The upstream asked to wait longer than `max_retry_after`.
    RetryAfterTooLong(Duration),
}

/// Something a retry layer did, sent to `on_event` listeners, `tracing` and
/// `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RetryEvent {
    /// Another attempt will be made after `delay`.
    Retry {
        /// The layer's name.
        name: Arc<str>,
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
        /// The wait before it: back-off with jitter, or the upstream's
        /// `Retry-After` if longer.
        delay: Duration,
        /// What went wrong with the previous attempt.
        reason: RetryReason,
    },
    /// The call ends with its last attempt's failure.
    GaveUp {
        /// The layer's name.
        name: Arc<str>,
        /// Attempts made.
        attempts: u32,
        /// Why no further attempt is made.
        reason: GiveUpReason,
    },
    /// The budget refused a retry; the call ends with its last failure.
    BudgetExhausted {
        /// The layer's name.
        name: Arc<str>,
        /// Attempts made.
        attempts: u32,
    },
}

impl Event for RetryEvent {
    fn layer(&self) -> &'static str {
        "retry"
    }

    fn name(&self) -> &str {
        match self {
            RetryEvent::Retry { name, .. }
            | RetryEvent::GaveUp { name, .. }
            | RetryEvent::BudgetExhausted { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            RetryEvent::Retry { .. } => "retry",
            RetryEvent::GaveUp { .. } => "gave_up",
            RetryEvent::BudgetExhausted { .. } => "budget_exhausted",
        }
    }

    fn is_warning(&self) -> bool {
        !matches!(self, RetryEvent::Retry { .. })
    }
}
