//! The dedup table and its shared calls.
//!
//! A call with a new key is led by its first caller. The boxed inner
//! future waits in the call's table entry until the first of the call's
//! waiters is polled: usually the leader, which takes it out and polls it
//! inline, with its own waker and no lock held. Most calls end there: if
//! the inner future answers on its first poll, the call costs three table
//! locks (start, take, finish) and a reused box. Shared state (a
//! [`Flight`]) is made only when a second caller joins, or when the inner
//! future is pending on its first poll. From there on whichever waiter is
//! polled drives it (at most one at a time, one poll of the inner future
//! per poll of the waiter, so a future that yields gives the executor
//! back), with a waker that wakes every waiter, so the call keeps going for as long as anyone waits, whether or
//! not the leader is ever polled, and no runtime is needed to spawn it.
//! When the last waiter goes away before the answer, the inner future is
//! dropped (cancelled). A panic while polling it reaches the waiter that
//! polled it; every other waiter gets a [`Panicked`] error.
//!
//! A leader that has not been polled is one of its flight's waiters but
//! does not hold the flight: it finds it through the table entry, or, once
//! the call has left the table, in `TableContents::unpolled_leaders`, where
//! the call's finisher leaves it. The leader's first poll or its drop takes
//! it back out, so that map holds only flights whose leaders are alive.
//!
//! The table is hashed once per call with a randomly keyed hasher
//! ([`KeyHasher`], so keys chosen by a client cannot degrade it); the hash
//! and a per-table call id are kept by each waiter, so finishing or leaving
//! a call finds its entry without hashing or comparing the key again. The
//! leader's claim and finish look first in the bucket the entry went into
//! (see [`CallRef`]), and probe by hash only if the table moved it.
//!
//! An entry exists only while a call that can answer it exists: the inner
//! service's `call` runs before the entry goes in (both under the table's
//! lock, so no one sees one without the other), and a panic in `call`
//! leaves nothing behind.
//!
//! Eviction is O(1) amortised per key: every cached answer is also queued,
//! in the order it was cached, in one queue per TTL (answers, errors). With
//! one TTL per queue and a clock that does not go back, that order is
//! expiry order, so the answer that expires first is at the head of one of
//! the two queues. Queue entries are never updated in place: an answer
//! that left the table (evicted, replaced by a new call, cleared) leaves a
//! stale entry behind, recognised by its call id and skipped when it
//! reaches the head; each entry is pushed once and popped or compacted
//! away once.
//!
//! Locks: the table's lock may be held while taking a flight's state lock,
//! never the other way round; a flight's waker list is only ever locked
//! last. The inner future is polled and dropped with no lock held.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hashbrown::hash_table::{Entry, HashTable};

use super::{DedupEvent, Panicked, SharedError};
use crate::clock::{nanos, Clock, Nanos};
use crate::error::BoxError;
use crate::observe::Listeners;

/// A fallible future, with its output types named.
pub(crate) trait Call: Future<Output = Result<Self::Ok, Self::Err>> {
    type Ok;
    type Err;
}

impl<F, T, E> Call for F
where
    F: Future<Output = Result<T, E>>,
{
    type Ok = T;
    type Err = E;
}

/// A call's answer, as each of its waiters gets it.
pub(crate) type Answer<T> = Result<T, SharedError>;

/// A panic caught while polling an inner future, to be resumed in the
/// waiter that polled it.
pub(crate) type PanicPayload = Box<dyn Any + Send>;

/// What one poll gave a waiter: its answer, or the panic of the inner
/// future it polled.
pub(crate) type Polled<T> = Result<Answer<T>, PanicPayload>;

/// A pinned, reusable home for an inner future: `None` once it finished.
/// Leaders reuse the homes of finished calls, so a call that answers at
/// once allocates nothing in the steady state.
pub(crate) type FutureBox<F> = Pin<Box<Option<F>>>;

/// Spare homes kept per table.
const SPARES: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a listener or a clone must not wedge the table.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settings of one layer, validated by the builder.
#[derive(Debug)]
pub(crate) struct DedupConfig {
    pub(crate) name: Arc<str>,
    pub(crate) cache_ttl: Option<Duration>,
    pub(crate) error_ttl: Option<Duration>,
    pub(crate) max_entries: usize,
    pub(crate) listeners: Listeners<DedupEvent>,
}

impl DedupConfig {
    /// Sends the event of `kind`. A panicking listener propagates to the
    /// caller.
    #[inline]
    pub(crate) fn emit(&self, kind: EventKind) {
        if self.listeners.active() {
            self.send(kind);
        }
    }

