//! The dedup layer, its builder and its handle.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tower_layer::Layer;

use super::flight::{DedupConfig, FlightTable};
use super::{Dedup, DedupEvent, DefaultKey, KeyFn};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "dedup";

/// Makes concurrent identical requests share one inner call, and may serve
/// a finished answer again for a while. See the [module docs](super).
///
/// Each service the layer makes has its own in-flight calls and cache,
/// shared by that service's clones; services made separately (for example
/// by axum's `Router::layer`, once per route) never answer each other,
/// unless the layer was built with
/// [`share_between_services`](DedupBuilder::share_between_services).
pub struct DedupLayer<K = DefaultKey> {
    pub(crate) key: Arc<K>,
    pub(crate) registry: Arc<LayerRegistry>,
}

impl DedupLayer {
    /// A builder with the defaults: the [`DefaultKey`], no caching (in-flight
    /// sharing only), at most 10,000 keys at once.
    pub fn builder() -> DedupBuilder {
        DedupBuilder {
            key: DefaultKey,
            name: None,
            cache_ttl: None,
            error_ttl: None,
            max_entries: 10_000,
            listeners: Listeners::default(),
            share_between_services: false,
        }
    }
}

impl<K> DedupLayer<K> {
    /// A handle on the tables of every service this layer (or a clone of
    /// it) made: counts add up over them, and `clear_cache` clears them
    /// all.
    pub fn handle(&self) -> DedupHandle {
        DedupHandle {
            scope: Scope::Layer(self.registry.clone()),
        }
    }
}

impl<K> Clone for DedupLayer<K> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for DedupLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("key", &self.key)
            .field("config", &self.registry.cfg)
            .finish()
    }
}

impl<S, K> Layer<S> for DedupLayer<K> {
    type Service = Dedup<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedup::new(inner, self)
    }
}

/// A table, with its types erased so the layer can hold it before it knows
/// the request and response types.
struct TableEntry {
    any: Arc<dyn Any + Send + Sync>,
    ops: Arc<dyn TableOps>,
}

pub(crate) trait TableOps: Send + Sync {
    fn counts(&self) -> (usize, usize);
    fn clear_cache(&self);
}

impl<K, F, T> TableOps for FlightTable<K, F, T>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync,
    F: Send,
    T: Clone + Send,
{
    fn counts(&self) -> (usize, usize) {
        FlightTable::counts(self)
    }

    fn clear_cache(&self) {
        FlightTable::clear_cache(self)
    }
}

/// What every service of one layer shares: the configuration, and where
/// to find each service's tables for the layer's handle.
pub(crate) struct LayerRegistry {
    pub(crate) cfg: Arc<DedupConfig>,
    services: Mutex<Vec<Weak<ServiceTables>>>,
    /// The one table set of a layer built with `share_between_services`.
    all: Option<Arc<ServiceTables>>,
}

impl LayerRegistry {
    /// The tables of a new service, known to the layer's handle for as long
    /// as the service (or a clone of it) lives.
    pub(crate) fn service(&self) -> Arc<ServiceTables> {
        if let Some(all) = &self.all {
            return all.clone();
        }
        let tables = Arc::new(ServiceTables::new(self.cfg.clone()));
        let mut services = lock(&self.services);
        if services.len() == services.capacity() {
            // Forget services that are gone. Growing the list when at least
            // half of it is still alive keeps this O(1) amortised, so a
            // layer that makes a service per connection stays small.
            services.retain(|s| s.strong_count() > 0);
            if services.len() * 2 > services.capacity() {
                let more = services.len().max(4);
                services.reserve(more);
            }
        }
        services.push(Arc::downgrade(&tables));
        tables
    }

