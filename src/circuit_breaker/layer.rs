//! The breaker layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::backend::{Attached, Backend, SharedCfg};
use super::circuit::Rules;
use super::state::{Config, Core, Source};
use super::{CircuitBreaker, CircuitEvent, CircuitMetrics, CircuitState, Window};
use crate::backoff::Backoff;
use crate::classify::{DefaultClassifier, DEFAULT_MAX_RETRY_AFTER};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "circuit_breaker";

/// Builds [`CircuitBreaker`] services that all share one breaker.
///
/// Made with [`CircuitBreakerLayer::builder`]. Cloning the layer, and every
/// service it makes, shares the same state.
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    pub(crate) core: Arc<Core>,
    pub(crate) classifier: C,
}

impl CircuitBreakerLayer {
    /// A builder with the defaults: open after 5 consecutive failures, stay
    /// open 30 s, admit 1 probe at a time, close after 2 probe successes.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::new()
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A handle that reads and steers the shared state from outside the
    /// stack.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle::new(self.core.clone())
    }
}

impl<C: Clone> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.core.cfg)
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.core.clone(), self.classifier.clone())
    }
}

/// Configures a [`CircuitBreakerLayer`]. See the [module docs](super).
#[derive(Clone)]
pub struct CircuitBreakerBuilder<C = DefaultClassifier> {
    settings: Settings,
    classifier: C,
}

/// The builder's settings apart from the classifier, which alone changes
/// its type: `classify` moves them as one.
#[derive(Clone)]
struct Settings {
    name: Option<String>,
    failure_threshold: u32,
    open_timeout: Duration,
    open_backoff: Option<Backoff>,
    half_open_max_calls: u32,
    success_threshold: u32,
    window: Option<Window>,
    failure_rate_threshold: f64,
    minimum_calls: Option<u32>,
    slow_call_duration: Option<Duration>,
    slow_call_rate_threshold: f64,
    honor_retry_after: bool,
    max_retry_after: Duration,
    backend: Backend,
    stale_attempt_timeout: Duration,
    sync_interval: Duration,
    sync_interval_set: bool,
    listeners: Listeners<CircuitEvent>,
}

impl CircuitBreakerBuilder {
    fn new() -> Self {
        Self {
            settings: Settings {
                name: None,
                failure_threshold: 5,
                open_timeout: Duration::from_secs(30),
                open_backoff: None,
                half_open_max_calls: 1,
                success_threshold: 2,
                window: None,
                failure_rate_threshold: 0.5,
                minimum_calls: None,
                slow_call_duration: None,
                slow_call_rate_threshold: 1.0,
                honor_retry_after: false,
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
                backend: Backend::Memory,
                stale_attempt_timeout: Duration::from_secs(120),
                sync_interval: Duration::from_millis(500),
                sync_interval_set: false,
                listeners: Listeners::default(),
            },
            classifier: DefaultClassifier,
        }
    }
}

