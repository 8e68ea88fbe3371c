//! The limiter service.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::{Refund, ResponseFuture};
use super::gcra::{Decision, Reservation};
use super::layer::{Cost, Global, Keyed, LayerState};
use super::remote::StoreAnswer;
use super::{CostTooHigh, RateLimitEvent, RateLimitLayer};
use crate::classify::Classify;
use crate::clock::{nanos, Nanos};
use crate::error::BoxError;

/// A rate limiter around `S`. Made by [`RateLimitLayer`].
///
/// Every clone shares the buckets of the layer that made it. `S` must be
/// `Clone` so that a request that waits for its tokens can take the
/// readied service along into its response future.
pub struct RateLimit<S, K, C, H> {
    inner: S,
    shared: Arc<LayerState<K, C, H>>,
}

impl<S, K, C, H> RateLimit<S, K, C, H> {
    pub(crate) fn from_shared(inner: S, shared: Arc<LayerState<K, C, H>>) -> Self {
        Self { inner, shared }
    }

    /// Wraps `inner` in a limiter sharing `layer`'s buckets.
    pub fn new(inner: S, layer: &RateLimitLayer<K, C, H>) -> Self {
        Self::from_shared(inner, layer.shared.clone())
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

impl<S: Clone, K, C, H> Clone for RateLimit<S, K, C, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, K, C, H> fmt::Debug for RateLimit<S, K, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("name", &self.shared.core.cfg.name)
            .finish()
    }
}

impl<S, K, C, H> RateLimit<S, K, C, H>
where
    K: Send + Sync + 'static,
    C: Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    /// The increment of `req`, or the error future for a cost that can
    /// never be admitted.
    #[inline]
    fn increment<Req>(&self, req: &Req) -> Result<Nanos, CostTooHigh>
    where
        C: Cost<Req>,
    {
        let core = &self.shared.core;
        match self.shared.cost.cost(req) {
            None => Ok(core.inc),
            Some(c) => core
                .params
                .increment(c)
                .ok_or_else(|| CostTooHigh::new(core.cfg.name.clone(), c, core.cfg.max_tokens)),
        }
    }

    /// Admission through a file or Redis backend. `key` names the bucket
    /// in Redis (`None`: the limiter's one bucket).
    #[inline(never)]
    fn call_remote<Req>(&mut self, req: Req, key: Option<String>) -> ResponseFuture<S, Req, K, C, H>
    where
        S: Service<Req> + Clone,
        C: Cost<Req>,
    {
        let shared = &self.shared;
        let core = &shared.core;
        let tokens = shared
            .cost
            .cost(&req)
            .unwrap_or(core.cfg.tokens_per_request);
        if core.params.increment(tokens).is_none() {
            let e = CostTooHigh::new(core.cfg.name.clone(), tokens, core.cfg.max_tokens);
            return ResponseFuture::rejected(e.into());
        }
        // An upstream's block this process keeps (Redis).
        if let Some(left) = core.blocked(core.clock.now()) {
            return ResponseFuture::rejected(core.rejected(left, 0.0).into());
        }
        let remote = core.remote.as_ref().expect("a shared backend");
        let hint = shared.hint.as_ref().map(|_| shared.clone());
        // The layers below that share this state file are admitted in the
        // same round as this one, inside their `call`s.
        let span = remote.span();
        match remote.admit(key, tokens, &span) {
            StoreAnswer::Now(Ok(())) => ResponseFuture::called(self.inner.call(req), hint),
            StoreAnswer::Now(Err(wait)) => {
                let left = remote.tokens().unwrap_or(0.0);
                ResponseFuture::rejected(core.rejected(nanos(wait), left).into())
            }
            StoreAnswer::Later(pending) => {
                let owner = shared.clone();
                let admit = Box::pin(async move {
                    let (r, span) = pending.await;
                    let r = r.map_err(|wait| owner.core.rejected(nanos(wait), 0.0).into());
                    (r, span)
                });
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::admitting(admit, svc, req, hint)
            }
        }
    }

    /// Carries the decision out: call now, wait in the future, or reject.
    #[inline]
    fn dispatch<Req>(
        &mut self,
        req: Req,
        now: Nanos,
        decision: Decision,
        inc: Nanos,
        refund: impl FnOnce(&Arc<LayerState<K, C, H>>, Reservation) -> Refund,
    ) -> ResponseFuture<S, Req, K, C, H>
    where
        S: Service<Req> + Clone,
    {
        let hint = self.shared.hint.as_ref().map(|_| self.shared.clone());
        match decision {
            Decision::Admit { .. } => ResponseFuture::called(self.inner.call(req), hint),
            Decision::Wait {
                tat,
                inc: own,
                wait,
            } => {
                let refund = refund(&self.shared, Reservation { end: tat, inc: own });
                // The readied service goes into the future; this one gets a
                // fresh clone that will be readied before its own call.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                let at = self.shared.core.clock.instant(now.saturating_add(wait));
                ResponseFuture::waiting(at, svc, req, refund, hint)
            }
            Decision::Reject { retry_after } => {
                // What the bucket holds is what the request lacked.
                let core = &self.shared.core;
                let left = inc.saturating_sub(retry_after) as f64 / core.params.per_token;
                ResponseFuture::rejected(self.shared.core.rejected(retry_after, left).into())
            }
        }
    }
}

