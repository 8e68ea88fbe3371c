//! Request dedup ("singleflight"): concurrent identical requests share one
//! inner call, and a finished answer may be served again for a while.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_bulwark::dedup::DedupLayer;
//!
//! #[derive(Clone)]
//! struct Req { id: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let upstream = service_fn(move |req: Req| {
//!     counter.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         Ok::<_, std::io::Error>(format!("profile of {}", req.id))
//!     }
//! });
//! let layer = DedupLayer::builder()
//!     .key(|req: &Req| Some(req.id.clone()))   // None: not deduplicated
//!     .cache_ttl(Duration::from_secs(1))        // default: in-flight only
//!     .max_entries(10_000)
//!     .build()?;
//! let svc = layer.layer(upstream);
//!
//! // Ten callers at once, one upstream call.
//! let answers = futures::future::join_all(
//!     (0..10).map(|_| svc.clone().oneshot(Req { id: "ada".into() })),
//! ).await;
//! assert!(answers.iter().all(|a| a.as_ref().unwrap() == "profile of ada"));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! # The shared call
//!
//! The first caller with a new key starts the inner call; callers with the
//! same key that arrive while it runs wait on it, and each gets a clone of
//! its answer (so the response type must be `Clone`). The call belongs to
//! all of them, not to the first:
//!
//! - whichever waiter is polled drives the inner future, so it keeps going
//!   while anyone waits, with no task spawned and no runtime needed;
//! - no waiter holds up another: the first caller's response future may be
//!   kept and never polled, or polled once and then left alone, and the
//!   callers that joined it are still driven to their answer (it gets the
//!   same answer whenever it is polled);
//! - any waiter may go away (dropped, or its own timeout fired) without
//!   failing or restarting the call for the others;
//! - when the last waiter goes away the inner future is dropped: the call
//!   is cancelled;
//! - a panic in the inner future reaches the waiter whose poll ran into it,
//!   as a panic; every other waiter gets an error ([`Panicked`] inside a
//!   [`SharedError`]), not a hang.
//!
//! The inner service's `call` runs under the table's lock, so that a second
//! caller cannot miss the call the first one starts; like any tower
//! service's `call`, it should only start the work.
//!
//! # Panics
//!
//! A key is held only while a call that can answer it exists, so no panic
//! wedges it:
//!
//! - a panic in the inner service's `call` (tower's `Buffer` and
//!   `ConcurrencyLimit` panic there when misused) reaches the caller, and
//!   the key is left as if the call never happened: the entry is made only
//!   once `call` has returned;
//! - a panic in the key closure reaches the caller before anything is held;
//! - a panic in an `on_event` listener reaches the caller whose call raised
//!   the event (`leader`, `joined`, `cache_hit`, `full`), after that
//!   caller's place in the call exists, so dropping it releases the key or
//!   hands the call to whoever joined; a listener that panics on
//!   `cancelled`, which is raised while a future is dropped, is ignored
//!   (a second panic while unwinding would abort the process);
//! - a panic in the inner future reaches the waiter that polled it, and
//!   every other waiter gets a [`Panicked`] error, as above; the key is
//!   free again at once (a panic is never cached, even with
//!   [`error_ttl`](DedupBuilder::error_ttl));
//! - a panic in the inner future's destructor is caught and ignored (it
//!   may run while a waiter is dropped during a panic, where a second
//!   panic would abort the process).
//!
//! # Caching
//!
//! With [`cache_ttl`](DedupBuilder::cache_ttl), a successful answer is
//! served to new callers for that long after it arrived. Errors are not
//! cached unless [`error_ttl`](DedupBuilder::error_ttl) is set. Cache hits
//! are clones, taken under the table's lock.
//!
//! # Keys
//!
//! A [`DedupKey`] says which requests are the same; a closure works
//! ([`key`](DedupBuilder::key)). A key of `None` sends the request straight
//! through. With the `http` feature, the [`DefaultKey`] keys HTTP requests
//! by method, URI, `Host` and the headers that say who asks or change the
//! answer (`Authorization`, `Proxy-Authorization`, `Cookie`, `X-Api-Key`,
//! so one caller's answer never reaches another), and only safe methods
//! (`GET`, `HEAD`, `OPTIONS`) are deduplicated; `http::dedup::HttpKey`
//! says exactly what makes two requests the same, and adds headers and
//! request extensions (a tenant id set by auth middleware) to the key. Responses with a streaming body are not `Clone`: wrap the
//! stack with `http::dedup::HttpDedupLayer`, which buffers the body once (up
//! to a limit, 1 MiB by default) and shares the copy; a bigger body is not
//! shared (the first waiter streams it, the others re-issue their own
//! request).
//!
//! # Memory
//!
//! The table holds at most [`max_entries`](DedupBuilder::max_entries) keys,
//! in flight or cached. When it is full, a new key evicts the cached answer
//! that expires first (so an expired one, if any); when every key is in
//! flight, a new key's request is not deduplicated. Caching an answer also
//! drops the answers that have expired by then. Both cost O(1) amortised
//! per key, whatever the table's size: a flood of distinct keys costs each
//! of them a small constant, and holds the table's lock as briefly as any
//! other call.
//!
//! Dropping the layer and every service it made frees everything: no
//! table outlives them, and nothing is kept per layer for the life of the
//! process, so building a layer per tenant or per host is fine.
//!
//! # Errors
//!
//! Errors of a shared call (and of cached errors) are a [`SharedError`]:
//! the inner error is kept once behind an `Arc`, so it need not be `Clone`,
//! and stays reachable through `source()` and
//! [`get_ref`](SharedError::get_ref). A request that was not deduplicated
//! gets the inner service's own error, boxed.
//!
//! # Readiness
//!
//! `poll_ready` forwards to the inner service. A caller that joins a call
//! in flight, or is served from the cache, does not call the inner service.
//!
//! # Clone
//!
//! Each service the layer makes ([`Layer::layer`](tower::Layer::layer), or
//! [`Dedup::new`]) has a table of its own, shared by its clones: clones of
//! one service share calls in flight and the cache. Services made
//! separately by one layer (or its clones) never share answers, even for
//! equal keys: axum's `Router::layer` applies one layer to every route,
//! and `GET /a` must not be answered by `/b`'s upstream. The settings and
//! listeners are shared by all of them.
//!
//! Some stacks apply a layer again for each connection or request to what
//! is one upstream: under `axum::serve`, `Router::layer` wraps each handler
//! route anew for every connection. There, build the layer with
//! [`share_between_services`](DedupBuilder::share_between_services): every
//! service it makes then shares one table, and the key must tell the
//! services apart ([`DefaultKey`] and `http::dedup::HttpKey` do, by method,
//! URI and `Host`).
//!
//! [`DedupLayer::handle`] reads every live service the layer made
//! ([`in_flight`](DedupHandle::in_flight) and
//! [`cached`](DedupHandle::cached) add up over them); a service's own
//! [`handle`](Dedup::handle) reads just its table. A service that takes
//! several request types keeps one table per type.
//!
//! # Cost
//!
//! The inner future waits in the table until the first of its callers is
//! polled. Usually that is the first caller of the key (the leader), which
//! takes it and polls it inline, with its own waker. A call that answers on
//! its first poll hashes its key once, takes the table's lock three times
//! (start, first poll, finish) and finds its entry again without hashing
//! or comparing the key, and reuses the pinned box of an earlier call, so
//! in the steady state it allocates nothing. Shared state (the waker list,
//! the answer for the others, the future) is made only when a second
//! caller joins, or when the inner future is pending on its first poll;
//! from there on whichever waiter is polled drives it, one poll of the
//! inner future per poll of that waiter.
//!
//! Keys are hashed with [foldhash](https://docs.rs/foldhash), with seeds
//! drawn for each table from the operating system's randomness: a client
//! that does not know them cannot choose keys that collide. foldhash does
//! not claim to resist someone who can recover its seeds by observing hash
//! values or timing the table closely; the table shows neither, and each
//! service's table has seeds of its own.

