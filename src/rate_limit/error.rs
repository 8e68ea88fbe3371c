//! The limiter's rejections.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Rejection;

/// The bucket had too few tokens: the call was rejected without reaching
/// the inner service.
///
/// ```
/// use tower_bulwark::rate_limit::RateLimited;
/// # fn check(err: tower::BoxError) {
/// if let Some(limited) = err.downcast_ref::<RateLimited>() {
///     println!("slow down: try again in {:?}", limited.retry_after());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RateLimited {
    name: Arc<str>,
    retry_after: Duration,
    limit: f64,
    remaining: f64,
}

impl RateLimited {
    pub(crate) fn new(name: Arc<str>, retry_after: Duration, limit: f64, remaining: f64) -> Self {
        Self {
            name,
            retry_after,
            limit,
            remaining,
        }
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long until the same request would be admitted, if nothing else
    /// takes the tokens first.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The bucket's size (`max_tokens`).
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// Tokens left in the bucket when the call was rejected.
    pub fn remaining(&self) -> f64 {
        self.remaining
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rate limit ")?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        write!(f, "exceeded, retry in {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

impl Rejection for RateLimited {
    fn layer(&self) -> &'static str {
        "rate_limit"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
}

/// A request's cost can never be admitted: it is above the bucket's
/// `max_tokens`, negative, or not a number. Waiting would not help, so the
/// call fails at once rather than hanging.
#[derive(Debug, Clone)]
pub struct CostTooHigh {
    name: Arc<str>,
    cost: f64,
    max_tokens: f64,
}

impl CostTooHigh {
    pub(crate) fn new(name: Arc<str>, cost: f64, max_tokens: f64) -> Self {
        Self {
            name,
            cost,
            max_tokens,
        }
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The request's cost, as the cost function gave it.
    pub fn cost(&self) -> f64 {
        self.cost
    }

    /// The bucket's size.
    pub fn max_tokens(&self) -> f64 {
        self.max_tokens
    }
}

impl fmt::Display for CostTooHigh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request cost {} can never fit rate limit ", self.cost)?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        write!(f, "of {} tokens", self.max_tokens)
    }
}

impl std::error::Error for CostTooHigh {}

impl Rejection for CostTooHigh {
    fn layer(&self) -> &'static str {
        "rate_limit"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