    /// Whether events go anywhere: read before a call's guard is built,
    /// so that the common path never needs the guard's address.
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.listeners.active()
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn send(&self, kind: EventKind) {
        let name = self.name.clone();
        self.listeners.emit(&match kind {
            EventKind::Leader => DedupEvent::Leader { name },
            EventKind::Joined => DedupEvent::Joined { name },
            EventKind::CacheHit => DedupEvent::CacheHit { name },
            EventKind::Full => DedupEvent::Full { name },
            EventKind::Cancelled => DedupEvent::Cancelled { name },
        });
    }
}

/// Which event a call raised; sent by the service once the call's guard
/// exists, so a panicking listener cannot strand an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    Leader,
    Joined,
    CacheHit,
    Full,
    Cancelled,
}

/// Where a call is in the table: its hash and its id, and the bucket it
/// went into. The bucket is only a hint (the table moves entries when it
/// grows): an entry is the call's only if its id matches, and ids are
/// never reused within a table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallRef {
    hash: u64,
    id: u64,
    bucket: usize,
}

/// One key's entry in the table: its call in flight, or its cached answer.
struct DedupEntry<K, F, T> {
    hash: u64,
    id: u64,
    key: K,
    state: EntryState<F, T>,
}

/// Where a key's call is.
enum EntryState<F, T> {
    /// Started and not polled yet: the inner future waits here for the
    /// first of its waiters to be polled.
    Unpolled(FutureBox<F>),
    /// In flight. Its [`Flight`] exists once a second caller joined or
    /// the inner future was pending; without one, the leader is polling
    /// the inner future inline.
    InFlight(Option<Arc<Flight<F, T>>>),
    Cached {
        result: Answer<T>,
        until: Nanos,
    },
}

/// What `FlightTable::start` decided for one call.
pub(crate) enum Start<F, T> {
    /// This call leads a new call, whose inner future waits in the table.
    Leader(CallRef),
    /// This call waits on a call already running.
    Joined(CallRef, Arc<Flight<F, T>>),
    /// A cached answer.
    Hit(Answer<T>),
    /// The table is full of calls in flight: this call goes straight through.
    Bypass(F),
}

/// How a leader's first poll finds its call.
pub(crate) enum Claim<F, T> {
    /// Nobody else polled it yet: the leader polls the inner future inline.
    Mine(FutureBox<F>),
    /// Others joined first: the leader is one of the flight's waiters.
    Joined(Arc<Flight<F, T>>),
}

/// A cached answer's place in its expiry queue.
#[derive(Clone, Copy)]
struct Expiry {
    hash: u64,
    id: u64,
    until: Nanos,
}

/// What the table's lock guards.
struct TableContents<K, F, T> {
    map: HashTable<DedupEntry<K, F, T>>,
    next_id: u64,
    spares: Vec<FutureBox<F>>,
    /// Cached answers in the order they were cached: successes, errors.
    expiry: [VecDeque<Expiry>; 2],
    /// Flights of finished calls whose leaders were not polled yet, by call
    /// id (see the module docs).
    unpolled_leaders: HashMap<u64, Arc<Flight<F, T>>>,
}

/// A new call's entry, with the inner future in a spare home if there is
/// one.
fn unpolled<F, T>(spares: &mut Vec<FutureBox<F>>, fut: F) -> EntryState<F, T> {
    let home = match spares.pop() {
        Some(mut home) => {
            home.set(Some(fut));
            home
        }
        None => Box::pin(Some(fut)),
    };
    EntryState::Unpolled(home)
}

impl<K, F, T> TableContents<K, F, T> {
    /// Call `t`'s entry, looked up at its bucket first.
    #[inline]
    fn call_mut(&mut self, t: CallRef) -> Option<&mut DedupEntry<K, F, T>> {
        if matches!(self.map.get_bucket(t.bucket), Some(it) if it.id == t.id) {
            return self.map.get_bucket_mut(t.bucket);
        }
        self.map.find_mut(t.hash, |it| it.id == t.id)
    }

    /// Takes call `t`'s entry out of the table, looked up at its bucket
    /// first.
    #[inline]
    fn remove_call(&mut self, t: CallRef) -> Option<DedupEntry<K, F, T>> {
        if matches!(self.map.get_bucket(t.bucket), Some(it) if it.id == t.id) {
            return self
                .map
                .get_bucket_entry(t.bucket)
                .ok()
                .map(|e| e.remove().0);
        }
        let e = self.map.find_entry(t.hash, |it| it.id == t.id).ok()?;
        Some(e.remove().0)
    }

