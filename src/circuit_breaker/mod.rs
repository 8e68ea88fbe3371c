//! Circuit breaker: stop calling an upstream that keeps failing, and probe
//! it now and then until it recovers.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! let layer = CircuitBreakerLayer::builder()
//!     .name("payments")
//!     .failure_threshold(2)
//!     .open_timeout(Duration::from_secs(30))
//!     .build()?;
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_: ()| async { Err::<(), _>("upstream down") }));
//!
//! for _ in 0..2 {
//!     assert!(svc.ready().await?.call(()).await.is_err());
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//!
//! // Now calls fail fast, without reaching the upstream.
//! let err = svc.ready().await?.call(()).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert_eq!(open.name(), "payments");
//! assert!(open.retry_after().unwrap() <= Duration::from_secs(30));
//! # Ok(()) }
//! ```
//!
//! # States
//!
//! - **Closed**: calls go through. By default `failure_threshold`
//!   consecutive failures (default 5) open the breaker; with a
//!   [`Window`] it opens when the failure rate (or slow-call rate) over the
//!   last `n` calls or the last `d` reaches its threshold, once the window
//!   holds at least `minimum_calls` calls (also before a count window is
//!   full).
//! - **Open**: calls are rejected at once with [`CircuitOpen`] for
//!   `open_timeout` (default 30 s), or a growing duration with
//!   `open_backoff`.
//! - **Half-open**: up to `half_open_max_calls` probes run at once (default
//!   1); `success_threshold` probe successes (default 2) close the breaker,
//!   one failure opens it again. Concurrent callers see exactly one
//!   open → half-open transition.
//! - **Forced open** and **disabled**: set from the [`CircuitHandle`],
//!   until [`reset`](CircuitHandle::reset).
//!
//! Every transition starts a new *generation*. A call records its outcome
//! only in the generation it was admitted in: a slow call that started
//! before the breaker opened cannot close it, or open it again, later.
//!
//! # Classification
//!
//! A [`Classify`](crate::classify::Classify) decides what a failure is;
//! by default every `Err`. With the `http` feature,
//! `http::StatusClassifier` makes 5xx responses failures, and with
//! [`honor_retry_after`](CircuitBreakerBuilder::honor_retry_after) a 429 or
//! 503 answer's `Retry-After` holds the breaker open at least that long.
//! An outcome of `Ignore` is not counted.
//!
//! # Readiness and errors
//!
//! `poll_ready` forwards to the inner service. An open breaker
//! answers `call` with an error future holding [`CircuitOpen`] (boxed into
//! [`BoxError`](crate::error::BoxError)), naming the breaker and the time
//! until the next probe, as `tower::load_shed` does: the service is never
//! poisoned.
//!
//! With a file backend (`store::file`, feature `file-store`), a breaker
//! whose next call would be a half-open probe takes that probe in
//! `poll_ready`, once the inner service is ready, waiting for the state
//! file's lock with tokio timers while another process holds it, so the
//! runtime keeps running other tasks; the service's next `call` uses it.
//! A service that finds no probe free is ready all the same and its call
//! is rejected. Readiness reads nothing while this process last saw the
//! breaker closed or still open, so the closed path costs what it did; a
//! call that then finds the breaker half-open (another process moved it)
//! takes a probe only if the lock is free at that moment: `call` never
//! waits, so with a peer holding the lock it is rejected as a call beyond
//! the probes is. A reservation whose generation has passed (the breaker
//! reopened while the service sat idle) is not used: its call is admitted
//! afresh.
//!
//! # Cancellation
//!
//! A half-open probe slot belongs to the call's response future. If the
//! future is dropped before it finishes, or the inner service or the
//! classifier panics, the slot is given back and the call counts as
//! neither success nor failure. A probe taken in `poll_ready` (file
//! backend) belongs to the service until its next call: dropped before
//! calling, the service gives it back.
//!
//! # Clone
//!
//! The state lives behind an `Arc` made by `build()`. The layer, its
//! clones, every service it makes and their clones all share one breaker;
//! build another layer for another breaker.
//!
//! # Keyed breakers
//!
//! A client that calls many hosts or tenants wants a breaker per key, so
//! one failing host does not shut the others out.
//! [`key`](CircuitBreakerBuilder::key) turns the builder into a
//! [`KeyedCircuitBreakerBuilder`]: each key gets a breaker of its own,
//! with every setting of the builder and the full semantics above, named
//! `name[key]` in errors and events. With the `http` feature,
//! `authority_key` keys requests by their upstream host.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_bulwark::BoxError> {
//! let layer = CircuitBreakerLayer::builder()
//!     .name("hosts")
//!     .failure_threshold(1)
//!     .key(|host: &&'static str| *host)
//!     .max_keys(10_000)
//!     .build()?;
//! let handle = layer.handle();
//! let upstream = service_fn(|host: &'static str| async move {
//!     if host == "down.example" { Err("unreachable") } else { Ok(host.len()) }
//! });
//! let svc = ServiceBuilder::new().layer(layer).service(upstream);
//! assert!(svc.clone().oneshot("down.example").await.is_err());
//! assert_eq!(handle.state(&"down.example"), Some(CircuitState::Open));
//! assert_eq!(svc.oneshot("up.example").await?, 10); // other hosts are not affected
//! # Ok(()) }
//! ```
//!
//! The table keeps at most `max_keys` keys (default 1024). Past that, a
//! new key takes the place of an idle one, found by a clock sweep (each
//! use marks a key, the sweep clears marks and takes the first unmarked
//! key): idle means closed, or open with its period over, and no call in
//! flight. An open breaker is never forgotten before its open period
//! ends, nor a forced-open or disabled one. If every key is busy, new keys
//! share one overflow breaker ([`KeyedCircuitHandle::overflow`]) until a
//! place frees. Keyed breakers keep their state in memory; a shared
//! backend is refused by `build()`.
//!
//! # Cost
//!
//! In the default consecutive mode a call through a closed breaker does one
//! atomic load on admission, one reference-count increment, and one more
//! load when it succeeds: no lock, no allocation, no clock read and no
//! boxed future. Window mode and slow-call detection read the clock and
//! take a short lock per finished call. A keyed breaker adds a read lock
//! and a hash lookup per call.