impl<C> CircuitBreakerBuilder<C> {
    /// The breaker's name, used in errors, events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = Some(name.into());
        self
    }

    /// Consecutive failures that open a closed breaker (default 5). Used
    /// when no [`window`](Self::window) is set.
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.settings.failure_threshold = n;
        self
    }

    /// How long the breaker stays open before admitting a probe (default
    /// 30 s).
    pub fn open_timeout(mut self, d: Duration) -> Self {
        self.settings.open_timeout = d;
        self
    }

    /// Lets the open duration grow when probes keep failing: the `n`th
    /// open period in a row lasts `backoff.delay(n)` (jittered if the
    /// back-off says so, and capped by its `max_delay`). Its base delay
    /// must be longer than zero. Replaces [`open_timeout`](Self::open_timeout).
    pub fn open_backoff(mut self, backoff: Backoff) -> Self {
        self.settings.open_backoff = Some(backoff);
        self
    }

    /// Probes admitted at once while half-open (default 1).
    pub fn half_open_max_calls(mut self, n: u32) -> Self {
        self.settings.half_open_max_calls = n;
        self
    }

    /// Probe successes that close a half-open breaker (default 2). A
    /// single failed probe opens it again.
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.settings.success_threshold = n;
        self
    }

    /// Switches from consecutive failures to a failure rate over a sliding
    /// window of calls ([`Window::count`]) or of time ([`Window::time`]).
    pub fn window(mut self, window: Window) -> Self {
        self.settings.window = Some(window);
        self
    }

    /// The failure rate in `(0, 1]` that opens the breaker in window mode
    /// (default 0.5).
    pub fn failure_rate_threshold(mut self, rate: f64) -> Self {
        self.settings.failure_rate_threshold = rate;
        self
    }

    /// Calls the window must hold before its rates are judged (default 10,
    /// or the count window's size if smaller). Honoured before a count
    /// window is full.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.settings.minimum_calls = Some(n);
        self
    }

    /// A call taking at least `d` is slow. In window mode slow calls have
    /// their own rate threshold ([`slow_call_rate_threshold`](Self::slow_call_rate_threshold));
    /// in consecutive mode, and for probes, a slow call counts as a failure.
    /// Setting this makes the breaker read the clock twice per call.
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.settings.slow_call_duration = Some(d);
        self
    }

    /// The slow-call rate in `(0, 1]` that opens the breaker in window mode
    /// (default 1.0).
    pub fn slow_call_rate_threshold(mut self, rate: f64) -> Self {
        self.settings.slow_call_rate_threshold = rate;
        self
    }

    /// Holds the breaker open for at least an upstream's back-off hint
    /// (with the `http` feature's `StatusClassifier`: the `Retry-After` of a
    /// 429 or 503 answer). Off by default.
    pub fn honor_retry_after(mut self, yes: bool) -> Self {
        self.settings.honor_retry_after = yes;
        self
    }

    /// The longest an upstream's back-off hint may hold the breaker open
    /// (default [`DEFAULT_MAX_RETRY_AFTER`], 60 s, the same cap as the rate
    /// limiter's and retry's). A longer hint is cut to this, and a
    /// [`CircuitEvent::RetryAfterClamped`] event says so: a hint is the
    /// upstream's word, and one bad header must not shut a service out
    /// for years.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.settings.max_retry_after = d;
        self
    }

    /// Decides which results are failures (default: every `Err`).
    pub fn classify<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            settings: self.settings,
            classifier,
        }
    }

    /// Where the breaker keeps its state (default [`Backend::Memory`]): a
    /// `store::file::FileStore` shares it across processes, a
    /// `store::redis::RedisStore` across a fleet. See [`Backend`].
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.settings.backend = backend.into();
        self
    }

    /// Shared backends: how long a half-open probe reservation may stay
    /// unanswered before it is taken to be from a crashed or hung process
    /// and freed (default 2 min, at least 1 ms). Make it longer than your
    /// slowest call.
    pub fn stale_attempt_timeout(mut self, d: Duration) -> Self {
        self.settings.stale_attempt_timeout = d;
        self
    }

    /// Redis backend: how often each process syncs with the fleet (default
    /// 500 ms, so a state change is seen fleet-wide within about 1 s). An
    /// opening is reported at once.
    pub fn sync_interval(mut self, d: Duration) -> Self {
        self.settings.sync_interval = d;
        self.settings.sync_interval_set = true;
        self
    }

    /// Calls `f` on every event (state changes, rejections). Listeners add
    /// up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&CircuitEvent) + Send + Sync + 'static) -> Self {
        self.settings.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        let (v, classifier) = self.validate()?;
        let attached = match v.backend {
            Backend::Memory => Attached::Memory,
            #[cfg(feature = "file-store")]
            Backend::File(store) => Attached::File(super::file::FileBreaker {
                store,
                name: v.cfg.name.to_string(),
                rules: v.cfg.rules,
                stale_attempt_timeout: v.shared.stale_attempt_timeout,
                seen: Default::default(),
            }),
            #[cfg(feature = "redis")]
            Backend::Redis(store) => {
                Attached::Redis(super::fleet::FleetSync::new(store, &v.cfg, &v.shared))
            }
        };
        Ok(CircuitBreakerLayer {
            core: Arc::new(Core::new(v.cfg, v.listeners, attached)),
            classifier,
        })
    }

    /// Checks every setting; the parts a layer is made of.
    pub(crate) fn validate(self) -> Result<(Validated, C), ConfigError> {
        let check = Check { layer: LAYER };
        let s = self.settings;
        check.at_least_one("failure_threshold", u64::from(s.failure_threshold))?;
        check.at_least_one("half_open_max_calls", u64::from(s.half_open_max_calls))?;
        check.at_least_one("success_threshold", u64::from(s.success_threshold))?;
        check.non_zero_duration("open_timeout", s.open_timeout)?;
        if let Some(b) = &s.open_backoff {
            b.validate(LAYER, "open_backoff")?;
            // Like open_timeout: an opening of zero would never reject.
            if b.base().is_zero() {
                return Err(ConfigError::new(
                    LAYER,
                    "open_backoff",
                    "the base delay must be longer than zero",
                ));
            }
        }
        check.ratio("failure_rate_threshold", s.failure_rate_threshold)?;
        check.ratio("slow_call_rate_threshold", s.slow_call_rate_threshold)?;
        if let Some(d) = s.slow_call_duration {
            check.non_zero_duration("slow_call_duration", d)?;
        }
        check.non_zero_duration("max_retry_after", s.max_retry_after)?;
        let minimum_calls = match (s.window, s.minimum_calls) {
            (Some(Window::Count(0)), _) => {
                return Err(ConfigError::new(
                    LAYER,
                    "window",
                    "a count window needs at least 1 call",
                ))
            }
            (Some(Window::Time(d)), _) if d.is_zero() => {
                return Err(ConfigError::new(
                    LAYER,
                    "window",
                    "a time window must be longer than zero",
                ))
            }
            (Some(Window::Count(n)), Some(m)) if m > n => {
                return Err(ConfigError::new(
                    LAYER,
                    "minimum_calls",
                    format!("must not exceed the count window size ({m} > {n})"),
                ))
            }
            (_, Some(m)) => {
                check.at_least_one("minimum_calls", u64::from(m))?;
                m
            }
            (Some(Window::Count(n)), None) => n.min(10),
            (_, None) => 10,
        };
        if s.stale_attempt_timeout < Duration::from_millis(1) {
            // Shared backends time probe reservations in whole
            // milliseconds: a shorter timeout would free every reservation
            // at once, and half_open_max_calls would bound nothing.
            return Err(ConfigError::new(
                LAYER,
                "stale_attempt_timeout",
                format!("must be at least 1 ms (got {:?})", s.stale_attempt_timeout),
            ));
        }
        check.non_zero_duration("sync_interval", s.sync_interval)?;
        if s.sync_interval_set && !s.backend.is_redis() {
            return Err(ConfigError::new(
                LAYER,
                "sync_interval",
                "only a breaker on the Redis backend syncs with a fleet",
            ));
        }
        if !s.backend.is_memory() && s.window.is_some() {
            return Err(ConfigError::new(
                LAYER,
                "window",
                "the file and Redis backends count consecutive failures: use the memory backend for a window",
            ));
        }
        let cfg = Config {
            name: Arc::from(s.name.unwrap_or_default()),
            rules: Rules {
                failure_threshold: s.failure_threshold,
                success_threshold: s.success_threshold,
                half_open_max_calls: s.half_open_max_calls,
                open_timeout: s.open_timeout,
                open_backoff: s.open_backoff,
            },
            window: s.window,
            failure_rate_threshold: s.failure_rate_threshold,
            minimum_calls,
            slow_call_duration: s.slow_call_duration,
            slow_call_rate_threshold: s.slow_call_rate_threshold,
            honor_retry_after: s.honor_retry_after,
            max_retry_after: s.max_retry_after,
        };
        let shared = SharedCfg {
            stale_attempt_timeout: s.stale_attempt_timeout,
            sync_interval: s.sync_interval,
        };
        let v = Validated {
            cfg,
            shared,
            backend: s.backend,
            listeners: s.listeners,
        };
        Ok((v, self.classifier))
    }
}

