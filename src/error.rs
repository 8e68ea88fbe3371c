//! Errors shared by every layer: configuration errors and the common face of
//! rejections.
//!
//! Each layer rejects with its own small error type (`CircuitOpen`,
//! `RateLimited`, `BulkheadFull`, ...), boxed into [`BoxError`] so layers
//! compose. Every one of them implements [`Rejection`], and [`rejection`]
//! finds one inside any boxed error, however deeply it was wrapped:
//!
//! ```
//! # #[cfg(feature = "circuit-breaker")] {
//! use tower_bulwark::error::{rejection, BoxError};
//!
//! fn describe(err: &BoxError) -> String {
//!     match rejection(err.as_ref()) {
//!         Some(r) => format!("{} `{}` said no, retry in {:?}", r.layer(), r.name(), r.retry_after()),
//!         None => format!("upstream failed: {err}"),
//!     }
//! }
//! # }
//! ```

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::time::Duration;

/// The error type every layer's response future returns: a boxed error that
/// is `Send + Sync`, the same as [`tower::BoxError`].
pub type BoxError = tower::BoxError;

/// A layer's `build()` rejected its configuration.
///
/// The error names the layer and the builder field at fault, and says why.
///
/// ```
/// # #[cfg(feature = "circuit-breaker")] {
/// use tower_bulwark::CircuitBreakerLayer;
///
/// let err = CircuitBreakerLayer::builder().failure_threshold(0).build().unwrap_err();
/// assert_eq!(err.field(), "failure_threshold");
/// assert_eq!(err.to_string(), "invalid circuit_breaker config: `failure_threshold` must be at least 1");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    layer: &'static str,
    field: &'static str,
    reason: Cow<'static, str>,
}

impl ConfigError {
    /// A configuration error for `field` of `layer`, with the reason it was
    /// rejected.
    pub fn new(
        layer: &'static str,
        field: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            layer,
            field,
            reason: reason.into(),
        }
    }

    /// The layer whose builder failed, e.g. `"circuit_breaker"`.
    pub fn layer(&self) -> &'static str {
        self.layer
    }

    /// The builder field at fault, e.g. `"failure_threshold"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why the value was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} config: `{}` {}",
            self.layer, self.field, self.reason
        )
    }
}

impl Error for ConfigError {}

/// Small validation helpers that keep every builder's checks alike.
pub(crate) struct Check {
    pub(crate) layer: &'static str,
}

impl Check {
    pub(crate) fn at_least_one(&self, field: &'static str, v: u64) -> Result<(), ConfigError> {
        if v == 0 {
            return Err(ConfigError::new(self.layer, field, "must be at least 1"));
        }
        Ok(())
    }

    pub(crate) fn at_most(&self, field: &'static str, v: u64, max: u64) -> Result<(), ConfigError> {
        if v > max {
            return Err(ConfigError::new(
                self.layer,
                field,
                format!("must be at most {max} (got {v})"),
            ));
        }
        Ok(())
    }

    /// A finite number in `(0, max]`.
    #[allow(dead_code)]
    pub(crate) fn positive(&self, field: &'static str, v: f64) -> Result<(), ConfigError> {
        if !v.is_finite() || v <= 0.0 {
            return Err(ConfigError::new(
                self.layer,
                field,
                format!("must be a finite number above 0 (got {v})"),
            ));
        }
        Ok(())
    }

    /// A ratio in `(0, 1]`.
    #[allow(dead_code)]
    pub(crate) fn ratio(&self, field: &'static str, v: f64) -> Result<(), ConfigError> {
        if !v.is_finite() || v <= 0.0 || v > 1.0 {
            return Err(ConfigError::new(
                self.layer,
                field,
                format!("must be a ratio in (0, 1] (got {v})"),
            ));
        }
        Ok(())
    }