    /// What a call that left the table leaves to its waiters: its flight,
    /// which an unpolled leader must still be able to find.
    #[inline(always)]
    fn retire(&mut self, id: u64, state: EntryState<F, T>) -> Option<Arc<Flight<F, T>>> {
        match state {
            EntryState::InFlight(Some(g)) => {
                if g.leader_unpolled.load(Ordering::Relaxed) {
                    self.keep_for_leader(id, &g);
                }
                Some(g)
            }
            _ => None,
        }
    }

    /// Keeps a finished call's home for a later call, up to [`SPARES`].
    #[inline]
    fn keep_spare(&mut self, spare: Option<FutureBox<F>>) {
        if let Some(home) = spare {
            if self.spares.len() < SPARES {
                self.spares.push(home);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn keep_for_leader(&mut self, id: u64, g: &Arc<Flight<F, T>>) {
        self.unpolled_leaders.insert(id, g.clone());
    }

    fn is_live(&self, e: &Expiry) -> bool {
        matches!(
            self.map.find(e.hash, |it| it.id == e.id),
            Some(DedupEntry { state: EntryState::Cached { until, .. }, .. }) if *until == e.until
        )
    }

    /// The queue whose live head expires first, after dropping stale heads.
    fn first_to_expire(&mut self) -> Option<usize> {
        let mut best: Option<(usize, Nanos)> = None;
        for q in 0..2 {
            while let Some(e) = self.expiry[q].front() {
                if self.is_live(e) {
                    if best.is_none_or(|(_, until)| e.until < until) {
                        best = Some((q, e.until));
                    }
                    break;
                }
                self.expiry[q].pop_front();
            }
        }
        best.map(|(q, _)| q)
    }

    /// Removes the cached answer that expires first (an expired one, if
    /// any). Returns whether there was one: `false` means every key is in
    /// flight.
    fn evict_one(&mut self) -> bool {
        let Some(q) = self.first_to_expire() else {
            return false;
        };
        let e = self.expiry[q].pop_front().expect("head found above");
        if let Ok(entry) = self.map.find_entry(e.hash, |it| it.id == e.id) {
            entry.remove();
        }
        true
    }

    /// Drops the answers that have expired by `now` (from the queue heads
    /// only, so it costs nothing when none has).
    fn drop_expired(&mut self, now: Nanos) {
        while let Some(q) = self.first_to_expire() {
            let e = self.expiry[q].front().expect("head found above");
            if e.until > now {
                break;
            }
            self.evict_one();
        }
    }

    /// Queues an answer cached now, keeping each queue within twice the
    /// table's size: when stale entries make up more than half of it,
    /// they go in one pass (paid for by the pushes that made them).
    fn queue(&mut self, q: usize, e: Expiry, now: Nanos) {
        self.drop_expired(now);
        self.expiry[q].push_back(e);
        let limit = 2 * self.map.len() + 16;
        if self.expiry[q].len() > limit {
            let mut queue = std::mem::take(&mut self.expiry[q]);
            queue.retain(|e| self.is_live(e));
            self.expiry[q] = queue;
        }
    }
}

/// The table's keyed hash: foldhash, with seeds drawn for each table from
/// std's `RandomState` (the operating system's randomness), so no one
/// outside the process knows them.
///
/// foldhash is about ten times cheaper than std's SipHash on a small key.
/// It promises that without its seeds no one can build keys that collide
/// (so a client cannot flood one bucket), and makes no promise against
/// someone who can observe hash values or time the table's probes well
/// enough to recover them: the table shows neither, and each table (one
/// per service) has seeds of its own.
struct KeyHasher {
    per_table: u64,
    shared: foldhash::SharedSeed,
}

impl KeyHasher {
    fn new() -> Self {
        let os = RandomState::new();
        Self {
            per_table: os.hash_one(0u8),
            shared: foldhash::SharedSeed::from_u64(os.hash_one(1u8)),
        }
    }

    #[inline]
    fn hash<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        let mut h = foldhash::fast::FoldHasher::with_seed(self.per_table, &self.shared);
        key.hash(&mut h);
        h.finish()
    }
}

/// In-flight calls and cached answers by key, shared by the clones of one
/// service (or by every service of a layer that shares one table).
pub(crate) struct FlightTable<K, F, T> {
    pub(crate) cfg: Arc<DedupConfig>,
    clock: Clock,
    hasher: KeyHasher,
    inner: Mutex<TableContents<K, F, T>>,
}

impl<K, F, T> FlightTable<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(cfg: Arc<DedupConfig>) -> Self {
        Self {
            cfg,
            clock: Clock::new(),
            hasher: KeyHasher::new(),
            inner: Mutex::new(TableContents {
                map: HashTable::new(),
                next_id: 0,
                spares: Vec::new(),
                expiry: [VecDeque::new(), VecDeque::new()],
                unpolled_leaders: HashMap::new(),
            }),
        }
    }

    fn caches(&self) -> bool {
        self.cfg.cache_ttl.is_some() || self.cfg.error_ttl.is_some()
    }

    /// Joins the call for `key`, serves it from the cache, or starts a new
    /// call with `call`. `call` runs under the table's lock, so a second
    /// caller with the same key cannot miss the call it starts, and before
    /// the call's entry goes in, so a panic in it leaves no entry. The
    /// event is the caller's to send, once it holds its guard (see
    /// [`EventKind`]).
    #[inline]
    pub(crate) fn start(&self, key: K, call: impl FnOnce() -> F) -> Start<F, T> {
        let hash = self.hasher.hash(&key);
        let now = if self.caches() { self.clock.now() } else { 0 };
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let room = inner.map.len() < self.cfg.max_entries;
        match inner.map.entry(hash, |it| it.key == key, |it| it.hash) {
            Entry::Occupied(e) => {
                let bucket = e.bucket_index();
                let item = e.into_mut();
                let call_ref = CallRef {
                    hash,
                    id: item.id,
                    bucket,
                };
                return match &mut item.state {
                    EntryState::InFlight(Some(g)) => {
                        g.waiters.fetch_add(1, Ordering::Relaxed);
                        Start::Joined(call_ref, g.clone())
                    }
                    EntryState::InFlight(flight) => {
                        // The leader is polling the future inline: it hands
                        // it over if it is pending, or answers us.
                        let g = Arc::new(Flight::new(None, 2));
                        *flight = Some(g.clone());
                        Start::Joined(call_ref, g)
                    }
                    state @ EntryState::Unpolled(_) => {
                        // The future goes to a flight that this call and
                        // the leader wait on, so that whichever is polled
                        // first drives it.
                        let EntryState::Unpolled(fut) =
                            std::mem::replace(state, EntryState::InFlight(None))
                        else {
                            unreachable!("matched above")
                        };
                        let g = Arc::new(Flight::new(Some(fut), 2));
                        g.leader_unpolled.store(true, Ordering::Relaxed);
                        *state = EntryState::InFlight(Some(g.clone()));
                        Start::Joined(call_ref, g)
                    }
                    EntryState::Cached { result, until } if now < *until => {
                        Start::Hit(result.clone())
                    }
                    EntryState::Cached { .. } => {
                        // Expired: this call replaces the answer. Its queue
                        // entry goes stale with the old id.
                        let fut = call();
                        let id = inner.next_id;
                        inner.next_id += 1;
                        item.id = id;
                        item.state = unpolled(&mut inner.spares, fut);
                        Start::Leader(CallRef { id, ..call_ref })
                    }
                };
            }
            Entry::Vacant(v) if room => {
                let fut = call();
                let id = inner.next_id;
                inner.next_id += 1;
                let e = v.insert(DedupEntry {
                    hash,
                    id,
                    key,
                    state: unpolled(&mut inner.spares, fut),
                });
                let bucket = e.bucket_index();
                return Start::Leader(CallRef { hash, id, bucket });
            }
            Entry::Vacant(_) => {}
        }
        // Full: a cached answer makes room, or the call goes straight
        // through.
        if !inner.evict_one() {
            return Start::Bypass(call());
        }
        let fut = call();
        let id = inner.next_id;
        inner.next_id += 1;
        let state = unpolled(&mut inner.spares, fut);
        let e = inner.map.insert_unique(
            hash,
            DedupEntry {
                hash,
                id,
                key,
                state,
            },
            |it| it.hash,
        );
        let bucket = e.bucket_index();
        Start::Leader(CallRef { hash, id, bucket })
    }

    /// Takes a finished call out of the table, leaving its answer cached
    /// when the layer caches answers of that kind (never a panic). Returns
    /// its flight.
    fn finish(
        &self,
        t: CallRef,
        outcome: &Answer<T>,
        panicked: bool,
        spare: Option<FutureBox<F>>,
    ) -> Option<Arc<Flight<F, T>>> {
        match self.ttl(outcome.is_ok(), panicked) {
            None => self.remove_finished(t, spare),
            Some(ttl) => self.cache_finished(t, outcome, ttl, spare),
        }
    }

    /// How long an answer is kept: never a panic's.
    #[inline]
    fn ttl(&self, ok: bool, panicked: bool) -> Option<Duration> {
        match ok {
            _ if panicked => None,
            true => self.cfg.cache_ttl,
            false => self.cfg.error_ttl,
        }
    }

    /// Takes a finished call that is not cached out of the table. The
    /// answer itself is not needed here, so it stays with the caller (in
    /// registers, on the common path).
    #[inline]
    fn remove_finished(
        &self,
        t: CallRef,
        spare: Option<FutureBox<F>>,
    ) -> Option<Arc<Flight<F, T>>> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        inner.keep_spare(spare);
        let state = inner.remove_call(t)?.state;
        inner.retire(t.id, state)
    }

