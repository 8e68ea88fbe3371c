//! The limiter layer, its builder, its handle, and the key and cost
//! adapters.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::gcra::{Params, MAX_TAU};
use super::keyed::KeyMap;
use super::remote::StoreBuckets;
use super::state::{Config, Core};
use super::{RateLimit, RateLimitEvent};
use crate::backend::Backend;
use crate::classify::{DefaultClassifier, DEFAULT_MAX_RETRY_AFTER};
use crate::clock::{nanos, Clock, ClockSource};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "rate_limit";

/// The default key: one bucket for every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

/// A bucket per key, the key taken from each request by a closure. Made
/// by [`RateLimitBuilder::key`].
pub struct Keyed<F, K> {
    pub(crate) f: F,
    pub(crate) map: KeyMap<K>,
    /// Names a key in Redis; set by the keyed builder's `backend`.
    pub(crate) remote_key: Option<fn(&K) -> String>,
}

impl<F, K> fmt::Debug for Keyed<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("key", &std::any::type_name::<F>())
            .finish_non_exhaustive()
    }
}

/// The tokens one request costs.
///
/// Return `None` for the builder's
/// [`tokens_per_request`](RateLimitBuilder::tokens_per_request). A closure
/// `Fn(&Req) -> f64` becomes a `Cost` through [`RateLimitBuilder::cost`]:
///
/// ```
/// use tower_bulwark::rate_limit::RateLimitLayer;
///
/// struct Prompt { text: String }
///
/// # fn main() -> Result<(), tower_bulwark::ConfigError> {
/// // A budget of 10,000 prompt bytes, refilled at 500 a second.
/// let layer = RateLimitLayer::builder()
///     .max_tokens(10_000.0)
///     .refill_rate(500.0)
///     .cost(|p: &Prompt| p.text.len() as f64)
///     .build()?;
/// # Ok(()) }
/// ```
pub trait Cost<Req> {
    /// The cost of `req` in tokens, or `None` for the default.
    fn cost(&self, req: &Req) -> Option<f64>;
}

/// Every request costs `tokens_per_request`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedCost;

impl<Req> Cost<Req> for FixedCost {
    #[inline]
    fn cost(&self, _req: &Req) -> Option<f64> {
        None
    }
}

/// A [`Cost`] from a closure. Made by [`RateLimitBuilder::cost`].
#[derive(Clone, Copy)]
pub struct CostFn<F> {
    f: F,
}

impl<F, Req> Cost<Req> for CostFn<F>
where
    F: Fn(&Req) -> f64,
{
    #[inline]
    fn cost(&self, req: &Req) -> Option<f64> {
        Some((self.f)(req))
    }
}

impl<F> fmt::Debug for CostFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// What every service of a layer shares: the core and the request-typed
/// parts, behind one `Arc`.
#[derive(Debug)]
pub(crate) struct LayerState<K, C, H> {
    pub(crate) core: Core,
    pub(crate) key: K,
    pub(crate) cost: C,
    /// Reads upstream back-off hints from results, when asked to.
    pub(crate) hint: Option<H>,
}

/// Builds [`RateLimit`] services that all share one limiter.
///
/// Made with [`RateLimitLayer::builder`]. Cloning the layer, and every
/// service it makes, shares the same buckets.
pub struct RateLimitLayer<K = Global, C = FixedCost, H = DefaultClassifier> {
    pub(crate) shared: Arc<LayerState<K, C, H>>,
}

impl RateLimitLayer {
    /// A builder with the defaults: a bucket of 50 tokens refilled at 10 a
    /// second, 1 token a request, rejecting at once when empty.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::new()
    }
}

impl<C, H> RateLimitLayer<Global, C, H>
where
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    /// A handle that reads and steers the shared state from outside the
    /// stack.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<F, K, C, H> RateLimitLayer<Keyed<F, K>, C, H>
where
    F: Send + Sync + 'static,
    K: Hash + Eq + Send + Sync + 'static,
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    /// A handle that reads and steers the shared state from outside the
    /// stack.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            shared: self.shared.clone(),
        }
    }

    /// Tokens available now in `key`'s bucket.
    pub fn tokens_for(&self, key: &K) -> f64 {
        let core = &self.shared.core;
        self.shared
            .key
            .map
            .tokens(key, core.clock.now(), &core.params)
    }
}

