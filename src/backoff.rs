//! Delays that grow: retry back-off, and the breaker's open duration after
//! repeated failed probes.
//!
//! A [`Backoff`] gives the nominal delay before the `n`th retry (1-based):
//! constant, linear (`base * n`) or exponential (`base * 2^(n-1)`), always
//! capped at [`max_delay`](Backoff::max_delay) (60 s unless set) and never
//! overflowing, whatever `n` is. [`Jitter`] then spreads callers apart, as
//! in the AWS architecture note "Exponential Backoff and Jitter".
//!
//! ```
//! use std::time::Duration;
//! use tower_bulwark::backoff::{Backoff, Jitter};
//!
//! let b = Backoff::exponential(Duration::from_millis(100)).max_delay(Duration::from_secs(1));
//! assert_eq!(b.delay(1), Duration::from_millis(100));
//! assert_eq!(b.delay(4), Duration::from_millis(800));
//! assert_eq!(b.delay(5), Duration::from_secs(1)); // capped
//! assert_eq!(b.delay(u32::MAX), Duration::from_secs(1)); // no overflow
//!
//! // Jittered delays from a seeded generator are reproducible.
//! let jittered: Vec<_> = b.jitter(Jitter::Full).delays(Some(7)).take(3).collect();
//! assert_eq!(jittered, b.jitter(Jitter::Full).delays(Some(7)).take(3).collect::<Vec<_>>());
//! assert!(jittered.iter().all(|d| *d <= Duration::from_secs(1)));
//! ```

use std::time::Duration;

use crate::error::ConfigError;

/// Every back-off is capped at one minute unless set otherwise: a longer
/// pause rarely helps, and it holds the caller's resources as long.
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    Constant = 0,
    Linear = 1,
    Exponential = 2,
}

/// How long to wait before the `n`th retry. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backoff {
    growth: Growth,
    base: Duration,
    max_delay: Duration,
    jitter: Jitter,
}

/// How a nominal delay `d` is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Jitter {
    /// Exactly `d`.
    #[default]
    None = 0,
    /// Uniform in `[0, d]`: spreads callers the most.
    Full = 1,
    /// `d / 2` plus uniform in `[0, d / 2]`: never less than half.
    Equal = 2,
    /// Uniform in `[base, 3 * previous]`, capped: grows from the last delay
    /// actually slept rather than from the attempt number.
    Decorrelated,
}

impl Backoff {
    /// The same delay before every retry.
    pub fn constant(delay: Duration) -> Self {
        Self::new(Growth::Constant, delay)
    }

    /// `base * n` before the `n`th retry.
    pub fn linear(base: Duration) -> Self {
        Self::new(Growth::Linear, base)
    }

    /// `base * 2^(n-1)` before the `n`th retry.
    pub fn exponential(base: Duration) -> Self {
        Self::new(Growth::Exponential, base)
    }

    fn new(growth: Growth, base: Duration) -> Self {
        Self {
            growth,
            base,
            max_delay: DEFAULT_MAX_DELAY.max(base),
            jitter: Jitter::None,
        }
    }

    /// Caps every delay, jittered or not (default 60 s).
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Randomises delays (default [`Jitter::None`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max_delay
    }

    /// The jitter in use.
    pub fn jitter_kind(&self) -> Jitter {
        self.jitter
    }

    /// The nominal (un-jittered) delay before retry `n` (1-based; 0 is
    /// treated as 1), capped at the maximum.
    pub fn delay(&self, n: u32) -> Duration {
        let n = n.max(1);
        let base = self.base.as_nanos();
        let nanos = match self.growth {
            Growth::Constant => base,
            Growth::Linear => base.saturating_mul(u128::from(n)),
            // 2^127 overflows nothing in u128 math below the cap check, and
            // any shift past that is far beyond every cap anyway.
            Growth::Exponential if n > 100 => u128::MAX,
            Growth::Exponential => base.saturating_mul(1u128 << (n - 1)),
        };
        let capped = nanos.min(self.max_delay.as_nanos());
        // `capped` fits: it is at most `max_delay`.
        Duration::from_nanos(u64::try_from(capped).unwrap_or(u64::MAX))
    }

    /// The delay before retry `n` with jitter applied. `prev` is the delay
    /// slept before the previous retry (used by [`Jitter::Decorrelated`];
    /// pass [`Duration::ZERO`] for the first retry).
    pub fn jittered(&self, n: u32, prev: Duration, rng: &mut fastrand::Rng) -> Duration {
        let d = self.delay(n);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => uniform(rng, Duration::ZERO, d),
            Jitter::Equal => {
                let half = d / 2;
                half + uniform(rng, Duration::ZERO, d - half)
            }
            Jitter::Decorrelated => {
                let prev = prev.max(self.base);
                let hi = prev.saturating_mul(3).min(self.max_delay);
                uniform(rng, self.base.min(hi), hi)
            }
        }
    }

