//! Sliding windows for the failure-rate mode.

use std::collections::VecDeque;
use std::time::Duration;

use crate::clock::Nanos;

/// The window over which the failure rate is computed.
///
/// Without a window the breaker counts consecutive failures (the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `d`, kept in ten buckets (so the window moves
    /// in steps of a tenth of `d`).
    Time(Duration),
}

impl Window {
    /// A window of the last `n` calls.
    pub fn count(n: u32) -> Self {
        Window::Count(n)
    }

    /// A window of the calls in the last `d`.
    pub fn time(d: Duration) -> Self {
        Window::Time(d)
    }
}

/// Totals of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Totals {
    fn add(&mut self, failure: bool, slow: bool) {
        self.calls += 1;
        self.failures += u32::from(failure);
        self.slow += u32::from(slow);
    }

    fn sub(&mut self, other: Totals) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }

    pub(crate) fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    pub(crate) fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

fn ratio(n: u32, d: u32) -> f64 {
    if d == 0 {
        0.0
    } else {
        f64::from(n) / f64::from(d)
    }
}

const TIME_BUCKETS: u64 = 10;

/// Slots a count window reserves when made; it grows from there.
const RING_PREALLOC: usize = 128;

/// The recorded outcomes of one window; plain data, driven by `now`.
#[derive(Debug)]
pub(crate) enum Recorder {
    Count {
        size: usize,
        /// bit 0: failure, bit 1: slow.
        ring: VecDeque<u8>,
        totals: Totals,
    },
    Time {
        span: Nanos,
        /// (bucket epoch, totals), oldest first.
        buckets: VecDeque<(u64, Totals)>,
        totals: Totals,
    },
}

impl Recorder {
    pub(crate) fn new(w: Window) -> Self {
        match w {
            Window::Count(n) => Recorder::Count {
                size: n as usize,
                // The ring grows as calls come: a window of millions of
                // calls must not reserve them all up front, per breaker.
                ring: VecDeque::with_capacity((n as usize).min(RING_PREALLOC)),
                totals: Totals::default(),
            },
            Window::Time(d) => Recorder::Time {
                span: (crate::clock::nanos(d) / TIME_BUCKETS).max(1),
                buckets: VecDeque::with_capacity(TIME_BUCKETS as usize + 1),
                totals: Totals::default(),
            },
        }
    }

    pub(crate) fn record(&mut self, failure: bool, slow: bool, now: Nanos) -> Totals {
        match self {
            Recorder::Count { size, ring, totals } => {
                if ring.len() == *size {
                    let old = ring.pop_front().unwrap_or(0);
                    totals.sub(Totals {
                        calls: 1,
                        failures: u32::from(old & 1),
                        slow: u32::from(old >> 1),
                    });
                }
                ring.push_back(u8::from(failure) | (u8::from(slow) << 1));
                totals.add(failure, slow);
                *totals
            }
            Recorder::Time { .. } => {
                self.expire(now);
                let Recorder::Time {
                    span,
                    buckets,
                    totals,
                } = self
                else {
                    unreachable!()
                };
                let epoch = now / *span;
                match buckets.back_mut() {
                    Some((e, t)) if *e == epoch => t.add(failure, slow),
                    _ => {
                        let mut t = Totals::default();
                        t.add(failure, slow);
                        buckets.push_back((epoch, t));
                    }
                }
                totals.add(failure, slow);
                *totals
            }
        }
    }

    /// Drops time buckets that have left the window.
    fn expire(&mut self, now: Nanos) {
        if let Recorder::Time {
            span,
            buckets,
            totals,
        } = self
        {
            let epoch = now / *span;
            while let Some((e, t)) = buckets.front() {
                if epoch.saturating_sub(*e) < TIME_BUCKETS {
                    break;
                }
                totals.sub(*t);
                buckets.pop_front();
            }
        }
    }

    pub(crate) fn totals(&mut self, now: Nanos) -> Totals {
        self.expire(now);
        match self {
            Recorder::Count { totals, .. } | Recorder::Time { totals, .. } => *totals,
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Recorder::Count { ring, totals, .. } => {
                ring.clear();
                *totals = Totals::default();
            }
            Recorder::Time {
                buckets, totals, ..
            } => {
                buckets.clear();
                *totals = Totals::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn count_window_slides() {
        let mut r = Recorder::new(Window::count(3));
        r.record(true, false, 0);
        r.record(true, true, 0);
        let t = r.record(false, false, 0);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 2,
                slow: 1
            }
        );
        let t = r.record(false, false, 0);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        let t = r.record(false, false, 0);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn time_window_expires_buckets() {
        let mut r = Recorder::new(Window::time(Duration::from_secs(10)));
        r.record(true, false, 0);
        r.record(true, false, 5 * S);
        assert_eq!(r.totals(9 * S).failures, 2);
        // The first bucket leaves the window after 10 s.
        assert_eq!(r.totals(10 * S).failures, 1);
        assert_eq!(r.totals(15 * S).failures, 0);
        let t = r.record(false, false, 100 * S);
        assert_eq!(
            t,
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        r.clear();
        assert_eq!(r.totals(100 * S).calls, 0);
    }
}