impl<K, C, H> Clone for RateLimitLayer<K, C, H> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K: fmt::Debug, C: fmt::Debug, H> fmt::Debug for RateLimitLayer<K, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("config", &self.shared.core.cfg)
            .field(
                "max_wait",
                &Duration::from_nanos(self.shared.core.params.max_wait),
            )
            .field("key", &self.shared.key)
            .field("cost", &self.shared.cost)
            .finish()
    }
}

impl<S, K, C, H> Layer<S> for RateLimitLayer<K, C, H> {
    type Service = RateLimit<S, K, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_shared(inner, self.shared.clone())
    }
}

/// Configures a [`RateLimitLayer`]. See the [module docs](super).
pub struct RateLimitBuilder<K = Global, C = FixedCost, H = DefaultClassifier> {
    settings: Settings,
    key: K,
    cost: C,
    hint: Option<H>,
}

/// The builder's settings that do not change its type, so the methods that
/// do (`key`, `cost`, `retry_after_from`) move them as one.
struct Settings {
    name: Option<String>,
    max_tokens: f64,
    refill_rate: f64,
    tokens_per_request: f64,
    max_wait: Duration,
    max_retry_after: Duration,
    max_keys: usize,
    clock: ClockSource,
    /// Whether `clock` was chosen (a file backend cannot follow it).
    clock_chosen: bool,
    listeners: Listeners<RateLimitEvent>,
    backend: Backend,
}

impl RateLimitBuilder {
    fn new() -> Self {
        Self {
            settings: Settings {
                name: None,
                max_tokens: 50.0,
                refill_rate: 10.0,
                tokens_per_request: 1.0,
                max_wait: Duration::ZERO,
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
                max_keys: 100_000,
                clock: ClockSource::default(),
                clock_chosen: false,
                listeners: Listeners::default(),
                backend: Backend::Memory,
            },
            key: Global,
            cost: FixedCost,
            hint: None,
        }
    }
}

