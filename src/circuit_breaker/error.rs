//! The breaker's rejection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::CircuitState;
use crate::error::Rejection;

/// The breaker rejected a call without calling the inner service.
///
/// ```
/// use tower_bulwark::circuit_breaker::CircuitOpen;
/// # fn check(err: tower::BoxError) {
/// if let Some(open) = err.downcast_ref::<CircuitOpen>() {
///     println!("{} is open, next probe in {:?}", open.name(), open.retry_after());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CircuitOpen {
    name: Arc<str>,
    state: CircuitState,
    retry_after: Option<Duration>,
}

impl CircuitOpen {
    pub(crate) fn new(name: Arc<str>, state: CircuitState, retry_after: Option<Duration>) -> Self {
        Self {
            name,
            state,
            retry_after,
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state that rejected: open, half-open (all probe slots taken), or
    /// forced open.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Time until the next probe will be admitted, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit ")?;
        if !self.name.is_empty() {
            write!(f, "`{}` ", self.name)?;
        }
        match self.state {
            CircuitState::HalfOpen => f.write_str("is half-open and all probe slots are taken"),
            CircuitState::ForcedOpen => f.write_str("is forced open"),
            _ => f.write_str("is open"),
        }
    }
}

impl std::error::Error for CircuitOpen {}

impl Rejection for CircuitOpen {
    fn layer(&self) -> &'static str {
        "circuit_breaker"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}