    #[inline(never)]
    fn cache_finished(
        &self,
        t: CallRef,
        outcome: &Answer<T>,
        ttl: Duration,
        spare: Option<FutureBox<F>>,
    ) -> Option<Arc<Flight<F, T>>> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        inner.keep_spare(spare);
        self.cache(inner, t, outcome, ttl)
    }

    /// Leaves a finished call's answer in the table for `ttl`. Out of line,
    /// so that a call that is not cached pays nothing for it.
    #[inline(never)]
    fn cache(
        &self,
        inner: &mut TableContents<K, F, T>,
        t: CallRef,
        outcome: &Answer<T>,
        ttl: Duration,
    ) -> Option<Arc<Flight<F, T>>> {
        let item = inner.call_mut(t)?;
        let now = self.clock.now();
        let until = now.saturating_add(nanos(ttl));
        let result = outcome.clone();
        let old = std::mem::replace(&mut item.state, EntryState::Cached { result, until });
        let queue = usize::from(outcome.is_err());
        let e = Expiry {
            hash: t.hash,
            id: t.id,
            until,
        };
        inner.queue(queue, e, now);
        inner.retire(t.id, old)
    }

    /// The leader's first poll: takes the inner future to poll it inline,
    /// or finds the flight of the callers that joined before.
    #[inline]
    pub(crate) fn claim(&self, t: CallRef) -> Claim<F, T> {
        let mut inner = lock(&self.inner);
        if let Some(item) = inner.call_mut(t) {
            if let EntryState::Unpolled(_) = item.state {
                let EntryState::Unpolled(fut) =
                    std::mem::replace(&mut item.state, EntryState::InFlight(None))
                else {
                    unreachable!("matched above")
                };
                return Claim::Mine(fut);
            }
        }
        Self::claim_joined(&mut inner, t)
    }

    /// Others joined before the leader's first poll.
    #[cold]
    #[inline(never)]
    fn claim_joined(inner: &mut TableContents<K, F, T>, t: CallRef) -> Claim<F, T> {
        if let Some(DedupEntry {
            state: EntryState::InFlight(Some(g)),
            ..
        }) = inner.map.find(t.hash, |it| it.id == t.id)
        {
            if g.leader_unpolled.load(Ordering::Relaxed) {
                g.leader_unpolled.store(false, Ordering::Relaxed);
                return Claim::Joined(g.clone());
            }
        }
        // The call left the table (answered by a caller that joined it):
        // its finisher left the flight here. The leader is counted among
        // its waiters, so the call cannot have been cancelled.
        let g = inner
            .unpolled_leaders
            .remove(&t.id)
            .expect("an unpolled leader's call is in the table or among unpolled_leaders");
        g.leader_unpolled.store(false, Ordering::Relaxed);
        Claim::Joined(g)
    }

    /// The leader's inner future answered (or panicked) on the leader's own
    /// poll. Returns the leader's answer and hands the others theirs.
    #[inline(always)]
    pub(crate) fn finish_leader(
        &self,
        t: CallRef,
        outcome: Answer<T>,
        panicked: bool,
        spare: Option<FutureBox<F>>,
    ) -> Answer<T> {
        let flight = match self.ttl(outcome.is_ok(), panicked) {
            None => self.remove_finished(t, spare),
            Some(ttl) => self.cache_finished(t, &outcome, ttl, spare),
        };
        match flight {
            None => outcome,
            Some(g) => g.settle(outcome),
        }
    }

    /// The leader's inner future is pending: it goes to the call's flight
    /// (made now if nobody joined yet), to be driven by whichever waiter is
    /// polled.
    pub(crate) fn hand_over(&self, t: CallRef, fut: FutureBox<F>) -> Arc<Flight<F, T>> {
        let mut inner = lock(&self.inner);
        let item = inner.map.find_mut(t.hash, |it| it.id == t.id);
        match item.map(|it| &mut it.state) {
            Some(EntryState::InFlight(Some(g))) => {
                let g = g.clone();
                let mut st = lock(&g.state);
                st.fut = Some(fut);
                st.polling = false;
                g.woken.store(true, Ordering::Release);
                drop(st);
                g
            }
            Some(EntryState::InFlight(state)) => {
                let g = Arc::new(Flight::new(Some(fut), 1));
                *state = Some(g.clone());
                g
            }
            // Not reachable: only a waiter finishes or cancels a call, and
            // the leader is one. Keep going on a private flight regardless.
            _ => Arc::new(Flight::new(Some(fut), 1)),
        }
    }

    /// Calls in flight and answers cached.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        let flying = inner
            .map
            .iter()
            .filter(|it| !matches!(it.state, EntryState::Cached { .. }))
            .count();
        (flying, inner.map.len() - flying)
    }

    /// Forgets every cached answer.
    pub(crate) fn clear_cache(&self) {
        let mut inner = lock(&self.inner);
        inner
            .map
            .retain(|it| !matches!(it.state, EntryState::Cached { .. }));
        inner.expiry = [VecDeque::new(), VecDeque::new()];
    }
}

