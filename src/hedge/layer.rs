//! The hedge layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::state::{Core, Percentile};
use super::{Hedge, HedgeEvent};
use crate::classify::DefaultClassifier;
use crate::clock::{Clock, ClockSource};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "hedge";

/// Decides which requests may be hedged (sent twice). Closures
/// `Fn(&Req) -> bool` implement it through [`HedgeBuilder::hedge_if`].
pub trait HedgePredicate<Req> {
    /// Whether `req` may be sent again while its first copy is running.
    fn can_hedge(&self, req: &Req) -> bool;
}

/// Every request may be hedged (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct HedgeAll;

impl<Req> HedgePredicate<Req> for HedgeAll {
    #[inline]
    fn can_hedge(&self, _req: &Req) -> bool {
        true
    }
}

/// A predicate made from a closure. Made by [`HedgeBuilder::hedge_if`].
#[derive(Clone, Copy)]
pub struct HedgeIf<F> {
    f: F,
}

impl<F, Req> HedgePredicate<Req> for HedgeIf<F>
where
    F: Fn(&Req) -> bool,
{
    #[inline]
    fn can_hedge(&self, req: &Req) -> bool {
        (self.f)(req)
    }
}

impl<F> fmt::Debug for HedgeIf<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeIf")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// Builds [`Hedge`] services that share one latency window and one
/// budget. Made with [`HedgeLayer::builder`].
#[derive(Clone)]
pub struct HedgeLayer<P = HedgeAll, C = DefaultClassifier> {
    pub(crate) core: Arc<Core>,
    pub(crate) predicate: P,
    pub(crate) classifier: C,
}

impl HedgeLayer {
    /// A builder with the defaults: the delay is the 95th percentile of
    /// the last 1000 attempts' latencies (at least 1 ms, once 20 were
    /// seen), one hedge per call, hedges at most 10% of calls.
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            name: None,
            delay: None,
            percentile: 0.95,
            min_delay: Duration::from_millis(1),
            min_data_points: 20,
            window: 1000,
            max_hedges: 1,
            max_extra_load: 0.1,
            clock: ClockSource::Tokio,
            predicate: HedgeAll,
            classifier: DefaultClassifier,
            listeners: Listeners::default(),
        }
    }
}

impl<P, C> HedgeLayer<P, C> {
    /// A handle that reads the shared state from outside the stack.
    pub fn handle(&self) -> HedgeHandle {
        HedgeHandle {
            core: self.core.clone(),
        }
    }
}

impl<P, C> fmt::Debug for HedgeLayer<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("name", &self.core.name)
            .field("delay", &self.core.delay())
            .field("max_hedges", &self.core.max_hedges)
            .field("predicate", &std::any::type_name::<P>())
            .finish()
    }
}

impl<S, P: Clone, C: Clone> Layer<S> for HedgeLayer<P, C> {
    type Service = Hedge<S, P, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge::from_parts(
            inner,
            self.core.clone(),
            self.predicate.clone(),
            self.classifier.clone(),
        )
    }
}

/// Configures a [`HedgeLayer`]. See the [module docs](super).
pub struct HedgeBuilder<P = HedgeAll, C = DefaultClassifier> {
    name: Option<String>,
    delay: Option<Duration>,
    percentile: f64,
    min_delay: Duration,
    min_data_points: usize,
    window: usize,
    max_hedges: u32,
    max_extra_load: f64,
    clock: ClockSource,
    predicate: P,
    classifier: C,
    listeners: Listeners<HedgeEvent>,
}

/// The largest latency window: a selection over it runs every sixteenth
/// of it, under the window's lock.
const MAX_WINDOW: usize = 1 << 16;

impl<P, C> HedgeBuilder<P, C> {
    /// The same settings with the predicate and classifier `f` makes of
    /// the current ones (the two settings that change the builder's type).
    fn retyped<P2, C2>(self, f: impl FnOnce(P, C) -> (P2, C2)) -> HedgeBuilder<P2, C2> {
        let (predicate, classifier) = f(self.predicate, self.classifier);
        HedgeBuilder {
            name: self.name,
            delay: self.delay,
            percentile: self.percentile,
            min_delay: self.min_delay,
            min_data_points: self.min_data_points,
            window: self.window,
            max_hedges: self.max_hedges,
            max_extra_load: self.max_extra_load,
            clock: self.clock,
            predicate,
            classifier,
            listeners: self.listeners,
        }
    }

    /// The layer's name, used in events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A fixed delay before a hedge is sent, instead of a percentile of
    /// observed latency.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Hedge a call still running after this percentile of recent
    /// latencies, in `(0, 1]` (default 0.95). Ignored with
    /// [`delay`](Self::delay).
    pub fn percentile(mut self, p: f64) -> Self {
        self.percentile = p;
        self
    }

    /// The shortest percentile-based delay (default 1 ms): a very fast
    /// upstream is not hedged at once.
    pub fn min_delay(mut self, d: Duration) -> Self {
        self.min_delay = d;
        self
    }

    /// Latencies to see before the percentile is trusted, at least 1 and
    /// at most `window` (default 20); no call is hedged before.
    pub fn min_data_points(mut self, n: usize) -> Self {
        self.min_data_points = n;
        self
    }