mod backend;
mod circuit;
mod error;
#[cfg(feature = "file-store")]
mod file;
#[cfg(feature = "redis")]
mod fleet;
pub mod future;
mod keyed;
mod layer;
mod service;
mod state;
mod window;

use std::sync::Arc;
use std::time::Duration;

pub use backend::Backend;
pub use error::CircuitOpen;
#[cfg(feature = "http")]
pub use keyed::authority_key;
pub use keyed::{
    KeyedCircuitBreaker, KeyedCircuitBreakerBuilder, KeyedCircuitBreakerLayer, KeyedCircuitHandle,
};
pub use layer::{CircuitBreakerBuilder, CircuitBreakerLayer, CircuitHandle};
pub use service::CircuitBreaker;
pub use window::Window;
// The fallback layer admits calls to each entry's breaker the same way
// the breaker's own service does.
#[cfg(feature = "fallback")]
pub(crate) use state::{Admission, Core};

use crate::observe::Event;

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    #[default]
    Closed,
    /// Calls are rejected until the open period ends.
    Open,
    /// A limited number of probes go through.
    HalfOpen,
    /// Every call is rejected until the handle resets the breaker.
    ForcedOpen,
    /// Every call goes through and the breaker never opens.
    Disabled,
}

impl CircuitState {
    /// A snake_case label: `closed`, `open`, `half_open`, `forced_open`,
    /// `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::Disabled => "disabled",
        }
    }

    /// The value of the `bulwark_circuit_state` gauge: 0 closed, 1 open,
    /// 2 half-open, 3 forced open, 4 disabled.
    pub fn gauge_value(self) -> f64 {
        self.code() as f64
    }

    /// The state as a small number, the one encoding every backend uses
    /// (the memory backend's word, the state file, the Redis fleet view
    /// and the gauge): 0 closed, 1 open, 2 half-open, 3 forced open,
    /// 4 disabled.
    pub fn code(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
            CircuitState::ForcedOpen => 3,
            CircuitState::Disabled => 4,
        }
    }

    /// The inverse of [`code`](Self::code); `None` for a number no
    /// state has.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            3 => CircuitState::ForcedOpen,
            4 => CircuitState::Disabled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a breaker did, sent to `on_event` listeners, `tracing` and