/// Leaving a call needs neither the key's hash and equality nor the
/// answer's `Clone`, so the guards' `Drop` can call these directly.
impl<K, F, T> FlightTable<K, F, T> {
    #[inline]
    fn emit(&self, kind: EventKind) {
        self.cfg.emit(kind);
    }

    /// Removes a call that every waiter left.
    fn cancel(inner: &mut TableContents<K, F, T>, t: CallRef) {
        if let Ok(e) = inner.map.find_entry(t.hash, |it| it.id == t.id) {
            e.remove();
        }
    }

    /// The leader went away: before its first poll (`None`: the future is
    /// in the table or with the flight), or while holding the inner future,
    /// which goes to the others if anyone waits. With nobody left the call
    /// is cancelled.
    pub(crate) fn leader_leave(&self, t: CallRef, fut: Option<FutureBox<F>>) {
        match fut {
            Some(fut) => self.holder_leave(t, fut),
            None => self.unpolled_leave(t),
        }
    }

    fn unpolled_leave(&self, t: CallRef) {
        let flight = {
            let mut guard = lock(&self.inner);
            let inner = &mut *guard;
            let flight = match inner.map.find_entry(t.hash, |it| it.id == t.id) {
                Ok(e) => match &e.get().state {
                    EntryState::Unpolled(_) => {
                        let EntryState::Unpolled(fut) = e.remove().0.state else {
                            unreachable!("matched above")
                        };
                        drop(guard);
                        return self.cancelled(Some(fut));
                    }
                    EntryState::InFlight(Some(g)) if g.leader_unpolled.load(Ordering::Relaxed) => {
                        Some(g.clone())
                    }
                    _ => None,
                },
                Err(_) => None,
            };
            let flight = flight.or_else(|| inner.unpolled_leaders.remove(&t.id));
            if let Some(g) = &flight {
                g.leader_unpolled.store(false, Ordering::Relaxed);
            }
            flight
        };
        // The leader is one of the flight's waiters, so its flight is always
        // found; a drop has nothing else to release.
        if let Some(g) = flight {
            self.leave(t, &g, None);
        }
    }