/// A breaker configuration that passed [`CircuitBreakerBuilder::validate`].
pub(crate) struct Validated {
    pub(crate) cfg: Config,
    #[cfg_attr(not(any(feature = "file-store", feature = "redis")), allow(dead_code))]
    pub(crate) shared: SharedCfg,
    pub(crate) backend: Backend,
    pub(crate) listeners: Listeners<CircuitEvent>,
}

impl<C> fmt::Debug for CircuitBreakerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("name", &self.settings.name)
            .field("failure_threshold", &self.settings.failure_threshold)
            .field("open_timeout", &self.settings.open_timeout)
            .field("half_open_max_calls", &self.settings.half_open_max_calls)
            .field("success_threshold", &self.settings.success_threshold)
            .field("window", &self.settings.window)
            .field("classifier", &std::any::type_name::<C>())
            .finish_non_exhaustive()
    }
}

/// Reads and steers a breaker's shared state from outside the stack.
///
/// Cheap to clone; every clone and every service of the layer see the same
/// state.
#[derive(Clone)]
pub struct CircuitHandle {
    core: Arc<Core>,
}

impl CircuitHandle {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    fn core(&self) -> &Core {
        &self.core
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.core().cfg.name
    }

    /// The current state. An open breaker whose timeout has passed reports
    /// [`CircuitState::HalfOpen`]: the next call will probe.
    ///
    /// With the file backend this reads the state file; with Redis it
    /// first takes in the fleet's latest view.
    pub fn state(&self) -> CircuitState {
        self.core().state()
    }

