//! What is retried: the [`RetryPolicy`] trait and its stock implementations.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use crate::classify::{Classify, Outcome};
use crate::error::{refuses_retry, BoxError};

/// Decides whether a finished attempt is tried again.
///
/// The layer asks [`should_retry`](RetryPolicy::should_retry) after every
/// attempt; `false` ends the call with that attempt's result. A policy
/// sees the request too, so it can refuse to repeat what is not safe to
/// repeat (an HTTP `POST`, a body too large to replay).
///
/// Most users pick one of the stock policies through the builder:
/// [`DefaultPolicy`] (every error except the crate's own rejections),
/// [`ClassifyPolicy`] (`.classify(..)`, whatever a [`Classify`] calls a
/// failure) or [`RetryFn`] (`.retry_if(..)`, a closure). With the `http`
/// feature, `http::HttpRetryPolicy` retries idempotent requests on 5xx,
/// 429 and connection errors.
pub trait RetryPolicy<Req, Res, E> {
    /// Whether `req` could ever be retried. Checked once per call, before
    /// the first attempt: `false` skips keeping a copy of the request.
    fn may_retry(&self, req: &Req) -> bool {
        let _ = req;
        true
    }

    /// Whether the attempt that produced `result` is tried again.
    fn should_retry(&self, req: &Req, result: &Result<Res, E>) -> bool;

    /// Whether an attempt cut off by the per-attempt timeout is tried again
    /// (default yes). An attempt that timed out may still have reached the
    /// upstream: a policy for non-idempotent requests should say no.
    fn retry_timeout(&self, req: &Req) -> bool {
        let _ = req;
        true
    }

    /// The upstream's own back-off hint carried by `result` (an HTTP
    /// `Retry-After`): the next attempt waits at least this long.
    fn retry_after(&self, result: &Result<Res, E>) -> Option<Duration> {
        let _ = result;
        None
    }
}

/// Whether `err` is one of this crate's rejections. Errors are inspected
/// when they are a [`BoxError`], which is what every layer of this crate
/// returns.
pub(crate) fn is_crate_rejection<E: 'static>(err: &E) -> bool {
    let any: &dyn Any = err;
    match any.downcast_ref::<BoxError>() {
        Some(boxed) => refuses_retry(&**boxed),
        None => false,
    }
}

/// The default policy: every `Err` is retried except the crate's own
/// rejections (an open circuit is not retried into); every `Ok` is final.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl<Req, Res, E: 'static> RetryPolicy<Req, Res, E> for DefaultPolicy {
    #[inline]
    fn should_retry(&self, _req: &Req, result: &Result<Res, E>) -> bool {
        match result {
            Ok(_) => false,
            Err(e) => !is_crate_rejection(e),
        }
    }
}

/// Retries what a [`Classify`] calls a [`Failure`](Outcome::Failure),
/// except the crate's own rejections, and honours the classifier's
/// [`retry_after`](Classify::retry_after) hint. Made by
/// [`RetryBuilder::classify`](super::RetryBuilder::classify).
///
/// The classifier is given [`Duration::ZERO`] as the elapsed time: use the
/// per-attempt timeout to cut slow attempts short.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifyPolicy<C> {
    classifier: C,
}

impl<C> ClassifyPolicy<C> {
    /// Retries failures according to `classifier`.
    pub fn new(classifier: C) -> Self {
        Self { classifier }
    }

    /// The classifier.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }
}

impl<C, Req, Res, E: 'static> RetryPolicy<Req, Res, E> for ClassifyPolicy<C>
where
    C: Classify<Res, E>,
{
    #[inline]
    fn should_retry(&self, _req: &Req, result: &Result<Res, E>) -> bool {
        if let Err(e) = result {
            if is_crate_rejection(e) {
                return false;
            }
        }
        self.classifier.classify(result, Duration::ZERO) == Outcome::Failure
    }

    fn retry_after(&self, result: &Result<Res, E>) -> Option<Duration> {
        self.classifier.retry_after(result)
    }
}

/// Retries when a closure over the request and the attempt's result says
/// so. Made by [`RetryBuilder::retry_if`](super::RetryBuilder::retry_if).
///
/// ```
/// use tower_bulwark::retry::{RetryFn, RetryPolicy};
///
/// // Retry errors, and answers below 0, but never request 0.
/// let p = RetryFn::new(|req: &i32, res: &Result<i32, String>| {
///     *req != 0 && res.as_ref().map_or(true, |n| *n < 0)
/// });
/// assert!(p.should_retry(&1, &Ok(-1)));
/// assert!(!p.should_retry(&0, &Err("boom".into())));
/// ```
#[derive(Clone, Copy)]
pub struct RetryFn<F> {
    f: F,
}

impl<F> RetryFn<F> {
    /// Retries when `f(&request, &result)` returns `true`.
    pub fn new(f: F) -> Self {
        Self { f }
    }
}

impl<F, Req, Res, E> RetryPolicy<Req, Res, E> for RetryFn<F>
where
    F: Fn(&Req, &Result<Res, E>) -> bool,
{
    #[inline]
    fn should_retry(&self, req: &Req, result: &Result<Res, E>) -> bool {
        (self.f)(req, result)
    }
}

impl<F> fmt::Debug for RetryFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "circuit-breaker")]
    #[test]
    fn default_skips_rejections() {
        use crate::circuit_breaker::CircuitBreakerLayer;
        use tower::{service_fn, Service, ServiceExt};

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let layer = CircuitBreakerLayer::builder().build().unwrap();
            layer.handle().force_open();
            let mut svc = tower_layer::Layer::layer(
                &layer,
                service_fn(|_: ()| async { Ok::<_, BoxError>(()) }),
            );
            let res = svc.ready().await.unwrap().call(()).await;
            assert!(!RetryPolicy::<(), (), BoxError>::should_retry(
                &DefaultPolicy,
                &(),
                &res
            ));
        });
        let plain: Result<(), BoxError> = Err("boom".into());
        assert!(DefaultPolicy.should_retry(&(), &plain));
        assert!(!RetryPolicy::<(), u8, BoxError>::should_retry(
            &DefaultPolicy,
            &(),
            &Ok(1)
        ));
        // Errors of other types are retried.
        assert!(RetryPolicy::<(), (), std::io::Error>::should_retry(
            &DefaultPolicy,
            &(),
            &Err(std::io::Error::other("x"))
        ));
    }

    #[test]
    fn classify_policy_follows_the_classifier() {
        use crate::classify::classify_fn;
        let p = ClassifyPolicy::new(classify_fn(|r: &Result<u16, BoxError>| match r {
            Ok(s) if *s >= 500 => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }));
        assert!(p.should_retry(&(), &Ok(503)));
        assert!(!p.should_retry(&(), &Ok(200)));
        assert!(p.should_retry(&(), &Err("x".into())));
        assert!(
            format!("{:?}", RetryFn::new(|_: &(), _: &Result<(), ()>| true)).contains("RetryFn")
        );
    }
}
