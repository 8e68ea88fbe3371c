//! Type-stable slots: shared state a response future can reach without a
//! reference count.
//!
//! A future that must report back to its layer when it finishes would
//! normally hold an `Arc` clone: two atomic read-modify-writes per call,
//! about 9 ns here, more than a whole layer's budget. Instead, a layer's
//! shared state leases a [`Slot`] whose memory is never freed: a future
//! keeps a plain [`SlotRef`] (`&'static Slot` plus the lease's
//! incarnation) and touches only the slot's atomic `word` on its fast path.
//! The cold path (a failure, a failover) upgrades the slot's weak owner to
//! the whole state, and gets `None` if the layer is gone or the slot has
//! been leased again since.
//!
//! A slot goes back to a free list when its lease (held by the shared
//! state) drops, so memory is bounded by the most layers alive at once.

use std::any::Any;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::{Arc, Mutex, Weak};

use crate::sync::AtomicU64;

type AnyWeak = Weak<dyn Any + Send + Sync>;

#[derive(Debug)]
pub(crate) struct Slot {
    /// The lessee's hot word; its meaning is the lessee's.
    pub(crate) word: AtomicU64,
    owner: Mutex<Owner>,
}

#[derive(Debug)]
struct Owner {
    /// Bumped on every lease, so a reference from an earlier lease never
    /// reaches a later lessee.
    incarnation: u64,
    weak: Option<AnyWeak>,
}

/// A plain, copyable way back to a slot and its current lessee.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotRef {
    pub(crate) slot: &'static Slot,
    incarnation: u64,
}

impl SlotRef {
    /// The lessee that made this reference, if it is still alive.
    pub(crate) fn upgrade<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let owner = self.slot.owner.lock().unwrap_or_else(|e| e.into_inner());
        if owner.incarnation != self.incarnation {
            return None;
        }
        owner.weak.as_ref()?.upgrade()?.downcast::<T>().ok()
    }
}

/// Holds a slot for the shared state that owns it; gives it back on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    r: SlotRef,
}

#[cfg(not(bulwark_loom))]
static FREE: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

impl Lease {
    /// Leases a slot for `owner`. `init` turns the slot's previous word
    /// (0 for a new slot) into the first word of this lease.
    pub(crate) fn new<T: Any + Send + Sync>(owner: Weak<T>, init: impl FnOnce(u64) -> u64) -> Self {
        #[cfg(not(bulwark_loom))]
        let reused = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        #[cfg(bulwark_loom)]
        let reused: Option<&'static Slot> = None;
        let slot: &'static Slot = reused.unwrap_or_else(|| {
            Box::leak(Box::new(Slot {
                word: AtomicU64::new(0),
                owner: Mutex::new(Owner {
                    incarnation: 0,
                    weak: None,
                }),
            }))
        });
        // Only a straggler of the previous lessee can touch the word now,
        // and whatever it wrote belongs to that lease: overwrite it.
        slot.word.store(init(slot.word.load(Acquire)), Release);
        let mut o = slot.owner.lock().unwrap_or_else(|e| e.into_inner());
        o.incarnation += 1;
        let weak: AnyWeak = owner;
        o.weak = Some(weak);
        let incarnation = o.incarnation;
        drop(o);
        Self {
            r: SlotRef { slot, incarnation },
        }
    }

    pub(crate) fn get(&self) -> SlotRef {
        self.r
    }

    pub(crate) fn slot(&self) -> &'static Slot {
        self.r.slot
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = self.r.slot;
        let mut o = slot.owner.lock().unwrap_or_else(|e| e.into_inner());
        o.incarnation += 1;
        o.weak = None;
        drop(o);
        #[cfg(not(bulwark_loom))]
        FREE.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_reference_reaches_only_its_own_lessee() {
        let a = Arc::new_cyclic(|w: &Weak<(Lease, u8)>| (Lease::new(w.clone(), |_| 7), 1u8));
        let ra = a.0.get();
        assert_eq!(ra.slot.word.load(Acquire), 7);
        assert_eq!(ra.upgrade::<(Lease, u8)>().unwrap().1, 1);
        assert!(ra.upgrade::<String>().is_none(), "wrong type");
        let slot = ra.slot;
        drop(a);
        assert!(ra.upgrade::<(Lease, u8)>().is_none(), "lessee gone");
        // Whoever leases the slot next, a stale reference never reaches it.
        let leases: Vec<_> = (0..64)
            .map(|_| {
                Arc::new_cyclic(|w: &Weak<(Lease, u8)>| (Lease::new(w.clone(), |old| old + 1), 2u8))
            })
            .collect();
        if let Some(b) = leases.iter().find(|b| std::ptr::eq(b.0.slot(), slot)) {
            assert_eq!(b.0.get().upgrade::<(Lease, u8)>().unwrap().1, 2);
        }
        assert!(ra.upgrade::<(Lease, u8)>().is_none(), "stale incarnation");
    }
}