impl<K, C, H> RateLimitBuilder<K, C, H> {
    /// The limiter's name, used in errors, events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = Some(name.into());
        self
    }

    /// The bucket's size: the largest burst (default 50).
    pub fn max_tokens(mut self, n: f64) -> Self {
        self.settings.max_tokens = n;
        self
    }

    /// Tokens added per second (default 10).
    pub fn refill_rate(mut self, per_second: f64) -> Self {
        self.settings.refill_rate = per_second;
        self
    }

    /// Tokens one request costs when no [`cost`](Self::cost) function says
    /// otherwise (default 1).
    pub fn tokens_per_request(mut self, n: f64) -> Self {
        self.settings.tokens_per_request = n;
        self
    }

    /// How long a request may wait for its tokens inside its response
    /// future (default zero: reject at once). A request that would wait
    /// longer is rejected at once with the time it would have needed. A
    /// waiting request dropped before its call gives its tokens back, to
    /// the bucket or to the next request that would otherwise wait (see
    /// the [module docs](super#cancellation)).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.settings.max_wait = d;
        self
    }

    /// The most keys a keyed limiter remembers (default 100,000). See
    /// [`key`](Self::key).
    ///
    /// Full buckets are forgotten first, which changes no decision. When
    /// more keys than this are still refilling, the ones closest to full
    /// are forgotten, and until time has refilled them, keys not
    /// remembered (those, and new ones that hash alike) start no fuller
    /// than the emptiest of them: a flood of new keys never lets a key
    /// start over with a full bucket, at the price of making new keys wait
    /// their turn while the flood lasts.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.settings.max_keys = n;
        self
    }

    /// Gives each key its own bucket, the key read from each request by
    /// `f` (a client IP, an API key). Memory stays bounded: full buckets
    /// are forgotten (losslessly), and at most
    /// [`max_keys`](Self::max_keys) are kept, without a forgotten key ever
    /// being better off for it.
    ///
    /// ```
    /// use tower_bulwark::rate_limit::RateLimitLayer;
    ///
    /// struct Req { api_key: String }
    ///
    /// # fn main() -> Result<(), tower_bulwark::ConfigError> {
    /// let per_client = RateLimitLayer::builder()
    ///     .max_tokens(5.0)
    ///     .refill_rate(1.0)
    ///     .key(|r: &Req| r.api_key.clone())
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn key<Req, K2, F>(self, f: F) -> RateLimitBuilder<Keyed<F, K2>, C, H>
    where
        F: Fn(&Req) -> K2,
        K2: Hash + Eq,
    {
        RateLimitBuilder {
            settings: self.settings,
            key: Keyed {
                f,
                map: KeyMap::new(1),
                remote_key: None,
            },
            cost: self.cost,
            hint: self.hint,
        }
    }

    /// Charges each request the tokens `f` returns, such as an LLM
    /// prompt's token count. A cost above `max_tokens` (or negative, or
    /// NaN) fails the call with [`CostTooHigh`](super::CostTooHigh).
    pub fn cost<Req, F>(self, f: F) -> RateLimitBuilder<K, CostFn<F>, H>
    where
        F: Fn(&Req) -> f64,
    {
        RateLimitBuilder {
            settings: self.settings,
            key: self.key,
            cost: CostFn { f },
            hint: self.hint,
        }
    }

    /// Blocks the limiter when an upstream asks for a pause: `classifier`'s
    /// [`retry_after`](crate::classify::Classify::retry_after) is read from
    /// every result (with the `http` feature, `http::StatusClassifier`
    /// reads `Retry-After` from 429 and 503 answers), and nothing is
    /// admitted until then, as
    /// [`set_retry_after`](RateLimitHandle::set_retry_after) does.
    pub fn retry_after_from<H2>(self, classifier: H2) -> RateLimitBuilder<K, C, H2> {
        RateLimitBuilder {
            settings: self.settings,
            key: self.key,
            cost: self.cost,
            hint: Some(classifier),
        }
    }

    /// The longest pause an upstream's hint can impose through
    /// [`retry_after_from`](Self::retry_after_from) (default
    /// [`DEFAULT_MAX_RETRY_AFTER`], one minute). A longer `Retry-After` is
    /// never trusted: the limiter blocks for this long instead and raises
    /// [`RateLimitEvent::RetryAfterClamped`]. Zero ignores hints.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.settings.max_retry_after = d;
        self
    }

    /// Where the limiter reads the time: by default tokio's clock, which
    /// `tokio::time::pause()` drives, or the CPU's time-stamp counter
    /// ([`ClockSource::Fast`]), faster on a hot path. See [`ClockSource`].
    /// A file backend keeps wall-clock time and refuses this setting.
    pub fn clock(mut self, source: ClockSource) -> Self {
        self.settings.clock = source;
        self.settings.clock_chosen = true;
        self
    }

    /// Calls `f` on every event (rejections, upstream blocks, evictions).
    /// Listeners add up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&RateLimitEvent) + Send + Sync + 'static) -> Self {
        self.settings.listeners.push(f);
        self
    }

    fn core(&self) -> Result<Core, ConfigError> {
        let check = Check { layer: LAYER };
        if !self.settings.backend.is_memory() && !self.settings.max_wait.is_zero() {
            return Err(ConfigError::new(
                LAYER,
                "max_wait",
                "waiting for tokens needs the memory backend: a shared bucket rejects at once",
            ));
        }
        #[cfg(feature = "file-store")]
        if matches!(self.settings.backend, Backend::File(_)) && self.settings.clock_chosen {
            return Err(ConfigError::new(
                LAYER,
                "clock",
                "a state file keeps wall-clock time, shared by every process: it cannot follow another clock",
            ));
        }
        check.positive("max_tokens", self.settings.max_tokens)?;
        check.positive("refill_rate", self.settings.refill_rate)?;
        check.positive("tokens_per_request", self.settings.tokens_per_request)?;
        if self.settings.tokens_per_request > self.settings.max_tokens {
            return Err(ConfigError::new(
                LAYER,
                "tokens_per_request",
                format!(
                    "must not exceed max_tokens ({} > {})",
                    self.settings.tokens_per_request, self.settings.max_tokens
                ),
            ));
        }
        check.at_least_one("max_keys", self.settings.max_keys as u64)?;
        let params = Params::new(
            self.settings.max_tokens,
            self.settings.refill_rate,
            nanos(self.settings.max_wait),
        );
        if params.tau > MAX_TAU {
            return Err(ConfigError::new(
                LAYER,
                "refill_rate",
                format!(
                    "is too slow for max_tokens: refilling {} tokens at {}/s would take more than 73 years",
                    self.settings.max_tokens, self.settings.refill_rate
                ),
            ));
        }
        if params.increment(self.settings.tokens_per_request).is_none() {
            return Err(ConfigError::new(
                LAYER,
                "max_tokens",
                "is too large for this refill_rate",
            ));
        }
        let cfg = Config {
            name: Arc::from(self.settings.name.as_deref().unwrap_or_default()),
            max_tokens: self.settings.max_tokens,
            tokens_per_request: self.settings.tokens_per_request,
            max_retry_after: self.settings.max_retry_after,
        };
        let mut core = Core::new(
            cfg,
            params,
            Clock::with_source(self.settings.clock),
            self.settings.listeners.clone(),
        );
        core.remote = self.remote()?;
        Ok(core)
    }

    /// The shared bucket(s) of a file or Redis backend.
    fn remote(&self) -> Result<Option<StoreBuckets>, ConfigError> {
        Ok(match &self.settings.backend {
            Backend::Memory => None,
            #[cfg(feature = "file-store")]
            Backend::File(store) => Some(StoreBuckets::File(
                store
                    .rate_limiter(self.settings.max_tokens, self.settings.refill_rate)?
                    .named(self.settings.name.as_deref().unwrap_or_default()),
            )),
            #[cfg(feature = "redis")]
            Backend::Redis(store) => {
                let name = self.settings.name.as_deref().filter(|n| !n.is_empty());
                Some(StoreBuckets::Redis(Arc::new(store.rate_limiter(
                    name.unwrap_or(LAYER),
                    self.settings.max_tokens,
                    self.settings.refill_rate,
                )?)))
            }
        })
    }
}

