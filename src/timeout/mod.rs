//! Timeout: give up on a call that takes too long, and cancel it.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::timeout::{TimedOut, TimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! # tokio::time::pause();
//! let layer = TimeoutLayer::builder()
//!     .name("search")
//!     .timeout(Duration::from_millis(500))
//!     .build()?;
//! let handle = layer.handle();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|ms: u64| async move {
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Ok::<_, std::io::Error>(ms)
//! }));
//!
//! assert_eq!(svc.clone().oneshot(100).await?, 100);
//! let err = svc.oneshot(2_000).await.unwrap_err();
//! let timed_out = err.downcast_ref::<TimedOut>().unwrap();
//! assert_eq!(timed_out.timeout(), Duration::from_millis(500));
//! assert_eq!(handle.timed_out(), 1);
//! # Ok(()) }
//! ```
//!
//! # Per-request timeouts
//!
//! A caller often says how long it will wait: gRPC's `grpc-timeout`
//! header, or an `X-Request-Timeout` of its own. With
//! [`per_request`](TimeoutBuilder::per_request) the layer reads it from
//! each request; the shorter of it and the configured timeout applies, so
//! a caller can ask for less time but never for more. With the `http`
//! feature, `timeout::grpc_timeout` reads gRPC's header.
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::time::Duration;
//! use tower_bulwark::timeout::TimeoutLayer;
//!
//! let layer = TimeoutLayer::builder()
//!     .timeout(Duration::from_secs(10))
//!     .per_request(|req: &http::Request<()>| {
//!         let ms = req.headers().get("x-request-timeout-ms")?.to_str().ok()?.parse().ok()?;
//!         Some(Duration::from_millis(ms))
//!     })
//!     .build()
//!     .unwrap();
//! # let _ = layer; }
//! ```
//!
//! # Errors
//!
//! A call still running at its deadline is dropped (which cancels it) and
//! fails with [`TimedOut`], naming the layer and the timeout it ran out
//! of, boxed into [`BoxError`](crate::error::BoxError). It is an error
//! like the upstream's own: a circuit breaker above the timeout counts it
//! as a failure and a retry above it tries again. An answer and the
//! deadline in the same poll go to the answer. `poll_ready` only forwards
//! to the inner service and is not timed.
//!
//! # Clone
//!
//! The name, the listeners and the count of timed-out calls live behind an
//! `Arc` made by `build()`, shared by the layer, its clones, every service
//! it makes and their clones.
//!
//! # Cost
//!
//! The response future holds the inner future and tokio's timer inline:
//! no allocation and no boxed future. The timer is only made, and
//! registered with tokio, when the call is not ready on its first poll;
//! a call that answers at once pays for one clock read. A timeout too long
//! for the clock (such as `Duration::MAX`) never fires rather than
//! overflowing.

mod error;
pub mod future;
#[cfg(feature = "http")]
mod header;
mod layer;
mod service;

use std::sync::Arc;
use std::time::Duration;

pub use error::TimedOut;
#[cfg(feature = "http")]
pub use header::grpc_timeout;
pub use layer::{
    NoRequestTimeout, RequestTimeout, RequestTimeoutFn, TimeoutBuilder, TimeoutHandle, TimeoutLayer,
};
pub use service::Timeout;

use crate::observe::Event;

/// Something a timeout layer did, sent to `on_event` listeners, `tracing`
/// and `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TimeoutEvent {
    /// A call ran out of time and was cancelled.
    TimedOut {
        /// The layer's name.
        name: Arc<str>,
        /// The timeout it ran out of.
        timeout: Duration,
    },
}

impl Event for TimeoutEvent {
    fn layer(&self) -> &'static str {
        "timeout"
    }

    fn name(&self) -> &str {
        match self {
            TimeoutEvent::TimedOut { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            TimeoutEvent::TimedOut { .. } => "timed_out",
        }
    }

    fn is_warning(&self) -> bool {
        true
    }
}
