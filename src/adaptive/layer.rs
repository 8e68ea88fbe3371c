//! The adaptive limit layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::algorithm::{Algorithm, Estimator};
use super::state::Core;
use super::{AdaptiveEvent, AdaptiveLimit};
use crate::classify::DefaultClassifier;
use crate::clock::{Clock, ClockSource};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "adaptive_limit";

/// Builds [`AdaptiveLimit`] services that all share one limit.
///
/// Made with [`AdaptiveLimitLayer::builder`]. The layer, its clones and
/// every service it makes share the limit and the calls in flight.
#[derive(Clone)]
pub struct AdaptiveLimitLayer<C = DefaultClassifier> {
    pub(crate) core: Arc<Core>,
    pub(crate) classifier: C,
}

impl AdaptiveLimitLayer {
    /// A builder with the defaults: [`Gradient`](super::Gradient), limits
    /// from 1 to 1000 starting at 20, failing fast at the limit, `Err`
    /// counting as a failure.
    pub fn builder() -> AdaptiveLimitBuilder {
        AdaptiveLimitBuilder {
            name: None,
            algorithm: Algorithm::default(),
            min_limit: 1,
            max_limit: 1000,
            initial_limit: 20,
            max_wait: Duration::ZERO,
            clock: ClockSource::Tokio,
            classifier: DefaultClassifier,
            listeners: Listeners::default(),
        }
    }
}

impl<C> AdaptiveLimitLayer<C> {
    /// A handle that reads the shared limit from outside the stack.
    pub fn handle(&self) -> AdaptiveHandle {
        AdaptiveHandle {
            core: self.core.clone(),
        }
    }
}

impl<C> fmt::Debug for AdaptiveLimitLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimitLayer")
            .field("name", &self.core.name)
            .field("limit", &self.core.limit())
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C: Clone> Layer<S> for AdaptiveLimitLayer<C> {
    type Service = AdaptiveLimit<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveLimit::from_parts(inner, self.core.clone(), self.classifier.clone())
    }
}

/// Configures an [`AdaptiveLimitLayer`]. See the [module docs](super).
pub struct AdaptiveLimitBuilder<C = DefaultClassifier> {
    name: Option<String>,
    algorithm: Algorithm,
    min_limit: usize,
    max_limit: usize,
    initial_limit: usize,
    max_wait: Duration,
    clock: ClockSource,
    classifier: C,
    listeners: Listeners<AdaptiveEvent>,
}

/// The highest `max_limit`: far above any real concurrency, and low enough
/// that the algorithms' arithmetic stays exact.
const MAX_LIMIT: usize = 1 << 32;

impl<C> AdaptiveLimitBuilder<C> {
    /// The layer's name, used in errors, events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The algorithm that moves the limit: [`Aimd`](super::Aimd),
    /// [`Gradient`](super::Gradient) (the default) or
    /// [`Vegas`](super::Vegas), each with its own settings.
    pub fn algorithm(mut self, algorithm: impl Into<Algorithm>) -> Self {
        self.algorithm = algorithm.into();
        self
    }

    /// The limit never goes below this, at least 1 (default 1).
    pub fn min_limit(mut self, n: usize) -> Self {
        self.min_limit = n;
        self
    }

    /// The limit never goes above this (default 1000).
    pub fn max_limit(mut self, n: usize) -> Self {
        self.max_limit = n;
        self
    }

    /// The limit before any call has finished, within
    /// `[min_limit, max_limit]` (default 20).
    pub fn initial_limit(mut self, n: usize) -> Self {
        self.initial_limit = n;
        self
    }

    /// How long a call may wait for a slot inside its response future
    /// (default zero: fail fast with [`LimitReached`](super::LimitReached)).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Where call latencies are read (default [`ClockSource::Tokio`]:
    /// tokio's clock, which `tokio::time::pause()` drives).
    /// `ClockSource::Fast` (feature `rate-limit`) reads the CPU's
    /// time-stamp counter instead: cheaper on a hot path (each call reads
    /// the clock twice), but blind to a paused clock. See [`ClockSource`].
    pub fn clock(mut self, source: ClockSource) -> Self {
        self.clock = source;
        self
    }

    /// What counts as a failure, which the algorithms read as a sign of
    /// overload (default: every `Err`). A call classified
    /// [`Ignore`](crate::Outcome::Ignore) is not fed to the algorithm.
    pub fn classify<C2>(self, classifier: C2) -> AdaptiveLimitBuilder<C2> {
        AdaptiveLimitBuilder {
            name: self.name,
            algorithm: self.algorithm,
            min_limit: self.min_limit,
            max_limit: self.max_limit,
            initial_limit: self.initial_limit,
            max_wait: self.max_wait,
            clock: self.clock,
            classifier,
            listeners: self.listeners,
        }
    }

