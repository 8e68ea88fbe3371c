//! The bulkhead's slots.
//!
//! Fail-fast mode (no `max_wait`) counts slots in one atomic word: taking
//! one is a compare-and-swap that never goes above the capacity, giving it
//! back a subtraction. No lock, no allocation. Waiting mode hands slots
//! out through tokio's fair semaphore instead, so waiters are served in
//! arrival order and one that gives up leaves nothing behind.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{BulkheadEvent, BulkheadFull};
use crate::observe::{gauge, Listeners};
use crate::sync::AtomicUsize;

/// Settings validated by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) capacity: usize,
    pub(crate) max_wait: Duration,
    pub(crate) soft_limit: Option<usize>,
}

/// A slot counter: the in-memory store a backend would replace.
#[derive(Debug)]
pub(crate) struct Counter {
    in_flight: AtomicUsize,
}

impl Counter {
    pub(crate) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Takes a slot if one is free; returns the count including it.
    #[inline]
    pub(crate) fn try_acquire(&self, capacity: usize) -> Option<usize> {
        let mut cur = self.in_flight.load(Acquire);
        loop {
            if cur >= capacity {
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
            {
                Ok(_) => return Some(cur + 1),
                Err(actual) => cur = actual,
            }
        }
    }

    #[inline]
    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Release);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Acquire)
    }
}

#[derive(Debug)]
pub(crate) enum Slots {
    Counter(Counter),
    Queue(Arc<Semaphore>),
    /// Slots owned by PIDs in a state file.
    #[cfg(feature = "file-store")]
    File(crate::store::file::FileBulkhead),
    /// Leases in Redis; `here` counts this process's.
    #[cfg(feature = "redis")]
    Redis {
        bulkhead: crate::store::redis::RedisBulkhead,
        here: Counter,
    },
}

#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) cfg: Config,
    pub(crate) slots: Slots,
    pub(crate) listeners: Listeners<BulkheadEvent>,
}

/// A held slot, given back on drop (completion, cancellation or panic).
#[derive(Debug)]
pub(crate) enum Slot {
    Counter(Arc<Core>),
    Permit(#[allow(dead_code)] OwnedSemaphorePermit),
    /// Given back to the file by its own drop.
    #[cfg(feature = "file-store")]
    File(#[allow(dead_code)] crate::store::file::FileSlot),
    /// Boxed: keeps the memory path's future small.
    #[cfg(feature = "redis")]
    Redis(#[allow(dead_code)] Box<RedisSlot>),
}

/// A Redis lease and the count of this process's leases it is part of.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub(crate) struct RedisSlot {
    #[allow(dead_code)]
    pub(crate) lease: crate::store::redis::RedisLease,
    pub(crate) core: Arc<Core>,
}

#[cfg(feature = "redis")]
impl Drop for RedisSlot {
    fn drop(&mut self) {
        if let Slots::Redis { here, .. } = &self.core.slots {
            here.release();
        }
    }
}

impl Drop for Slot {
    #[inline]
    fn drop(&mut self) {
        if let Slot::Counter(core) = self {
            if let Slots::Counter(c) = &core.slots {
                c.release();
            }
        }
    }
}

impl Core {
    pub(crate) fn new(
        cfg: Config,
        listeners: Listeners<BulkheadEvent>,
        shared: Option<Slots>,
    ) -> Self {
        let slots = match shared {
            Some(s) => s,
            None if cfg.max_wait.is_zero() => Slots::Counter(Counter::new()),
            None => Slots::Queue(Arc::new(Semaphore::new(cfg.capacity))),
        };
        Self {
            cfg,
            slots,
            listeners,
        }
    }

    /// Takes a slot at once if one is free.
    #[inline]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        match &self.slots {
            Slots::Counter(c) => {
                let n = c.try_acquire(self.cfg.capacity)?;
                if self.cfg.soft_limit == Some(n) {
                    self.soft_limit_reached(n);
                }
                Some(Slot::Counter(self.clone()))
            }
            Slots::Queue(sem) => {
                let permit = sem.clone().try_acquire_owned().ok()?;
                self.acquired();
                Some(Slot::Permit(permit))
            }
            #[cfg(feature = "file-store")]
            Slots::File(b) => b.try_acquire().map(Slot::File),
            // Needs a round trip: taken in the response future.
            #[cfg(feature = "redis")]
            Slots::Redis { .. } => None,
        }
    }

    /// Called when a semaphore permit was taken.
    pub(crate) fn acquired(&self) {
        if let Some(soft) = self.cfg.soft_limit {
            if self.in_flight() == soft {
                self.soft_limit_reached(soft);
            }
        }
    }

    #[cold]
    fn soft_limit_reached(&self, n: usize) {
        gauge("bulwark_bulkhead_in_flight", &self.cfg.name, n as f64);
        self.listeners.emit(&BulkheadEvent::SoftLimitReached {
            name: self.cfg.name.clone(),
            in_flight: n,
            capacity: self.cfg.capacity,
        });
    }

    #[cold]
    pub(crate) fn rejected(&self, waited: Duration) -> BulkheadFull {
        self.listeners.emit(&BulkheadEvent::Rejected {
            name: self.cfg.name.clone(),
            capacity: self.cfg.capacity,
            waited,
        });
        BulkheadFull::new(self.cfg.name.clone(), self.cfg.capacity, waited)
    }

    pub(crate) fn in_flight(&self) -> usize {
        match &self.slots {
            Slots::Counter(c) => c.in_flight(),
            Slots::Queue(sem) => self.cfg.capacity - sem.available_permits().min(self.cfg.capacity),
            #[cfg(feature = "file-store")]
            Slots::File(b) => b.in_use() as usize,
            #[cfg(feature = "redis")]
            Slots::Redis { here, .. } => here.in_flight(),
        }
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Three callers race for two slots while one is given back: the count
    /// never exceeds the capacity and ends where the admissions put it.
    #[test]
    fn loom_bulkhead_counter() {
        loom::model(|| {
            let c = Arc::new(Counter::new());
            assert_eq!(c.try_acquire(2), Some(1));
            let t: Vec<_> = (0..2)
                .map(|_| {
                    let c = c.clone();
                    thread::spawn(move || {
                        let got = c.try_acquire(2);
                        if let Some(n) = got {
                            assert!(n <= 2);
                        }
                        got.is_some()
                    })
                })
                .collect();
            c.release();
            let admitted = t
                .into_iter()
                .filter(|_| true)
                .map(|h| h.join().unwrap())
                .filter(|&b| b)
                .count();
            assert!(admitted >= 1);
            assert_eq!(c.in_flight(), admitted);
        });
    }
}
