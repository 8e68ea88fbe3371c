//! Hedging: when a call is slower than usual, send a copy of the request
//! and take whichever answers first.
//!
//! Most slow calls are slow by bad luck (a busy replica, a lost packet, a
//! garbage collection) rather than because the request is costly, so a
//! second copy sent after the usual latency usually answers at the usual
//! speed. Tail latency drops for a small, capped amount of extra load.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::hedge::HedgeLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! # tokio::time::pause();
//! let layer = HedgeLayer::builder()
//!     .name("search")
//!     .delay(Duration::from_millis(50))
//!     .max_extra_load(1.0) // let this example's one call be hedged
//! #   .clock(tower_bulwark::ClockSource::Tokio) // the example runs on a paused clock
//!     .build()?;
//! let handle = layer.handle();
//! // The first copy of a request hangs; the second answers in 10 ms.
//! let sent = Arc::new(AtomicU32::new(0));
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(move |q: &'static str| {
//!     let nth = sent.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let ms = if nth == 0 { 10_000 } else { 10 };
//!         tokio::time::sleep(Duration::from_millis(ms)).await;
//!         Ok::<_, std::io::Error>(format!("{q}: copy {nth}"))
//!     }
//! }));
//!
//! let start = tokio::time::Instant::now();
//! assert_eq!(svc.oneshot("rust").await?, "rust: copy 1");
//! // About 60 ms (50 ms delay + 10 ms), not 10 s.
//! assert!(start.elapsed() < Duration::from_millis(100));
//! assert_eq!(handle.hedges(), 1);
//! # Ok(()) }
//! ```
//!
//! # When a call is hedged
//!
//! A call still running after the hedge delay gets a copy, sent to a
//! clone of the inner service (readied before it is called), and up to
//! [`max_hedges`](HedgeBuilder::max_hedges) copies, each a delay after
//! the last. The delay is fixed ([`delay`](HedgeBuilder::delay)) or,
//! by default, a percentile of recent latencies
//! ([`percentile`](HedgeBuilder::percentile) over the last
//! [`window`](HedgeBuilder::window) calls, never below
//! [`min_delay`](HedgeBuilder::min_delay)); nothing is hedged until
//! [`min_data_points`](HedgeBuilder::min_data_points) latencies were seen.
//!
//! The first copy to answer wins and every other is dropped at once,
//! which cancels it. A failure (an `Err`, or what a
//! [`classify`](HedgeBuilder::classify)er calls one, such as a 503) does
//! not win: the copies still running go on, and it is the answer only when
//! none is left. A failure is not hedged either (that is a retry's job).
//!
//! # Budget
//!
//! Hedges never exceed [`max_extra_load`](HedgeBuilder::max_extra_load)
//! of the calls (default 10%): every call earns that share of a hedge,
//! a hedge spends one, and unspent share accumulates up to ten hedges. So
//! an upstream that slows down as a whole sees at most that much more
//! load, not twice as much. A hedge the budget cannot pay for is not
//! sent, and the first call goes on alone.
//!
//! # Which requests
//!
//! The request must be `Clone`, and sending it twice must be harmless:
//! reads, or writes with an idempotency key. [`HedgeLayer::builder`]
//! hedges every request; say which may go twice with
//! [`hedge_if`](HedgeBuilder::hedge_if).
//!
//! **With HTTP, start from `HedgeLayer::http_builder()`** (feature
//! `http`): it hedges only requests that may be sent twice, by the rule
//! retries and failover follow (`http::may_resend`: an idempotent method,
//! or an `Idempotency-Key` header, and a replayable body), so a slow
//! `POST` is never sent twice; and it lets a hedge's 200 win over a first
//! copy's 5xx.
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::time::Duration;
//! use tower_bulwark::hedge::HedgeLayer;
//!
//! let layer = HedgeLayer::http_builder::<http_body_util::Full<bytes::Bytes>>()
//!     .name("catalog")
//!     .percentile(0.9)
//!     .build()
//!     .unwrap();
//! # let _ = layer; }
//! ```
//!
//! `http::Request<B>` is `Clone` when its body is; a streaming body has
//! to be buffered first (the `http` feature's `ReplayBodyLayer` does).
//!
//! # Clone
//!
//! The latency window, the budget and the count of hedges live behind an
//! `Arc` made by `build()`, shared by the layer, its clones, every service
//! it makes and their clones.
//!
//! # Errors
//!
//! The hedge layer rejects nothing: its errors are the inner service's,
//! boxed into [`BoxError`](crate::error::BoxError). `poll_ready` forwards
//! to the inner service.
//!
//! # Cost
//!
//! A call that is not hedged allocates nothing: the timer, the copy's
//! service and its request live inline in the response future. The
//! request and the service are cloned for every call that could be
//! hedged (the budget allows one and [`hedge_if`](HedgeBuilder::hedge_if)
//! agrees), and the clock is read at the call (tokio's by default; the
//! time-stamp counter with [`clock`](HedgeBuilder::clock)`(ClockSource::Fast)`
//! is several times cheaper). In percentile mode each finished call also
//! reads the clock and records its latency under a short lock.

pub mod future;
mod layer;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

pub use layer::{HedgeAll, HedgeBuilder, HedgeHandle, HedgeIf, HedgeLayer, HedgePredicate};
pub use service::Hedge;

use crate::observe::Event;

/// Something a hedge layer did, sent to `on_event` listeners, `tracing`
/// and `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HedgeEvent {
    /// A copy of a slow call was sent.
    Hedged {
        /// The layer's name.
        name: Arc<str>,
        /// Which copy (1 for the first hedge).
        attempt: u32,
        /// The delay it waited.
        delay: Duration,
    },
    /// A hedge was due but the budget could not pay for it.
    OverBudget {
        /// The layer's name.
        name: Arc<str>,
    },
}

impl Event for HedgeEvent {
    fn layer(&self) -> &'static str {
        "hedge"
    }

    fn name(&self) -> &str {
        match self {
            HedgeEvent::Hedged { name, .. } | HedgeEvent::OverBudget { name } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            HedgeEvent::Hedged { .. } => "hedged",
            HedgeEvent::OverBudget { .. } => "over_budget",
        }
    }
}
