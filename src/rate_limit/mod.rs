//! Rate limit: admit requests at a steady rate, with bursts up to a bucket
//! size, shared by every clone.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = RateLimitLayer::builder()
//!     .name("api")
//!     .max_tokens(2.0)   // burst
//!     .refill_rate(1.0)  // tokens per second
//!     .build()?;
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n) }));
//!
//! svc.ready().await?.call(1).await?;
//! svc.ready().await?.call(2).await?;
//! let err = svc.ready().await?.call(3).await.unwrap_err();
//! let limited = err.downcast_ref::<RateLimited>().unwrap();
//! assert!(limited.retry_after() <= Duration::from_secs(1));
//! assert!(handle.tokens() < 1.0);
//! # Ok(()) }
//! ```
//!
//! # Algorithm
//!
//! GCRA, the token bucket kept as a single number: what admitting reads
//! and writes is one `AtomicU64` updated by compare-and-swap, so the hot
//! path takes no lock and allocates nothing (the reservations of dropped
//! waiters, kept beside it, are only looked at by requests that would wait). It is exact: over any window of
//! `elapsed`, the cost admitted never exceeds `max_tokens + refill_rate *
//! elapsed`. Defaults: 50 tokens, refilled at 10 a second, 1 token a
//! request: a burst of 50 calls, then a steady 10 a second.
//!
//! # Waiting
//!
//! By default an empty bucket rejects at once. With
//! [`max_wait`](RateLimitBuilder::max_wait), a request whose tokens come
//! within that time reserves them and waits inside its response future,
//! then calls the inner service; later requests queue behind it in arrival
//! order. One that would wait longer is rejected at once. A waiting request
//! that is dropped gives its turn back (see [Cancellation](#cancellation)).
//!
//! # Cost and keys
//!
//! [`cost`](RateLimitBuilder::cost) charges each request its own number of
//! tokens (a prompt's length, a batch's size). A cost that can never fit
//! (above `max_tokens`) fails with [`CostTooHigh`] instead of waiting
//! forever. [`key`](RateLimitBuilder::key) gives each key (a client IP, an
//! API key) its own bucket; memory stays bounded by
//! [`max_keys`](RateLimitBuilder::max_keys) however many keys an attacker
//! invents, and full buckets are forgotten without changing any decision.
//!
//! # Upstream back-off
//!
//! [`RateLimitHandle::set_retry_after`] blocks the limiter for a while, as
//! an upstream's `Retry-After` asks; afterwards the bucket refills from
//! holding one request. [`retry_after_from`](RateLimitBuilder::retry_after_from)
//! does it for every result carrying such a hint (with the `http` feature:
//! `http::StatusClassifier` on 429 and 503 answers).
//!
//! A hint is the upstream's word, not the limiter's: one longer than
//! [`max_retry_after`](RateLimitBuilder::max_retry_after) (default
//! [`DEFAULT_MAX_RETRY_AFTER`](crate::classify::DEFAULT_MAX_RETRY_AFTER),
//! one minute) blocks for that cap only, and raises
//! [`RateLimitEvent::RetryAfterClamped`]. The handle's `set_retry_after`
//! is the application's own word and is not capped.
//!
//! # Settings at their extremes
//!
//! `build()` refuses what cannot be represented, naming the field: a
//! `max_tokens`, `refill_rate` or `tokens_per_request` that is zero,
//! negative, NaN or infinite, and a bucket so slow that refilling it would
//! take more than about 73 years (say a `refill_rate` of `1e-12`). Every
//! other setting is sound: `max_wait` and `max_retry_after` saturate (a
//! `Duration::MAX` wait is simply "as long as it takes"), and the bound
//! above holds to the nanosecond for any rate, however large or small.
//!
//! # Errors
//!
//! `poll_ready` only forwards to the inner service. A request without
//! tokens is answered by an error future holding [`RateLimited`] (boxed
//! into [`BoxError`](crate::error::BoxError)) with the time until it would
//! be admitted. With the `http` feature, `http::error_response` maps it to
//! `429 Too Many Requests` with `Retry-After` and `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers.
//!
//! # Cancellation
//!
//! A waiting request's reservation belongs to its response future.
//! Dropped before it calls the inner service, the future gives the tokens
//! back. The newest reservation simply comes off the bucket. One with
//! later requests queued behind it goes to the next request that would
//! otherwise wait longer or be rejected, if it costs no more: that request
//! is admitted at the dropped one's time, and the later ones keep their
//! turns. Once the requests behind are gone as well, every reservation is
//! back in the bucket. The bound holds throughout: a reservation changes
//! hands only while the request taking it can still call within the times
//! that reservation allows (the reasoning is in `gcra.rs`).
//!
//! Up to 32 dropped reservations are kept for an unkeyed limiter, 8 for
//! each key (a key's list allocated only while it holds one). Beyond
//! that, and when an upstream's `Retry-After` blocks the limiter, or a key
//! is forgotten, they lapse instead: their tokens come back with time.
//!
//! # Panics
//!
//! A `key` or `cost` closure, a classifier or an `on_event` listener that
//! panics unwinds into the caller whose request it was handling, and only
//! there. Nothing is taken before those closures run except into a guard
//! that already exists: a reservation is in its response future before any
//! listener hears of it, so a panic drops the future and gives the tokens
//! back, as a cancellation does. An upstream block is applied before the
//! listener that hears of it runs.
//!
//! # Clone
//!
//! The buckets live behind an `Arc` made by `build()`. The layer, its
//! clones, every service it makes and their clones all share them (unlike
//! `tower::limit::RateLimit`); build another layer for another limit.
//!
//! ## The inner service must be `Clone`
//!
//! A call that waits for tokens (with `max_wait`, or for a shared
//! backend's answer) takes the service it was readied on into its response
//! future and leaves a clone behind for the next caller, as the
//! `tower-service` docs advise, so `RateLimit<S>` is a `Service` only when
//! `S: Clone`. Without it the compiler says that ``the method `oneshot`
//! exists ... but its trait bounds were not satisfied``. Most services
//! are cheap to clone (axum's `Router`, tonic's `Channel`, hyper's
//! `Client`, `service_fn` over a cloneable closure); for one that is not,
//! put `tower::buffer::BufferLayer` under the limiter.
//!
//! # Cost of a call
//!
//! An admitted call through an unkeyed limiter reads the clock once and
//! does one load and one compare-and-swap; a keyed one adds a hash and a
//! shard's read lock. Nothing is allocated unless a request waits.
//!
//! # Time
//!
//! The limiter reads tokio's clock by default, so a test with
//! `#[tokio::test(start_paused = true)]` or `tokio::time::pause()` drives
//! it as it drives every other layer. It reads the time on every call: on
//! a hot path, `.clock(ClockSource::Fast)` reads the CPU's time-stamp
//! counter instead ([`ClockSource`](crate::ClockSource)), a few nanoseconds
//! against about 21 for an OS clock read on the CI machine, at the price of
//! ignoring paused time.