    fn holder_leave(&self, t: CallRef, fut: FutureBox<F>) {
        let cancelled = Some({
            let mut inner = lock(&self.inner);
            let flight = match inner.map.find(t.hash, |it| it.id == t.id) {
                Some(DedupEntry {
                    state: EntryState::InFlight(Some(g)),
                    ..
                }) => Some(g.clone()),
                _ => None,
            };
            if let Some(g) = flight {
                if g.waiters.fetch_sub(1, Ordering::AcqRel) != 1 {
                    let mut st = lock(&g.state);
                    st.fut = Some(fut);
                    st.polling = false;
                    g.woken.store(true, Ordering::Release);
                    drop(st);
                    drop(inner);
                    g.wake_all();
                    return;
                }
            }
            Self::cancel(&mut inner, t);
            fut
        });
        self.cancelled(cancelled);
    }

    /// Drops a cancelled call's future (with no lock held) and says so.
    /// This runs in a waiter's `Drop`, perhaps while a panic unwinds, so a
    /// panic in the future's destructor or in a listener stays in here: a
    /// second panic would abort the process.
    fn cancelled(&self, fut: Option<FutureBox<F>>) {
        if let Some(fut) = fut {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
        let _ = catch_unwind(AssertUnwindSafe(|| self.emit(EventKind::Cancelled)));
    }

    /// A waiter of a flight went away before its answer. The last one
    /// cancels the call.
    pub(crate) fn leave(&self, t: CallRef, flight: &Arc<Flight<F, T>>, waker_slot: Option<usize>) {
        if let Some(i) = waker_slot {
            lock(&flight.wakers).remove(i);
        }
        let cancelled = {
            let mut inner = lock(&self.inner);
            if flight.waiters.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            let fut = {
                let mut st = lock(&flight.state);
                if st.done.is_some() {
                    return;
                }
                st.fut.take()
            };
            Self::cancel(&mut inner, t);
            fut
        };
        self.cancelled(cancelled);
    }
}

/// What a flight's lock guards: the inner future between polls, and the
/// answer until every waiter took it.
struct FlightState<F, T> {
    fut: Option<FutureBox<F>>,
    done: Option<Answer<T>>,
    /// Someone has the future out to poll it (a waiter of the flight, or the
    /// leader before it handed the future over).
    polling: bool,
}

#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Wakers {
    fn remove(&mut self, i: usize) {
        if self.slots[i].take().is_some() {
            self.free.push(i);
        }
    }
}

