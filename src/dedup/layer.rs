//! The dedup layer, its builder and its handle.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_layer::Layer;

use super::flight::{Config, Table};
use super::{Dedup, DedupEvent, DefaultKey, KeyFn};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "dedup";

/// Makes concurrent identical requests share one inner call, and may serve
/// a finished answer again for a while. See the [module docs](super).
///
/// Cloning the layer, and every service it makes, shares the in-flight
/// calls and the cache.
pub struct DedupLayer<K = DefaultKey> {
    pub(crate) key: Arc<K>,
    pub(crate) shared: Arc<LayerShared>,
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
        }
    }
}

impl<K> DedupLayer<K> {
    /// A handle that reads the shared table and clears its cache.
    pub fn handle(&self) -> DedupHandle {
        DedupHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K> Clone for DedupLayer<K> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for DedupLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("key", &self.key)
            .field("config", &self.shared.cfg)
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

impl<K, F, T> TableOps for Table<K, F, T>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync,
    F: Send,
    T: Clone + Send,
{
    fn counts(&self) -> (usize, usize) {
        Table::counts(self)
    }

    fn clear_cache(&self) {
        Table::clear_cache(self)
    }
}

/// What every service of one layer shares: the configuration and one table
/// per kind of service the layer wrapped (normally one).
pub(crate) struct LayerShared {
    pub(crate) cfg: Arc<Config>,
    tables: Mutex<Vec<TableEntry>>,
}

impl LayerShared {
    /// The table for keys `K`, inner futures `F` and answers `T`, made on
    /// first use.
    pub(crate) fn table<K, F, T>(&self) -> Arc<Table<K, F, T>>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        F: Send + 'static,
        T: Clone + Send + 'static,
    {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        for t in tables.iter() {
            if let Ok(table) = Arc::downcast::<Table<K, F, T>>(t.any.clone()) {
                return table;
            }
        }
        let table = Arc::new(Table::<K, F, T>::new(self.cfg.clone()));
        tables.push(TableEntry {
            any: table.clone(),
            ops: table.clone(),
        });
        table
    }
}

/// Configures a [`DedupLayer`]. See the [module docs](super).
pub struct DedupBuilder<K = DefaultKey> {
    key: K,
    name: Option<String>,
    cache_ttl: Option<Duration>,
    error_ttl: Option<Duration>,
    max_entries: usize,
    listeners: Listeners<DedupEvent>,
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
        let cfg = Config {
            name: Arc::from(self.name.unwrap_or_default()),
            cache_ttl: self.cache_ttl,
            error_ttl: self.error_ttl,
            max_entries: self.max_entries,
            listeners: self.listeners,
        };
        Ok(DedupLayer {
            key: Arc::new(self.key),
            shared: Arc::new(LayerShared {
                cfg: Arc::new(cfg),
                tables: Mutex::new(Vec::new()),
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
            .finish()
    }
}

/// Reads a dedup layer's shared table from outside the stack.
#[derive(Clone)]
pub struct DedupHandle {
    shared: Arc<LayerShared>,
}

impl DedupHandle {
    fn sum(&self) -> (usize, usize) {
        let tables = self.shared.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.iter().fold((0, 0), |(a, b), t| {
            let (x, y) = t.ops.counts();
            (a + x, b + y)
        })
    }

    /// Shared calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.sum().0
    }

    /// Answers held in the cache (some may have expired but not yet been
    /// dropped).
    pub fn cached(&self) -> usize {
        self.sum().1
    }

    /// Forgets every cached answer; calls in flight go on.
    pub fn clear_cache(&self) {
        let tables = self.shared.tables.lock().unwrap_or_else(|e| e.into_inner());
        for t in tables.iter() {
            t.ops.clear_cache();
        }
    }
}

impl fmt::Debug for DedupHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (in_flight, cached) = self.sum();
        f.debug_struct("DedupHandle")
            .field("name", &self.shared.cfg.name)
            .field("in_flight", &in_flight)
            .field("cached", &cached)
            .finish()
    }
}
