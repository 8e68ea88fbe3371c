//! The bulkhead layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::state::{Config, Core};
use super::{Bulkhead, BulkheadEvent};
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
}

impl BulkheadBuilder {
    fn new() -> Self {
        Self {
            name: None,
            max_concurrent: 10,
            max_wait: Duration::ZERO,
            soft_limit: None,
            listeners: Listeners::default(),
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
        let cfg = Config {
            name: Arc::from(self.name.unwrap_or_default()),
            capacity: self.max_concurrent,
            max_wait: self.max_wait,
            soft_limit: self.soft_limit,
        };
        Ok(BulkheadLayer {
            core: Arc::new(Core::new(cfg, self.listeners)),
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
