//! Per-key buckets with bounded memory.
//!
//! Keys are spread over a fixed number of shards, each a `RwLock`ed map
//! from key to its GCRA word: a known key costs a read lock and one
//! compare-and-swap; only a new key takes the write lock. So does
//! everything about reservations given back (rare: a waiter dropped
//! early): releasing one, and a wait or rejection for a key holding freed
//! ones, which may be handed one.
//!
//! Memory stays bounded however many keys arrive:
//! - a bucket that is full again (`tat <= now`) decides exactly like a
//!   fresh one, so forgetting it is lossless (its freed reservations all
//!   end by then, so they could give nothing back); each shard sweeps such idle
//!   buckets whenever it has doubled since its last sweep;
//! - each shard holds at most its share of `max_keys`. When a shard is
//!   full of live buckets, it forgets the quarter closest to full, and
//!   raises the *floors* those keys hash to, each to the latest TAT among
//!   the keys forgotten into it.
//!
//! The floors are what keep eviction from being a way out of a limit. A
//! shard's floors are a small table (an entry for each key the shard holds,
//! up to 1024, allocated the first time it forgets a live bucket), indexed by
//! bits of the key's hash that neither the shard nor the map use. A key
//! not in the map starts with its floor as its TAT, not with a full
//! bucket. A forgotten key's TAT was at most its floor (floors only rise),
//! so when it comes back it is never better off than had it been kept.
//! Other keys that share its floor pay for the flood that raised it (they
//! start no fuller than the emptiest bucket forgotten into it) until time
//! passes it; spreading keys over a table rather than one floor a shard
//! keeps that cost on the few keys that collide. Each sweep is a pass over
//! the shard that frees at least a quarter of it (or halves the work to
//! the next one), so a new key costs O(1) amortised.
//!
//! A bucket is its word plus, only while it holds freed reservations, a
//! boxed list of them: one pointer per key otherwise.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{PoisonError, RwLock};

use super::gcra::{self, Decision, Freed, Params, Reservation};
use super::state::Word;
use crate::clock::Nanos;

const MAX_SHARDS: usize = 64;
/// Freed reservations a key's bucket keeps (see [`Freed`]).
const FREED: usize = 8;
const MIN_SWEEP: usize = 64;
const MIN_PER_SHARD: usize = 64;
/// The most floors a shard keeps (8 KiB): enough that keys rarely share
/// one, few enough that a flood costs a keyed limiter at most 512 KiB.
const MAX_FLOORS: usize = 1024;

/// One key's bucket.
#[derive(Debug)]
struct Bucket {
    word: Word,
    /// Allocated only while some reservation given back is kept.
    freed: Option<Box<Freed<FREED>>>,
}

impl Bucket {
    fn new() -> Self {
        Self {
            word: Word::new(),
            freed: None,
        }
    }

    fn load(&self) -> Nanos {
        self.word.load()
    }

    /// Decides with the shard's write lock held: nothing else touches the
    /// word meanwhile.
    fn settle(&mut self, now: Nanos, inc: Nanos, p: &Params) -> Decision {
        let Some(freed) = self.freed.as_deref_mut() else {
            return self.word.acquire(now, inc, p);
        };
        let (d, tat) = freed.decide(self.word.load(), now, inc, p);
        self.word.store(tat);
        self.drop_empty();
        d
    }

    /// Gives back `mine`, with the shard's write lock held.
    fn release(&mut self, mine: Reservation, now: Nanos) {
        let tat = self.word.load();
        if self.freed.is_none() && tat == mine.end {
            // The newest reservation, nothing under it to roll back
            // through: no list needed.
            self.word.store(mine.start());
            return;
        }
        let freed = self.freed.get_or_insert_with(|| Box::new(Freed::new()));
        let tat = freed.release(tat, mine, now, |_, _| Ok(()));
        self.word.store(tat);
        self.drop_empty();
    }

    fn drop_empty(&mut self) {
        if self.freed.as_ref().is_some_and(|f| f.is_empty()) {
            self.freed = None;
        }
    }
}

#[derive(Debug)]
struct ShardMap<K> {
    map: HashMap<K, Bucket>,
    /// Sweep idle buckets when the map reaches this size.
    sweep_at: usize,
    /// The latest TAT of the live buckets forgotten, by [`floor_index`]:
    /// where a key not in the map starts (see the module docs). Empty
    /// until the shard first forgets a live bucket.
    floors: Box<[Nanos]>,
}

impl<K> ShardMap<K> {
    fn floor(&self, hash: u64) -> Nanos {
        if self.floors.is_empty() {
            return 0;
        }
        self.floors[floor_index(hash, self.floors.len())]
    }
}

/// A key's entry in its shard's floors: hash bits that neither the shard
/// (bits 40 and up) nor, in practice, the map's own hasher (a different
/// key) depend on.
#[inline]
fn floor_index(hash: u64, len: usize) -> usize {
    (hash >> 12) as usize & (len - 1)
}

#[derive(Debug)]
pub(crate) struct KeyMap<K> {
    shards: Box<[RwLock<ShardMap<K>>]>,
    hasher: RandomState,
    per_shard: usize,
}