/// The shared state of a call that more than one caller waits on, or that
/// did not answer at once.
pub(crate) struct Flight<F, T> {
    state: Mutex<FlightState<F, T>>,
    /// The inner future asked to be polled again.
    woken: AtomicBool,
    wakers: Mutex<Wakers>,
    /// Callers that have not yet taken their answer or left. Changed under
    /// the table's lock when joining and leaving.
    waiters: AtomicUsize,
    /// The leader is one of the waiters but has not been polled, so it does
    /// not hold the flight yet. Read and written under the table's lock.
    leader_unpolled: AtomicBool,
}

impl<F, T> Flight<F, T> {
    fn new(fut: Option<FutureBox<F>>, waiters: usize) -> Self {
        let held = fut.is_none();
        Self {
            state: Mutex::new(FlightState {
                fut,
                done: None,
                polling: held,
            }),
            woken: AtomicBool::new(!held),
            wakers: Mutex::new(Wakers::default()),
            waiters: AtomicUsize::new(waiters),
            leader_unpolled: AtomicBool::new(false),
        }
    }

    fn register(&self, waker_slot: &mut Option<usize>, waker: &Waker) {
        let mut ws = lock(&self.wakers);
        match *waker_slot {
            Some(i) => match &mut ws.slots[i] {
                Some(w) if w.will_wake(waker) => {}
                w => *w = Some(waker.clone()),
            },
            None => {
                let i = match ws.free.pop() {
                    Some(i) => {
                        ws.slots[i] = Some(waker.clone());
                        i
                    }
                    None => {
                        ws.slots.push(Some(waker.clone()));
                        ws.slots.len() - 1
                    }
                };
                *waker_slot = Some(i);
            }
        }
    }

    fn wake_all(&self) {
        let ws = lock(&self.wakers);
        for w in ws.slots.iter().flatten() {
            w.wake_by_ref();
        }
    }

    /// This waiter's answer: the last reader takes it, the others clone.
    fn read(&self, st: &mut FlightState<F, T>) -> Answer<T>
    where
        T: Clone,
    {
        if self.waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            st.done.take().expect("answer kept for the last waiter")
        } else {
            st.done.clone().expect("answer kept until the last waiter")
        }
    }

    /// The call is out of the table with this answer: the caller that
    /// produced it takes its own, and the others are woken to theirs. No
    /// one can join once the call is out of the table, so the waiter count
    /// only goes down from here.
    fn settle(&self, outcome: Answer<T>) -> Answer<T>
    where
        T: Clone,
    {
        let mut st = lock(&self.state);
        st.polling = false;
        if self.waiters.load(Ordering::Acquire) == 1 {
            self.waiters.store(0, Ordering::Release);
            return outcome;
        }
        st.done = Some(outcome);
        let mine = self.read(&mut st);
        drop(st);
        self.wake_all();
        mine
    }
}