    /// Calls `f` on every event (limit changes, rejections). Listeners add
    /// up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&AdaptiveEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<AdaptiveLimitLayer<C>, ConfigError> {
        let check = Check { layer: LAYER };
        check.at_least_one("min_limit", self.min_limit as u64)?;
        check.at_most("max_limit", self.max_limit as u64, MAX_LIMIT as u64)?;
        if self.max_limit < self.min_limit {
            return Err(ConfigError::new(
                LAYER,
                "max_limit",
                format!(
                    "must be at least min_limit ({} < {})",
                    self.max_limit, self.min_limit
                ),
            ));
        }
        if !(self.min_limit..=self.max_limit).contains(&self.initial_limit) {
            return Err(ConfigError::new(
                LAYER,
                "initial_limit",
                format!(
                    "must be within [min_limit, max_limit] ([{}, {}], got {})",
                    self.min_limit, self.max_limit, self.initial_limit
                ),
            ));
        }
        check_algorithm(&check, &self.algorithm)?;
        let estimator = Estimator::new(
            self.algorithm,
            self.initial_limit,
            self.min_limit,
            self.max_limit,
        );
        let core = Core::new(
            Arc::from(self.name.unwrap_or_default()),
            estimator,
            self.min_limit,
            self.max_limit,
            self.max_wait,
            self.listeners,
            Clock::with_source(self.clock),
        );
        Ok(AdaptiveLimitLayer {
            core: Arc::new(core),
            classifier: self.classifier,
        })
    }
}

fn check_algorithm(check: &Check, algorithm: &Algorithm) -> Result<(), ConfigError> {
    let range = |field, v: f64, lo: f64, hi: f64, what: &str| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(())
        } else {
            Err(ConfigError::new(
                LAYER,
                field,
                format!("must be {what} (got {v})"),
            ))
        }
    };
    match *algorithm {
        Algorithm::Aimd(a) => {
            if !(a.backoff_ratio.is_finite() && (0.5..1.0).contains(&a.backoff_ratio)) {
                return Err(ConfigError::new(
                    LAYER,
                    "backoff_ratio",
                    format!("must be in [0.5, 1) (got {})", a.backoff_ratio),
                ));
            }
            check.positive("increase", a.increase)?;
            range(
                "increase",
                a.increase,
                0.0,
                MAX_LIMIT as f64,
                "at most max_limit",
            )?;
            check.non_zero_duration("latency_threshold", a.latency_threshold)?;
        }
        Algorithm::Gradient(g) => {
            range("tolerance", g.tolerance, 1.0, 1e6, "a number from 1")?;
            check.ratio("smoothing", g.smoothing)?;
            check.at_least_one("window", u64::from(g.window))?;
            if g.long_window < g.window {
                return Err(ConfigError::new(
                    LAYER,
                    "long_window",
                    format!("must be at least window ({} < {})", g.long_window, g.window),
                ));
            }
            if let Some(q) = g.queue_size {
                range(
                    "queue_size",
                    q,
                    0.0,
                    MAX_LIMIT as f64,
                    "a number from 0 to max_limit",
                )?;
            }
        }
        Algorithm::Vegas(v) => {
            range("alpha", v.alpha, 0.0, 1e6, "a number from 0")?;
            if !(v.beta.is_finite() && v.beta > v.alpha && v.beta <= 1e6) {
                return Err(ConfigError::new(
                    LAYER,
                    "beta",
                    format!("must be above alpha ({} <= {})", v.beta, v.alpha),
                ));
            }
            check.at_least_one("probe_interval", u64::from(v.probe_interval))?;
        }
    }
    Ok(())
}

impl<C> fmt::Debug for AdaptiveLimitBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimitBuilder")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .field("min_limit", &self.min_limit)
            .field("max_limit", &self.max_limit)
            .field("initial_limit", &self.initial_limit)
            .field("max_wait", &self.max_wait)
            .field("classifier", &std::any::type_name::<C>())
            .finish_non_exhaustive()
    }
}

/// Reads an adaptive limit from outside the stack. Cheap to clone.
#[derive(Clone)]
pub struct AdaptiveHandle {
    pub(crate) core: Arc<Core>,
}

impl AdaptiveHandle {
    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The current limit: the most calls admitted at once now.
    pub fn limit(&self) -> usize {
        self.core.limit()
    }

    /// Calls holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.core.in_flight()
    }
}

impl fmt::Debug for AdaptiveHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveHandle")
            .field("name", &self.name())
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
