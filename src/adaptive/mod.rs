//! Adaptive concurrency limit: a cap on the calls in flight that finds its
//! own value from the upstream's latency and failures, as Netflix's
//! concurrency-limits and Envoy's adaptive concurrency filter do.
//!
//! A fixed bulkhead must be sized by hand, and is wrong as soon as the
//! upstream gets slower or faster. This layer keeps the calls in flight
//! near what the upstream can serve without queueing: it raises the limit
//! while latency holds steady, and lowers it when latency climbs or calls
//! fail. Calls above the limit are turned away at once, so an overloaded
//! upstream keeps answering the calls it has at its normal speed.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::adaptive::{AdaptiveLimitLayer, Gradient, LimitReached};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! # tokio::time::pause();
//! let layer = AdaptiveLimitLayer::builder()
//!     .name("inventory")
//!     .algorithm(Gradient::default()) // the default; or Vegas, Aimd
//!     .min_limit(2)
//!     .initial_limit(10)
//!     .max_limit(200)
//!     .build()?;
//! let handle = layer.handle();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|n: u32| async move {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//!     Ok::<_, std::io::Error>(n)
//! }));
//!
//! assert_eq!(svc.clone().oneshot(7).await?, 7);
//! assert_eq!(handle.in_flight(), 0);
//! assert!((2..=200).contains(&handle.limit()));
//!
//! // Twenty at once against a limit of ten: the rest are turned away.
//! let calls = (0..20).map(|n| svc.clone().oneshot(n));
//! let results = futures::future::join_all(calls).await;
//! let refused = results.iter().filter(|r| matches!(r, Err(e) if e.is::<LimitReached>())).count();
//! assert_eq!(refused, 10);
//! # Ok(()) }
//! ```
//!
//! # Algorithms
//!
//! - [`Gradient`] (the default; gradient2): compares recent latency with
//!   its long-term average. Learns what normal latency is, and settles a
//!   few calls (`√limit`) above the upstream's knee; its `tolerance` lets
//!   a noisy upstream's latency rise that much before the limit shrinks,
//!   at the price of a limit that much higher. It learns "normal" from
//!   the first call and from calls that ran without a full limit around
//!   them, never from calls that started or ended among a full limit; if
//!   even the first call meets an overloaded upstream, begin with an
//!   `initial_limit` below its capacity, or use Vegas.
//! - [`Vegas`]: estimates the queue at the upstream from the lowest
//!   latency seen. Converges tightly on a steady upstream.
//! - [`Aimd`]: additive increase, multiplicative decrease on failures and
//!   on calls slower than a threshold you set. Simple, and the right one
//!   when failures (timeouts, 503s) rather than latency signal overload.
//!
//! The limit always stays within [`min_limit`](AdaptiveLimitBuilder::min_limit)
//! and [`max_limit`](AdaptiveLimitBuilder::max_limit), starting at
//! [`initial_limit`](AdaptiveLimitBuilder::initial_limit). Only finished
//! calls teach the algorithm: a cancelled call gives its slot back and
//! says nothing, as does a call the classifier marks
//! [`Ignore`](crate::Outcome::Ignore) (a client error, say).
//!
//! # Backpressure
//!
//! By default a call above the limit fails fast with [`LimitReached`].
//! With [`max_wait`](AdaptiveLimitBuilder::max_wait) it waits up to that
//! long for a slot inside its response future, woken in arrival order as
//! slots free up or the limit grows, and fails with [`LimitReached`] if
//! none does.
//!
//! # Errors
//!
//! `poll_ready` only forwards to the inner service. A rejection is an
//! error future holding [`LimitReached`] (boxed into
//! [`BoxError`](crate::error::BoxError)), naming the layer and the limit.
//! With the `http` feature, `http::error_response` maps it to `503
//! Service Unavailable`.
//!
//! # Slots
//!
//! A slot is taken when the request is *called*, never in `poll_ready`,
//! and belongs to the response future: it is given back when the call
//! completes, when the future is dropped at any point, or when the inner
//! service panics.
//!
//! # Clone
//!
//! The limit, the calls in flight and the algorithm's state live behind an
//! `Arc` made by `build()`, shared by the layer, its clones, every service
//! it makes and their clones.
//!
//! # Cost
//!
//! Admission is one compare-and-swap on an atomic counter, against a limit
//! read from another: no lock, no allocation. Each call reads the clock
//! at its start and end (tokio's by default; the time-stamp counter with
//! [`clock`](AdaptiveLimitBuilder::clock)`(ClockSource::Fast)` is several
//! times cheaper) and takes a short lock to feed the algorithm. Waiting
//! calls box their wait.

mod algorithm;
mod error;
pub mod future;
mod layer;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

pub use algorithm::{Aimd, Algorithm, Gradient, Vegas};
pub use error::LimitReached;
pub use layer::{AdaptiveHandle, AdaptiveLimitBuilder, AdaptiveLimitLayer};
pub use service::AdaptiveLimit;

use crate::observe::Event;

/// Something an adaptive limit did, sent to `on_event` listeners,
/// `tracing` and `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AdaptiveEvent {
    /// The limit moved.
    LimitChanged {
        /// The layer's name.
        name: Arc<str>,
        /// The limit before.
        from: usize,
        /// The limit now.
        to: usize,
    },
    /// A call was rejected without reaching the inner service.
    Rejected {
        /// The layer's name.
        name: Arc<str>,
        /// The limit then.
        limit: usize,
        /// How long it waited first.
        waited: Duration,
    },
}

impl Event for AdaptiveEvent {
    fn layer(&self) -> &'static str {
        "adaptive_limit"
    }

    fn name(&self) -> &str {
        match self {
            AdaptiveEvent::LimitChanged { name, .. } | AdaptiveEvent::Rejected { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AdaptiveEvent::LimitChanged { .. } => "limit_changed",
            AdaptiveEvent::Rejected { .. } => "rejected",
        }
    }
}
