//! The dedup table and its shared calls ("flights").
//!
//! A flight is one inner call that belongs to every caller waiting on it.
//! Whichever waiter is polled drives the inner future (at most one at a
//! time), with a waker that wakes every waiter, so the call keeps going for
//! as long as anyone waits and no runtime is needed to spawn it. When the
//! last waiter goes away before the answer, the inner future is dropped
//! (cancelled). A panic while polling it becomes every waiter's error.
//!
//! Locks: the table's map lock is never taken while a flight's state lock
//! is held, except in `leave` (map, then state); a flight's waker list is
//! only ever locked last. The inner future is polled and dropped with no
//! lock held.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

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

pub(crate) type Shared<T> = Result<T, SharedError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a listener or a clone must not wedge the table.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settings of one layer, validated by the builder.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) cache_ttl: Option<Duration>,
    pub(crate) error_ttl: Option<Duration>,
    pub(crate) max_entries: usize,
    pub(crate) listeners: Listeners<DedupEvent>,
}

#[derive(Clone, Copy)]
enum Kind {
    Leader,
    Joined,
    CacheHit,
    Full,
    Cancelled,
}

enum Slot<K, F, T> {
    InFlight(Arc<Flight<K, F, T>>),
    Cached { result: Shared<T>, until: Nanos },
}

/// What `Table::start` decided for one call.
pub(crate) enum Start<K, F, T> {
    /// This call leads a new flight.
    Leader(Arc<Flight<K, F, T>>),
    /// This call waits on a flight already running.
    Joined(Arc<Flight<K, F, T>>),
    /// A cached answer.
    Hit(Shared<T>),
    /// The table is full of calls in flight: this call goes straight through.
    Bypass(F),
}

/// In-flight calls and cached answers by key, shared by every service of a
/// layer.
pub(crate) struct Table<K, F, T> {
    pub(crate) cfg: Arc<Config>,
    clock: Clock,
    map: Mutex<HashMap<K, Slot<K, F, T>>>,
}

impl<K, F, T> Table<K, F, T>
where
    K: Hash + Eq + Clone,
    T: Clone,
{
    pub(crate) fn new(cfg: Arc<Config>) -> Self {
        Self {
            cfg,
            clock: Clock::new(),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn caches(&self) -> bool {
        self.cfg.cache_ttl.is_some() || self.cfg.error_ttl.is_some()
    }

    /// Joins the flight for `key`, serves it from the cache, or starts a
    /// new flight with `call`. `call` runs under the map lock, so a second
    /// caller with the same key cannot miss the flight it starts.
    pub(crate) fn start(&self, key: K, call: impl FnOnce() -> F) -> Start<K, F, T> {
        let now = if self.caches() { self.clock.now() } else { 0 };
        let mut map = lock(&self.map);
        let mut full = map.len() >= self.cfg.max_entries;
        if full {
            full = !make_room(&mut map, now);
        }
        let (start, event) = match map.entry(key) {
            Entry::Occupied(mut e) => match e.get() {
                Slot::InFlight(f) => {
                    f.waiters.fetch_add(1, Ordering::Relaxed);
                    (Start::Joined(f.clone()), Kind::Joined)
                }
                Slot::Cached { result, until } if now < *until => {
                    (Start::Hit(result.clone()), Kind::CacheHit)
                }
                Slot::Cached { .. } => {
                    let flight = Arc::new(Flight::new(e.key().clone(), call()));
                    e.insert(Slot::InFlight(flight.clone()));
                    (Start::Leader(flight), Kind::Leader)
                }
            },
            Entry::Vacant(_) if full => (Start::Bypass(call()), Kind::Full),
            Entry::Vacant(v) => {
                let flight = Arc::new(Flight::new(v.key().clone(), call()));
                v.insert(Slot::InFlight(flight.clone()));
                (Start::Leader(flight), Kind::Leader)
            }
        };
        drop(map);
        self.emit(event);
        start
    }

    #[inline]
    fn emit(&self, kind: Kind) {
        if !self.cfg.listeners.active() {
            return;
        }
        let name = self.cfg.name.clone();
        self.cfg.listeners.emit(&match kind {
            Kind::Leader => DedupEvent::Leader { name },
            Kind::Joined => DedupEvent::Joined { name },
            Kind::CacheHit => DedupEvent::CacheHit { name },
            Kind::Full => DedupEvent::Full { name },
            Kind::Cancelled => DedupEvent::Cancelled { name },
        });
    }

    /// Takes a finished flight out of the map, leaving its answer cached
    /// when the layer caches answers of that kind.
    fn finish(&self, flight: &Arc<Flight<K, F, T>>, outcome: &Shared<T>) {
        let ttl = match outcome {
            Ok(_) => self.cfg.cache_ttl,
            Err(_) => self.cfg.error_ttl,
        };
        let mut map = lock(&self.map);
        match ttl {
            Some(ttl) => {
                if let Some(slot) = map.get_mut(&flight.key) {
                    if matches!(slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight)) {
                        let until = self.clock.now().saturating_add(nanos(ttl));
                        let result = outcome.clone();
                        *slot = Slot::Cached { result, until };
                    }
                }
            }
            None => {
                if let Some(slot) = map.remove(&flight.key) {
                    if !matches!(&slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight)) {
                        map.insert(flight.key.clone(), slot);
                    }
                }
            }
        }
    }

    /// A waiter went away before its answer. The last one cancels the call.
    pub(crate) fn leave(&self, flight: &Arc<Flight<K, F, T>>, slot: Option<usize>) {
        if let Some(i) = slot {
            lock(&flight.wakers).remove(i);
        }
        let cancelled = {
            let mut map = lock(&self.map);
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
            if let Some(slot) = map.remove(&flight.key) {
                if !matches!(&slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight)) {
                    map.insert(flight.key.clone(), slot);
                }
            }
            fut
        };
        // Dropped with no lock held: this is the cancellation.
        drop(cancelled);
        self.emit(Kind::Cancelled);
    }

    /// Calls in flight and answers cached.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let map = lock(&self.map);
        let flying = map
            .values()
            .filter(|s| matches!(s, Slot::InFlight(_)))
            .count();
        (flying, map.len() - flying)
    }

    /// Forgets every cached answer.
    pub(crate) fn clear_cache(&self) {
        lock(&self.map).retain(|_, s| matches!(s, Slot::InFlight(_)));
    }
}

