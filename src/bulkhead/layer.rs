//! The bulkhead layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_layer::Layer;

#[allow(unused_imports)]
use super::state::{Config, Core, Slots};
use super::{Bulkhead, BulkheadEvent};
use crate::backend::Backend;
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "bulkhead";

/// Builds [`Bulkhead`] services that all share one set of slots.
///
/// Made with [`BulkheadLayer::builder`]. Cloning the layer, and every
/// service it makes, shares the same slots (unlike
/// `tower::limit::ConcurrencyLimitLayer`, whose every `layer()` makes a
/// new semaphore).
#[derive(Clone)]
pub struct BulkheadLayer {
    pub(crate) core: Arc<Core>,
}

impl BulkheadLayer {
    /// A builder with the defaults: 10 calls at once, failing fast when
    /// full.
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder::new()
    }

    /// A handle that reads the shared slots from outside the stack.
    pub fn handle(&self) -> BulkheadHandle {
        BulkheadHandle {
            core: self.core.clone(),
        }
    }
}

impl fmt::Debug for BulkheadLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadLayer")
            .field("config", &self.core.cfg)
            .finish()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::from_core(inner, self.core.clone())
    }
}

/// Configures a [`BulkheadLayer`]. See the [module docs](super).
pub struct BulkheadBuilder {
    name: Option<String>,
    max_concurrent: usize,
    max_wait: Duration,
    soft_limit: Option<usize>,
    listeners: Listeners<BulkheadEvent>,
    backend: Backend,
}

impl BulkheadBuilder {
    fn new() -> Self {
        Self {
            name: None,
            max_concurrent: 10,
            max_wait: Duration::ZERO,
            soft_limit: None,
            listeners: Listeners::default(),
            backend: Backend::Memory,
        }
    }

    /// The bulkhead's name, used in errors, events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most calls running at once (default 10).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// How long a call may wait for a slot, in arrival order, inside its
    /// response future (default zero: fail fast with
    /// [`BulkheadFull`](super::BulkheadFull)).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Raises a warning event ([`BulkheadEvent::SoftLimitReached`]) each
    /// time the calls in flight climb to `n`; calls are still admitted up
    /// to `max_concurrent`. Must be below `max_concurrent`.
    pub fn soft_limit(mut self, n: usize) -> Self {
        self.soft_limit = Some(n);
        self
    }

    /// Calls `f` on every event (soft limit reached, rejections).
    /// Listeners add up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&BulkheadEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Where the slots live (default [`Backend::Memory`]): a
    /// `FileStore` shares them across the
    /// processes using one state file (the entry of the bulkhead's name,
    /// `""` when unnamed; each slot owned by a process, known by PID and
    /// start time; those of ended processes, and slots held longer than
    /// the store's `slot_timeout`, are reclaimed), a
    /// `RedisStore` across a fleet
    /// (leases at `{<prefix>:<name>}:bulkhead`, the name defaulting to
    /// `bulkhead`, renewed while the call runs and expiring the store's
    /// `lease_ttl`, 5 s by default, after a process died). See [`Backend`].
    ///
    /// On a `FileStore`, a slot given back is free at once for this
    /// process's calls and reaches the file with its next round, or
    /// within the store's `release_delay` (10 ms by default; zero writes
    /// it at once, in a lock round of its own): other processes may see it
    /// taken that much longer, never free too early.
    ///
    /// A shared bulkhead fails fast: `max_wait` and `soft_limit` need the
    /// memory backend. [`BulkheadHandle::in_flight`] reads the file, or
    /// counts this process's Redis leases.
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.backend = backend.into();
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<BulkheadLayer, ConfigError> {
        let check = Check { layer: LAYER };
        check.at_least_one("max_concurrent", self.max_concurrent as u64)?;
        check.at_most(
            "max_concurrent",
            self.max_concurrent as u64,
            Semaphore::MAX_PERMITS as u64,
        )?;
        if let Some(soft) = self.soft_limit {
            check.at_least_one("soft_limit", soft as u64)?;
            if soft >= self.max_concurrent {
                return Err(ConfigError::new(
                    LAYER,
                    "soft_limit",
                    format!(
                        "must be below max_concurrent ({soft} >= {})",
                        self.max_concurrent
                    ),
                ));
            }
        }
        if !self.backend.is_memory() {
            if !self.max_wait.is_zero() {
                return Err(ConfigError::new(
                    LAYER,
                    "max_wait",
                    "waiting for a slot needs the memory backend: a shared bulkhead fails fast",
                ));
            }
            if self.soft_limit.is_some() {
                return Err(ConfigError::new(
                    LAYER,
                    "soft_limit",
                    "needs the memory backend",
                ));
            }
            check.at_most(
                "max_concurrent",
                self.max_concurrent as u64,
                u64::from(u32::MAX),
            )?;
        }
        #[allow(unused_variables)]
        let name = self
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(LAYER);
        let shared = match &self.backend {
            Backend::Memory => None,
            #[cfg(feature = "file-store")]
            Backend::File(store) => Some(Slots::File(
                store
                    .bulkhead(self.max_concurrent as u32)?
                    .named(self.name.as_deref().unwrap_or_default()),
            )),
            #[cfg(feature = "redis")]
            Backend::Redis(store) => Some(Slots::Redis {
                bulkhead: store.bulkhead(name, self.max_concurrent as u32)?,
                here: super::state::Counter::new(),
            }),
        };
        let cfg = Config {
            name: Arc::from(self.name.unwrap_or_default()),
            capacity: self.max_concurrent,
            max_wait: self.max_wait,
            soft_limit: self.soft_limit,
        };
        Ok(BulkheadLayer {
            core: Arc::new(Core::new(cfg, self.listeners, shared)),
        })
    }
}

impl fmt::Debug for BulkheadBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadBuilder")
            .field("name", &self.name)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_wait", &self.max_wait)
            .field("soft_limit", &self.soft_limit)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Reads a bulkhead's shared slots from outside the stack.
///
/// Cheap to clone; every clone and every service of the layer see the same
/// slots.
#[derive(Clone)]
pub struct BulkheadHandle {
    pub(crate) core: Arc<Core>,
}

impl BulkheadHandle {
    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.core.cfg.name
    }

    /// Calls holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.core.in_flight()
    }

    /// Free slots now.
    pub fn available(&self) -> usize {
        self.core.cfg.capacity.saturating_sub(self.core.in_flight())
    }

    /// The most calls that run at once (`max_concurrent`).
    pub fn capacity(&self) -> usize {
        self.core.cfg.capacity
    }
}

impl fmt::Debug for BulkheadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadHandle")
            .field("name", &self.name())
            .field("in_flight", &self.in_flight())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl BulkheadLayer {
    /// A bulkhead of `max_concurrent` slots, failing fast when full, with
    /// the memory backend: the same as
    /// `BulkheadLayer::builder().max_concurrent(max_concurrent).build()`.
    ///
    /// # Panics
    ///
    /// If `max_concurrent` is 0 or above tokio's semaphore limit
    /// (`usize::MAX >> 3`), as `build()` refuses them. Use the builder to
    /// get a `ConfigError` instead.
    pub fn new(max_concurrent: usize) -> Self {
        match Self::builder().max_concurrent(max_concurrent).build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }
}
