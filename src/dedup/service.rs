//! The dedup service.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::flight::{Start, Table};
use super::future::{Leader, ResponseFuture, Waiter};
use super::layer::LayerShared;
use super::{DedupHandle, DedupKey, DedupLayer};
use crate::error::BoxError;

/// Shares one inner call among concurrent identical requests. Made by
/// [`DedupLayer`].
///
/// Every clone shares the in-flight calls and the cache of the layer that
/// made it.
pub struct Dedup<S, K> {
    inner: S,
    key: Arc<K>,
    shared: Arc<LayerShared>,
    /// This service's table, found on the first keyed call.
    table: Option<Arc<dyn Any + Send + Sync>>,
}

impl<S, K> Dedup<S, K> {
    /// Wraps `inner`, sharing `layer`'s table.
    pub fn new(inner: S, layer: &DedupLayer<K>) -> Self {
        Self {
            inner,
            key: layer.key.clone(),
            shared: layer.shared.clone(),
            table: None,
        }
    }

    /// A handle on the shared table.
    pub fn handle(&self) -> DedupHandle {
        DedupLayer {
            key: self.key.clone(),
            shared: self.shared.clone(),
        }
        .handle()
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

    fn table<Key, F, T>(&mut self) -> Arc<Table<Key, F, T>>
    where
        Key: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        F: Send + 'static,
        T: Clone + Send + 'static,
    {
        if let Some(t) = &self.table {
            if let Ok(t) = Arc::downcast::<Table<Key, F, T>>(t.clone()) {
                return t;
            }
        }
        let t = self.shared.table::<Key, F, T>();
        self.table = Some(t.clone());
        t
    }
}

impl<S: Clone, K> Clone for Dedup<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            shared: self.shared.clone(),
            table: self.table.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Dedup<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("name", &self.shared.cfg.name)
            .finish()
    }
}

impl<S, K, Req> Service<Req> for Dedup<S, K>
where
    S: Service<Req>,
    S::Response: Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    K: DedupKey<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, K::Key, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = self.key.key(&req) else {
            return ResponseFuture::direct(self.inner.call(req));
        };
        let table = self.table::<K::Key, S::Future, S::Response>();
        let inner = &mut self.inner;
        match table.start(key, || inner.call(req)) {
            Start::Leader(ticket, fut, spare) => {
                let home = match spare {
                    Some(mut home) => {
                        home.set(Some(fut));
                        home
                    }
                    None => Box::pin(Some(fut)),
                };
                ResponseFuture::leading(Leader::new(table, ticket, home))
            }
            Start::Joined(ticket, group) => {
                ResponseFuture::waiting(Waiter::new(table, ticket, group))
            }
            Start::Hit(res) => ResponseFuture::ready(res.map_err(Into::into)),
            Start::Bypass(fut) => ResponseFuture::direct(fut),
        }
    }
}