    /// A bucket that refills from empty within about 73 years (2^61 ns,
    /// the rate limiter's largest burst tolerance): slower ones lose the
    /// bucket's bound to saturating or imprecise arithmetic and admit
    /// everything. `max_tokens` and `refill_rate` are already positive.
    #[allow(dead_code)]
    pub(crate) fn refill_time(&self, max_tokens: f64, refill_rate: f64) -> Result<(), ConfigError> {
        const MAX_REFILL_NANOS: f64 = (1u64 << 61) as f64;
        let nanos = max_tokens / refill_rate * 1e9;
        // A NaN is refused too.
        if nanos.is_nan() || nanos > MAX_REFILL_NANOS {
            return Err(ConfigError::new(
                self.layer,
                "refill_rate",
                format!(
                    "is too slow for max_tokens: refilling {max_tokens} tokens at {refill_rate}/s would take more than 73 years"
                ),
            ));
        }
        Ok(())
    }

    #[allow(dead_code)]
    pub(crate) fn non_zero_duration(
        &self,
        field: &'static str,
        d: Duration,
    ) -> Result<(), ConfigError> {
        if d.is_zero() {
            return Err(ConfigError::new(
                self.layer,
                field,
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// What every rejection error of this crate can tell a caller.
///
/// A rejection is the crate's own "no" (an open circuit, an empty bucket, a
/// full bulkhead, ...) as opposed to an error of the wrapped service. Find
/// one in a [`BoxError`] with [`rejection`].
pub trait Rejection: Error + Send + Sync + 'static {
    /// The layer that rejected, e.g. `"circuit_breaker"` or `"rate_limit"`.
    fn layer(&self) -> &'static str;

    /// The name given to that layer's builder (`""` when none was set).
    fn name(&self) -> &str;

    /// How long until the same call could be admitted, when the layer knows.
    fn retry_after(&self) -> Option<Duration>;
}

type Probe = for<'a> fn(&'a (dyn Error + 'static)) -> Option<&'a dyn Rejection>;

fn probe<'a, T: Rejection>(err: &'a (dyn Error + 'static)) -> Option<&'a dyn Rejection> {
    err.downcast_ref::<T>().map(|r| r as &dyn Rejection)
}

/// Every rejection type of the enabled features, so a trait object can be
/// recovered from a `dyn Error`.
const PROBES: &[Probe] = &[
    #[cfg(feature = "circuit-breaker")]
    probe::<crate::circuit_breaker::CircuitOpen>,
    #[cfg(feature = "fallback")]
    probe::<crate::fallback::AllFailed>,
    #[cfg(feature = "rate-limit")]
    probe::<crate::rate_limit::RateLimited>,
    #[cfg(feature = "rate-limit")]
    probe::<crate::rate_limit::CostTooHigh>,
    #[cfg(feature = "bulkhead")]
    probe::<crate::bulkhead::BulkheadFull>,
    #[cfg(feature = "timeout")]
    probe::<crate::timeout::TimedOut>,
    #[cfg(feature = "adaptive")]
    probe::<crate::adaptive::LimitReached>,
];

/// Finds the crate's rejection in `err` or in its chain of
/// [`source`](Error::source)s.
///
/// Returns `None` when the error came from the wrapped service rather than
/// from one of this crate's layers.
pub fn rejection<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a dyn Rejection> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = PROBES.iter().find_map(|p| p(e)) {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

/// Finds a `T` in `err` or in its chain of sources.
#[allow(dead_code)]
pub(crate) fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

/// Whether `err` is a rejection that retrying at once cannot cure: every
/// rejection but a timeout, which says the upstream was slow this time.
pub(crate) fn refuses_retry(err: &(dyn Error + 'static)) -> bool {
    rejection(err).is_some_and(|r| r.layer() != "timeout")
}

/// Whether `err` is (or wraps) one of this crate's rejections.
pub fn is_rejection(err: &(dyn Error + 'static)) -> bool {
    rejection(err).is_some()
}