    /// How many recent latencies the percentile is taken over (default
    /// 1000, at most 65536).
    pub fn window(mut self, n: usize) -> Self {
        self.window = n;
        self
    }

    /// The most extra copies of one request, each a delay after the last
    /// (default 1).
    pub fn max_hedges(mut self, n: u32) -> Self {
        self.max_hedges = n;
        self
    }

    /// The most hedges as a share of calls (default 0.1: at most one
    /// hedge per ten calls, so a slow upstream sees at most 10% more
    /// load). Unspent share accumulates up to ten hedges. Above zero, at
    /// most `max_hedges`.
    pub fn max_extra_load(mut self, share: f64) -> Self {
        self.max_extra_load = share;
        self
    }

    /// Where call starts, hedge deadlines and latencies are read (default
    /// [`ClockSource::Tokio`]: tokio's clock, which `tokio::time::pause()`
    /// drives). `ClockSource::Fast` (feature `rate-limit`) reads the CPU's
    /// time-stamp counter instead: cheaper on a hot path, but blind to a
    /// paused clock. See [`ClockSource`].
    pub fn clock(mut self, source: ClockSource) -> Self {
        self.clock = source;
        self
    }

    /// Only requests for which `f` is true are hedged; others are sent
    /// once. With HTTP, `HedgeLayer::http_builder()` (feature `http`)
    /// already hedges only requests that may be sent twice.
    pub fn hedge_if<F, Req>(self, f: F) -> HedgeBuilder<HedgeIf<F>, C>
    where
        F: Fn(&Req) -> bool,
    {
        self.retyped(|_, classifier| (HedgeIf { f }, classifier))
    }

    /// What counts as a failed copy (default: an `Err`). A failed copy
    /// does not answer the call while another copy is still running; with
    /// HTTP, a classifier that calls 5xx responses failures lets a hedge's
    /// 200 win over the first call's 503. The classifier is given
    /// `Duration::ZERO` as the elapsed time.
    pub fn classify<C2>(self, classifier: C2) -> HedgeBuilder<P, C2> {
        self.retyped(|predicate, _| (predicate, classifier))
    }

    /// Calls `f` on every event (a hedge sent, a hedge refused by the
    /// budget). Listeners add up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&HedgeEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<HedgeLayer<P, C>, ConfigError> {
        let check = Check { layer: LAYER };
        check.at_least_one("max_hedges", u64::from(self.max_hedges))?;
        check.at_most("max_hedges", u64::from(self.max_hedges), 16)?;
        check.positive("max_extra_load", self.max_extra_load)?;
        if self.max_extra_load > f64::from(self.max_hedges) {
            return Err(ConfigError::new(
                LAYER,
                "max_extra_load",
                format!(
                    "must be at most max_hedges ({} > {})",
                    self.max_extra_load, self.max_hedges
                ),
            ));
        }
        let percentile = if self.delay.is_some() {
            None
        } else {
            check.ratio("percentile", self.percentile)?;
            check.at_least_one("window", self.window as u64)?;
            check.at_most("window", self.window as u64, MAX_WINDOW as u64)?;
            check.at_least_one("min_data_points", self.min_data_points as u64)?;
            check.at_most(
                "min_data_points",
                self.min_data_points as u64,
                self.window as u64,
            )?;
            Some(Percentile {
                p: self.percentile,
                min_delay: self.min_delay,
                min_data_points: self.min_data_points,
                window: self.window,
            })
        };
        let core = Core::new(
            Arc::from(self.name.unwrap_or_default()),
            self.delay,
            percentile,
            self.max_hedges,
            self.max_extra_load,
            self.listeners,
            Clock::with_source(self.clock),
        );
        Ok(HedgeLayer {
            core: Arc::new(core),
            predicate: self.predicate,
            classifier: self.classifier,
        })
    }
}

impl<P, C> fmt::Debug for HedgeBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeBuilder")
            .field("name", &self.name)
            .field("delay", &self.delay)
            .field("percentile", &self.percentile)
            .field("min_delay", &self.min_delay)
            .field("min_data_points", &self.min_data_points)
            .field("window", &self.window)
            .field("max_hedges", &self.max_hedges)
            .field("max_extra_load", &self.max_extra_load)
            .field("predicate", &std::any::type_name::<P>())
            .field("classifier", &std::any::type_name::<C>())
            .finish_non_exhaustive()
    }
}

/// Reads a hedge layer's state from outside the stack. Cheap to clone.
#[derive(Clone)]
pub struct HedgeHandle {
    pub(crate) core: Arc<Core>,
}

impl HedgeHandle {
    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The delay after which a call is hedged now: the fixed delay, or the
    /// percentile of recent latencies (`None` until enough were seen).
    pub fn delay(&self) -> Option<Duration> {
        self.core.delay()
    }

    /// Hedges sent since the layer was built.
    pub fn hedges(&self) -> u64 {
        self.core.hedges()
    }
}

impl fmt::Debug for HedgeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeHandle")
            .field("name", &self.name())
            .field("delay", &self.delay())
            .field("hedges", &self.hedges())
            .finish()
    }
}
