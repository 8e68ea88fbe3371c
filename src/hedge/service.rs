//! The hedge service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::{HedgeAll, HedgePredicate};
use super::state::Core;
use super::{HedgeHandle, HedgeLayer};
use crate::classify::{Classify, DefaultClassifier};
use crate::error::BoxError;

/// Sends a second copy of a slow request to `S` and takes whichever copy
/// answers first. Made by [`HedgeLayer`].
///
/// `S` must be `Clone`: a hedge goes to a clone of the service, readied
/// before it is called. The request must be `Clone` too.
pub struct Hedge<S, P = HedgeAll, C = DefaultClassifier> {
    inner: S,
    core: Arc<Core>,
    predicate: P,
    classifier: C,
}

impl<S, P, C> Hedge<S, P, C> {
    pub(crate) fn from_parts(inner: S, core: Arc<Core>, predicate: P, classifier: C) -> Self {
        Self {
            inner,
            core,
            predicate,
            classifier,
        }
    }

    /// Wraps `inner` with `layer`'s settings and shared state.
    pub fn new(inner: S, layer: &HedgeLayer<P, C>) -> Self
    where
        P: Clone,
        C: Clone,
    {
        Self::from_parts(
            inner,
            layer.core.clone(),
            layer.predicate.clone(),
            layer.classifier.clone(),
        )
    }

    /// A handle on the shared state.
    pub fn handle(&self) -> HedgeHandle {
        HedgeHandle {
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

impl<S: Clone, P: Clone, C: Clone> Clone for Hedge<S, P, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            core: self.core.clone(),
            predicate: self.predicate.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, P, C> fmt::Debug for Hedge<S, P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("name", &self.core.name)
            .field("delay", &self.core.delay())
            .finish()
    }
}

impl<S, P, C, Req> Service<Req> for Hedge<S, P, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: HedgePredicate<Req>,
    C: Classify<S::Response, S::Error> + Clone,
    Req: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let core = &self.core;
        let classifier = self.classifier.clone();
        core.budget.deposit();
        // Nothing is cloned for a call that could not be hedged anyway.
        let delay = if core.budget.affordable() && self.predicate.can_hedge(&req) {
            core.delay()
        } else {
            None
        };
        match delay {
            // The hedge goes to a fresh clone, readied in the response
            // future before it is called; the primary goes to the
            // instance the caller readied.
            Some(delay) => {
                let svc = self.inner.clone();
                let copy = req.clone();
                ResponseFuture::hedged(
                    self.inner.call(req),
                    core.clone(),
                    delay,
                    svc,
                    copy,
                    classifier,
                )
            }
            None if core.records() => {
                ResponseFuture::recorded(self.inner.call(req), core.clone(), classifier)
            }
            None => ResponseFuture::single(self.inner.call(req), classifier),
        }
    }
}
