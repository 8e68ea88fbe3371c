//! Per-key state kept in this process (the degraded fallback and the
//! over-limit cache), with a hard cap on the number of keys.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// How many keys one insertion past the cap looks at, at most, for one to
/// evict: a constant, so an insertion costs the same at any size.
const SCAN: usize = 8;

/// A map from key to a deadline (a GCRA TAT, a cache expiry) holding at
/// most `cap` keys.
///
/// A key whose deadline is at or below `now` is *spent*: its entry says
/// nothing an absent entry would not (a TAT at or below `now` is a full
/// bucket). Only spent keys are evicted, so dropping one can never let a
/// key exceed its limit; when the keys looked at are all live, the new key
/// is refused instead.
///
/// Invariant: `hand` holds every key of `map` exactly once. Keys enter
/// `hand` when inserted and leave it when evicted; updating a key does not
/// touch it. An insertion past the cap turns the hand over at most `SCAN`
/// times (a CLOCK sweep): live keys go to the back, so successive
/// insertions sweep the whole map, each at constant cost.
#[derive(Debug)]
pub(super) struct Bounded<V> {
    map: HashMap<Arc<str>, V>,
    hand: VecDeque<Arc<str>>,
    cap: usize,
}

impl<V: Copy + PartialOrd> Bounded<V> {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            hand: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.map.get(key).copied()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        debug_assert_eq!(self.map.len(), self.hand.len());
        self.map.len()
    }

    /// Sets `key` to `v`. A new key past the cap takes the place of a
    /// spent one; `Err` with the soonest deadline among the keys looked at
    /// when none of them is spent (nothing was stored).
    pub(super) fn set(&mut self, key: &str, v: V, now: V) -> Result<(), V> {
        if let Some(slot) = self.map.get_mut(key) {
            *slot = v;
            return Ok(());
        }
        if self.map.len() >= self.cap {
            self.evict(now)?;
        }
        let key: Arc<str> = Arc::from(key);
        self.hand.push_back(key.clone());
        self.map.insert(key, v);
        Ok(())
    }

    fn evict(&mut self, now: V) -> Result<(), V> {
        let mut soonest: Option<V> = None;
        for _ in 0..SCAN.min(self.hand.len()) {
            let Some(k) = self.hand.pop_front() else {
                break;
            };
            match self.map.get(&k) {
                Some(&d) if d > now => {
                    if soonest.is_none_or(|s| d < s) {
                        soonest = Some(d);
                    }
                    self.hand.push_back(k);
                }
                _ => {
                    self.map.remove(&k);
                    return Ok(());
                }
            }
        }
        Err(soonest.unwrap_or(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_of_live_keys_refuses_a_new_one_and_evicts_a_spent_one() {
        let mut m = Bounded::new(3);
        for (k, d) in [("a", 10), ("b", 20), ("c", 30)] {
            m.set(k, d, 0).unwrap();
        }
        assert_eq!(m.set("d", 40, 5), Err(10));
        assert_eq!(m.len(), 3);
        // Updating a present key never needs room.
        m.set("b", 25, 5).unwrap();
        // At 20, `a` is spent: `d` takes its place.
        m.set("d", 40, 20).unwrap();
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("d"), Some(40));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn a_sweep_finds_the_spent_key_behind_live_ones() {
        let mut m = Bounded::new(20);
        for i in 0..20 {
            // Only the last key is spent by time 50.
            let d = if i == 19 { 50 } else { 1000 };
            m.set(&i.to_string(), d, 0).unwrap();
        }
        // Each insertion looks at SCAN keys: the third one reaches it.
        assert!(m.set("x", 1000, 60).is_err());
        assert!(m.set("x", 1000, 60).is_err());
        m.set("x", 1000, 60).unwrap();
        assert_eq!(m.get("19"), None);
    }

    /// One step of a GCRA history: `key` asks at `dt` after the last step.
    #[derive(Debug, Clone)]
    struct Step {
        key: u8,
        dt: u64,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (0u8..24, 0u64..40).prop_map(|(key, dt)| Step { key, dt }),
            1..400,
        )
    }

    /// GCRA admission of one unit at `now`: the new TAT, or `None`.
    fn gcra(tat: Option<u64>, now: u64, interval: u64, tau: u64) -> Option<u64> {
        let next = tat.unwrap_or(now).max(now) + interval;
        (next - now <= tau).then_some(next)
    }

    proptest! {
        /// Over any history, the capped map never holds more than its cap,
        /// and every key's admitted calls conform to its limit: replayed
        /// through a map with no cap, each of them is admitted.
        #[test]
        fn the_cap_holds_and_no_key_escapes_its_limit(
            cap in 1usize..12,
            interval in 1u64..30,
            burst in 1u64..4,
            history in steps(),
        ) {
            let tau = interval * burst;
            let mut capped = Bounded::new(cap);
            let mut replay: HashMap<u8, u64> = HashMap::new();
            let mut now = 0;
            for s in history {
                now += s.dt;
                let key = s.key.to_string();
                let Some(tat) = gcra(capped.get(&key), now, interval, tau) else {
                    continue;
                };
                if capped.set(&key, tat, now).is_err() {
                    continue;
                }
                prop_assert!(capped.len() <= cap);
                let model = gcra(replay.get(&s.key).copied(), now, interval, tau);
                prop_assert!(model.is_some(), "key {} admitted over its limit", s.key);
                replay.insert(s.key, model.unwrap());
            }
        }
    }
}