mod error;
pub mod future;
pub(crate) mod gcra;
mod keyed;
mod layer;
mod remote;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

pub use crate::backend::Backend;
pub use error::{CostTooHigh, RateLimited};
pub use layer::{
    Cost, CostFn, FixedCost, Global, Keyed, RateLimitBuilder, RateLimitHandle, RateLimitLayer,
};
pub use service::RateLimit;

use crate::observe::Event;

/// Something a limiter did, sent to `on_event` listeners, `tracing` and
/// `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RateLimitEvent {
    /// A request was rejected without reaching the inner service.
    Rejected {
        /// The limiter's name.
        name: Arc<str>,
        /// When it would have been admitted.
        retry_after: Duration,
    },
    /// An upstream asked for a pause: nothing is admitted for `duration`.
    Blocked {
        /// The limiter's name.
        name: Arc<str>,
        /// How long.
        duration: Duration,
    },
    /// A keyed limiter forgot keys to stay within its memory bound.
    KeysEvicted {
        /// The limiter's name.
        name: Arc<str>,
        /// Full buckets forgotten (no decision changes).
        idle: usize,
        /// Buckets still refilling, forgotten because `max_keys` was
        /// reached. A key forgotten this way is never better off for it:
        /// new keys in its shard start no fuller than the emptiest bucket
        /// forgotten, until time has refilled that one.
        live: usize,
    },
    /// An upstream asked for a pause longer than
    /// [`max_retry_after`](RateLimitBuilder::max_retry_after): the limiter
    /// blocks for the cap instead.
    RetryAfterClamped {
        /// The limiter's name.
        name: Arc<str>,
        /// What the upstream asked for.
        requested: Duration,
        /// The block applied.
        applied: Duration,
    },
}

impl Event for RateLimitEvent {
    fn layer(&self) -> &'static str {
        "rate_limit"
    }

    fn name(&self) -> &str {
        match self {
            RateLimitEvent::Rejected { name, .. }
            | RateLimitEvent::Blocked { name, .. }
            | RateLimitEvent::KeysEvicted { name, .. }
            | RateLimitEvent::RetryAfterClamped { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            RateLimitEvent::Rejected { .. } => "rejected",
            RateLimitEvent::Blocked { .. } => "blocked",
            RateLimitEvent::KeysEvicted { .. } => "keys_evicted",
            RateLimitEvent::RetryAfterClamped { .. } => "retry_after_clamped",
        }
    }

    fn is_warning(&self) -> bool {
        matches!(
            self,
            RateLimitEvent::Blocked { .. }
                | RateLimitEvent::KeysEvicted { live: 1.., .. }
                | RateLimitEvent::RetryAfterClamped { .. }
        )
    }
}
