//! Bulkhead slots given back, queued until this process's next round on
//! the state file.
//!
//! Giving a slot back is a change of the shared state like any other, and
//! a round of its own would double the lock rounds of a call. Instead the
//! slot's id goes into this store's queue, and every round the store makes
//! (a call's admission, a breaker's outcome, a flush) first applies the
//! whole queue to the state it read under the lock. When no round comes
//! for `release_delay`, a tokio task makes one to flush the queue.
//!
//! Invariant: the holders the file lists are the slots really held, plus
//! the slots queued here (and in peers' queues), plus those of processes
//! that ended (reclaimed by the next claim). So
//!
//! - the file never lists fewer holders than hold a slot: a bulkhead
//!   never gives out more than its capacity across processes;
//! - every round of this store applies the queue before its own change,
//!   so a call in this process sees every slot given back here before it,
//!   at once (and may take that very slot);
//! - a peer sees a slot given back here at most `release_delay` later
//!   while this process runs its runtime and the file can be written, or
//!   once the process has ended.
//!
//! A batch taken from the queue is put back unless its round wrote the
//! file (the round failed, the store degraded, or a listener panicked), so
//! a give-back is never lost while the process lives; applying one twice
//! does nothing, as its id is gone from the file.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{lock_mutex, FileStore, State, StoreShared};

/// One slot to give back: the bulkhead's name and the slot's id.
#[derive(Debug, Clone)]
pub(super) struct Release {
    pub(super) name: Arc<str>,
    pub(super) id: u64,
}

/// This store's queued give-backs.
#[derive(Debug, Default)]
pub(super) struct Releases {
    queue: Mutex<Queue>,
    /// The store the queue belongs to, for the flush tasks it starts.
    store: Weak<StoreShared>,
    /// The store's `release_delay`: zero starts no flush task.
    delay: Duration,
}

#[derive(Debug, Default)]
struct Queue {
    slots: Vec<Release>,
    /// When the queue last went from empty to not empty.
    since: Option<Instant>,
    /// A flush task is alive (it re-checks the queue before it ends).
    armed: bool,
    /// Batches written to the file: a flush that moved it on succeeded.
    written: u64,
    /// The runtime the last flush task ran on, for slots put back by a
    /// round made outside any runtime.
    rt: Option<tokio::runtime::Handle>,
}

/// A batch taken from the queue for one round: put back when dropped,
/// unless [`written`](Drained::written) said the file has it.
pub(super) struct Drained<'a> {
    releases: &'a Releases,
    slots: Vec<Release>,
    since: Option<Instant>,
}

impl Releases {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        lock_mutex(&self.queue)
    }

    /// The queue of the store `store` points to, whose delay is `delay`.
    pub(super) fn new(store: Weak<StoreShared>, delay: Duration) -> Self {
        Self {
            queue: Mutex::default(),
            store,
            delay,
        }
    }

    /// Queues a slot, and starts a flush task if none is armed.
    pub(super) fn push(&self, r: Release) {
        {
            let mut q = self.lock();
            if q.slots.is_empty() {
                q.since = Some(Instant::now());
            }
            q.slots.push(r);
        }
        self.arm();
    }

    /// Whether a flush task can run: a delay to wait, on a tokio runtime.
    pub(super) fn can_flush(&self) -> bool {
        !self.delay.is_zero() && tokio::runtime::Handle::try_current().is_ok()
    }

    /// Starts a flush task unless one is armed or none can run. Called
    /// whenever slots enter the queue (given back, or put back by a round
    /// that could not write them), so queued slots always have a task
    /// that will write them, whatever became of an earlier one.
    fn arm(&self) {
        if self.delay.is_zero() {
            return;
        }
        let current = tokio::runtime::Handle::try_current().ok();
        let rt = {
            let mut q = self.lock();
            if current.is_some() {
                q.rt.clone_from(&current);
            }
            let Some(rt) = current.or_else(|| q.rt.clone()) else {
                return;
            };
            if std::mem::replace(&mut q.armed, true) {
                return;
            }
            rt
        };
        // Made before the spawn: a task dropped unpolled (its runtime is
        // shutting down) disarms as it goes, so a later give-back starts
        // another.
        let disarm = Disarm(self.store.clone());
        drop(rt.spawn(flush_later(self.store.clone(), disarm)));
    }

    /// Takes the whole queue for a round.
    pub(super) fn take(&self) -> Drained<'_> {
        let mut q = self.lock();
        let since = q.since.take();
        Drained {
            releases: self,
            slots: std::mem::take(&mut q.slots),
            since,
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().slots.is_empty()
    }

    /// Takes the whole queue for good (the store is going away).
    pub(super) fn take_all(&mut self) -> Vec<Release> {
        let q = self.queue.get_mut().unwrap_or_else(|e| e.into_inner());
        q.since = None;
        std::mem::take(&mut q.slots)
    }

    /// Forgets the queue (the state file was removed).
    pub(super) fn clear(&self) {
        let mut q = self.lock();
        q.slots.clear();
        q.since = None;
    }

    /// Whether the slot `id` of bulkhead `name` waits in the queue.
    pub(super) fn queued(&self, name: &str, id: u64) -> bool {
        self.lock()
            .slots
            .iter()
            .any(|r| r.id == id && &*r.name == name)
    }

    /// Applies the queue to a copy of the state (what this process sees).
    pub(super) fn apply_queued(&self, state: &mut State) {
        apply(state, &self.lock().slots);
    }

    fn put_back(&self, mut slots: Vec<Release>, since: Option<Instant>) {
        {
            let mut q = self.lock();
            q.since = match (q.since, since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b).or_else(|| Some(Instant::now())),
            };
            slots.append(&mut q.slots);
            q.slots = slots;
        }
        // A flush task may have found the queue empty while this batch
        // was out, and ended.
        self.arm();
    }
}