impl<C, H> RateLimitBuilder<Global, C, H> {
    /// Where the bucket lives (default [`Backend::Memory`]): a
    /// `FileStore` shares it across the
    /// processes using one state file (the entry of the limiter's name,
    /// `""` when unnamed), a
    /// `RedisStore` across a fleet
    /// (its Redis key is `{<prefix>:<name>}:gcra`, the name defaulting to
    /// `rate_limit`). Both run the same GCRA as the memory backend. See
    /// [`Backend`] and the `store` module for how to stack it with a
    /// shared breaker.
    ///
    /// A shared bucket rejects at once (`max_wait` must stay zero). A file
    /// keeps wall-clock time (`clock` must stay unset). With Redis, an
    /// upstream's `Retry-After` is kept by this process only.
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.settings.backend = backend.into();
        self
    }
}

impl<F, K: fmt::Display, C, H> RateLimitBuilder<Keyed<F, K>, C, H> {
    /// Where the buckets live (default [`Backend::Memory`]). With a
    /// `RedisStore`, each key's GCRA
    /// word lives in Redis at `{<prefix>:<name>}:gcra:<key>` (the key
    /// written with `Display`), shared exactly across the fleet. The file
    /// backend keeps one entry per limiter name, not per key, and is
    /// refused for a keyed limiter. Call it after [`key`](RateLimitBuilder::key).
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.settings.backend = backend.into();
        self.key.remote_key = Some(<K as ToString>::to_string);
        self
    }
}

impl<C, H> RateLimitBuilder<Global, C, H> {
    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<RateLimitLayer<Global, C, H>, ConfigError> {
        let core = self.core()?;
        Ok(RateLimitLayer {
            shared: Arc::new(LayerState {
                core,
                key: Global,
                cost: self.cost,
                hint: self.hint,
            }),
        })
    }
}

