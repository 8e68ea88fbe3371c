//! The one place logic reads time.
//!
//! Time comes from tokio's clock, so `tokio::time::pause()` and `advance()`
//! drive every timing test, and is handed to the state machines as plain
//! nanoseconds since the layer was built. Layers read it only where their
//! mode needs it: the breaker's closed, consecutive-failure path never does.

use tokio::time::Instant;

/// Monotonic nanoseconds since the layer was built.
pub(crate) type Nanos = u64;

/// Where the rate limiter reads the time (it reads it on every call).
///
/// The default is [`ClockSource::Tokio`], the clock every other layer
/// reads: a test with `#[tokio::test(start_paused = true)]` or
/// `tokio::time::pause()` drives the limiter with no extra setting.
///
/// [`ClockSource::Fast`] is the choice for a hot path: on the CI machine a
/// read of tokio's (or std's) `Instant` costs about 21 ns and one of the
/// CPU's time-stamp counter a few, while a whole admitted call through the
/// limiter costs about 9 ns with the counter. Set it with
/// `.clock(ClockSource::Fast)` on the builder; paused tokio time then no
/// longer moves the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClockSource {
    /// tokio's clock: follows `tokio::time::pause()` and `advance()`.
    Tokio,
    /// The CPU's time-stamp counter through `quanta` (feature
    /// `rate-limit`), calibrated against the OS clock; falls back to the
    /// OS clock where no stable counter exists. Ignores tokio's paused
    /// clock.
    #[cfg(feature = "rate-limit")]
    Fast,
}

impl Default for ClockSource {
    /// [`Tokio`](ClockSource::Tokio): paused tokio time drives it.
    fn default() -> Self {
        ClockSource::Tokio
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
    /// The time-stamp counter and its reading at the origin.
    #[cfg(feature = "rate-limit")]
    fast: Option<(&'static quanta::Clock, u64)>,
}

/// One calibrated counter for the process: calibration takes a while.
#[cfg(feature = "rate-limit")]
fn tsc() -> &'static quanta::Clock {
    static TSC: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    TSC.get_or_init(quanta::Clock::new)
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self::with_source(ClockSource::Tokio)
    }

    #[allow(unused_variables, dead_code)]
    pub(crate) fn with_source(source: ClockSource) -> Self {
        Self {
            origin: Instant::now(),
            #[cfg(feature = "rate-limit")]
            fast: (source == ClockSource::Fast).then(|| {
                let c = tsc();
                (c, c.raw())
            }),
        }
    }

    /// Nanoseconds since the origin; saturates after ~584 years.
    #[inline]
    pub(crate) fn now(&self) -> Nanos {
        #[cfg(feature = "rate-limit")]
        if let Some((c, origin)) = self.fast {
            return c.delta_as_nanos(origin, c.raw());
        }
        let d = Instant::now().saturating_duration_since(self.origin);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `nanos` after the origin, for timers.
    #[allow(dead_code)]
    pub(crate) fn instant(&self, nanos: Nanos) -> Instant {
        instant_after(self.origin, std::time::Duration::from_nanos(nanos))
    }
}

/// `start + d` for a timer, saturating instead of panicking: a `Duration`
/// from a setting or an upstream can be as large as `Duration::MAX`, which
/// no `Instant` can hold. A timer 30 years out never fires in a process's
/// life, so that is where a longer one is set.
#[allow(dead_code)]
#[inline]
pub(crate) fn instant_after(start: Instant, d: std::time::Duration) -> Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);
    start.checked_add(d.min(FAR)).unwrap_or(start)
}

/// `Duration` to saturating nanoseconds.
#[inline]
pub(crate) fn nanos(d: std::time::Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