impl Drained<'_> {
    /// Gives the batch's slots back in `state`.
    pub(super) fn apply(&self, state: &mut State) {
        apply(state, &self.slots);
    }

    /// Adds the slots of an earlier batch (a span's, taken when it opened).
    pub(super) fn extend(&mut self, slots: Vec<Release>) {
        self.slots.extend(slots);
    }

    /// The write failed: only the slots `file` (the state read under the
    /// lock) lists still need giving back there. The rest (taken in a
    /// round whose write failed too, or reclaimed by a peer) are dropped,
    /// so the queue never outgrows the slots the file lists.
    pub(super) fn keep_listed(&mut self, file: &State) {
        self.slots.retain(|r| {
            file.bulkheads
                .get(&*r.name)
                .is_some_and(|e| e.holders.iter().any(|h| h.id == r.id))
        });
    }

    /// The file has the batch: nothing to put back.
    pub(super) fn written(mut self) {
        if !self.slots.is_empty() {
            self.slots.clear();
            let mut q = self.releases.lock();
            q.written = q.written.wrapping_add(1);
        }
    }

    /// Keeps the batch out of the queue until the round it joined ends.
    pub(super) fn into_slots(mut self) -> Vec<Release> {
        std::mem::take(&mut self.slots)
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            self.releases
                .put_back(std::mem::take(&mut self.slots), self.since);
        }
    }
}

pub(super) fn apply(state: &mut State, slots: &[Release]) {
    for r in slots {
        if let Some(e) = state.bulkheads.get_mut(&*r.name) {
            e.release(r.id);
        }
    }
}

/// Disarms the store's queue when a flush task ends other than by finding
/// it empty: dropped unpolled or unfinished (its runtime shut down) or
/// unwound by a panic in its round; a later give-back starts another.
pub(super) struct Disarm(Weak<StoreShared>);

impl Disarm {
    /// The task ended by finding the queue empty, and disarmed it then.
    fn done(mut self) {
        self.0 = Weak::new();
    }
}

impl Drop for Disarm {
    fn drop(&mut self) {
        if let Some(s) = self.0.upgrade() {
            s.releases.lock().armed = false;
        }
    }
}

/// Flushes `store`'s queue once it has waited `release_delay` with no
/// round taking it; ends when the queue is empty or the store is gone.
///
/// Holds the store only while it makes a round, so a store dropped by
/// every user meanwhile flushes in its own drop.
pub(super) async fn flush_later(store: Weak<StoreShared>, disarm: Disarm) {
    let mut failures = 0u32;
    loop {
        let Some(shared) = store.upgrade() else {
            return;
        };
        let (due, written) = {
            let mut q = shared.releases.lock();
            let Some(since) = q.since.filter(|_| !q.slots.is_empty()) else {
                q.armed = false;
                disarm.done();
                return;
            };
            (
                crate::clock::instant_after(since, shared.release_delay),
                q.written,
            )
        };
        if Instant::now() < due {
            drop(shared);
            tokio::time::sleep_until(due).await;
            continue;
        }
        let store_now = FileStore { inner: shared };
        let _ = store_now.round_async(|_| ()).await;
        if store_now.inner.releases.lock().written != written {
            failures = 0;
            continue;
        }
        // No round wrote the queue (the file cannot be used): try again
        // after a pause from the delay (at least 10 ms) doubling up to a
        // second, rather than spin.
        failures = failures.saturating_add(1);
        let pause = store_now
            .inner
            .release_delay
            .max(Duration::from_millis(10))
            .saturating_mul(1 << failures.min(8))
            .min(Duration::from_secs(1));
        drop(store_now);
        tokio::time::sleep(pause).await;
    }
}