impl<F, K: Hash + Eq, C, H> RateLimitBuilder<Keyed<F, K>, C, H> {
    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<RateLimitLayer<Keyed<F, K>, C, H>, ConfigError> {
        match &self.settings.backend {
            Backend::Memory => {}
            #[cfg(feature = "file-store")]
            Backend::File(_) => return Err(ConfigError::new(
                LAYER,
                "backend",
                "a state file keeps one bucket per limiter name, not per key: a keyed limiter needs the memory or Redis backend",
            )),
            #[allow(unreachable_patterns)]
            _ if self.key.remote_key.is_none() => {
                return Err(ConfigError::new(
                    LAYER,
                    "backend",
                    "set a shared backend after `.key(...)`, whose key must implement Display",
                ))
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
        let core = self.core()?;
        Ok(RateLimitLayer {
            shared: Arc::new(LayerState {
                core,
                key: Keyed {
                    f: self.key.f,
                    map: KeyMap::new(self.settings.max_keys),
                    remote_key: self.key.remote_key,
                },
                cost: self.cost,
                hint: self.hint,
            }),
        })
    }
}

impl<K, C, H> fmt::Debug for RateLimitBuilder<K, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("name", &self.settings.name)
            .field("max_tokens", &self.settings.max_tokens)
            .field("refill_rate", &self.settings.refill_rate)
            .field("tokens_per_request", &self.settings.tokens_per_request)
            .field("max_wait", &self.settings.max_wait)
            .field("max_retry_after", &self.settings.max_retry_after)
            .field("max_keys", &self.settings.max_keys)
            .field("key", &std::any::type_name::<K>())
            .field("cost", &std::any::type_name::<C>())
            .field("backend", &self.settings.backend)
            .finish_non_exhaustive()
    }
}

/// What a handle needs from a layer's shared state, whatever its key.
pub(crate) trait HandleOps: Send + Sync {
    fn core(&self) -> &Core;
    fn keys(&self) -> usize;
    fn clear_keys(&self);
}

impl<C: Send + Sync, H: Send + Sync> HandleOps for LayerState<Global, C, H> {
    fn core(&self) -> &Core {
        &self.core
    }
    fn keys(&self) -> usize {
        0
    }
    fn clear_keys(&self) {}
}

impl<F: Send + Sync, K: Hash + Eq + Send + Sync, C: Send + Sync, H: Send + Sync> HandleOps
    for LayerState<Keyed<F, K>, C, H>
{
    fn core(&self) -> &Core {
        &self.core
    }
    fn keys(&self) -> usize {
        self.key.map.len()
    }
    fn clear_keys(&self) {
        self.key.map.clear();
    }
}

/// Reads and steers a limiter's shared state from outside the stack.
///
/// Cheap to clone; every clone and every service of the layer see the same
/// state.
#[derive(Clone)]
pub struct RateLimitHandle {
    shared: Arc<dyn HandleOps>,
}

impl RateLimitHandle {
    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.shared.core().cfg.name
    }

    /// Tokens available now. For a keyed limiter, this is the bucket an
    /// upstream block is kept in, which is full unless one is in force.
    pub fn tokens(&self) -> f64 {
        self.shared.core().tokens()
    }

    /// Admits nothing for `d` from now, as an upstream's `Retry-After`
    /// asks. Afterwards the bucket refills from
    /// holding a single request. A longer block already in force is kept.
    pub fn set_retry_after(&self, d: Duration) {
        self.shared.core().block_for(d);
    }

    /// Time left in an upstream block, if one is in force.
    pub fn blocked_for(&self) -> Option<Duration> {
        let core = self.shared.core();
        core.blocked(core.clock.now()).map(Duration::from_nanos)
    }

    /// Fills every bucket and lifts any block.
    pub fn reset(&self) {
        self.shared.core().reset();
        self.shared.clear_keys();
    }

    /// Keys remembered by a keyed limiter (0 when unkeyed).
    pub fn keys(&self) -> usize {
        self.shared.keys()
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("name", &self.name())
            .field("tokens", &self.tokens())
            .finish()
    }
}

impl RateLimitLayer {
    /// A limit of `n` calls a second with bursts of up to `n`: a bucket of
    /// `n` tokens refilled at `n` a second, 1 token a call, rejecting at
    /// once when empty. The same as
    /// `RateLimitLayer::builder().max_tokens(n as f64).refill_rate(n as f64).build()`.
    ///
    /// # Panics
    ///
    /// If `n` is 0. Use the builder to get a `ConfigError` instead.
    pub fn per_second(n: u32) -> Self {
        let n = f64::from(n);
        match Self::builder().max_tokens(n).refill_rate(n).build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }
}