    /// Closes the breaker and clears its counts (here and, with a shared
    /// backend, for every process).
    pub fn reset(&self) {
        self.core().force(CircuitState::Closed, Source::Local);
    }

    /// Rejects every call until [`reset`](Self::reset) (or
    /// [`disable`](Self::disable)).
    pub fn force_open(&self) {
        self.core().force(CircuitState::ForcedOpen, Source::Local);
    }

    /// Admits every call and never opens, until [`reset`](Self::reset):
    /// the breaker only keeps its counts. (With the Redis backend, only in
    /// this process.)
    pub fn disable(&self) {
        self.core().force(CircuitState::Disabled, Source::Local);
    }

    /// Holds the breaker open for at least `d` from now, as an upstream's
    /// `Retry-After` would. A longer open period is kept.
    pub fn hold_open(&self, d: Duration) {
        self.core().hold_open(d, Source::Local);
    }

    /// A snapshot of the breaker's counts. With the file backend, state and
    /// counts come from the file; totals are this process's.
    pub fn metrics(&self) -> CircuitMetrics {
        self.core().snapshot()
    }
}

impl fmt::Debug for CircuitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitHandle")
            .field("name", &self.name())
            .field("state", &self.state())
            .finish()
    }
}

impl Default for CircuitBreakerLayer {
    /// A breaker with the defaults (see [`CircuitBreakerLayer::builder`]):
    /// open after 5 consecutive failures, stay open 30 s, 1 probe at a
    /// time, close after 2 probe successes; every `Err` a failure.
    fn default() -> Self {
        match Self::builder().build() {
            Ok(layer) => layer,
            Err(e) => unreachable!("the default breaker config is valid: {e}"),
        }
    }
}

// Lets one configuration build several independent breakers (the fallback
// layer makes one per entry).