/// Buckets forgotten by one insertion's sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub(crate) idle: usize,
    pub(crate) live: usize,
}

impl<K: Hash + Eq> KeyMap<K> {
    pub(crate) fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        // The largest power of two not above `max_keys`, so the shards'
        // shares never add up to more than the cap.
        // Enough keys per shard that a small cap is exact: with `max_keys`
        // of 10, two live keys must never evict each other because they
        // happened to hash to the same shard.
        let wanted = (max_keys / MIN_PER_SHARD).max(1);
        let shards = (1usize << wanted.ilog2()).min(MAX_SHARDS);
        let per_shard = max_keys / shards;
        Self {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(ShardMap {
                        map: HashMap::new(),
                        sweep_at: MIN_SWEEP.min(per_shard),
                        floors: Box::new([]),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            per_shard,
        }
    }

    #[inline]
    fn shard(&self, key: &K) -> &RwLock<ShardMap<K>> {
        let h = self.hasher.hash_one(key);
        // The high bits: the maps inside use the low ones.
        &self.shards[(h >> 40) as usize & (self.shards.len() - 1)]
    }

    #[inline]
    pub(crate) fn acquire(
        &self,
        key: K,
        now: Nanos,
        inc: Nanos,
        p: &Params,
    ) -> (Decision, Evicted) {
        let shard = self.shard(&key);
        {
            let s = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = s.map.get(&key) {
                if b.freed.is_none() {
                    return (b.word.acquire(now, inc, p), Evicted::default());
                }
                // Freed reservations: admitting now still needs no more
                // than the read lock; a wait or rejection may be handed one.
                if let Some(d) = b.word.try_admit(now, inc, p) {
                    return (d, Evicted::default());
                }
            }
        }
        self.acquire_locked(shard, key, now, inc, p)
    }

    /// With the shard's write lock: a new key, or a request for one holding
    /// freed reservations that would wait or be rejected.
    #[cold]
    fn acquire_locked(
        &self,
        shard: &RwLock<ShardMap<K>>,
        key: K,
        now: Nanos,
        inc: Nanos,
        p: &Params,
    ) -> (Decision, Evicted) {
        let mut s = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = s.map.get_mut(&key) {
            return (b.settle(now, inc, p), Evicted::default());
        }
        let evicted = make_room(&mut s, now, self.per_shard, &self.hasher);
        let b = Bucket::new();
        // A key not in the map may have been forgotten while still
        // refilling: it starts from its floor, never fuller.
        let floor = s.floor(self.hasher.hash_one(&key));
        if floor > now {
            b.word.store(floor);
        }
        let mut b = b;
        let d = b.settle(now, inc, p);
        s.map.insert(key, b);
        (d, evicted)
    }

    /// Gives back `key`'s reservation `mine`; nothing if the key was
    /// forgotten since (its reservations lapse with it).
    pub(crate) fn release(&self, key: &K, mine: Reservation, now: Nanos) {
        let mut s = self
            .shard(key)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = s.map.get_mut(key) {
            b.release(mine, now);
        }
    }

    pub(crate) fn tokens(&self, key: &K, now: Nanos, p: &Params) -> f64 {
        let s = self
            .shard(key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let tat = match s.map.get(key) {
            Some(b) => b.load(),
            None => s.floor(self.hasher.hash_one(key)),
        };
        gcra::tokens(tat, now, p)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub(crate) fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = s.write().unwrap_or_else(PoisonError::into_inner);
            s.map = HashMap::new();
            s.sweep_at = MIN_SWEEP.min(self.per_shard);
            s.floors = Box::new([]);
        }
    }
}

/// Makes room for one more key in a shard.
fn make_room<K: Hash>(
    s: &mut ShardMap<K>,
    now: Nanos,
    cap: usize,
    hasher: &RandomState,
) -> Evicted {
    let mut ev = Evicted::default();
    if s.map.len() < s.sweep_at && s.map.len() < cap {
        return ev;
    }
    let before = s.map.len();
    s.map.retain(|_, b| !gcra::is_idle(b.load(), now));
    ev.idle = before - s.map.len();
    if s.map.len() >= cap {
        // Full of live buckets: forget those closest to full.
        let keep = cap - cap.div_ceil(4);
        let mut cut = s.map.len() - keep;
        let mut debts: Vec<Nanos> = s
            .map
            .values()
            .map(|b| b.load().saturating_sub(now))
            .collect();
        let (_, &mut threshold, _) = debts.select_nth_unstable(cut - 1);
        ev.live = cut;
        if s.floors.is_empty() {
            let len = cap.next_power_of_two().min(MAX_FLOORS);
            s.floors = vec![0; len].into_boxed_slice();
        }
        let floors = &mut s.floors;
        s.map.retain(|k, b| {
            if cut > 0 && b.load().saturating_sub(now) <= threshold {
                cut -= 1;
                let f = &mut floors[floor_index(hasher.hash_one(k), floors.len())];
                *f = (*f).max(b.load());
                false
            } else {
                true
            }
        });
    }
    s.sweep_at = (s.map.len() * 2).clamp(MIN_SWEEP.min(cap), cap);
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn cap_holds_and_idle_keys_go_first() {
        let p = Params::new(1.0, 1.0, 0);
        let m = KeyMap::<u32>::new(1000);
        for k in 0..100_000u32 {
            m.acquire(k, 0, S, &p);
            assert!(m.len() <= 1000);
        }
        // Once full again every bucket is forgettable.
        let (_, ev) = m.acquire(u32::MAX, 10 * S, S, &p);
        let _ = ev;
        for k in 0..2000u32 {
            m.acquire(k + 200_000, 10 * S, S, &p);
        }
        assert!(m.len() <= 1000);
    }

    #[test]
    fn a_key_hands_its_freed_turns_on() {
        let p = Params::new(1.0, 1.0, 10 * S);
        let m = KeyMap::<&str>::new(10);
        let wait = |d: Decision| match d {
            Decision::Wait { tat, inc, .. } => Reservation { end: tat, inc },
            d => panic!("{d:?}"),
        };
        assert!(matches!(m.acquire("a", 0, S, &p).0, Decision::Admit { .. }));
        let first = wait(m.acquire("a", 0, S, &p).0);
        let second = wait(m.acquire("a", 0, S, &p).0);
        m.release(&"a", first, 0);
        // Another key is not handed a's turn.
        assert!(matches!(m.acquire("b", 0, S, &p).0, Decision::Admit { .. }));
        let taken = wait(m.acquire("a", 0, S, &p).0);
        assert_eq!(taken, first);
        let has_list = |m: &KeyMap<&str>| {
            let s = m.shard(&"a").read().unwrap();
            s.map.get(&"a").unwrap().freed.is_some()
        };
        assert!(!has_list(&m), "an empty list is not kept");
        m.release(&"a", taken, 0);
        assert!(has_list(&m));
        m.release(&"a", second, 0);
        assert!(!has_list(&m));
        assert_eq!(m.tokens(&"a", 0, &p), 0.0);
        assert_eq!(m.tokens(&"a", S, &p), 1.0);
        // A forgotten key's reservations lapse with it.
        m.clear();
        m.release(&"a", second, 0);
        assert_eq!(m.len(), 0);
    }

    mod eviction {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However keys arrive and are evicted (a few hot keys among a
            /// flood of one-shot ones, in a map of 64), every key's
            /// admissions over every window `[t_i, t_j]` stay within
            /// `max_tokens + refill_rate * (t_j - t_i)`: being forgotten
            /// never gives a key a fuller bucket.
            #[test]
            fn a_forgotten_key_is_never_better_off(
                max_tokens in 1.0f64..5.0,
                refill_rate in 0.1f64..10.0,
                ops in proptest::collection::vec(
                    (
                        prop_oneof![3 => Just(0u64), 1 => 0u64..300_000_000],
                        prop_oneof![1 => 0u64..4, 2 => 4u64..1_000_000],
                        1usize..7,
                    ),
                    1..400,
                ),
            ) {
                let p = Params::new(max_tokens, refill_rate, 0);
                let inc = p.increment(1.0).unwrap();
                let m = KeyMap::<u64>::new(64);
                let mut now = 0;
                let mut admitted: HashMap<u64, Vec<Nanos>> = HashMap::new();
                // Each op: a gap, then a burst of calls for one key.
                for &(gap, key, burst) in &ops {
                    now += gap;
                    for _ in 0..burst {
                        if let (Decision::Admit { .. }, _) = m.acquire(key, now, inc, &p) {
                            admitted.entry(key).or_default().push(now);
                        }
                    }
                    prop_assert!(m.len() <= 64);
                }
                for times in admitted.values() {
                    for i in 0..times.len() {
                        for j in i..times.len() {
                            let n = (j - i + 1) as f64;
                            let secs = (times[j] - times[i]) as f64 / 1e9;
                            // To the nanosecond rounding of `tau`.
                            let bound = max_tokens + refill_rate * (secs + 1e-9);
                            prop_assert!(n <= bound + 1e-9, "{n} admitted in {secs} s, bound {bound}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn known_key_keeps_its_bucket() {
        let p = Params::new(2.0, 1.0, 0);
        let m = KeyMap::<&str>::new(10);
        assert!(matches!(m.acquire("a", 0, S, &p).0, Decision::Admit { .. }));
        assert!(matches!(m.acquire("a", 0, S, &p).0, Decision::Admit { .. }));
        assert!(matches!(
            m.acquire("a", 0, S, &p).0,
            Decision::Reject { .. }
        ));
        assert!(matches!(m.acquire("b", 0, S, &p).0, Decision::Admit { .. }));
        assert_eq!(m.tokens(&"a", 0, &p), 0.0);
        assert_eq!(m.tokens(&"zzz", 0, &p), 2.0);
        // However the keys hash, a cap of 10 holds 10 live keys.
        for k in ["c", "d", "e", "f", "g", "h", "i", "j"] {
            m.acquire(k, 0, S, &p);
        }
        assert_eq!(m.len(), 10);
        assert_eq!(m.tokens(&"a", 0, &p), 0.0, "no live key was evicted");
        m.clear();
        assert_eq!(m.len(), 0);
    }
}
