//! The timeout's rejection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Rejection;

/// The call did not finish within its timeout; the inner call was dropped
/// (cancelled).
///
/// It is an error like any other: a circuit breaker above the timeout
/// counts it as a failure, and a retry above it tries again. With the
/// `http` feature it stands for `504 Gateway Timeout`, with `grpc` for
/// `DEADLINE_EXCEEDED`.
///
/// ```
/// use tower_bulwark::timeout::TimedOut;
/// # fn check(err: tower::BoxError) {
/// if let Some(t) = err.downcast_ref::<TimedOut>() {
///     println!("`{}` gave up after {:?}", t.name(), t.timeout());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TimedOut {
    name: Arc<str>,
    timeout: Duration,
}

impl TimedOut {
    pub(crate) fn new(name: Arc<str>, timeout: Duration) -> Self {
        Self { name, timeout }
    }

    /// The timeout layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The timeout the call ran out of: the configured one, or the shorter
    /// per-request one.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("call ")?;
        if !self.name.is_empty() {
            write!(f, "through `{}` ", self.name)?;
        }
        write!(f, "timed out after {:?}", self.timeout)
    }
}

impl std::error::Error for TimedOut {}

impl Rejection for TimedOut {
    fn layer(&self) -> &'static str {
        "timeout"
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// A timeout says nothing about when the upstream will be quicker:
    /// `None`.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
