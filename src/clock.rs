//! The one place logic reads time.
//!
//! Time comes from tokio's clock, so `tokio::time::pause()` and `advance()`
//! drive every timing test, and is handed to the state machines as plain
//! nanoseconds since the layer was built. Layers read it only where their
//! mode needs it: the breaker's closed, consecutive-failure path never does.

use tokio::time::Instant;

/// Monotonic nanoseconds since the layer was built.
pub(crate) type Nanos = u64;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// Nanoseconds since the origin; saturates after ~584 years.
    #[inline]
    pub(crate) fn now(&self) -> Nanos {
        let d = Instant::now().saturating_duration_since(self.origin);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `nanos` after the origin, for timers.
    #[allow(dead_code)]
    pub(crate) fn instant(&self, nanos: Nanos) -> Instant {
        self.origin + std::time::Duration::from_nanos(nanos)
    }
}

/// `Duration` to saturating nanoseconds.
#[inline]
pub(crate) fn nanos(d: std::time::Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