    /// The sequence of delays before retries 1, 2, 3, ... with jitter
    /// applied; `seed` makes it reproducible.
    pub fn delays(&self, seed: Option<u64>) -> Delays {
        Delays {
            backoff: *self,
            n: 0,
            prev: Duration::ZERO,
            rng: seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
        }
    }

    /// The back-off in a dozen bytes fewer, for a copy every call carries:
    /// `(growth, jitter, base, max_delay)`, the delays in nanoseconds
    /// (saturating: a delay past 584 years is as long as any).
    #[allow(dead_code)]
    pub(crate) fn pack(&self) -> (u8, u8, u64, u64) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        (
            self.growth as u8,
            self.jitter as u8,
            nanos(self.base),
            nanos(self.max_delay),
        )
    }

    /// The inverse of [`pack`](Self::pack).
    #[allow(dead_code)]
    pub(crate) fn unpack((growth, jitter, base, max): (u8, u8, u64, u64)) -> Self {
        let growth = match growth {
            0 => Growth::Constant,
            1 => Growth::Linear,
            _ => Growth::Exponential,
        };
        let jitter = match jitter {
            0 => Jitter::None,
            1 => Jitter::Full,
            2 => Jitter::Equal,
            _ => Jitter::Decorrelated,
        };
        Self {
            growth,
            base: Duration::from_nanos(base),
            max_delay: Duration::from_nanos(max),
            jitter,
        }
    }

    pub(crate) fn validate(
        &self,
        layer: &'static str,
        field: &'static str,
    ) -> Result<(), ConfigError> {
        if self.max_delay < self.base {
            return Err(ConfigError::new(
                layer,
                field,
                format!(
                    "max_delay ({:?}) must not be below the base delay ({:?})",
                    self.max_delay, self.base
                ),
            ));
        }
        Ok(())
    }
}

fn uniform(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let lo_n = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_n = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(lo_n..=hi_n))
}

/// An endless iterator of jittered delays. See [`Backoff::delays`].
#[derive(Debug, Clone)]
pub struct Delays {
    backoff: Backoff,
    n: u32,
    prev: Duration,
    rng: fastrand::Rng,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.n = self.n.saturating_add(1);
        let d = self.backoff.jittered(self.n, self.prev, &mut self.rng);
        self.prev = d;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn growth_kinds() {
        let c = Backoff::constant(5 * MS);
        assert_eq!((c.delay(1), c.delay(9)), (5 * MS, 5 * MS));
        let l = Backoff::linear(5 * MS);
        assert_eq!((l.delay(1), l.delay(3)), (5 * MS, 15 * MS));
        let e = Backoff::exponential(100 * MS);
        let seq: Vec<_> = (1..=5).map(|n| e.delay(n)).collect();
        assert_eq!(seq, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS]);
    }

    #[test]
    fn caps_never_overflow() {
        let e = Backoff::exponential(Duration::from_secs(1));
        assert_eq!(e.delay(1000), Duration::from_secs(60));
        assert_eq!(e.delay(u32::MAX), Duration::from_secs(60));
        let huge = Backoff::linear(Duration::MAX).max_delay(Duration::MAX);
        assert_eq!(huge.delay(u32::MAX), Duration::from_nanos(u64::MAX));
        assert_eq!(e.delay(0), e.delay(1));
    }

    #[test]
    fn invalid_cap_is_a_config_error() {
        let b = Backoff::exponential(Duration::from_secs(2)).max_delay(Duration::from_secs(1));
        let err = b.validate("retry", "backoff").unwrap_err();
        assert_eq!(err.field(), "backoff");
    }

    proptest! {
        #[test]
        fn jitter_stays_in_bounds(
            base_ms in 0u64..10_000,
            cap_ms in 0u64..120_000,
            n in 1u32..2000,
            seed: u64,
            kind in 0u8..4,
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = Duration::from_millis(cap_ms).max(base);
            let jitter = [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated][kind as usize];
            let b = Backoff::exponential(base).max_delay(cap).jitter(jitter);
            let nominal = b.delay(n);
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut prev = Duration::ZERO;
            for i in 1..=n.min(50) {
                let d = b.jittered(i, prev, &mut rng);
                prop_assert!(d <= cap);
                match jitter {
                    Jitter::None => prop_assert_eq!(d, b.delay(i)),
                    Jitter::Full => prop_assert!(d <= b.delay(i)),
                    Jitter::Equal => prop_assert!(d >= b.delay(i) / 2 && d <= b.delay(i)),
                    Jitter::Decorrelated => prop_assert!(d >= base.min(cap)),
                }
                prev = d;
            }
            prop_assert!(nominal <= cap);
        }
    }
}
