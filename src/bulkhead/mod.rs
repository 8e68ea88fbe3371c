//! Bulkhead: cap the calls running at once, so one slow upstream cannot
//! take every worker with it.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = BulkheadLayer::builder()
//!     .name("db")
//!     .max_concurrent(1)
//!     .max_wait(Duration::ZERO) // fail fast (the default)
//!     .build()?;
//! let handle = layer.handle();
//! let (tx, rx) = tokio::sync::oneshot::channel::<()>();
//! let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(move |_: ()| {
//!     let rx = rx.lock().unwrap().take();
//!     async move {
//!         if let Some(rx) = rx { let _ = rx.await; }
//!         Ok::<_, std::io::Error>(())
//!     }
//! }));
//!
//! // The first call holds the only slot until it finishes...
//! let first = tokio::spawn(svc.ready().await?.call(()));
//! tokio::task::yield_now().await;
//! assert_eq!(handle.in_flight(), 1);
//! // ...so the second is turned away at once.
//! let err = svc.ready().await?.call(()).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<BulkheadFull>().unwrap().capacity(), 1);
//!
//! tx.send(()).unwrap();
//! first.await??;
//! assert_eq!(handle.available(), 1);
//! # Ok(()) }
//! ```
//!
//! # Slots
//!
//! A slot is taken when the request is *called*, never in `poll_ready`:
//! hyper polls readiness before a request arrives, and an idle keep-alive
//! connection must not hold capacity. The slot belongs to the response
//! future and is given back when the call completes, when the future is
//! dropped, or when the inner service panics.
//!
//! A streaming HTTP body is still work after the response head is ready.
//! With the `http` feature, `BulkheadLayer::hold_until_body_end` makes an
//! `HttpBulkheadLayer` whose responses carry a `BulkheadBody` holding the
//! slot until the body ends, fails or is dropped.
//!
//! # Backpressure
//!
//! By default a full bulkhead fails fast with [`BulkheadFull`]. With
//! [`max_wait`](BulkheadBuilder::max_wait), a call waits up to that long
//! for a slot inside its response future, waiters served in arrival order
//! (FIFO), and fails with [`BulkheadFull`] if none frees up. A
//! [`soft_limit`](BulkheadBuilder::soft_limit) raises a warning event when
//! the calls in flight reach it, before anything is refused, so a
//! dashboard sees the pressure building while calls still succeed.
//!
//! # Across processes
//!
//! With `.backend(store)` the slots live in a shared store and the
//! bulkhead fails fast. On a `FileStore` (feature `file-store`) a slot
//! given back is free at once for the calls of this process, and is
//! written to the file with this process's next lock round on it (the
//! next call's admission), or after the store's `release_delay` (10 ms by
//! default) if none comes: a steady stream of calls through the
//! documented stack takes one lock round each instead of two. Other
//! processes may see a freed slot taken up to that much longer, never
//! free too early, so the capacity holds across processes.
//! `release_delay(Duration::ZERO)` writes each slot back at once.
//!
//! # Errors
//!
//! `poll_ready` only forwards to the inner service. A rejection is an
//! error future holding [`BulkheadFull`] (boxed into
//! [`BoxError`](crate::error::BoxError)), naming the bulkhead and its
//! capacity. With the `http` feature, `http::error_response` maps it to
//! `503 Service Unavailable` with `Retry-After: 1`.
//!
//! # Panics
//!
//! An `on_event` listener that panics unwinds into the caller whose call
//! raised the event, and only there. A slot is always in its guard before
//! any listener hears of it, so the panic gives it back, as a dropped
//! future does; so does a panic in the inner service's `call` or in its
//! response future.
//!
//! # Clone
//!
//! The slots live behind an `Arc` made by `build()`. The layer, its
//! clones, every service it makes and their clones all share one set;
//! build another layer for another bulkhead.
//!
//! ## The inner service must be `Clone`
//!
//! A call that waits for a slot (with `max_wait`, or for a shared
//! backend's lease) takes the service it was readied on into its response
//! future and leaves a clone behind for the next caller, as the
//! `tower-service` docs advise, so `Bulkhead<S>` is a `Service` only when
//! `S: Clone`. Without it the compiler says that ``the method `oneshot`
//! exists ... but its trait bounds were not satisfied``. Most services
//! are cheap to clone (axum's `Router`, tonic's `Channel`, hyper's
//! `Client`, `service_fn` over a cloneable closure); for one that is not,
//! put `tower::buffer::BufferLayer` under the bulkhead, or share it
//! behind `Arc<Mutex<..>>` in a `service_fn`.
//!
//! # Cost
//!
//! In fail-fast mode a call takes its slot with one compare-and-swap on an
//! atomic counter and gives it back with one subtraction: no lock, no
//! allocation, and no reference count (the counter lives in memory that
//! outlives the layer, so the response future holds a plain reference). Waiting mode uses tokio's fair semaphore
//! (whose release takes a short lock) and boxes the wait of a call that
//! finds no free slot.

mod error;
pub mod future;
#[cfg(feature = "http")]
mod hold;
mod layer;
mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

pub use crate::backend::Backend;
pub use error::BulkheadFull;
#[cfg(feature = "http")]
pub use hold::{BulkheadBody, HttpBulkhead, HttpBulkheadLayer};
pub use layer::{BulkheadBuilder, BulkheadHandle, BulkheadLayer};
pub use service::Bulkhead;

use crate::observe::Event;

/// Something a bulkhead did, sent to `on_event` listeners, `tracing` and
/// `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BulkheadEvent {
    /// The calls in flight climbed to the soft limit (a warning).
    SoftLimitReached {
        /// The bulkhead's name.
        name: Arc<str>,
        /// Calls in flight.
        in_flight: usize,
        /// The hard limit.
        capacity: usize,
    },
    /// A call was rejected without reaching the inner service.
    Rejected {
        /// The bulkhead's name.
        name: Arc<str>,
        /// The hard limit.
        capacity: usize,
        /// How long it waited first.
        waited: Duration,
    },
}

impl Event for BulkheadEvent {
    fn layer(&self) -> &'static str {
        "bulkhead"
    }

    fn name(&self) -> &str {
        match self {
            BulkheadEvent::SoftLimitReached { name, .. } | BulkheadEvent::Rejected { name, .. } => {
                name
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            BulkheadEvent::SoftLimitReached { .. } => "soft_limit_reached",
            BulkheadEvent::Rejected { .. } => "rejected",
        }
    }

    fn is_warning(&self) -> bool {
        matches!(self, BulkheadEvent::SoftLimitReached { .. })
    }
}
