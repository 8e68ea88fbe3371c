//! State backends: where a primitive keeps its shared state.
//!
//! By default every layer keeps its state in memory, behind the `Arc` its
//! `build()` made: lock-free and allocation-free on the hot path. Two other
//! homes let processes share one breaker, one bucket and one bulkhead:
//!
//! - [`file`](mod@file) (feature `file-store`): one versioned JSON file per scope,
//!   for CLIs where every invocation is a new process;
//! - [`redis`](mod@redis) (feature `redis`): a fleet of processes shares
//!   one state through atomic Lua scripts on a Redis server.
//!
//! The breaker, the rate limiter and the bulkhead each pick their backend
//! at `build()`, with `.backend(store)` taking the same `Backend`.
//!
//! # Gate order
//!
//! Stack shared layers **rate limit and bulkhead before the breaker**. With `ServiceBuilder` the first layer
//! added is the outermost, so:
//!
//! ```no_run
//! # #[cfg(all(feature = "circuit-breaker", feature = "rate-limit",
//! #           feature = "bulkhead", feature = "file-store"))] {
//! use tower::{service_fn, ServiceBuilder};
//! use tower_bulwark::store::file::FileStore;
//! use tower_bulwark::{BulkheadLayer, CircuitBreakerLayer, RateLimitLayer};
//!
//! let store = FileStore::builder().app("mycli").build()?;
//! let svc = ServiceBuilder::new()
//!     // 1. the rate limit, shared by every process
//!     .layer(RateLimitLayer::builder().backend(store.clone()).build()?)
//!     // 2. the bulkhead: slots owned by processes
//!     .layer(BulkheadLayer::builder().max_concurrent(4).backend(store.clone()).build()?)
//!     // 3. the breaker, innermost: it only sees calls that will run
//!     .layer(CircuitBreakerLayer::builder().name("api").backend(store).build()?)
//!     .service(service_fn(|req: String| async move { Ok::<_, std::io::Error>(req) }));
//! # let _ = svc;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A half-open breaker reserves its probe slot in the shared state when it
//! admits a call. Were the breaker outside, a call it admitted as the probe
//! and the bucket then rejected would spend the probe on a call that never
//! reached the upstream (and count as its failure), and a process killed in
//! between would hold the slot until `stale_attempt_timeout`. Inside, a
//! rejected call never reaches the breaker. The price: a
//! call the bulkhead or the open breaker rejects has already spent its
//! token.
//!
//! On the file backend a half-open breaker takes its probe when the
//! stack's readiness reaches it (so that it can wait for the file lock
//! without holding the runtime's thread), before the outer layers decide.
//! A call they then reject does not use the probe and is not counted: the
//! probe is given back when that service is dropped (as `oneshot`, hyper
//! and axum do after each request), or else goes to the service's next
//! call that passes them.
//!
//! A Redis script runs atomically on the server, one per layer. On the
//! file backend the layers of this stack that share a [`FileStore`] are
//! admitted in one lock round: the outermost keeps its round open while
//! its `call` runs the `call`s below it, which join that round (one lock,
//! one read, one write). When a peer holds the lock, the rate limit waits
//! for it in its response future, then keeps the round it makes open
//! while it calls the layers below. Its bulkhead slot, given back when it ends, is
//! written by the next round (the next call's admission) or after the
//! store's `release_delay` (10 ms) if none comes, so a steady stream of
//! calls takes one round per call. A closed breaker's admission and
//! a success with nothing to clear only read the file, without the lock.
//! The lock is held across the synchronous part of the wrapped `call`
//! (making its future), never across its await. A store that fails closed
//! keeps one round per admitting layer instead (two for this stack, the
//! slot given back joining the next): each admission must be on disk
//! before its call goes through. [`FileStore::lock_rounds`] counts them.
//!
//! [`FileStore`]: file::FileStore
//! [`FileStore::lock_rounds`]: file::FileStore::lock_rounds
//!
//! # Failure of the store itself
//!
//! A store that cannot be reached never hangs a call and never crashes the
//! program. The file store proceeds without its lock after `lock_timeout`
//! (100 ms by default) when a peer holds it, sets a corrupt or over-size
//! file aside and starts afresh, and follows its [`Degrade`] policy when
//! the file cannot be read, locked or written; the Redis store gives each
//! command a timeout and then follows its [`Degrade`] policy. Failing open
//! means local limits (the same algorithms over a state in memory), never
//! no limit. Each of these emits a [`StoreEvent`].