/// `metrics`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CircuitEvent {
    /// The breaker changed state.
    StateChanged {
        /// The breaker's name.
        name: Arc<str>,
        /// The state before.
        from: CircuitState,
        /// The state after.
        to: CircuitState,
        /// When opening: for how long.
        open_for: Option<Duration>,
        /// Whether an upstream's back-off hint (`Retry-After`) opened it.
        retry_after_hint: bool,
    },
    /// A call was rejected without reaching the inner service.
    Rejected {
        /// The breaker's name.
        name: Arc<str>,
        /// The state that rejected.
        state: CircuitState,
        /// Time until the next probe, when known.
        retry_after: Option<Duration>,
    },
    /// An upstream's back-off hint was longer than `max_retry_after`: the
    /// breaker was held open for the cap instead.
    RetryAfterClamped {
        /// The breaker's name.
        name: Arc<str>,
        /// What the upstream asked for.
        hinted: Duration,
        /// What the breaker used.
        used: Duration,
    },
    /// A Redis-backed breaker has not heard from the fleet for longer
    /// than three sync intervals plus two store timeouts, and follows the
    /// store's degrade policy until it does again.
    #[cfg(feature = "redis")]
    FleetUnheard {
        /// The breaker's name.
        name: Arc<str>,
        /// The policy now in force.
        policy: crate::store::Degrade,
        /// How long since the last sync round.
        quiet: Duration,
    },
}

impl Event for CircuitEvent {
    fn layer(&self) -> &'static str {
        "circuit_breaker"
    }

    fn name(&self) -> &str {
        match self {
            CircuitEvent::StateChanged { name, .. }
            | CircuitEvent::Rejected { name, .. }
            | CircuitEvent::RetryAfterClamped { name, .. } => name,
            #[cfg(feature = "redis")]
            CircuitEvent::FleetUnheard { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CircuitEvent::StateChanged { to, .. } => match to {
                CircuitState::Closed => "closed",
                CircuitState::Open => "opened",
                CircuitState::HalfOpen => "half_opened",
                CircuitState::ForcedOpen => "forced_open",
                CircuitState::Disabled => "disabled",
            },
            CircuitEvent::Rejected { .. } => "rejected",
            CircuitEvent::RetryAfterClamped { .. } => "retry_after_clamped",
            #[cfg(feature = "redis")]
            CircuitEvent::FleetUnheard { .. } => "fleet_unheard",
        }
    }

    fn is_warning(&self) -> bool {
        match self {
            CircuitEvent::StateChanged { to, .. } => {
                matches!(to, CircuitState::Open | CircuitState::ForcedOpen)
            }
            CircuitEvent::RetryAfterClamped { .. } => true,
            #[cfg(feature = "redis")]
            CircuitEvent::FleetUnheard { .. } => true,
            CircuitEvent::Rejected { .. } => false,
        }
    }
}

/// A snapshot of a breaker's counts, from [`CircuitHandle::metrics`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CircuitMetrics {
    /// The state, as [`CircuitHandle::state`] reports it.
    pub state: CircuitState,
    /// Consecutive failures so far (consecutive mode, closed).
    pub consecutive_failures: u32,
    /// Probes running (half-open).
    pub half_open_in_flight: u32,
    /// Calls in the sliding window (window mode).
    pub window_calls: u32,
    /// Failure rate over the window (window mode, once it holds a call).
    pub failure_rate: Option<f64>,
    /// Slow-call rate over the window (window mode, once it holds a call).
    pub slow_call_rate: Option<f64>,
    /// Failures recorded since the breaker was built.
    pub failures_total: u64,
    /// Calls rejected since the breaker was built.
    pub rejected_total: u64,
    /// Time left in the open period (open).
    pub open_remaining: Option<Duration>,
}
