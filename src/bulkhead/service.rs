//! The bulkhead service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use super::future::ResponseFuture;
#[cfg(feature = "file-store")]
use super::state::HeldSlot;
use super::state::{Core, Slots};
use super::{BulkheadHandle, BulkheadLayer};
use crate::error::BoxError;

/// A concurrency cap around `S`. Made by [`BulkheadLayer`].
///
/// Every clone shares the slots of the layer that made it. `S` must be
/// `Clone` so that a call that waits for a slot can take the readied
/// service along into its response future.
pub struct Bulkhead<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S> Bulkhead<S> {
    pub(crate) fn from_core(inner: S, core: Arc<Core>) -> Self {
        Self { inner, core }
    }

    /// Wraps `inner` in a bulkhead sharing `layer`'s slots.
    pub fn new(inner: S, layer: &BulkheadLayer) -> Self {
        Self::from_core(inner, layer.core.clone())
    }

    /// A handle on the shared slots.
    pub fn handle(&self) -> BulkheadHandle {
        BulkheadHandle {
            core: self.core.clone(),
        }
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

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Bulkhead<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("inner", &self.inner)
            .field("name", &self.core.cfg.name)
            .field("in_flight", &self.core.in_flight())
            .finish()
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // No slot is taken here: an idle keep-alive connection that polled
        // readiness must not hold one.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(slot) = self.core.try_acquire() {
            return ResponseFuture::called(self.inner.call(req), slot);
        }
        match &self.core.slots {
            Slots::Counter(_) => {
                ResponseFuture::rejected(self.core.rejected(Duration::ZERO).into())
            }
            // Taken now if the file's lock is free; else the wait for the
            // lock happens in the response future, on tokio's timers.
            #[cfg(feature = "file-store")]
            Slots::File(b) => match (b.span(), b.try_acquire_now()) {
                // The span (when this is the outermost file-backed layer)
                // takes in the admissions of the layers below.
                (_span, Ok(Some(slot))) => {
                    ResponseFuture::called(self.inner.call(req), HeldSlot::File(slot))
                }
                (_, Ok(None)) => {
                    ResponseFuture::rejected(self.core.rejected(Duration::ZERO).into())
                }
                (_, Err(())) => {
                    let b = b.clone();
                    let claim = Box::pin(async move { b.acquire_async().await });
                    let clone = self.inner.clone();
                    let svc = std::mem::replace(&mut self.inner, clone);
                    ResponseFuture::claiming(self.core.clone(), claim, svc, req)
                }
            },
            #[cfg(feature = "redis")]
            Slots::Redis { bulkhead, .. } => {
                let bulkhead = bulkhead.clone();
                let lease = Box::pin(async move { bulkhead.try_acquire().await });
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::leasing(self.core.clone(), lease, svc, req)
            }
            Slots::Queue(sem) => {
                let acquire = Box::pin(sem.clone().acquire_owned());
                // The readied service goes into the future; this one gets a
                // fresh clone that will be readied before its own call.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(self.core.clone(), acquire, svc, req)
            }
        }
    }
}
