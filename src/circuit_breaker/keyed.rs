//! A breaker per key: one upstream host, tenant or route each, with the
//! full breaker semantics, in a table of bounded size.
//!
//! Made with `CircuitBreakerLayer::builder()...key(|req| ...)`: every
//! setting of the plain builder applies to each key's breaker. See the
//! [module docs](super#keyed-breakers).

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::backend::Attached;
use super::future::ResponseFuture;
use super::layer::{CircuitBreakerBuilder, Validated};
use super::service::call_through;
use super::state::{Config, Core};
use super::{CircuitEvent, CircuitHandle, CircuitState};
use crate::classify::{Classify, DefaultClassifier};
use crate::error::{BoxError, Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "circuit_breaker";

/// The default bound on the number of keys.
const DEFAULT_MAX_KEYS: usize = 1024;

/// Configures a [`KeyedCircuitBreakerLayer`]: made by
/// [`CircuitBreakerBuilder::key`].
pub struct KeyedCircuitBreakerBuilder<K, F, C = DefaultClassifier> {
    breaker: CircuitBreakerBuilder<C>,
    key: F,
    max_keys: usize,
    _key: PhantomData<fn() -> K>,
}

impl<C> CircuitBreakerBuilder<C> {
    /// One breaker per key: `f` names the key of a request (a host, a
    /// tenant, a route), and each key gets a breaker of its own with every
    /// setting of this builder. At most [`max_keys`](KeyedCircuitBreakerBuilder::max_keys)
    /// keys are kept (default 1024); see [Keyed breakers](super#keyed-breakers).
    pub fn key<F, Req, K>(self, f: F) -> KeyedCircuitBreakerBuilder<K, F, C>
    where
        F: Fn(&Req) -> K,
    {
        KeyedCircuitBreakerBuilder {
            breaker: self,
            key: f,
            max_keys: DEFAULT_MAX_KEYS,
            _key: PhantomData,
        }
    }
}

impl<K, F, C> KeyedCircuitBreakerBuilder<K, F, C> {
    /// The most keys kept at once (default 1024). A new key past the bound
    /// takes the place of an idle one; see [Keyed breakers](super#keyed-breakers).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<KeyedCircuitBreakerLayer<K, F, C>, ConfigError>
    where
        K: Eq + Hash,
    {
        Check { layer: LAYER }.at_least_one("max_keys", self.max_keys as u64)?;
        let (v, classifier) = self.breaker.validate()?;
        let Validated {
            cfg,
            backend,
            listeners,
            ..
        } = v;
        if !backend.is_memory() {
            return Err(ConfigError::new(
                LAYER,
                "backend",
                "keyed breakers keep their state in memory: a shared backend would keep every key forever",
            ));
        }
        let overflow = new_core(&cfg, &listeners, "overflow");
        Ok(KeyedCircuitBreakerLayer {
            table: Arc::new(Table {
                template: cfg,
                listeners,
                max_keys: self.max_keys,
                keys: RwLock::new(Keys {
                    map: HashMap::new(),
                    ring: Vec::new(),
                    hand: 0,
                }),
                overflow,
            }),
            key: Arc::new(self.key),
            classifier,
        })
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerBuilder<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerBuilder")
            .field("breaker", &self.breaker)
            .field("key", &std::any::type_name::<F>())
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

fn new_core(template: &Config, listeners: &Listeners<CircuitEvent>, key: &str) -> Arc<Core> {
    let mut cfg = template.clone();
    cfg.name = Arc::from(format!("{}[{key}]", template.name));
    Arc::new(Core::new(cfg, listeners.clone(), Attached::Memory))
}

/// The keys' breakers.
///
/// Bounded by `max_keys` with the clock (second-chance) policy: every use
/// marks a key; a new key past the bound sweeps the ring of keys, clearing
/// marks, and takes the place of the first key that is unmarked and idle.
/// Idle means closed (or open with its period over) with no call in
/// flight: an open breaker is never forgotten before its open period ends,
/// nor a forced or disabled one ever. A sweep looks at each key at most
/// twice; if no key can go, the new key's calls share one overflow
/// breaker until one can.
struct Table<K> {
    template: Config,
    listeners: Listeners<CircuitEvent>,
    max_keys: usize,
    keys: RwLock<Keys<K>>,
    overflow: Arc<Core>,
}

struct Keys<K> {
    map: HashMap<K, KeyEntry>,
    ring: Vec<K>,
    hand: usize,
}

struct KeyEntry {
    core: Arc<Core>,
    used: AtomicBool,
}

impl KeyEntry {
    /// Whether forgetting this key loses nothing a caller relies on.
    fn idle(&self) -> bool {
        if Arc::strong_count(&self.core) > 1 {
            return false; // a call is in flight
        }
        matches!(
            self.core.state(),
            CircuitState::Closed | CircuitState::HalfOpen
        ) && self.core.snapshot().half_open_in_flight == 0
    }
}

impl<K: Eq + Hash + Clone + fmt::Display> Table<K> {
    fn breaker(&self, key: K) -> Arc<Core> {
        {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = keys.map.get(&key) {
                e.used.store(true, Relaxed);
                return e.core.clone();
            }
        }
        self.insert(key)
    }

    #[cold]
    fn insert(&self, key: K) -> Arc<Core> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let keys = &mut *keys;
        if let Some(e) = keys.map.get(&key) {
            return e.core.clone();
        }
        let core = new_core(&self.template, &self.listeners, &key.to_string());
        let entry = KeyEntry {
            core: core.clone(),
            used: AtomicBool::new(true),
        };
        if keys.map.len() < self.max_keys {
            keys.ring.push(key.clone());
            keys.map.insert(key, entry);
            return core;
        }
        for _ in 0..2 * keys.ring.len() {
            let at = keys.hand;
            keys.hand = (keys.hand + 1) % keys.ring.len();
            let old = &keys.map[&keys.ring[at]];
            if old.used.swap(false, Relaxed) || !old.idle() {
                continue;
            }
            let gone = std::mem::replace(&mut keys.ring[at], key.clone());
            keys.map.remove(&gone);
            keys.map.insert(key, entry);
            return core;
        }
        self.overflow.clone()
    }
}

/// Builds [`KeyedCircuitBreaker`] services that share one table of
/// per-key breakers.
///
/// Cloning the layer, and every service it makes, shares the table.
pub struct KeyedCircuitBreakerLayer<K, F, C = DefaultClassifier> {
    table: Arc<Table<K>>,
    key: Arc<F>,
    classifier: C,
}

impl<K, F, C: Clone> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            key: self.key.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    /// A handle on the keys' breakers.
    pub fn handle(&self) -> KeyedCircuitHandle<K> {
        KeyedCircuitHandle {
            table: self.table.clone(),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("name", &self.table.template.name)
            .field("max_keys", &self.table.max_keys)
            .field("key", &std::any::type_name::<F>())
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, K, F, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            layer: self.clone(),
        }
    }
}

/// A breaker per key around `S`. Made by [`KeyedCircuitBreakerLayer`].
pub struct KeyedCircuitBreaker<S, K, F, C = DefaultClassifier> {
    inner: S,
    layer: KeyedCircuitBreakerLayer<K, F, C>,
}

impl<S, K, F, C> KeyedCircuitBreaker<S, K, F, C> {
    /// A handle on the keys' breakers.
    pub fn handle(&self) -> KeyedCircuitHandle<K> {
        self.layer.handle()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K, F, C: Clone> Clone for KeyedCircuitBreaker<S, K, F, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, K, F, C, Req> Service<Req> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    F: Fn(&Req) -> K,
    K: Eq + Hash + Clone + fmt::Display,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An open breaker still reports ready: rejections come from `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let core = self.layer.table.breaker((self.layer.key)(&req));
        call_through(core, &self.layer.classifier, &mut self.inner, req)
    }
}

/// Reads and steers the breakers of a [`KeyedCircuitBreakerLayer`].
pub struct KeyedCircuitHandle<K> {
    table: Arc<Table<K>>,
}

impl<K> Clone for KeyedCircuitHandle<K> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedCircuitHandle<K> {
    /// The breaker of `key`, if the table holds it now.
    pub fn breaker(&self, key: &K) -> Option<CircuitHandle> {
        let keys = self.table.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.map
            .get(key)
            .map(|e| CircuitHandle::new(e.core.clone()))
    }

    /// The state of `key`'s breaker, if the table holds it now.
    pub fn state(&self, key: &K) -> Option<CircuitState> {
        self.breaker(key).map(|h| h.state())
    }

    /// The breaker that new keys share while the table is full of keys
    /// that cannot be forgotten yet.
    pub fn overflow(&self) -> CircuitHandle {
        CircuitHandle::new(self.table.overflow.clone())
    }

    /// The keys held now.
    pub fn keys(&self) -> Vec<K> {
        let keys = self.table.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.ring.clone()
    }

    /// How many keys are held now.
    pub fn len(&self) -> usize {
        let keys = self.table.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K> fmt::Debug for KeyedCircuitHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitHandle")
            .field("name", &self.table.template.name)
            .finish_non_exhaustive()
    }
}

/// The key of an HTTP request by its upstream: the URI's authority, or the
/// `Host` header for an origin-form URI (as a server sees it), lowercased;
/// empty when there is neither.
///
/// ```
/// # use tower_bulwark::circuit_breaker::{authority_key, CircuitBreakerLayer};
/// let layer = CircuitBreakerLayer::builder()
///     .key(authority_key::<String>)
///     .build()?;
/// # Ok::<(), tower_bulwark::ConfigError>(())
/// ```
#[cfg(feature = "http")]
pub fn authority_key<B>(req: &http::Request<B>) -> String {
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    authority.unwrap_or_default().to_ascii_lowercase()
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use crate::circuit_breaker::CircuitBreakerLayer;

    #[test]
    fn the_ring_and_the_map_hold_the_same_keys() {
        let layer = CircuitBreakerLayer::builder()
            .key(|k: &u32| *k)
            .max_keys(4)
            .build()
            .unwrap();
        for k in 0..100u32 {
            drop(layer.table.breaker(k % 9));
            let keys = layer.table.keys.read().unwrap();
            assert!(keys.map.len() <= 4);
            assert_eq!(keys.map.len(), keys.ring.len());
            for k in &keys.ring {
                assert!(keys.map.contains_key(k));
            }
        }
    }
}