    fn live(&self) -> Vec<Arc<ServiceTables>> {
        if let Some(all) = &self.all {
            return vec![all.clone()];
        }
        lock(&self.services)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

/// The tables of one service made by [`Layer::layer`] (and its clones):
/// one per kind of request it was called with (normally one).
pub(crate) struct ServiceTables {
    pub(crate) cfg: Arc<DedupConfig>,
    /// The first kind's table, found without a lock: stacks that clone the
    /// service for every request (axum's routes) look it up every call.
    first: OnceLock<TableEntry>,
    /// Tables of other kinds, if the service takes several.
    others: Mutex<Vec<TableEntry>>,
}

impl ServiceTables {
    pub(crate) fn new(cfg: Arc<DedupConfig>) -> Self {
        Self {
            cfg,
            first: OnceLock::new(),
            others: Mutex::new(Vec::new()),
        }
    }

    /// The table for keys `K`, inner futures `F` and answers `T`, made on
    /// first use.
    pub(crate) fn table<K, F, T>(&self) -> Arc<FlightTable<K, F, T>>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        F: Send + 'static,
        T: Clone + Send + 'static,
    {
        let entry = || {
            let table = Arc::new(FlightTable::<K, F, T>::new(self.cfg.clone()));
            TableEntry {
                any: table.clone(),
                ops: table,
            }
        };
        let first = self.first.get_or_init(entry);
        if let Ok(table) = Arc::downcast::<FlightTable<K, F, T>>(first.any.clone()) {
            return table;
        }
        let mut others = lock(&self.others);
        for t in others.iter() {
            if let Ok(table) = Arc::downcast::<FlightTable<K, F, T>>(t.any.clone()) {
                return table;
            }
        }
        let e = entry();
        let table = Arc::downcast::<FlightTable<K, F, T>>(e.any.clone()).expect("made above");
        others.push(e);
        table
    }

    fn each(&self, mut f: impl FnMut(&dyn TableOps)) {
        if let Some(t) = self.first.get() {
            f(&*t.ops);
        }
        for t in lock(&self.others).iter() {
            f(&*t.ops);
        }
    }

    fn counts(&self) -> (usize, usize) {
        let mut sum = (0, 0);
        self.each(|t| {
            let (x, y) = t.counts();
            sum = (sum.0 + x, sum.1 + y);
        });
        sum
    }

    fn clear_cache(&self) {
        self.each(|t| t.clear_cache());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configures a [`DedupLayer`]. See the [module docs](super).
pub struct DedupBuilder<K = DefaultKey> {
    key: K,
    name: Option<String>,
    cache_ttl: Option<Duration>,
    error_ttl: Option<Duration>,
    max_entries: usize,
    listeners: Listeners<DedupEvent>,
    share_between_services: bool,
}

impl<K> DedupBuilder<K> {
    /// The key of a request, from a closure: requests with equal keys share
    /// one call; `None` leaves a request alone.
    pub fn key<F, Req, K2>(self, f: F) -> DedupBuilder<KeyFn<F, K2>>
    where
        F: Fn(&Req) -> Option<K2>,
    {
        self.key_by(KeyFn::new(f))
    }

    /// The key of a request, from any [`DedupKey`](super::DedupKey) (for
    /// example `http::dedup::HttpKey` with extra headers).
    pub fn key_by<K2>(self, key: K2) -> DedupBuilder<K2> {
        DedupBuilder {
            key,
            name: self.name,
            cache_ttl: self.cache_ttl,
            error_ttl: self.error_ttl,
            max_entries: self.max_entries,
            listeners: self.listeners,
            share_between_services: self.share_between_services,
        }
    }

    /// The layer's name, used in events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Serves a successful answer to calls with the same key for `ttl`
    /// after it arrived (default: no caching, only calls in flight are
    /// shared).
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = Some(ttl);
        self
    }

    /// Serves an error to calls with the same key for `ttl` after it
    /// arrived (negative caching; default off: the next call tries again).
    pub fn error_ttl(mut self, ttl: Duration) -> Self {
        self.error_ttl = Some(ttl);
        self
    }

    /// The most keys held at once, in flight or cached (default 10,000).
    /// When full, expired answers are dropped, then the cached answer that
    /// expires first; when every key is in flight, a new key's call goes
    /// straight to the inner service (a `full` event).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// One table for every service the layer makes, instead of one per
    /// service (default off).
    ///
    /// For stacks that apply the layer again for each connection or
    /// request to what is one upstream. axum is one: under `axum::serve`,
    /// `Router::layer` wraps each handler route anew for every connection,
    /// so without this, requests on different connections never share.
    /// Then equal keys must mean the same upstream answer in every service:
    /// [`DefaultKey`] and `http::dedup::HttpKey` include the method, the URI
    /// and `Host`, which pick the route; a key closure must include them
    /// too (or whatever tells the services apart).
    ///
    /// ```
    /// # #[cfg(feature = "http")] {
    /// use tower_bulwark::dedup::DedupLayer;
    /// use tower_bulwark::http::dedup::HttpKey;
    ///
    /// // For every route of an axum Router, on every connection.
    /// let layer = DedupLayer::builder()
    ///     .key_by(HttpKey::new())
    ///     .share_between_services()
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer; }
    /// ```
    pub fn share_between_services(mut self) -> Self {
        self.share_between_services = true;
        self
    }

    /// Calls `f` on every event (leader, joined, cache hit, full,
    /// cancelled). Listeners add up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&DedupEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<DedupLayer<K>, ConfigError> {
        let check = Check { layer: LAYER };
        check.at_least_one("max_entries", self.max_entries as u64)?;
        if let Some(d) = self.cache_ttl {
            check.non_zero_duration("cache_ttl", d)?;
        }
        if let Some(d) = self.error_ttl {
            check.non_zero_duration("error_ttl", d)?;
        }
        let cfg = DedupConfig {
            name: Arc::from(self.name.unwrap_or_default()),
            cache_ttl: self.cache_ttl,
            error_ttl: self.error_ttl,
            max_entries: self.max_entries,
            listeners: self.listeners,
        };
        let cfg = Arc::new(cfg);
        let all = self
            .share_between_services
            .then(|| Arc::new(ServiceTables::new(cfg.clone())));
        Ok(DedupLayer {
            key: Arc::new(self.key),
            registry: Arc::new(LayerRegistry {
                cfg,
                services: Mutex::new(Vec::new()),
                all,
            }),
        })
    }
}

impl<K: fmt::Debug> fmt::Debug for DedupBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupBuilder")
            .field("key", &self.key)
            .field("name", &self.name)
            .field("cache_ttl", &self.cache_ttl)
            .field("error_ttl", &self.error_ttl)
            .field("max_entries", &self.max_entries)
            .field("share_between_services", &self.share_between_services)
            .finish()
    }
}