impl<S, Req, C, H> Service<Req> for RateLimit<S, Global, C, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Cost<Req> + Send + Sync + 'static,
    H: Classify<S::Response, S::Error> + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, Global, C, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An empty bucket still reports ready: rejections come from `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if self.shared.core.remote.is_some() {
            return self.call_remote(req, None);
        }
        let inc = match self.increment(&req) {
            Ok(inc) => inc,
            Err(e) => return ResponseFuture::rejected(e.into()),
        };
        let core = &self.shared.core;
        let now = core.clock.now();
        if core.bucket.admit_now(now, inc, &core.params) {
            let hint = self.shared.hint.as_ref().map(|_| self.shared.clone());
            return ResponseFuture::called(self.inner.call(req), hint);
        }
        let decision = core.bucket.acquire(now, inc, &core.params);
        self.dispatch(req, now, decision, inc, |shared, mine| {
            let shared = shared.clone();
            Refund::new(move || {
                let core = &shared.core;
                core.bucket.release(mine, core.clock.now());
            })
        })
    }
}

impl<S, Req, F, K, C, H> Service<Req> for RateLimit<S, Keyed<F, K>, C, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    F: Fn(&Req) -> K + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Cost<Req> + Send + Sync + 'static,
    H: Classify<S::Response, S::Error> + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, Keyed<F, K>, C, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if self.shared.core.remote.is_some() {
            let keyed = &self.shared.key;
            let name = keyed.remote_key.map(|f| f(&(keyed.f)(&req)));
            return self.call_remote(req, name);
        }
        let inc = match self.increment(&req) {
            Ok(inc) => inc,
            Err(e) => return ResponseFuture::rejected(e.into()),
        };
        let shared = &*self.shared;
        let core = &shared.core;
        let now = core.clock.now();
        if let Some(left) = core.blocked(now) {
            return ResponseFuture::rejected(core.rejected(left, 0.0).into());
        }
        let key = (shared.key.f)(&req);
        // The key is only kept (cloned) when a request has to wait.
        let waits = core.params.max_wait > 0;
        let kept = waits.then(|| key.clone());
        let (decision, evicted) = shared.key.map.acquire(key, now, inc, &core.params);
        let fut = self.dispatch(req, now, decision, inc, |shared, mine| {
            let shared = shared.clone();
            Refund::new(move || {
                if let Some(key) = kept {
                    shared.key.map.release(&key, mine, shared.core.clock.now());
                }
            })
        });
        // Listeners run once the reservation is in the future's guard: one
        // that panics unwinds through it and the tokens go back.
        if evicted.idle + evicted.live > 0 {
            let core = &self.shared.core;
            core.listeners.emit(&RateLimitEvent::KeysEvicted {
                name: core.cfg.name.clone(),
                idle: evicted.idle,
                live: evicted.live,
            });
        }
        fut
    }
}
