//! GCRA, the generic cell rate algorithm: a token bucket kept as one number.
//!
//! The whole state of a bucket is its *theoretical arrival time* (TAT), in
//! nanoseconds on the layer's clock: the instant at which the bucket would
//! be full again if nothing else were admitted. With `t` the time one token
//! takes to refill and `tau = max_tokens * t` the burst tolerance, a
//! request costing `inc = cost * t` is admitted at `now` when
//!
//! ```text
//! max(tat, now) + inc - tau <= now          and then tat' = max(tat, now) + inc
//! ```
//!
//! Every function here is plain arithmetic over the stored word and `now`,
//! so it is tested without a service and can be run by any store (an
//! atomic in memory, a file, a Redis script).
//!
//! # Why the bound holds
//!
//! Each admitted (or waiting) request owns a stretch `[T - I, T)` of the
//! TAT axis: `T` the TAT its decision stored, `I` its increment. It calls
//! the inner service at an instant `e` with
//!
//! ```text
//! (1)  T - tau <= e <= T - I
//! (2)  owned stretches never overlap, and none ends above the TAT
//! ```
//!
//! A decision keeps both: `e = max(now, T - tau)`, its stretch starts at
//! `max(tat, now)`, which is at least `now` and at least every other
//! stretch's end, and `I <= tau`. So the requests calling within a window
//! `[t0, t1]` own disjoint stretches inside `[t0, t1 + tau]`, and their
//! increments add up to at most `t1 - t0 + tau`; since every `inc` is
//! rounded up, the admitted cost is at most `max_tokens + refill_rate *
//! (t1 - t0)` (to the nanosecond rounding of `tau`).
//!
//! # Giving reservations back
//!
//! A waiter dropped before its call leaves its stretch `[T - I, T)` owned
//! by no one. Getting it used again within (1) and (2):
//!
//! - *Roll the tail back.* When `T` is the TAT, the TAT goes back to
//!   `T - I`: by (2) every owned stretch lies below. Then each freed
//!   stretch that now ends at the TAT is rolled back too
//!   ([`Freed::unwind`]).
//! - *Otherwise keep it.* A later reservation lies above it, so it goes
//!   into a short list ([`Freed`]) instead: the later waiters keep their
//!   turns.
//! - *Hand it on.* A request that would otherwise wait or be rejected
//!   takes the earliest freed stretch with `I >= inc` while
//!   `now <= T - I`: it calls at `max(now, T - tau)` and owns the whole
//!   stretch, which is (1) again, and the TAT does not move. Dropped in
//!   turn, it gives back that same stretch. Once `now` is past `T - I`, a
//!   call at `now` would start after its stretch does, outside (1), so the
//!   stretch is only kept for rolling back; once `now` reaches `T` it is
//!   forgotten, as a TAT at or below `now` is a full bucket anyway.
//!
//! The admit-now path never looks at the list.

use crate::clock::Nanos;

const NANOS_PER_SEC: f64 = 1e9;

/// The largest burst tolerance a bucket may have: 2^61 ns, about 73
/// years. Every TAT then stays below `now + tau + max_wait`, far from
/// `u64::MAX` for any `now` a process reaches (the clock saturates after
/// 584 years), so no sum in [`decide`] saturates and the bound stays
/// exact. A slower bucket saturated `tau` and `inc` to the same value and
/// admitted everything; the builder refuses it instead.
pub(crate) const MAX_TAU: Nanos = 1 << 61;

/// The bucket's shape in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Params {
    /// Nanoseconds to refill one token.
    pub(crate) per_token: f64,
    /// Burst tolerance: `max_tokens` worth of refill time, rounded up.
    pub(crate) tau: Nanos,
    /// The longest a caller may wait for its turn (0: reject at once).
    pub(crate) max_wait: Nanos,
    /// The bucket's size as configured: `tau` rounds up to a whole
    /// nanosecond, which a bucket refilling faster than a token per
    /// nanosecond overshoots by many tokens.
    pub(crate) max_tokens: f64,
}

impl Params {
    pub(crate) fn new(max_tokens: f64, refill_rate: f64, max_wait: Nanos) -> Self {
        let per_token = NANOS_PER_SEC / refill_rate;
        Self {
            per_token,
            tau: ceil_nanos(max_tokens * per_token),
            // A wait past `MAX_TAU` is as good as forever, and keeping it
            // there keeps every TAT from saturating (see `MAX_TAU`).
            max_wait: max_wait.min(MAX_TAU),
            max_tokens,
        }
    }

