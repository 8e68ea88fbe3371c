//! The shared limit: the calls in flight, the current limit, and the
//! algorithm that moves it.
//!
//! Admission is one compare-and-swap on the in-flight count against the
//! published limit; no lock. Each finished call takes the algorithm's lock
//! briefly to feed it one sample, and publishes the new limit when its
//! whole part changes. Calls already in flight when the limit drops finish
//! normally: the count falls below the limit as they do.

use std::sync::atomic::{
    AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::algorithm::{Estimator, Sample};
use super::{AdaptiveEvent, LimitReached};
use crate::classify::Outcome;
use crate::clock::{Clock, Nanos};
use crate::observe::{gauge, Listeners};

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
