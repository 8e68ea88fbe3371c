//! Type-stable slots for the breaker's hot word.
//!
//! A closed-breaker call must reach the breaker again when it finishes, and
//! an `Arc` clone per call (two atomic read-modify-writes) would cost about
//! as much as everything else on the path together. So the word that the
//! closed path reads lives in a [`Slot`] whose memory is never freed: a
//! call's future keeps a plain `&'static Slot` and its admission
//! generation, and only a failure (the cold path) upgrades the slot's weak
//! owner to the full breaker.
//!
//! When a breaker is dropped its slot goes back to a free list for the next
//! breaker, after its generation jumps by 2^28, so a straggling future from
//! the old breaker finds a generation that is not its own and records
//! nothing. Memory is bounded by the most breakers ever alive at once.

use std::sync::atomic::Ordering::{AcqRel, Acquire};
use std::sync::{Arc, Mutex, Weak};

use super::state::Core;
use super::word::Word;
use super::CircuitState;
use crate::sync::AtomicU64;

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) word: AtomicU64,
    owner: Mutex<Weak<Core>>,
}

#[cfg(not(bulwark_loom))]
static FREE: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

/// A slot for a new breaker, its word closed with no counts.
pub(crate) fn acquire() -> &'static Slot {
    #[cfg(not(bulwark_loom))]
    if let Some(slot) = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop() {
        return slot;
    }
    Box::leak(Box::new(Slot {
        word: AtomicU64::new(Word::new(CircuitState::Closed, 0, 0, 0).0),
        owner: Mutex::new(Weak::new()),
    }))
}

impl Slot {
    pub(crate) fn set_owner(&self, owner: Weak<Core>) {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = owner;
    }

    /// The breaker this slot belongs to now, if it is still alive.
    pub(crate) fn owner(&self) -> Option<Arc<Core>> {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    /// Records a closed-generation success: clears the consecutive-failure
    /// count if there is one. Usually a single load.
    #[inline]
    pub(crate) fn record_success(&self, gen: u32) {
        let mut w = Word(self.word.load(Acquire));
        while w.gen() == gen && w.is_closed() && w.a() != 0 {
            match self
                .word
                .compare_exchange_weak(w.0, w.with_a(0).0, AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(cur) => w = Word(cur),
            }
        }
    }

    /// Hands the slot to the free list once its breaker is gone.
    pub(crate) fn retire(&'static self) {
        self.reset_for_reuse();
        #[cfg(not(bulwark_loom))]
        FREE.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }

    fn reset_for_reuse(&self) {
        let mut w = Word(self.word.load(Acquire));
        loop {
            let fresh = Word::new(CircuitState::Closed, w.gen().wrapping_add(1 << 28), 0, 0);
            match self
                .word
                .compare_exchange_weak(w.0, fresh.0, AcqRel, Acquire)
            {
                Ok(_) => break,
                Err(cur) => w = Word(cur),
            }
        }
        self.set_owner(Weak::new());
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use std::sync::atomic::Ordering::Release;

    use super::*;

    #[test]
    fn a_reused_slot_ignores_stale_generations() {
        // A slot of its own, so no other test can pick it up.
        let slot = Slot {
            word: AtomicU64::new(Word::new(CircuitState::Closed, 0, 3, 0).0),
            owner: Mutex::new(Weak::new()),
        };
        let stale_gen = Word(slot.word.load(Acquire)).gen();
        slot.reset_for_reuse();
        let fresh = Word(slot.word.load(Acquire));
        assert_ne!(fresh.gen(), stale_gen);
        assert_eq!((fresh.state(), fresh.a()), (CircuitState::Closed, 0));
        // The new breaker has failures; a straggler's success clears nothing.
        slot.word.store(fresh.with_a(2).0, Release);
        slot.record_success(stale_gen);
        assert_eq!(Word(slot.word.load(Acquire)).a(), 2);
        // Its own success does.
        slot.record_success(fresh.gen());
        assert_eq!(Word(slot.word.load(Acquire)).a(), 0);
        assert!(slot.owner().is_none());
    }
}