    /// The TAT increment of a request costing `cost` tokens, rounded up so
    /// the bound can only err on the safe side; `None` if the cost can
    /// never be admitted (above the bucket, negative or not a number).
    #[inline]
    pub(crate) fn increment(&self, cost: f64) -> Option<Nanos> {
        if cost.is_nan() || cost < 0.0 {
            return None;
        }
        let inc = ceil_nanos(cost * self.per_token);
        (inc <= self.tau).then_some(inc)
    }
}

#[inline]
fn ceil_nanos(x: f64) -> Nanos {
    // `as` saturates: huge values become u64::MAX, which `increment` rejects.
    x.ceil() as Nanos
}

/// What a request gets from the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Admitted now; store `tat`.
    Admit { tat: Nanos },
    /// Admitted `wait` from now (at most `max_wait`); store `tat`. The
    /// reservation to give back if the caller leaves early is the stretch
    /// ending at `tat` of increment `inc` (which a request handed a freed
    /// stretch may own more of than it costs).
    Wait { tat: Nanos, inc: Nanos, wait: Nanos },
    /// Not admitted: the same request would be in `retry_after`.
    Reject { retry_after: Nanos },
}

/// Decides a request of increment `inc` at `now` against the stored `tat`.
#[inline]
pub(crate) fn decide(tat: Nanos, now: Nanos, inc: Nanos, p: &Params) -> Decision {
    let next = tat.max(now).saturating_add(inc);
    let wait = next.saturating_sub(p.tau).saturating_sub(now);
    if wait == 0 {
        Decision::Admit { tat: next }
    } else if wait <= p.max_wait {
        Decision::Wait {
            tat: next,
            inc,
            wait,
        }
    } else {
        Decision::Reject { retry_after: wait }
    }
}

/// The TAT after an upstream said "not before `until`": nothing is
/// admitted before `until`, and from then the bucket refills from holding
/// one request of increment `inc` (a slow start rather than a burst).
#[inline]
pub(crate) fn block_until(tat: Nanos, until: Nanos, inc: Nanos, p: &Params) -> Nanos {
    tat.max(until.saturating_add(p.tau).saturating_sub(inc))
}

/// A reservation: the stretch `[end - inc, end)` of the TAT axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The TAT its decision stored.
    pub(crate) end: Nanos,
    /// The increment it owns.
    pub(crate) inc: Nanos,
}

impl Reservation {
    #[inline]
    pub(crate) fn start(&self) -> Nanos {
        self.end - self.inc
    }
}

/// Reservations given back while a later one was held: at most `N`, kept
/// for rolling the TAT back through them or handing them to a newcomer
/// (see the module docs). Plain data; the bucket that owns it serializes
/// access.
///
/// When all `N` are taken, a new stretch replaces the one that stops being
/// usable by a newcomer soonest (the lowest start), if it starts later; the
/// loser lapses: its tokens come back only when time reaches its end, as
/// before giving back existed. The cap keeps the work under the lock short
/// and the memory of a keyed bucket small.
#[derive(Debug, Clone)]
pub(crate) struct Freed<const N: usize> {
    slots: [Reservation; N],
    len: usize,
}