/// Frees a place in a full map: drops expired answers, or else the cached
/// answer that expires first. Returns whether there is room now.
fn make_room<K: Hash + Eq, F, T>(map: &mut HashMap<K, Slot<K, F, T>>, now: Nanos) -> bool {
    let before = map.len();
    map.retain(|_, s| !matches!(s, Slot::Cached { until, .. } if now >= *until));
    if map.len() < before {
        return true;
    }
    let oldest = map
        .values()
        .filter_map(|s| match s {
            Slot::Cached { until, .. } => Some(*until),
            Slot::InFlight(_) => None,
        })
        .min();
    let Some(oldest) = oldest else {
        return false;
    };
    let mut evicted = false;
    map.retain(|_, s| {
        let hit = !evicted && matches!(s, Slot::Cached { until, .. } if *until == oldest);
        evicted |= hit;
        !hit
    });
    true
}

struct State<F, T> {
    fut: Option<Pin<Box<F>>>,
    done: Option<Shared<T>>,
    /// A waiter has taken `fut` out to poll it.
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

/// One shared call.
pub(crate) struct Flight<K, F, T> {
    key: K,
    state: Mutex<State<F, T>>,
    /// The inner future asked to be polled again.
    woken: AtomicBool,
    wakers: Mutex<Wakers>,
    /// Callers that have not yet taken their answer or left. Changed under
    /// the map lock when joining and leaving.
    waiters: AtomicUsize,
}

impl<K, F, T> Flight<K, F, T> {
    fn new(key: K, fut: F) -> Self {
        Self {
            key,
            state: Mutex::new(State {
                fut: Some(Box::pin(fut)),
                done: None,
                polling: false,
            }),
            woken: AtomicBool::new(true),
            wakers: Mutex::new(Wakers::default()),
            waiters: AtomicUsize::new(1),
        }
    }

    fn register(&self, slot: &mut Option<usize>, waker: &Waker) {
        let mut ws = lock(&self.wakers);
        match *slot {
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
                *slot = Some(i);
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
    fn read(&self, st: &mut State<F, T>) -> Shared<T>
    where
        T: Clone,
    {
        if self.waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            st.done.take().expect("answer kept for the last waiter")
        } else {
            st.done.clone().expect("answer kept until the last waiter")
        }
    }
}

impl<K, F, T> Flight<K, F, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Call<Ok = T> + Send + 'static,
    T: Clone + Send + 'static,
    F::Err: Into<BoxError>,
{
    /// Polls on behalf of one waiter: reads the answer if there is one,
    /// else drives the inner future if nobody else is and it asked to be
    /// polled, else waits.
    pub(crate) fn poll_waiter(
        self: &Arc<Self>,
        table: &Table<K, F, T>,
        slot: &mut Option<usize>,
        cx: &mut Context<'_>,
    ) -> Poll<Shared<T>> {
        loop {
            let mut st = lock(&self.state);
            if st.done.is_some() {
                return Poll::Ready(self.read(&mut st));
            }
            if st.polling || !self.woken.swap(false, Ordering::AcqRel) {
                self.register(slot, cx.waker());
                // A wake-up that came before we registered is not lost.
                if !st.polling && self.woken.load(Ordering::Acquire) {
                    continue;
                }
                return Poll::Pending;
            }
            let mut fut = st.fut.take().expect("a running flight has its future");
            st.polling = true;
            drop(st);

            let waker = Waker::from(self.clone());
            let polled = catch_unwind(AssertUnwindSafe(|| {
                fut.as_mut().poll(&mut Context::from_waker(&waker))
            }));
            let outcome = match polled {
                Ok(Poll::Pending) => {
                    let mut st = lock(&self.state);
                    st.polling = false;
                    st.fut = Some(fut);
                    continue;
                }
                Ok(Poll::Ready(res)) => {
                    drop(fut);
                    res.map_err(|e| SharedError::new(e.into()))
                }
                Err(payload) => {
                    // The future is in an unknown state: drop it, and keep
                    // a second panic from its destructor in here too.
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
                    let panicked = Panicked::from_payload(&*payload);
                    Err(SharedError::new(Box::new(panicked)))
                }
            };

            // No one can join once the flight is out of the map, so the
            // waiter count only goes down from here.
            table.finish(self, &outcome);
            let mut st = lock(&self.state);
            st.polling = false;
            if self.waiters.load(Ordering::Acquire) == 1 {
                self.waiters.store(0, Ordering::Release);
                return Poll::Ready(outcome);
            }
            st.done = Some(outcome);
            let mine = self.read(&mut st);
            drop(st);
            self.wake_all();
            return Poll::Ready(mine);
        }
    }
}

impl<K, F, T> Wake for Flight<K, F, T>
where
    K: Send + Sync + 'static,
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
