//! The limiter's in-memory state: one GCRA word per bucket, the settings,
//! the clock and the listeners. The service and futures only call in.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::gcra::{self, Decision, Freed, Params, Reservation};
use super::remote::StoreBuckets;
use super::{RateLimitEvent, RateLimited};
use crate::classify::clamp_retry_after;
use crate::clock::{nanos, Clock, Nanos};
use crate::observe::Listeners;
use crate::sync::{AtomicU64, AtomicUsize, Mutex};

/// Freed reservations an unkeyed bucket keeps (see [`Freed`]).
const FREED: usize = 32;

/// A GCRA word, updated by compare-and-swap: the whole state of a bucket
/// as far as admitting now goes.
#[derive(Debug)]
pub(crate) struct Word(AtomicU64);

impl Word {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Decides and, unless rejected, records the request.
    #[inline]
    pub(crate) fn acquire(&self, now: Nanos, inc: Nanos, p: &Params) -> Decision {
        let mut cur = self.0.load(Acquire);
        loop {
            let d = gcra::decide(cur, now, inc, p);
            let next = match d {
                Decision::Admit { tat } | Decision::Wait { tat, .. } => tat,
                Decision::Reject { .. } => return d,
            };
            match self.0.compare_exchange_weak(cur, next, AcqRel, Acquire) {
                Ok(_) => return d,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Admits now or does nothing (`None`: the request would wait or be
    /// rejected).
    #[inline]
    pub(crate) fn try_admit(&self, now: Nanos, inc: Nanos, p: &Params) -> Option<Decision> {
        let mut cur = self.0.load(Acquire);
        loop {
            let d = gcra::decide(cur, now, inc, p);
            let Decision::Admit { tat } = d else {
                return None;
            };
            match self.0.compare_exchange_weak(cur, tat, AcqRel, Acquire) {
                Ok(_) => return Some(d),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Moves the word from `from` to `to` unless it moved meanwhile
    /// (`Err`: where it is).
    pub(crate) fn set(&self, from: Nanos, to: Nanos) -> Result<(), Nanos> {
        self.0.compare_exchange(from, to, AcqRel, Acquire).map(drop)
    }

    pub(crate) fn block_until(&self, until: Nanos, inc: Nanos, p: &Params) {
        let _ = self.0.fetch_update(AcqRel, Acquire, |t| {
            Some(gcra::block_until(t, until, inc, p))
        });
    }

    pub(crate) fn store(&self, tat: Nanos) {
        self.0.store(tat, Release);
    }

    pub(crate) fn load(&self) -> Nanos {
        self.0.load(Acquire)
    }
}

/// An unkeyed limiter's bucket: the GCRA word, and beside it the
/// reservations given back while a later one was held.
#[derive(Debug)]
pub(crate) struct Bucket {
    word: Word,
    freed: Mutex<Freed<FREED>>,
    /// How many `freed` holds, so that a wait or a rejection only takes
    /// the lock when there may be something to hand on.
    freed_len: AtomicUsize,
}

impl Bucket {
    pub(crate) fn new() -> Self {
        Self {
            word: Word::new(),
            freed: Mutex::new(Freed::new()),
            freed_len: AtomicUsize::new(0),
        }
    }

    /// Decides and, unless rejected, records the request: admitted now on
    /// the word alone, else handed a freed reservation if one serves, else
    /// queued behind the TAT or rejected.
    #[inline]
    pub(crate) fn acquire(&self, now: Nanos, inc: Nanos, p: &Params) -> Decision {
        let d = self.word.acquire(now, inc, p);
        // Admitting now needs only the word: freed reservations matter
        // only to a request that would otherwise wait or be rejected.
        if matches!(d, Decision::Admit { .. }) || self.freed_len.load(Relaxed) == 0 {
            return d;
        }
        self.hand_on(d, now, inc, p)
    }

    /// Admits now, or changes nothing (`false`: ask [`acquire`]).
    ///
    /// The whole decision of an admitted call fits in a `bool`, which the
    /// caller keeps in a register; a [`Decision`] is built in memory and
    /// read back in pieces that stall on store forwarding.
    ///
    /// [`acquire`]: Self::acquire
    #[inline]
    pub(crate) fn admit_now(&self, now: Nanos, inc: Nanos, p: &Params) -> bool {
        self.word.try_admit(now, inc, p).is_some()
    }

    /// A request that queued (or was rejected) while freed reservations
    /// are kept: it takes the earliest that serves it and gives back the
    /// one it just made, as any waiter would.
    #[cold]
    #[inline(never)]
    fn hand_on(&self, d: Decision, now: Nanos, inc: Nanos, p: &Params) -> Decision {
        let mut freed = self.lock();
        let Some(taken) = freed.take(now, inc, p) else {
            return d;
        };
        if let Decision::Wait { tat, inc: own, .. } = d {
            let mine = Reservation { end: tat, inc: own };
            let tat = self.word.load();
            freed.release(tat, mine, now, |from, to| self.word.set(from, to));
        }
        self.freed_len.store(freed.len(), Relaxed);
        taken
    }

    /// Gives back the reservation `mine`, its waiter gone before its call.
    ///
    /// Every roll-back of the word happens under the lock, so two releases
    /// cannot miss each other (one finding the TAT above it and keeping its
    /// stretch while the other rolls the TAT down to that stretch's end).
    /// Admissions race on without the lock; they only raise the word, which
    /// fails a roll-back's compare-and-swap and leaves the stretch kept.
    #[cold]
    pub(crate) fn release(&self, mine: Reservation, now: Nanos) {
        let mut freed = self.lock();
        let tat = self.word.load();
        freed.release(tat, mine, now, |from, to| self.word.set(from, to));
        self.freed_len.store(freed.len(), Relaxed);
    }

    /// An upstream's block; freed reservations lapse, as handing them on
    /// would admit before `until`.
    pub(crate) fn block_until(&self, until: Nanos, inc: Nanos, p: &Params) {
        let mut freed = self.lock();
        self.word.block_until(until, inc, p);
        freed.clear();
        self.freed_len.store(0, Relaxed);
    }

    pub(crate) fn reset(&self) {
        let mut freed = self.lock();
        self.word.store(0);
        freed.clear();
        self.freed_len.store(0, Relaxed);
    }

    pub(crate) fn load(&self) -> Nanos {
        self.word.load()
    }

    fn lock(&self) -> impl std::ops::DerefMut<Target = Freed<FREED>> + '_ {
        self.freed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Settings validated by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) max_tokens: f64,
    pub(crate) tokens_per_request: f64,
    /// The longest upstream hint honoured; longer ones are clamped.
    pub(crate) max_retry_after: Duration,
}

/// The part of the limiter that does not depend on the request type.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) cfg: Config,
    pub(crate) params: Params,
    /// The increment of `tokens_per_request`.
    pub(crate) inc: Nanos,
    /// The bucket of an unkeyed limiter. An upstream's `Retry-After` is
    /// folded into it, so admitting stays a matter of one word.
    pub(crate) bucket: Bucket,
    /// Keyed limiters only: no key is admitted before this instant.
    pub(crate) blocked_until: AtomicU64,
    pub(crate) clock: Clock,
    pub(crate) listeners: Listeners<RateLimitEvent>,
    /// The shared bucket(s), for a limiter built with a file or Redis
    /// backend; `None` (memory) on the hot path.
    pub(crate) remote: Option<StoreBuckets>,
}

impl Core {
    pub(crate) fn new(
        cfg: Config,
        params: Params,
        clock: Clock,
        listeners: Listeners<RateLimitEvent>,
    ) -> Self {
        let inc = params
            .increment(cfg.tokens_per_request)
            .expect("validated by the builder");
        Self {
            cfg,
            params,
            inc,
            bucket: Bucket::new(),
            blocked_until: AtomicU64::new(0),
            clock,
            listeners,
            remote: None,
        }
    }

    /// The rejection for a request that would be admitted in
    /// `retry_after`, with `tokens` left in its bucket.
    #[cold]
    pub(crate) fn rejected(&self, retry_after: Nanos, tokens: f64) -> RateLimited {
        let retry_after = Duration::from_nanos(retry_after);
        self.listeners.emit(&RateLimitEvent::Rejected {
            name: self.cfg.name.clone(),
            retry_after,
        });
        RateLimited::new(
            self.cfg.name.clone(),
            retry_after,
            self.cfg.max_tokens,
            tokens,
        )
    }

    /// Nothing is admitted for `d` from now.
    pub(crate) fn block_for(&self, d: Duration) {
        let now = self.clock.now();
        let until = now.saturating_add(nanos(d));
        // A file-backed bucket keeps the block for every process; Redis
        // keeps it here (checked before each round trip).
        let shared = self.remote.as_ref().is_some_and(|r| r.block_for(d));
        if shared {
            self.listeners.emit(&RateLimitEvent::Blocked {
                name: self.cfg.name.clone(),
                duration: d,
            });
            return;
        }
        self.bucket.block_until(until, self.inc, &self.params);
        let _ = self.blocked_until.fetch_max(until, AcqRel);
        self.listeners.emit(&RateLimitEvent::Blocked {
            name: self.cfg.name.clone(),
            duration: d,
        });
    }

    /// An upstream's hint read from a result: honoured up to the cap.
    #[cold]
    pub(crate) fn block_for_hint(&self, requested: Duration) {
        let (d, clamped) = clamp_retry_after(requested, self.cfg.max_retry_after);
        // The block first: a listener that panics cannot skip it.
        self.block_for(d);
        if clamped {
            self.listeners.emit(&RateLimitEvent::RetryAfterClamped {
                name: self.cfg.name.clone(),
                requested,
                applied: d,
            });
        }
    }

    /// For keyed limiters: time left in an upstream's block, if any.
    #[inline]
    pub(crate) fn blocked(&self, now: Nanos) -> Option<Nanos> {
        let until = self.blocked_until.load(Relaxed);
        (now < until).then(|| until - now)
    }

    pub(crate) fn reset(&self) {
        if let Some(r) = &self.remote {
            r.reset();
        }
        self.bucket.reset();
        self.blocked_until.store(0, Relaxed);
    }

    pub(crate) fn tokens(&self) -> f64 {
        if let Some(t) = self.remote.as_ref().and_then(StoreBuckets::tokens) {
            return t;
        }
        gcra::tokens(self.bucket.load(), self.clock.now(), &self.params)
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn freed_turns_are_handed_on_until_a_block_or_reset() {
        let p = Params::new(1.0, 1.0, 10 * S);
        let b = Bucket::new();
        let queue = |b: &Bucket| {
            assert!(matches!(b.acquire(0, S, &p), Decision::Admit { .. }));
            for _ in 0..2 {
                assert!(matches!(b.acquire(0, S, &p), Decision::Wait { .. }));
            }
        };
        queue(&b);
        b.release(Reservation { end: 2 * S, inc: S }, 0);
        let handed = Decision::Wait {
            tat: 2 * S,
            inc: S,
            wait: S,
        };
        assert_eq!(b.acquire(0, S, &p), handed);
        assert_eq!(b.freed_len.load(Relaxed), 0);
        // Handing it on would admit before an upstream's block ends.
        b.release(Reservation { end: 2 * S, inc: S }, 0);
        b.block_until(5 * S, S, &p);
        assert_eq!(
            b.acquire(0, S, &p),
            Decision::Wait {
                tat: 6 * S,
                inc: S,
                wait: 5 * S
            }
        );
        // A reset forgets them too; a reservation from before it that ends
        // above the word belongs to nothing and is not kept.
        b.reset();
        queue(&b);
        b.release(Reservation { end: 9 * S, inc: S }, 0);
        assert_eq!(b.freed_len.load(Relaxed), 0);
        b.release(Reservation { end: 2 * S, inc: S }, 0);
        b.reset();
        assert_eq!(b.freed_len.load(Relaxed), 0);
        assert_eq!(b.load(), 0);
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two callers race for the last token: exactly one gets it, and the
    /// word ends where one admission puts it.
    #[test]
    fn loom_gcra_last_token() {
        loom::model(|| {
            let p = Params::new(1.0, 1.0, 0);
            let b = Arc::new(Bucket::new());
            let run =
                |b: Arc<Bucket>| thread::spawn(move || b.acquire(0, p.increment(1.0).unwrap(), &p));
            let t1 = run(b.clone());
            let t2 = run(b.clone());
            let (d1, d2) = (t1.join().unwrap(), t2.join().unwrap());
            let admitted = [d1, d2]
                .iter()
                .filter(|d| matches!(d, Decision::Admit { .. }))
                .count();
            assert_eq!(admitted, 1);
            assert_eq!(b.load(), 1_000_000_000);
        });
    }

    const S: u64 = 1_000_000_000;

    /// A bucket of one token a second, waits up to 10 s, after one
    /// admission and a waiter for each `end` given.
    fn queued(ends: &[u64]) -> (Params, Arc<Bucket>) {
        let p = Params::new(1.0, 1.0, 10 * S);
        let b = Arc::new(Bucket::new());
        let Decision::Admit { .. } = b.acquire(0, S, &p) else {
            panic!()
        };
        for &end in ends {
            let Decision::Wait { tat, .. } = b.acquire(0, S, &p) else {
                panic!()
            };
            assert_eq!(tat, end);
        }
        (p, b)
    }

    fn mine(end: u64) -> Reservation {
        Reservation { end, inc: S }
    }

    /// A newcomer racing the release of the newest waiter: either the
    /// release goes first and the newcomer queues in the freed turn, or
    /// the newcomer queues behind and the freed turn is kept, for the next
    /// one. Never both, never neither.
    #[test]
    fn loom_gcra_refund_races_reserve() {
        loom::model(|| {
            let (p, b) = queued(&[2 * S]);
            let b2 = b.clone();
            let other = thread::spawn(move || b2.acquire(0, S, &p));
            b.release(mine(2 * S), 0);
            let d = other.join().unwrap();
            let Decision::Wait { tat: theirs, .. } = d else {
                panic!("{d:?}")
            };
            if theirs == 2 * S {
                assert_eq!(b.load(), 2 * S);
                assert_eq!(b.freed_len.load(Relaxed), 0);
            } else {
                assert_eq!(theirs, 3 * S);
                assert_eq!(b.load(), 3 * S);
                // The next newcomer gets the freed turn, at its time.
                assert_eq!(
                    b.acquire(0, S, &p),
                    Decision::Wait {
                        tat: 2 * S,
                        inc: S,
                        wait: S
                    }
                );
            }
        });
    }

    /// A newcomer racing the release of the waiter above a freed turn:
    /// whether it takes the freed turn or the release rolls back through
    /// it first, the newcomer waits for the same instant and the word ends
    /// where that one reservation puts it.
    #[test]
    fn loom_gcra_slot_take_races_cascade() {
        loom::model(|| {
            let (p, b) = queued(&[2 * S, 3 * S]);
            b.release(mine(2 * S), 0);
            assert_eq!(b.load(), 3 * S);
            let b2 = b.clone();
            let other = thread::spawn(move || b2.acquire(0, S, &p));
            b.release(mine(3 * S), 0);
            let d = other.join().unwrap();
            assert_eq!(
                d,
                Decision::Wait {
                    tat: 2 * S,
                    inc: S,
                    wait: S
                }
            );
            assert_eq!(b.load(), 2 * S);
            assert_eq!(b.freed_len.load(Relaxed), 0);
        });
    }

    /// Two waiters released at once, the older while the newer still
    /// stands: neither reservation is lost between them.
    #[test]
    fn loom_gcra_releases_race() {
        loom::model(|| {
            let (_, b) = queued(&[2 * S, 3 * S]);
            let b2 = b.clone();
            let older = thread::spawn(move || b2.release(mine(2 * S), 0));
            b.release(mine(3 * S), 0);
            older.join().unwrap();
            assert_eq!(b.load(), S);
            assert_eq!(b.freed_len.load(Relaxed), 0);
        });
    }
}
