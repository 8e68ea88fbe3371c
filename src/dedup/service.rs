//! The dedup service.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::flight::{EventKind, FlightTable, Start};
use super::future::{Leader, ResponseFuture, Waiter};
use super::layer::ServiceTables;
use super::{DedupHandle, DedupKey, DedupLayer};
use crate::error::BoxError;

/// Shares one inner call among concurrent identical requests. Made by
/// [`DedupLayer`].
///
/// Every clone shares this service's in-flight calls and cache; another
/// service made by the same layer has its own.
pub struct Dedup<S, K> {
    inner: S,
    key: Arc<K>,
    tables: Arc<ServiceTables>,
    /// This service's table, found on the first keyed call.
    table: Option<Arc<dyn Any + Send + Sync>>,
}

impl<S, K> Dedup<S, K> {
    /// Wraps `inner` with `layer`'s settings and a table of its own (the
    /// layer's handle sees it too).
    pub fn new(inner: S, layer: &DedupLayer<K>) -> Self {
        Self {
            inner,
            key: layer.key.clone(),
            tables: layer.registry.service(),
            table: None,
        }
    }

    /// A handle on this service's table, which its clones share.
    pub fn handle(&self) -> DedupHandle {
        DedupHandle::of_service(self.tables.clone())
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

    fn table<Key, F, T>(&mut self) -> Arc<FlightTable<Key, F, T>>
    where
        Key: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        F: Send + 'static,
        T: Clone + Send + 'static,
    {
        if let Some(t) = &self.table {
            if let Ok(t) = Arc::downcast::<FlightTable<Key, F, T>>(t.clone()) {
                return t;
            }
        }
        let t = self.tables.table::<Key, F, T>();
        self.table = Some(t.clone());
        t
    }
}

impl<S: Clone, K> Clone for Dedup<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            tables: self.tables.clone(),
            table: self.table.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Dedup<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("name", &self.tables.cfg.name)
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
        // Each event is sent once the call's guard exists: if a listener
        // panics, the panic reaches this caller and dropping the guard
        // releases the entry (or hands the call to whoever joined it).
        let events = table.cfg.active();
        match table.start(key, || inner.call(req)) {
            Start::Leader(call_ref) => {
                let fut = ResponseFuture::leading(Leader::new(table, call_ref));
                if events {
                    fut.emit(EventKind::Leader);
                }
                fut
            }
            Start::Joined(call_ref, flight) => {
                let fut = ResponseFuture::waiting(Waiter::new(table, call_ref, flight));
                if events {
                    fut.emit(EventKind::Joined);
                }
                fut
            }
            Start::Hit(res) => {
                table.cfg.emit(EventKind::CacheHit);
                ResponseFuture::ready(res.map_err(Into::into))
            }
            Start::Bypass(fut) => {
                table.cfg.emit(EventKind::Full);
                ResponseFuture::direct(fut)
            }
        }
    }
}