mod error;
mod flight;
pub mod future;
mod key;
mod layer;
mod service;

use std::sync::Arc;

pub use error::{Panicked, SharedError};
pub use key::{DedupKey, DefaultKey, KeyFn};
pub use layer::{DedupBuilder, DedupHandle, DedupLayer};
pub use service::Dedup;

use crate::observe::Event;

/// Something the dedup layer did, sent to `on_event` listeners, `tracing`
/// and `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DedupEvent {
    /// A call with a new key started a shared call.
    Leader {
        /// The layer's name.
        name: Arc<str>,
    },
    /// A call joined a shared call already in flight.
    Joined {
        /// The layer's name.
        name: Arc<str>,
    },
    /// A call was answered from the cache.
    CacheHit {
        /// The layer's name.
        name: Arc<str>,
    },
    /// The table was full of calls in flight: a call went straight through.
    Full {
        /// The layer's name.
        name: Arc<str>,
    },
    /// Every waiter of a shared call went away: the call was cancelled.
    Cancelled {
        /// The layer's name.
        name: Arc<str>,
    },
}

impl Event for DedupEvent {
    fn layer(&self) -> &'static str {
        "dedup"
    }

    fn name(&self) -> &str {
        match self {
            DedupEvent::Leader { name }
            | DedupEvent::Joined { name }
            | DedupEvent::CacheHit { name }
            | DedupEvent::Full { name }
            | DedupEvent::Cancelled { name } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            DedupEvent::Leader { .. } => "leader",
            DedupEvent::Joined { .. } => "joined",
            DedupEvent::CacheHit { .. } => "cache_hit",
            DedupEvent::Full { .. } => "full",
            DedupEvent::Cancelled { .. } => "cancelled",
        }
    }

    fn is_warning(&self) -> bool {
        matches!(self, DedupEvent::Full { .. })
    }
}
