//! Which requests are "the same".

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;

/// Says which requests may share one call: two requests with equal keys
/// are the same request. `None` leaves a request alone (never shared, never
/// cached).
///
/// Closures adapt through [`DedupBuilder::key`](super::DedupBuilder::key):
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::dedup::DedupLayer;
///
/// struct Req { id: String, idempotent: bool }
/// let layer = DedupLayer::builder()
///     .key(|req: &Req| req.idempotent.then(|| req.id.clone()))
///     .cache_ttl(Duration::from_secs(1))
///     .build()
///     .unwrap();
/// ```
///
/// With the `http` feature, [`DefaultKey`] keys HTTP requests by method,
/// URI, `Host` and the headers that say who asks or change the answer.
pub trait DedupKey<Req> {
    /// The key.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of `req`, or `None` to call the inner service directly.
    fn key(&self, req: &Req) -> Option<Self::Key>;
}

/// A [`DedupKey`] made from a closure; see
/// [`DedupBuilder::key`](super::DedupBuilder::key).
pub struct KeyFn<F, K> {
    f: F,
    _key: PhantomData<fn() -> K>,
}

impl<F, K> KeyFn<F, K> {
    pub(crate) fn new(f: F) -> Self {
        Self {
            f,
            _key: PhantomData,
        }
    }
}

impl<F, Req, K> DedupKey<Req> for KeyFn<F, K>
where
    F: Fn(&Req) -> Option<K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    #[inline]
    fn key(&self, req: &Req) -> Option<K> {
        (self.f)(req)
    }
}

impl<F, K> fmt::Debug for KeyFn<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// The key used when [`key`](super::DedupBuilder::key) is not set.
///
/// With the `http` feature it keys `http::Request`s like
/// `http::dedup::HttpKey::new()`: safe methods only, by method, URI, `Host`
/// and the headers that say who asks or change the answer
/// (`Authorization`, `Proxy-Authorization`, `Cookie` and `X-Api-Key`
/// included).
/// Without it, it keys nothing, and a layer built without a key only
/// compiles around services of HTTP requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultKey;