/// Reads a dedup layer's tables from outside the stack: those of every
/// live service the layer made ([`DedupLayer::handle`]), or of one service
/// and its clones ([`Dedup::handle`](super::Dedup::handle)).
#[derive(Clone)]
pub struct DedupHandle {
    scope: Scope,
}

#[derive(Clone)]
enum Scope {
    Layer(Arc<LayerRegistry>),
    Service(Arc<ServiceTables>),
}

impl DedupHandle {
    pub(crate) fn of_service(tables: Arc<ServiceTables>) -> Self {
        Self {
            scope: Scope::Service(tables),
        }
    }

    fn services(&self) -> Vec<Arc<ServiceTables>> {
        match &self.scope {
            Scope::Layer(registry) => registry.live(),
            Scope::Service(tables) => vec![tables.clone()],
        }
    }

    fn sum(&self) -> (usize, usize) {
        self.services().iter().fold((0, 0), |(a, b), s| {
            let (x, y) = s.counts();
            (a + x, b + y)
        })
    }

    /// Shared calls in flight now. Every entry belongs to a call that can
    /// still answer it, so once every caller has its answer (or went
    /// away) this is 0.
    pub fn in_flight(&self) -> usize {
        self.sum().0
    }

    /// Answers held in the cache (some may have expired but not yet been
    /// dropped).
    pub fn cached(&self) -> usize {
        self.sum().1
    }

    /// Keys held now, in flight or cached: `in_flight() + cached()`.
    pub fn len(&self) -> usize {
        let (a, b) = self.sum();
        a + b
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every cached answer; calls in flight go on.
    pub fn clear_cache(&self) {
        for s in self.services() {
            s.clear_cache();
        }
    }

    fn cfg(&self) -> &DedupConfig {
        match &self.scope {
            Scope::Layer(registry) => &registry.cfg,
            Scope::Service(tables) => &tables.cfg,
        }
    }
}

impl fmt::Debug for DedupHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (in_flight, cached) = self.sum();
        f.debug_struct("DedupHandle")
            .field("name", &self.cfg().name)
            .field("in_flight", &in_flight)
            .field("cached", &cached)
            .finish()
    }
}
