//! The fallback service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::entry::{EntryRef, Group};
use super::future::ResponseFuture;
use super::{FallbackHandle, FallbackLayer, NotReady};
use crate::circuit_breaker::Admission;
use crate::classify::Classify;
use crate::error::BoxError;

/// A primary service with ordered fallbacks, each behind its own circuit
/// breaker. Made by [`FallbackLayer`].
///
/// Every clone shares the layer's fallback services and breakers.
pub struct Fallback<S, Req, Res, C> {
    primary: S,
    group: Arc<Group<Req, Res, C>>,
    handle: FallbackHandle,
    /// Whether the primary reported ready (always, unless `skip_not_ready`).
    primary_ready: bool,
    /// The group's settings the healthy path reads, kept here so that
    /// reading them needs no load through the group.
    skip_not_ready: bool,
    can_fail_over: bool,
}

impl<S, Req, Res, C> Fallback<S, Req, Res, C> {
    /// Wraps `primary` with the fallbacks of `layer`.
    pub fn new(primary: S, layer: &FallbackLayer<Req, Res, C>) -> Self {
        Self {
            primary,
            skip_not_ready: layer.group.skip_not_ready,
            can_fail_over: layer.group.can_fail_over(),
            group: layer.group.clone(),
            handle: layer.handle.clone(),
            primary_ready: true,
        }
    }

    /// A handle on the entries' breakers.
    pub fn handle(&self) -> FallbackHandle {
        self.handle.clone()
    }

    /// The primary service.
    pub fn get_ref(&self) -> &S {
        &self.primary
    }

    /// The primary service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.primary
    }

    /// Unwraps the primary service.
    pub fn into_inner(self) -> S {
        self.primary
    }
}

impl<S: Clone, Req, Res, C> Clone for Fallback<S, Req, Res, C> {
    fn clone(&self) -> Self {
        Self {
            primary: self.primary.clone(),
            group: self.group.clone(),
            handle: self.handle.clone(),
            primary_ready: true,
            skip_not_ready: self.skip_not_ready,
            can_fail_over: self.can_fail_over,
        }
    }
}

impl<S: fmt::Debug, Req, Res, C> fmt::Debug for Fallback<S, Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("primary", &self.primary)
            .field("handle", &self.handle)
            .finish()
    }
}

impl<S, Req, Res, C> Service<Req> for Fallback<S, Req, Res, C>
where
    S: Service<Req, Response = Res>,
    S::Error: Into<BoxError>,
    Req: Clone + Send + 'static,
    Res: Send + 'static,
    C: Classify<Res, BoxError> + Clone + Send + Sync + 'static,
{
    type Response = Res;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Req, Res, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.skip_not_ready {
            return self.primary.poll_ready(cx).map_err(Into::into);
        }
        // A primary that is not ready is skipped rather than waited for.
        match self.primary.poll_ready(cx) {
            Poll::Pending => {
                self.primary_ready = false;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                self.primary_ready = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let group = &self.group;
        let classifier = group.classifier.clone();
        let primary = || EntryRef {
            group: group.clone(),
            idx: 0,
        };
        if !std::mem::replace(&mut self.primary_ready, true) {
            let err = NotReady::new(group.name().clone());
            return ResponseFuture::skipped(primary(), err, classifier, req);
        }
        let timed = classifier.uses_elapsed();
        let inner = &mut self.primary;
        let can_fail_over = self.can_fail_over;
        Admission::admit_via(
            &group.primary,
            primary,
            timed,
            (req, classifier),
            |admission, (req, classifier)| {
                let backup = can_fail_over.then(|| req.clone());
                ResponseFuture::primary(inner.call(req), admission, classifier, backup)
            },
            |primary, open, (req, classifier)| {
                ResponseFuture::skipped(primary, open, classifier, req)
            },
        )
    }
}
