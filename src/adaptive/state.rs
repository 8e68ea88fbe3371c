//! The shared limit: the calls in flight, the current limit, and the
//! algorithm that moves it.
//!
//! Admission is one compare-and-swap on the in-flight count against the
//! published limit; no lock. Each finished call takes the algorithm's lock
//! briefly to feed it one sample, and publishes the new limit when its
//! whole part changes. Calls already in flight when the limit drops finish
//! normally: the count falls below the limit as they do.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::algorithm::{Estimator, Sample};
use super::{AdaptiveEvent, LimitReached};
use crate::classify::Outcome;
use crate::clock::{Clock, Nanos};
use crate::observe::{gauge, Listeners};
use crate::sync::{AtomicUsize, Mutex};

#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) name: Arc<str>,
    pub(crate) max_wait: Duration,
    pub(crate) min: usize,
    pub(crate) max: usize,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    estimator: Mutex<Estimator>,
    /// Wakes waiters as slots free up; `None` when failing fast.
    pub(crate) notify: Option<Notify>,
    pub(crate) listeners: Listeners<AdaptiveEvent>,
    /// Every call's latency is read here, at its start and end.
    clock: Clock,
}

impl Core {
    pub(crate) fn new(
        name: Arc<str>,
        estimator: Estimator,
        min: usize,
        max: usize,
        max_wait: Duration,
        listeners: Listeners<AdaptiveEvent>,
        clock: Clock,
    ) -> Self {
        let limit = estimator.limit as usize;
        Self {
            name,
            max_wait,
            min,
            max,
            limit: AtomicUsize::new(limit),
            in_flight: AtomicUsize::new(0),
            estimator: Mutex::new(estimator),
            notify: (!max_wait.is_zero()).then(Notify::new),
            listeners,
            clock,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Takes a slot if the calls in flight are below the limit.
    #[inline]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Relaxed);
        let mut cur = self.in_flight.load(Acquire);
        loop {
            if cur >= limit {
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
            {
                Ok(_) => {
                    return Some(Permit {
                        core: self.clone(),
                        start: self.clock.now(),
                        in_flight: cur + 1,
                    })
                }
                Err(actual) => cur = actual,
            }
        }
    }

    #[cold]
    pub(crate) fn rejected(&self, waited: Duration) -> LimitReached {
        let limit = self.limit();
        if self.listeners.active() {
            self.listeners.emit(&AdaptiveEvent::Rejected {
                name: self.name.clone(),
                limit,
                waited,
            });
        }
        LimitReached::new(self.name.clone(), limit, waited)
    }

    fn record(&self, sample: Sample) {
        let moved = {
            // A poisoned lock only means an update panicked midway; the
            // estimator's fields are each valid on their own.
            let mut e = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
            let next = (e.update(sample) as usize).clamp(self.min, self.max);
            // Published under the lock, so the limit admission reads is
            // always the latest update's; written only when its whole part
            // moves, which most calls do not do.
            let prev = self.limit.load(Relaxed);
            (prev != next).then(|| {
                self.limit.store(next, Relaxed);
                (prev, next)
            })
        };
        if let Some((prev, next)) = moved {
            self.limit_changed(prev, next);
        }
    }

    #[cold]
    fn limit_changed(&self, from: usize, to: usize) {
        if let Some(n) = &self.notify {
            // Room for more: wake as many waiters (a few at most per step).
            for _ in from..to {
                n.notify_one();
            }
        }
        gauge("bulwark_adaptive_limit", &self.name, to as f64);
        if self.listeners.active() {
            self.listeners.emit(&AdaptiveEvent::LimitChanged {
                name: self.name.clone(),
                from,
                to,
            });
        }
    }
}

/// A slot held by one call, given back on drop: completion, cancellation
/// or a panic in the inner service. Only a call that finished with an
/// outcome feeds the algorithm.
#[derive(Debug)]
pub(crate) struct Permit {
    core: Arc<Core>,
    start: Nanos,
    in_flight: usize,
}

impl Permit {
    /// How long the call has held its slot.
    pub(crate) fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.core.clock.now().saturating_sub(self.start))
    }

    /// Feeds the finished call to the algorithm; the slot is given back
    /// when the permit drops right after.
    #[inline]
    pub(crate) fn finish(self, outcome: Outcome) {
        if outcome == Outcome::Ignore {
            return;
        }
        let rtt = self.core.clock.now().saturating_sub(self.start);
        self.core.record(Sample {
            rtt: rtt as f64,
            in_flight: self.in_flight,
            // This permit is still held, so the count includes the call.
            in_flight_end: self.core.in_flight.load(Relaxed),
            dropped: outcome == Outcome::Failure,
            start: self.start as f64,
        });
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.core.in_flight.fetch_sub(1, Release);
        if let Some(n) = &self.core.notify {
            n.notify_one();
        }
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use super::*;
    use crate::adaptive::Aimd;
    use crate::clock::ClockSource;
    use loom::thread;

    /// A limit of `initial` within `[min, max]`, moved by `aimd`.
    fn core(aimd: Aimd, initial: usize, min: usize, max: usize) -> Arc<Core> {
        Arc::new(Core::new(
            Arc::from("loom"),
            Estimator::new(aimd.into(), initial, min, max),
            min,
            max,
            Duration::ZERO,
            Listeners::default(),
            Clock::with_source(ClockSource::Tokio),
        ))
    }

    /// A caller races a failure that lowers the limit from 2 to 1 as its
    /// call ends: it is not admitted above the higher limit, a caller that
    /// starts once the lower limit is known is held to it, and every slot
    /// comes back.
    #[test]
    fn loom_adaptive_admission_races_a_lower_limit() {
        loom::model(|| {
            let c = core(Aimd::default(), 2, 1, 2);
            let failing = c.try_acquire().unwrap();
            let lowers = thread::spawn(move || failing.finish(Outcome::Failure));
            let racer = c.try_acquire();
            if let Some(p) = &racer {
                assert!(p.in_flight <= 2);
            }
            lowers.join().unwrap();
            assert_eq!(c.limit(), 1);
            let late = c.try_acquire();
            if racer.is_some() {
                assert!(late.is_none(), "admitted above the lowered limit");
            } else {
                assert_eq!(late.as_ref().map(|p| p.in_flight), Some(1));
            }
            drop((racer, late));
            assert_eq!(c.in_flight(), 0);
        });
    }

    /// A caller races a success that raises the limit from 1 to 2 as its
    /// call ends: it is not admitted above the new limit, one that starts
    /// once the new limit is known is, and every slot comes back.
    #[test]
    fn loom_adaptive_admission_races_a_higher_limit() {
        loom::model(|| {
            let c = core(Aimd::default().increase(4.0), 1, 1, 2);
            let first = c.try_acquire().unwrap();
            assert!(c.try_acquire().is_none());
            let raises = thread::spawn(move || first.finish(Outcome::Success));
            let racer = c.try_acquire();
            if let Some(p) = &racer {
                assert!(p.in_flight <= 2);
            }
            raises.join().unwrap();
            assert_eq!(c.limit(), 2);
            let late = c.try_acquire();
            if racer.is_none() {
                assert_eq!(late.as_ref().map(|p| p.in_flight), Some(1));
            } else {
                assert_eq!(late.as_ref().map(|p| p.in_flight), Some(2));
            }
            drop((racer, late));
            assert_eq!(c.in_flight(), 0);
        });
    }
}