/// Polls `fut` once with `cx`, catching a panic so that the call can be
/// settled before it is resumed in the poller.
#[inline]
pub(crate) fn poll_call<F>(fut: &mut FutureBox<F>, cx: &mut Context<'_>) -> Poll<Polled<F::Ok>>
where
    F: Call,
    F::Err: Into<BoxError>,
{
    let polled = catch_unwind(AssertUnwindSafe(|| match fut.as_mut().as_pin_mut() {
        Some(f) => f.poll(cx),
        None => panic!("dedup: inner future polled after it finished"),
    }));
    match polled {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(res)) => Poll::Ready(Ok(res.map_err(|e| SharedError::new(e.into())))),
        Err(payload) => Poll::Ready(Err(payload)),
    }
}

/// The answer of the other waiters of a call that panicked.
pub(crate) fn panicked<T>(payload: &PanicPayload) -> Answer<T> {
    let panicked = Panicked::from_payload(&**payload);
    Err(SharedError::new(Box::new(panicked)))
}

/// Drops a finished (or panicked) inner future, keeping a panic from its
/// destructor in here too. Returns its home for reuse, unless dropping it
/// panicked.
#[inline]
pub(crate) fn drop_quietly<F>(mut fut: FutureBox<F>) -> Option<FutureBox<F>> {
    if !std::mem::needs_drop::<F>() {
        fut.set(None);
        return Some(fut);
    }
    catch_unwind(AssertUnwindSafe(|| fut.as_mut().set(None))).ok()?;
    Some(fut)
}

impl<F, T> Flight<F, T>
where
    F: Call<Ok = T> + Send + 'static,
    T: Clone + Send + 'static,
    F::Err: Into<BoxError>,
{
    /// Polls on behalf of one waiter: reads the answer if there is one,
    /// else drives the inner future if nobody else is and it asked to be
    /// polled, else waits. `Err` is a panic of the inner future in this
    /// poll, to be resumed by the waiter once the others have their answer.
    pub(crate) fn poll_waiter<K>(
        self: &Arc<Self>,
        table: &FlightTable<K, F, T>,
        call_ref: CallRef,
        waker_slot: &mut Option<usize>,
        cx: &mut Context<'_>,
    ) -> Poll<Polled<T>>
    where
        K: Hash + Eq,
    {
        loop {
            let mut st = lock(&self.state);
            if st.done.is_some() {
                return Poll::Ready(Ok(self.read(&mut st)));
            }
            if st.polling || !self.woken.swap(false, Ordering::AcqRel) {
                self.register(waker_slot, cx.waker());
                // A wake-up that came before we registered is not lost.
                if !st.polling && self.woken.load(Ordering::Acquire) {
                    continue;
                }
                return Poll::Pending;
            }
            let Some(mut fut) = st.fut.take() else {
                // Cancelled under us: cannot happen while we wait.
                self.register(waker_slot, cx.waker());
                return Poll::Pending;
            };
            st.polling = true;
            drop(st);

            let waker = Waker::from(self.clone());
            let polled = match poll_call(&mut fut, &mut Context::from_waker(&waker)) {
                Poll::Pending => {
                    let mut st = lock(&self.state);
                    st.polling = false;
                    st.fut = Some(fut);
                    self.register(waker_slot, cx.waker());
                    drop(st);
                    // A future that woke itself while it was polled (a
                    // yield) is polled again on the executor's next turn:
                    // polling it again here would never give the executor
                    // back.
                    if self.woken.load(Ordering::Acquire) {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(polled) => polled,
            };
            let home = drop_quietly(fut);
            return Poll::Ready(match polled {
                Ok(outcome) => {
                    table.finish(call_ref, &outcome, false, home);
                    Ok(self.settle(outcome))
                }
                Err(payload) => {
                    let outcome = panicked(&payload);
                    table.finish(call_ref, &outcome, true, home);
                    // This waiter's own answer is the panic.
                    let _ = self.settle(outcome);
                    Err(payload)
                }
            });
        }
    }
}

impl<F, T> Wake for Flight<F, T>
where
    F: Send + 'static,
    T: Send + 'static,
{
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::KeyHasher;

    #[test]
    fn each_table_hashes_with_seeds_of_its_own() {
        let (a, b) = (KeyHasher::new(), KeyHasher::new());
        assert_eq!(a.hash("GET /me"), a.hash("GET /me"));
        // Two tables agreeing on 64 keys would mean shared seeds.
        let agree = (0u64..64).filter(|k| a.hash(k) == b.hash(k)).count();
        assert_eq!(agree, 0);
    }
}
