//! Deciding what counts as a failure.
//!
//! The circuit breaker, retry and fallback layers all ask the same question
//! of a finished call: did it succeed, fail, or should it be left out of the
//! books? [`Classify`] answers it from the call's `Result` (and, when the
//! classifier asks for it, the call's elapsed time).
//!
//! By default ([`DefaultClassifier`]) an `Err` is a failure and every `Ok` a
//! success. Closures adapt with [`classify_fn`] and [`classify_timed_fn`]:
//!
//! ```
//! use std::time::Duration;
//! use tower_bulwark::classify::{classify_fn, classify_timed_fn, Classify, Outcome};
//!
//! // A response code of 500 or more is a failure even though the call was `Ok`.
//! let by_code = classify_fn(|res: &Result<u16, std::io::Error>| match res {
//!     Ok(code) if *code >= 500 => Outcome::Failure,
//!     Ok(_) => Outcome::Success,
//!     Err(_) => Outcome::Failure,
//! });
//! assert_eq!(by_code.classify(&Ok(503), Duration::ZERO), Outcome::Failure);
//!
//! // A slow answer is as bad as none.
//! let slow = classify_timed_fn(|res: &Result<(), ()>, elapsed: Duration| {
//!     if res.is_err() || elapsed > Duration::from_secs(2) { Outcome::Failure } else { Outcome::Success }
//! });
//! assert!(slow.uses_elapsed());
//! ```
//!
//! With the `http` feature, `http::StatusClassifier` treats 5xx responses
//! (and optionally 429) as failures.

use std::fmt;
use std::time::Duration;

/// The longest upstream back-off hint (an HTTP `Retry-After`) any layer
/// honours unless told otherwise: one minute.
///
/// A hint is data from the network: one `503` with `Retry-After:
/// 99999999999` would otherwise hold a breaker open, or a rate limiter
/// shut, for years. Each layer that reads hints has a `max_retry_after`
/// builder method defaulting to this. The breaker and the rate limiter
/// clamp a longer hint to their cap (and report it with an event); retry
/// gives up at once rather than wait that long.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An upstream hint `d` held to `max`: the duration to honour, and whether
/// it was clamped. Every layer that honours hints goes through here, so
/// they agree on what "too long" means.
#[allow(dead_code)]
#[inline]
pub(crate) fn clamp_retry_after(d: Duration, max: Duration) -> (Duration, bool) {
    if d > max {
        (max, true)
    } else {
        (d, false)
    }
}

/// The verdict on one finished call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call worked.
    Success,
    /// The call failed: it counts against the upstream.
    Failure,
    /// The call says nothing about the upstream's health (a client error,
    /// a cancelled call): it is not counted either way.
    Ignore,
}

impl Outcome {
    /// `true` for [`Outcome::Failure`].
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure)
    }
}

/// Decides whether a finished call succeeded.
///
/// `elapsed` is the call's duration when [`uses_elapsed`](Classify::uses_elapsed)
/// returns `true`, and [`Duration::ZERO`] otherwise: reading the clock costs
/// a noticeable share of a fast call, so layers only measure time when some
/// part of their configuration needs it.
pub trait Classify<Res, E> {
    /// Classifies one finished call.
    fn classify(&self, result: &Result<Res, E>, elapsed: Duration) -> Outcome;

    /// Whether [`classify`](Classify::classify) looks at `elapsed`.
    fn uses_elapsed(&self) -> bool {
        false
    }

    /// A back-off hint carried by the result, such as an HTTP `Retry-After`
    /// header on a 429 or 503 answer. Layers that honour upstream back-off
    /// (breaker, retry, rate limit) read it through here.
    fn retry_after(&self, result: &Result<Res, E>) -> Option<Duration> {
        let _ = result;
        None
    }

    /// Whether this classifier judges some answers only when they end
    /// (see [`defer`](Classify::defer)). A layer asks once per call, before
    /// it is made, and keeps a deferring call off its fastest path.
    fn defers(&self) -> bool {
        false
    }

    /// For an answer whose outcome is only known later, such as a gRPC
    /// response whose status comes in the trailers at the end of its body:
    /// keep `verdict` (typically inside the response's body, which may be
    /// replaced) and [`report`](Verdict::report) the outcome when it is
    /// known, then return `None`. Return `Some(verdict)` to have the layer
    /// book [`classify`](Classify::classify)'s outcome now, which is the
    /// default.
    ///
    /// Only asked when [`defers`](Classify::defers) is `true`, by the
    /// circuit breaker and by each fallback entry's breaker (which fails
    /// over only on an outcome known at once: a deferred one is booked,
    /// and the answer stays the caller's). Retry never defers: a late
    /// failure cannot bring the response back to retry it. A verdict dropped without a report (the caller
    /// stopped reading) counts as [`Outcome::Ignore`].
    fn defer(&self, result: &mut Result<Res, E>, verdict: Verdict) -> Option<Verdict> {
        let _ = result;
        Some(verdict)
    }
}