impl<const N: usize> Freed<N> {
    pub(crate) const fn new() -> Self {
        Self {
            slots: [Reservation { end: 0, inc: 0 }; N],
            len: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    fn live(&self) -> &[Reservation] {
        &self.slots[..self.len]
    }

    fn remove(&mut self, i: usize) -> Reservation {
        let s = self.slots[i];
        self.len -= 1;
        self.slots[i] = self.slots[self.len];
        s
    }

    /// Forgets the stretches that can no longer give anything back: once
    /// `now` reaches a stretch's end, a TAT rolled back to it would be a
    /// full bucket all the same.
    pub(crate) fn prune(&mut self, now: Nanos) {
        let mut i = 0;
        while i < self.len {
            if self.slots[i].end <= now {
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Keeps the freed stretch `s` (not at the TAT). `false` when a
    /// stretch lapsed for want of room.
    pub(crate) fn record(&mut self, s: Reservation, now: Nanos) -> bool {
        if s.inc == 0 || s.end <= now {
            return true;
        }
        self.prune(now);
        if self.len < N {
            self.slots[self.len] = s;
            self.len += 1;
            return true;
        }
        let Some((i, soonest)) = self
            .live()
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.start())
        else {
            // N == 0: nothing is ever kept.
            return false;
        };
        if soonest.start() < s.start() {
            self.slots[i] = s;
        }
        false
    }

    /// Rolls the TAT back from `tat` through the freed stretches ending
    /// where it stands, and returns where it stops. Each step is committed
    /// by `set(from, to)`: a compare-and-swap for a shared word, failing
    /// with the word's actual value when an admission moved it meanwhile
    /// (the stretch then stays, below a later reservation).
    pub(crate) fn unwind(
        &mut self,
        mut tat: Nanos,
        mut set: impl FnMut(Nanos, Nanos) -> Result<(), Nanos>,
    ) -> Nanos {
        while let Some(i) = self.live().iter().position(|s| s.end == tat) {
            let to = self.slots[i].start();
            match set(tat, to) {
                Ok(()) => {
                    self.remove(i);
                    tat = to;
                }
                Err(actual) => tat = actual,
            }
        }
        tat
    }

    /// Gives back the reservation `mine` at `now`, the TAT being `tat`;
    /// returns the TAT after. The newest reservation is rolled back (with
    /// the freed ones under it); an older one is kept for a newcomer.
    /// `set` commits each roll-back step, as in [`unwind`](Self::unwind).
    pub(crate) fn release(
        &mut self,
        mut tat: Nanos,
        mine: Reservation,
        now: Nanos,
        mut set: impl FnMut(Nanos, Nanos) -> Result<(), Nanos>,
    ) -> Nanos {
        if tat == mine.end {
            match set(tat, mine.start()) {
                Ok(()) => return self.unwind(mine.start(), set),
                Err(actual) => tat = actual,
            }
        }
        // A TAT below the stretch means the bucket was reset (or the key
        // forgotten) since: the stretch belongs to nothing any more.
        if mine.end < tat {
            self.record(mine, now);
        }
        tat
    }

    /// `decide`, except that a request that would wait or be rejected is
    /// first offered a freed stretch ([`take`](Self::take)); also returns
    /// the TAT to store. For a bucket whose word no one else writes.
    pub(crate) fn decide(
        &mut self,
        tat: Nanos,
        now: Nanos,
        inc: Nanos,
        p: &Params,
    ) -> (Decision, Nanos) {
        let d = decide(tat, now, inc, p);
        if let Decision::Admit { tat: next } = d {
            return (d, next);
        }
        if let Some(taken) = self.take(now, inc, p) {
            return (taken, tat);
        }
        match d {
            Decision::Wait { tat: next, .. } => (d, next),
            _ => (d, tat),
        }
    }

    /// For a request of increment `inc` at `now` that would otherwise wait
    /// or be rejected: the earliest freed stretch it may have, taken from
    /// the list, as its decision. The TAT does not move: the `tat` of the
    /// decision is the stretch's end, to be stored nowhere.
    pub(crate) fn take(&mut self, now: Nanos, inc: Nanos, p: &Params) -> Option<Decision> {
        self.prune(now);
        let at = |s: &Reservation| s.end.saturating_sub(p.tau).max(now);
        let i = self
            .live()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.inc >= inc && s.start() >= now && at(s) - now <= p.max_wait)
            .min_by_key(|(_, s)| s.end)
            .map(|(i, _)| i)?;
        let s = self.remove(i);
        let wait = at(&s) - now;
        Some(if wait == 0 {
            Decision::Admit { tat: s.end }
        } else {
            Decision::Wait {
                tat: s.end,
                inc: s.inc,
                wait,
            }
        })
    }
}

/// Tokens available at `now`.
#[inline]
pub(crate) fn tokens(tat: Nanos, now: Nanos, p: &Params) -> f64 {
    let debt = tat.saturating_sub(now);
    ((p.tau.saturating_sub(debt)) as f64 / p.per_token).min(p.max_tokens)
}

/// Whether a bucket is full at `now`, so forgetting it changes nothing: a
/// fresh bucket (TAT 0) decides exactly the same.
#[inline]
pub(crate) fn is_idle(tat: Nanos, now: Nanos) -> bool {
    tat <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn p(max: f64, rate: f64, wait: Nanos) -> Params {
        Params::new(max, rate, wait)
    }

    #[test]
    fn burst_then_refill() {
        let p = p(3.0, 1.0, 0);
        let inc = p.increment(1.0).unwrap();
        let mut tat = 0;
        for _ in 0..3 {
            match decide(tat, 0, inc, &p) {
                Decision::Admit { tat: t } => tat = t,
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(decide(tat, 0, inc, &p), Decision::Reject { retry_after: S });
        assert_eq!(tokens(tat, 0, &p), 0.0);
        assert!(matches!(decide(tat, S, inc, &p), Decision::Admit { .. }));
        assert_eq!(tokens(tat, 3 * S, &p), 3.0);
        assert!(is_idle(tat, 3 * S));
    }

    #[test]
    fn cost_bounds() {
        let p = p(50.0, 3.0, 0);
        assert_eq!(p.increment(50.0), Some(p.tau));
        assert_eq!(p.increment(50.0001), None);
        assert_eq!(p.increment(-1.0), None);
        assert_eq!(p.increment(f64::NAN), None);
        assert_eq!(p.increment(f64::INFINITY), None);
        assert_eq!(p.increment(0.0), Some(0));
    }

    #[test]
    fn wait_within_max_wait() {
        let p = p(1.0, 1.0, 2 * S);
        let inc = p.increment(1.0).unwrap();
        assert_eq!(decide(0, 0, inc, &p), Decision::Admit { tat: S });
        assert_eq!(
            decide(S, 0, inc, &p),
            Decision::Wait {
                tat: 2 * S,
                inc,
                wait: S
            }
        );
        assert_eq!(
            decide(2 * S, 0, inc, &p),
            Decision::Wait {
                tat: 3 * S,
                inc,
                wait: 2 * S
            }
        );
        assert_eq!(
            decide(3 * S, 0, inc, &p),
            Decision::Reject { retry_after: 3 * S }
        );
    }

    fn slot(end: Nanos, inc: Nanos) -> Reservation {
        Reservation { end, inc }
    }

    fn no_race(_: Nanos, _: Nanos) -> Result<(), Nanos> {
        Ok(())
    }

    /// A bucket of one token a second after one admission and three
    /// waiters, the reservations ending at 2, 3 and 4 s.
    fn queued() -> (Params, Nanos, [Reservation; 3]) {
        let p = p(1.0, 1.0, 10 * S);
        (p, 4 * S, [slot(2 * S, S), slot(3 * S, S), slot(4 * S, S)])
    }

    #[test]
    fn newest_rolls_back_and_cascades() {
        let (_, tat, [a, b, c]) = queued();
        let mut f = Freed::<8>::new();
        // Older ones are kept while a later reservation stands.
        assert_eq!(f.release(tat, a, 0, no_race), tat);
        assert_eq!(f.release(tat, b, 0, no_race), tat);
        assert_eq!(f.len(), 2);
        // The newest goes, and the two under it with it.
        assert_eq!(f.release(tat, c, 0, no_race), S);
        assert!(f.is_empty());
        // Alone, the newest just rolls back.
        assert_eq!(f.release(5 * S, slot(5 * S, S), 0, no_race), 4 * S);
    }

    #[test]
    fn cascade_stops_where_an_admission_moved_the_word() {
        let (_, tat, [a, b, c]) = queued();
        let mut f = Freed::<8>::new();
        f.release(tat, a, 0, no_race);
        f.release(tat, b, 0, no_race);
        // c rolls back to 3 s; an admission then takes the word to 5 s
        // before the step through b's stretch.
        let mut steps = 0;
        let end = f.release(tat, c, 0, |from, _| {
            steps += 1;
            if from == 3 * S {
                Err(5 * S)
            } else {
                Ok(())
            }
        });
        assert_eq!(end, 5 * S);
        assert_eq!(steps, 2);
        // b's stretch stays (under the admission), and so does a's.
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_freed_stretch_is_handed_on_at_its_time() {
        let (p, tat, [a, b, _]) = queued();
        let mut f = Freed::<8>::new();
        f.release(tat, b, 0, no_race);
        f.release(tat, a, 0, no_race);
        // The earliest comes first, at its own time, not after the TAT.
        assert_eq!(
            f.take(0, S, &p),
            Some(Decision::Wait {
                tat: 2 * S,
                inc: S,
                wait: S
            })
        );
        assert_eq!(f.decide(tat, 0, S, &p).1, tat, "the TAT does not move");
        assert!(f.is_empty());
        // Given back again, it can be handed on again.
        f.release(tat, a, 0, no_race);
        assert!(f.take(0, S, &p).is_some());
    }

    #[test]
    fn a_stretch_too_small_is_not_handed_on() {
        let p = p(3.0, 1.0, 10 * S);
        let mut f = Freed::<8>::new();
        f.record(slot(5 * S, S), 0);
        assert_eq!(f.take(0, 2 * S, &p), None);
        assert_eq!(f.len(), 1);
        // A larger stretch serves a smaller request, which owns all of it.
        f.record(slot(8 * S, 2 * S), 0);
        assert_eq!(
            f.take(0, S + 1, &p),
            Some(Decision::Wait {
                tat: 8 * S,
                inc: 2 * S,
                wait: 5 * S
            })
        );
    }

    #[test]
    fn a_stretch_whose_start_passed_is_not_handed_on() {
        // tau = 3 s: the stretch [4 s, 5 s) may be called from 2 s to 4 s.
        let p = p(3.0, 1.0, 10 * S);
        let mut f = Freed::<8>::new();
        f.record(slot(5 * S, S), 0);
        assert_eq!(f.take(3 * S, S, &p), Some(Decision::Admit { tat: 5 * S }));
        f.record(slot(5 * S, S), 0);
        assert_eq!(f.take(4 * S + 1, S, &p), None);
        // Still good for rolling back until its end...
        assert_eq!(f.len(), 1);
        assert_eq!(f.release(6 * S, slot(6 * S, S), 4 * S + 1, no_race), 4 * S);
        // ...and forgotten from then on.
        f.record(slot(5 * S, S), 0);
        f.prune(5 * S);
        assert!(f.is_empty());
        // Nor is one past already recorded, or one costing nothing.
        f.record(slot(5 * S, S), 5 * S);
        f.record(slot(5 * S, 0), 0);
        assert!(f.is_empty());
    }

    #[test]
    fn a_stretch_beyond_max_wait_is_not_handed_on() {
        let p = p(1.0, 1.0, 2 * S);
        let mut f = Freed::<8>::new();
        f.record(slot(4 * S, S), 0);
        assert_eq!(f.take(0, S, &p), None);
        assert_eq!(
            f.take(S, S, &p),
            Some(Decision::Wait {
                tat: 4 * S,
                inc: S,
                wait: 2 * S
            })
        );
    }

    #[test]
    fn cap_keeps_the_stretches_usable_longest() {
        let mut f = Freed::<2>::new();
        assert!(f.record(slot(3 * S, S), 0));
        assert!(f.record(slot(5 * S, S), 0));
        // Full: a later stretch replaces the earliest, an earlier one lapses.
        assert!(!f.record(slot(7 * S, S), 0));
        assert!(!f.record(slot(2 * S, S), 0));
        let mut ends: Vec<_> = f.live().iter().map(|s| s.end).collect();
        ends.sort_unstable();
        assert_eq!(ends, [5 * S, 7 * S]);
        // Past ones make room first.
        assert!(f.record(slot(9 * S, S), 5 * S));
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_reservation_from_before_a_reset_is_dropped() {
        let mut f = Freed::<8>::new();
        assert_eq!(f.release(0, slot(3 * S, S), 0, no_race), 0);
        assert!(f.is_empty());
    }

    #[test]
    fn block_holds_until_then_slow_starts() {
        let p = p(10.0, 1.0, 0);
        let inc = p.increment(1.0).unwrap();
        let tat = block_until(0, 5 * S, inc, &p);
        assert!(matches!(
            decide(tat, 5 * S - 1, inc, &p),
            Decision::Reject { retry_after: 1 }
        ));
        let Decision::Admit { tat } = decide(tat, 5 * S, inc, &p) else {
            panic!()
        };
        assert!(matches!(
            decide(tat, 5 * S, inc, &p),
            Decision::Reject { .. }
        ));
        // A later TAT already in force is kept.
        assert_eq!(block_until(20 * S, 0, inc, &p), 20 * S);
    }

    mod bound {
        use super::*;
        use proptest::prelude::*;

        /// What a run of the model leaves: the calls made (time, cost,
        /// end of the stretch owned), and the bucket once every waiter
        /// still queued at the end is dropped.
        struct Run {
            called: Vec<(Nanos, f64, Nanos)>,
            tat: Nanos,
            now: Nanos,
        }

        impl Run {
            fn check(&self, max_tokens: f64, refill_rate: f64) -> Result<(), TestCaseError> {
                let mut called = self.called.clone();
                called.sort_by_key(|c| c.0);
                for i in 0..called.len() {
                    let mut sum = 0.0;
                    for c in &called[i..] {
                        sum += c.1;
                        let elapsed = (c.0 - called[i].0) as f64 / 1e9;
                        let bound = max_tokens + refill_rate * elapsed;
                        // Exact up to the nanosecond rounding of `tau`.
                        prop_assert!(sum <= bound + 1e-6, "{sum} > {bound}");
                    }
                }
                Ok(())
            }
        }

        /// The limiter in miniature, keeping `N` freed reservations: each
        /// op is a gap, then an arrival of cost `frac * max_tokens` or the
        /// drop of a queued waiter picked by `pick`. A waiter calls when
        /// time reaches its turn, unless dropped first.
        fn run<const N: usize>(
            p: &Params,
            max_tokens: f64,
            ops: &[(u64, f64, bool, usize)],
        ) -> Result<Run, TestCaseError> {
            let mut freed = Freed::<N>::new();
            let mut tat = 0;
            let mut now = 0;
            let mut queued: Vec<(Nanos, f64, Reservation)> = Vec::new();
            let mut called = Vec::new();
            for &(gap, frac, drop, pick) in ops {
                now += gap;
                queued.retain(|&(at, cost, mine)| {
                    let due = at <= now;
                    if due {
                        called.push((at, cost, mine.end));
                    }
                    !due
                });
                if drop && !queued.is_empty() {
                    let (_, _, mine) = queued.swap_remove(pick % queued.len());
                    tat = freed.release(tat, mine, now, |_, _| Ok(()));
                    continue;
                }
                let cost = frac * max_tokens;
                let inc = p.increment(cost).expect("within the bucket");
                let (d, next) = freed.decide(tat, now, inc, p);
                tat = next;
                match d {
                    Decision::Admit { tat: end } => called.push((now, cost, end)),
                    Decision::Wait {
                        tat: end,
                        inc: own,
                        wait,
                    } => {
                        prop_assert!(wait > 0 && wait <= p.max_wait);
                        prop_assert!(own >= inc);
                        queued.push((now + wait, cost, Reservation { end, inc: own }));
                    }
                    Decision::Reject { retry_after } => prop_assert!(retry_after > p.max_wait),
                }
            }
            for (_, _, mine) in queued {
                tat = freed.release(tat, mine, now, |_, _| Ok(()));
            }
            Ok(Run { called, tat, now })
        }

        proptest! {
            /// For random arrivals and costs, in reject and wait modes, with
            /// random waiters dropped before their turn, the cost admitted
            /// over every window `[t_i, t_j]` of call times stays within
            /// `max_tokens + refill_rate * (t_j - t_i)`, with freed
            /// reservations kept as the keyed buckets keep them and with a
            /// list too short to keep them all. And no token is lost: with
            /// room for every freed reservation, once the last waiter is
            /// dropped the bucket is exactly where the calls made put it.
            #[test]
            fn admitted_cost_never_exceeds_the_bound(
                max_tokens in 1.0f64..20.0,
                refill_rate in 0.5f64..50.0,
                wait_ms in prop_oneof![Just(0u64), 1u64..3000],
                ops in proptest::collection::vec(
                    (0u64..400_000_000, 0.0f64..1.0, proptest::bool::weighted(0.3), any::<usize>()),
                    1..120,
                ),
            ) {
                let p = Params::new(max_tokens, refill_rate, wait_ms * 1_000_000);
                let short = run::<2>(&p, max_tokens, &ops)?;
                short.check(max_tokens, refill_rate)?;
                let roomy = run::<128>(&p, max_tokens, &ops)?;
                roomy.check(max_tokens, refill_rate)?;
                // Every waiter gone: only the calls made hold the bucket.
                let held = roomy.called.iter().map(|c| c.2).max().unwrap_or(0);
                prop_assert_eq!(roomy.tat.max(roomy.now), held.max(roomy.now));
                // And time refills it fully.
                let later = roomy.tat.max(roomy.now);
                prop_assert!((tokens(roomy.tat, later, &p) - max_tokens).abs() < 1e-6);
            }

            /// A full burst is always available after a long enough pause.
            #[test]
            fn full_after_idle(max_tokens in 1.0f64..100.0, refill_rate in 0.1f64..100.0) {
                let p = Params::new(max_tokens, refill_rate, 0);
                let inc = p.increment(1.0).unwrap_or(p.tau);
                let mut tat = 0;
                for _ in 0..1000 {
                    if let Decision::Admit { tat: t } = decide(tat, 0, inc, &p) { tat = t } else { break }
                }
                let later = tat + 1;
                prop_assert!((tokens(tat, later, &p) - max_tokens).abs() < 1e-6);
            }
        }
    }
}
