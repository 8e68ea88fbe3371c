//! The bulkhead's rejection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Rejection;

/// Every slot was taken (and stayed taken for `max_wait`, if waiting was
/// allowed): the call was rejected without reaching the inner service.
///
/// ```
/// use tower_bulwark::bulkhead::BulkheadFull;
/// # fn check(err: tower::BoxError) {
/// if let Some(full) = err.downcast_ref::<BulkheadFull>() {
///     println!("{} is at its {} calls", full.name(), full.capacity());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BulkheadFull {
    name: Arc<str>,
    capacity: usize,
    waited: Duration,
}

impl BulkheadFull {
    pub(crate) fn new(name: Arc<str>, capacity: usize, waited: Duration) -> Self {
        Self {
            name,
            capacity,
            waited,
        }
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The most calls it lets run at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long the call waited for a slot before giving up (zero in
    /// fail-fast mode).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead ")?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        write!(f, "is full ({} calls in flight)", self.capacity)
    }
}

impl std::error::Error for BulkheadFull {}

impl Rejection for BulkheadFull {
    fn layer(&self) -> &'static str {
        "bulkhead"
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// A bulkhead cannot know when a call will finish: `None`. (The `http`
    /// mapping still answers 503 with a short `Retry-After`.)
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