// The breaker's parts of each store are used only with `circuit-breaker`.
#![cfg_attr(not(feature = "circuit-breaker"), allow(dead_code))]

use std::path::PathBuf;
use std::sync::Arc;

use crate::observe::Event;

#[cfg(any(
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]
pub use crate::backend::Backend;

#[cfg(feature = "file-store")]
pub mod file;
#[cfg(feature = "redis")]
pub mod redis;

/// What a store does while its shared state cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Degrade {
    /// Keep serving from local, in-memory state (each process then enforces
    /// the limits on its own). The default: an outage of the store is not
    /// an outage of the service.
    #[default]
    FailOpenToLocal,
    /// Reject every call that needs the shared state until it is back.
    FailClosed,
}

/// Why a state file was set aside and started afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// The file was not valid JSON for the schema.
    Corrupt,
    /// The file was empty or cut short.
    Truncated,
    /// The file was written by a newer schema version than this one reads.
    FutureVersion(u32),
    /// The file was larger than the store reads (see
    /// `store::file::MAX_FILE_SIZE`).
    TooLarge,
}

/// Something a store did that deserves a line in the logs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreEvent {
    /// The file lock was not acquired within the lock timeout: the update
    /// went ahead without it (fail-open), so it may race another process.
    LockTimeout {
        /// The scope's name.
        name: Arc<str>,
        /// The state file.
        path: PathBuf,
    },
    /// An unreadable state file was moved aside and the state reset.
    Recovered {
        /// The scope's name.
        name: Arc<str>,
        /// The state file.
        path: PathBuf,
        /// What was wrong with it.
        reason: Recovery,
        /// Where the bad file was kept, if it could be moved.
        kept_at: Option<PathBuf>,
    },
    /// Reading or writing the state failed; the call went ahead with the
    /// state as last known.
    IoError {
        /// The scope's name.
        name: Arc<str>,
        /// What failed.
        error: String,
    },
    /// The shared state could not be reached: the store now follows its
    /// [`Degrade`] policy.
    Degraded {
        /// The store's name (its key prefix).
        name: Arc<str>,
        /// The policy now in force.
        policy: Degrade,
        /// Why.
        error: String,
    },
    /// The shared state is reachable again after [`StoreEvent::Degraded`].
    Restored {
        /// The store's name (its key prefix).
        name: Arc<str>,
    },
}

impl Event for StoreEvent {
    fn layer(&self) -> &'static str {
        "store"
    }

    fn name(&self) -> &str {
        match self {
            StoreEvent::LockTimeout { name, .. }
            | StoreEvent::Recovered { name, .. }
            | StoreEvent::IoError { name, .. }
            | StoreEvent::Degraded { name, .. }
            | StoreEvent::Restored { name } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            StoreEvent::LockTimeout { .. } => "lock_timeout",
            StoreEvent::Recovered { .. } => "recovered",
            StoreEvent::IoError { .. } => "io_error",
            StoreEvent::Degraded { .. } => "degraded",
            StoreEvent::Restored { .. } => "restored",
        }
    }

    fn is_warning(&self) -> bool {
        !matches!(self, StoreEvent::Restored { .. })
    }
}

/// Wall-clock milliseconds since the Unix epoch: shared state is compared
/// across processes (and hosts), so it cannot use a process's monotonic
/// clock.
#[cfg(feature = "file-store")]
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
