//! The bulkhead's slots.
//!
//! Fail-fast mode (no `max_wait`) counts slots in one atomic word: taking
//! one is a compare-and-swap that never goes above the capacity, giving it
//! back a subtraction. No lock, no allocation. Waiting mode hands slots
//! out through tokio's fair semaphore instead, so waiters are served in
//! arrival order and one that gives up leaves nothing behind.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::Arc;
#[cfg(not(bulwark_loom))]
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{BulkheadEvent, BulkheadFull};
use crate::observe::{gauge, Listeners};
use crate::sync::AtomicU64;

/// Settings validated by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) capacity: usize,
    pub(crate) max_wait: Duration,
    pub(crate) soft_limit: Option<usize>,
}

/// Set in a counter's word once its bulkhead is gone; the call that gives
/// back the last slot then recycles the cell.
const ORPHAN: u64 = 1 << 63;

/// A counter's memory: type-stable, never freed, and on a cache line of
/// its own so calls on other layers do not contend with it.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Cell {
    word: AtomicU64,
}

/// Cells whose bulkhead is gone and whose last slot came back.
#[cfg(not(bulwark_loom))]
static FREE: Mutex<Vec<&'static Cell>> = Mutex::new(Vec::new());

fn recycle(cell: &'static Cell) {
    #[cfg(not(bulwark_loom))]
    FREE.lock().unwrap_or_else(|e| e.into_inner()).push(cell);
    #[cfg(bulwark_loom)]
    let _ = cell;
}

/// A slot counter: the in-memory store a backend would replace.
///
/// The count lives in a [`Cell`] that outlives the bulkhead, so a held slot
/// is a plain `&'static Cell`: no reference count is taken per call (that
/// alone was two atomic read-modify-writes, about a third of the layer's
/// cost). When the bulkhead is dropped with calls still in flight, the
/// cell is marked [`ORPHAN`] and the last of them recycles it; a cell is
/// never reused while anything can still touch it.
#[derive(Debug)]
pub(crate) struct Counter {
    cell: &'static Cell,
}

impl Counter {
    pub(crate) fn new() -> Self {
        #[cfg(not(bulwark_loom))]
        let reused = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        #[cfg(bulwark_loom)]
        let reused: Option<&'static Cell> = None;
        let cell = reused.unwrap_or_else(|| {
            Box::leak(Box::new(Cell {
                word: AtomicU64::new(0),
            }))
        });
        // A recycled cell has no slot out: nothing else can touch it.
        cell.word.store(0, Release);
        Self { cell }
    }

    /// Takes a slot if one is free; returns the count including it.
    #[inline]
    pub(crate) fn try_acquire(&self, capacity: usize) -> Option<(usize, &'static Cell)> {
        let word = &self.cell.word;
        let mut cur = word.load(Acquire);
        loop {
            if cur >= capacity as u64 {
                return None;
            }
            match word.compare_exchange_weak(cur, cur + 1, AcqRel, Acquire) {
                Ok(_) => return Some((cur as usize + 1, self.cell)),
                Err(actual) => cur = actual,
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        (self.cell.word.load(Acquire) & !ORPHAN) as usize
    }

    /// Gives back a slot taken from this (still alive) counter.
    #[cfg(feature = "redis")]
    pub(crate) fn release(&self) {
        release(self.cell);
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        // Only calls already holding a slot can still touch the cell.
        let prev = self.cell.word.fetch_or(ORPHAN, AcqRel);
        if prev & !ORPHAN == 0 {
            recycle(self.cell);
        }
    }
}

/// Gives a counter slot back.
#[inline]
fn release(cell: &'static Cell) {
    let prev = cell.word.fetch_sub(1, Release);
    if prev == ORPHAN | 1 {
        last_of_orphan(cell);
    }
}

#[cold]
fn last_of_orphan(cell: &'static Cell) {
    // Synchronise with every release before ours, then hand the cell on.
    let _ = cell.word.load(Acquire);
    recycle(cell);
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
pub(crate) enum HeldSlot {
    Counter(&'static Cell),
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

impl Drop for HeldSlot {
    #[inline]
    fn drop(&mut self) {
        if let HeldSlot::Counter(cell) = self {
            release(cell);
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
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<HeldSlot> {
        match &self.slots {
            Slots::Counter(c) => {
                let (n, cell) = c.try_acquire(self.cfg.capacity)?;
                // The guard exists before any listener runs: one that
                // panics unwinds through it and the slot comes back.
                let slot = HeldSlot::Counter(cell);
                if self.cfg.soft_limit == Some(n) {
                    self.soft_limit_reached(n);
                }
                Some(slot)
            }
            Slots::Queue(sem) => {
                let slot = HeldSlot::Permit(sem.clone().try_acquire_owned().ok()?);
                self.acquired();
                Some(slot)
            }
            // Taken by the service: the file's lock may be busy.
            #[cfg(feature = "file-store")]
            Slots::File(_) => None,
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

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use super::*;

    /// A bulkhead dropped with a slot out keeps its cell off the free list
    /// until that slot comes back, so no later bulkhead can share it.
    #[test]
    fn an_orphaned_cell_is_recycled_by_its_last_slot() {
        let c = Counter::new();
        let cell = c.cell;
        let (n, held) = c.try_acquire(2).unwrap();
        assert_eq!(n, 1);
        drop(c);
        assert_eq!(cell.word.load(Acquire), ORPHAN | 1);
        let others: Vec<_> = (0..64).map(|_| Counter::new()).collect();
        assert!(others.iter().all(|o| !std::ptr::eq(o.cell, cell)));
        drop(HeldSlot::Counter(held));
        // Now it is free (or already leased again, counting from zero).
        let w = cell.word.load(Acquire);
        assert!(w == ORPHAN || w & !ORPHAN == 0, "{w:#x}");
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Three callers race for two slots while one is given back: the count
    /// never exceeds the capacity and ends where the admissions put it.
    /// Then the bulkhead goes away while a slot still out is given back on
    /// another thread: the cell ends orphaned with nothing counted.
    #[test]
    fn loom_bulkhead_counter() {
        loom::model(|| {
            let c = Arc::new(Counter::new());
            let (n, first) = c.try_acquire(2).unwrap();
            assert_eq!(n, 1);
            let t: Vec<_> = (0..2)
                .map(|_| {
                    let c = c.clone();
                    thread::spawn(move || {
                        c.try_acquire(2).map(|(n, cell)| {
                            assert!(n <= 2);
                            HeldSlot::Counter(cell)
                        })
                    })
                })
                .collect();
            drop(HeldSlot::Counter(first));
            let mut held: Vec<HeldSlot> = t.into_iter().filter_map(|h| h.join().unwrap()).collect();
            assert!(!held.is_empty());
            assert_eq!(c.in_flight(), held.len());
            let cell = c.cell;
            let last = held.pop().unwrap();
            drop(held);
            let straggler = thread::spawn(move || drop(last));
            drop(c);
            straggler.join().unwrap();
            assert_eq!(cell.word.load(Acquire), ORPHAN);
        });
    }
}
