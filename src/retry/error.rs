//! The retry layer's own error.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An attempt ran longer than the per-attempt timeout and was cut off.
///
/// It is returned only when that attempt was the last: otherwise the
/// layer tries again. It is not a rejection (the upstream was asked and
/// did not answer in time), so an outer breaker counts it as a failure.
///
/// ```
/// use tower_bulwark::retry::AttemptTimedOut;
/// # fn check(err: tower::BoxError) {
/// if let Some(t) = err.downcast_ref::<AttemptTimedOut>() {
///     println!("attempt {} took over {:?}", t.attempt(), t.timeout());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AttemptTimedOut {
    name: Arc<str>,
    attempt: u32,
    timeout: Duration,
}

impl AttemptTimedOut {
    pub(crate) fn new(name: Arc<str>, attempt: u32, timeout: Duration) -> Self {
        Self {
            name,
            attempt,
            timeout,
        }
    }

    /// The retry layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which attempt timed out (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for AttemptTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("retry ")?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        write!(
            f,
            "attempt {} timed out after {:?}",
            self.attempt, self.timeout
        )
    }
}

impl std::error::Error for AttemptTimedOut {}