/// A call's outcome, to be reported once it is known. See
/// [`Classify::defer`].
///
/// It holds what the layer needs to book the call (for the breaker: the
/// generation the call was admitted in, and a half-open probe slot), so a
/// late verdict counts where the call started. Dropping it unreported
/// counts as [`Outcome::Ignore`] and frees what it held.
pub struct Verdict {
    book: Option<Box<dyn FnOnce(Outcome) + Send>>,
}

impl Verdict {
    /// A verdict that calls `book` with the outcome reported, or never
    /// when dropped unreported.
    pub fn new(book: impl FnOnce(Outcome) + Send + 'static) -> Self {
        Self {
            book: Some(Box::new(book)),
        }
    }

    /// Books the call's outcome.
    pub fn report(mut self, outcome: Outcome) {
        if let Some(book) = self.book.take() {
            book(outcome);
        }
    }
}

impl fmt::Debug for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verdict").finish_non_exhaustive()
    }
}

/// The default classifier: `Err` is a failure, `Ok` a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<Res, E> Classify<Res, E> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: &Result<Res, E>, _elapsed: Duration) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// A classifier made from a closure over the result. See [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F> {
    f: F,
}

/// Makes a [`Classify`] from `Fn(&Result<Res, E>) -> Outcome`.
pub fn classify_fn<F>(f: F) -> ClassifyFn<F> {
    ClassifyFn { f }
}

impl<F, Res, E> Classify<Res, E> for ClassifyFn<F>
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    #[inline]
    fn classify(&self, result: &Result<Res, E>, _elapsed: Duration) -> Outcome {
        (self.f)(result)
    }
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// A classifier made from a closure over the result and the call's elapsed
/// time. See [`classify_timed_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyTimedFn<F> {
    f: F,
}

/// Makes a [`Classify`] from `Fn(&Result<Res, E>, Duration) -> Outcome`; the
/// layer then measures every call's duration.
pub fn classify_timed_fn<F>(f: F) -> ClassifyTimedFn<F> {
    ClassifyTimedFn { f }
}

impl<F, Res, E> Classify<Res, E> for ClassifyTimedFn<F>
where
    F: Fn(&Result<Res, E>, Duration) -> Outcome,
{
    #[inline]
    fn classify(&self, result: &Result<Res, E>, elapsed: Duration) -> Outcome {
        (self.f)(result, elapsed)
    }

    fn uses_elapsed(&self) -> bool {
        true
    }
}

impl<F> fmt::Debug for ClassifyTimedFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyTimedFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<T, Res, E> Classify<Res, E> for std::sync::Arc<T>
where
    T: Classify<Res, E> + ?Sized,
{
    fn classify(&self, result: &Result<Res, E>, elapsed: Duration) -> Outcome {
        (**self).classify(result, elapsed)
    }

    fn uses_elapsed(&self) -> bool {
        (**self).uses_elapsed()
    }

    fn retry_after(&self, result: &Result<Res, E>) -> Option<Duration> {
        (**self).retry_after(result)
    }

    fn defers(&self) -> bool {
        (**self).defers()
    }

    fn defer(&self, result: &mut Result<Res, E>, verdict: Verdict) -> Option<Verdict> {
        (**self).defer(result, verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_counts_errors_only() {
        let c = DefaultClassifier;
        assert_eq!(
            Classify::<(), ()>::classify(&c, &Ok(()), Duration::ZERO),
            Outcome::Success
        );
        assert_eq!(
            Classify::<(), ()>::classify(&c, &Err(()), Duration::ZERO),
            Outcome::Failure
        );
        assert!(!Classify::<(), ()>::uses_elapsed(&c));
    }

    #[test]
    fn closures_adapt() {
        let c = classify_fn(|r: &Result<u8, ()>| match r {
            Ok(0) => Outcome::Ignore,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        });
        assert_eq!(c.classify(&Ok(0), Duration::ZERO), Outcome::Ignore);
        let t = classify_timed_fn(|_: &Result<u8, ()>, d: Duration| {
            if d > Duration::from_millis(10) {
                Outcome::Failure
            } else {
                Outcome::Success
            }
        });
        assert_eq!(
            t.classify(&Ok(1), Duration::from_millis(11)),
            Outcome::Failure
        );
        assert!(format!("{t:?}").contains("ClassifyTimedFn"));
    }
}
