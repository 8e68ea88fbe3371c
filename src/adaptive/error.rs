//! The adaptive limit's rejection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Rejection;

/// The calls in flight were at the current limit (and stayed there for
/// `max_wait`, if waiting was allowed): the call was rejected without
/// reaching the inner service.
///
/// ```
/// use tower_bulwark::adaptive::LimitReached;
/// # fn check(err: tower::BoxError) {
/// if let Some(full) = err.downcast_ref::<LimitReached>() {
///     println!("{} is at its limit of {} calls", full.name(), full.limit());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LimitReached {
    name: Arc<str>,
    limit: usize,
    waited: Duration,
}

impl LimitReached {
    pub(crate) fn new(name: Arc<str>, limit: usize, waited: Duration) -> Self {
        Self {
            name,
            limit,
            waited,
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limit when the call was turned away.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long the call waited before giving up (zero when failing fast).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for LimitReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("adaptive limit ")?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        write!(f, "reached ({} calls in flight)", self.limit)
    }
}

impl std::error::Error for LimitReached {}

impl Rejection for LimitReached {
    fn layer(&self) -> &'static str {
        "adaptive_limit"
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// The limit cannot know when a call will finish: `None`. (The `http`
    /// mapping still answers 503.)
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}
