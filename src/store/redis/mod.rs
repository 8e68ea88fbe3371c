//! State shared across a fleet through Redis (feature `redis`).
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_bulwark::store::redis::RedisStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379/")
//!     .prefix("myapp")
//!     .timeout(Duration::from_millis(50))
//!     .build()?;
//! // 100 calls per second per key across every process, bursts of 20.
//! let limiter = store.rate_limiter("api", 20.0, 100.0)?;
//! match limiter.try_acquire("customer-42", 1).await {
//!     Ok(()) => { /* call */ }
//!     Err(wait) => eprintln!("over the fleet's limit, retry in {wait:?}"),
//! }
//! // At most 8 calls in flight across the fleet.
//! let bulkhead = store.bulkhead("db", 8)?;
//! if let Some(_lease) = bulkhead.try_acquire().await {
//!     // ...
//! }
//! # Ok(()) }
//! ```
//!
//! Pass the store to `CircuitBreakerBuilder::backend` for a fleet breaker.
//!
//! # How
//!
//! Every decision is one atomic Lua script (sent with `EVALSHA`, loaded
//! again after `NOSCRIPT`), reading time from Redis `TIME` so hosts with
//! skewed clocks agree:
//!
//! - rate limit: GCRA per key, as redis-cell and redis_rate do; exact
//!   across processes. Keys found over the limit are remembered locally
//!   until their retry time, so a hot rejected key costs no round trip;
//! - bulkhead: a sorted set of leases scored by expiry. A lease is renewed
//!   every third of its ttl while its call runs, however long that is, and
//!   expires [`lease_ttl`](RedisStoreBuilder::lease_ttl) (5 s by default)
//!   after its process died or stopped renewing it;
//!
//! # Calls that give up
//!
//! A lease or token request carries an id chosen before it is sent. If
//! its caller never learns the answer (the future is dropped, or the
//! store's `timeout` fires while Redis still holds the request), the store
//! gives it back in the background by that id: the lease is released, the
//! tokens refunded. A request that reaches Redis after its give-back takes
//! nothing (the give-back leaves a short-lived mark for it). So a call
//! that was not admitted is never charged, a fail-open call admitted
//! locally is not counted in Redis as well, and leases taken while Redis
//! stalled are released as soon as it answers again, rather than a
//! `lease_ttl` later. Give-backs that cannot be delivered are retried every
//! `retry_interval`; [`RedisStore::flush`] delivers them now (before a
//! process exits, say).
//!
//! For this, each admitted rate-limit request leaves a receipt in Redis
//! (a key of some 60 bytes) that expires after four times `timeout` plus
//! `retry_interval`, at least 1 s; a key that had refunds lately also
//! keeps their total and a log of at most 1024 of them, as long. A refund
//! gives back the part of the request's tokens that has not refilled yet,
//! so it never leaves a bucket fuller than had the request never been
//! made: if the bucket was full when the request came and another came
//! before the refund, the little that refilled in between stays charged.
//! - breaker: the fleet's failures and state in a hash with a TTL; each
//!   process keeps deciding locally and syncs within `sync_interval`
//!   (see `circuit_breaker`).
//!
//! Keys are `{<prefix>:<name>}:<kind>[:<key>]`: the braces are a hash tag,
//! so every key of one primitive lives in one cluster slot.
//!
//! # When Redis is down or slow
//!
//! Each command has a `timeout` (50 ms by default); the connection is
//! re-established in the background. On a failure the store follows its
//! [`Degrade`] policy and emits [`StoreEvent::Degraded`]; while degraded
//! it does not wait on Redis again for `retry_interval` (1 s), then tries
//! once more and emits [`StoreEvent::Restored`] when it answers. A call
//! never waits longer than `timeout` on Redis.
//!
//! - [`Degrade::FailOpenToLocal`] (default): each process enforces the
//!   same limits on its own, in memory. A keyed limiter keeps at most
//!   10 000 keys locally; past that, a new key takes the place of one
//!   whose bucket is full again, and when there is none it is rejected
//!   (a key is never forgotten while it is still being limited);
//! - [`Degrade::FailClosed`]: calls are rejected (the rate limiter answers
//!   `Err(retry_interval)`, the bulkhead `None`).

mod local;
mod scripts;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{Degrade, StoreEvent};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;
use local::Bounded;

const LAYER: &str = "redis_store";

/// A connection to the Redis server that holds a fleet's shared state.
///
/// Made with [`RedisStore::builder`]. Cheap to clone; clones share the
/// connection and the degraded/healthy status.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<StoreShared>,
}

struct StoreShared {
    name: Arc<str>,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    timeout: Duration,
    retry_interval: Duration,
    degrade: Degrade,
    degraded: AtomicBool,
    /// While degraded: no Redis call before this (ms since `origin`).
    quiet_until: AtomicU64,
    origin: Instant,
    listeners: Listeners<StoreEvent>,
    scripts: Scripts,
    /// What abandoned or finished requests hold in Redis, to give back.
    undo: Mutex<Undo>,
    /// A give-back was queued with no runtime to deliver it: the next
    /// command starts the delivery.
    stranded: AtomicBool,
    /// One deliverer at a time, so give-backs reach Redis in queue order.
    delivering: tokio::sync::Mutex<()>,
    /// Makes request ids unique across the fleet.
    id_prefix: u64,
    next_id: AtomicU64,
    /// How long a rate-limit receipt (or its refund's mark) lives.
    receipt_ttl_ms: u64,
    /// The lease ttl of the bulkheads this store makes.
    lease_ttl: Duration,
    /// The leases this process holds, renewed together.
    renewals: Mutex<Renewals>,
    /// Wakes the renewal task early: a lease of a shorter ttl arrived.
    renew_soon: tokio::sync::Notify,
}

struct Scripts {
    gcra: Script,
    refund: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
    lease_count: Script,
    breaker_sync: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.name)
            .field("timeout", &self.inner.timeout)
            .field("degrade", &self.inner.degrade)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

/// Configures a [`RedisStore`].
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    retry_interval: Duration,
    degrade: Degrade,
    lease_ttl: Duration,
    listeners: Listeners<StoreEvent>,
}

/// How long a bulkhead lease outlives a holder that stopped renewing it,
/// unless set otherwise: short, so a killed process's slots are free
/// again within seconds.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("retry_interval", &self.retry_interval)
            .field("degrade", &self.degrade)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for the server at `url` (`redis://host:port/db`): key
    /// prefix `bulwark`, 50 ms per command, fail open to local state,
    /// bulkhead leases of 5 s renewed while held.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "bulwark".to_owned(),
            timeout: Duration::from_millis(50),
            retry_interval: Duration::from_secs(1),
            degrade: Degrade::default(),
            lease_ttl: DEFAULT_LEASE_TTL,
            listeners: Listeners::default(),
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key (default `bulwark`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a call waits on Redis (default 50 ms).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// While degraded, how long to serve from the policy before asking
    /// Redis again (default 1 s).
    pub fn retry_interval(mut self, d: Duration) -> Self {
        self.retry_interval = d;
        self
    }

    /// What to do while Redis cannot be reached (default
    /// [`Degrade::FailOpenToLocal`]).
    pub fn degrade(mut self, policy: Degrade) -> Self {
        self.degrade = policy;
        self
    }

    /// How long a bulkhead lease outlives a holder that stopped renewing
    /// it (default [`DEFAULT_LEASE_TTL`], 5 s), for every bulkhead this
    /// store makes, the `BulkheadLayer`'s included.
    ///
    /// A live holder renews its leases every third of this, however long
    /// its calls run; a process that was killed, or whose runtime stays
    /// blocked longer than this, loses them, and their slots are free for
    /// the fleet again. Shorter frees a dead process's slots sooner and
    /// costs more renewals: one script per bulkhead every `lease_ttl / 3`,
    /// for all the leases this process holds in it. Keep it several times
    /// the store's `timeout`, so a renewal that waits that long still
    /// lands in time. From 30 ms to 30 days; `build()` refuses others.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.lease_ttl = d;
        self
    }

    /// Calls `f` on every [`StoreEvent`] (each switch to and from degraded).
    pub fn on_event(mut self, f: impl Fn(&StoreEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the store. No connection is
    /// made until the first command.
    pub fn build(self) -> Result<RedisStore, ConfigError> {
        let check = Check { layer: LAYER };
        check.non_zero_duration("timeout", self.timeout)?;
        check.non_zero_duration("retry_interval", self.retry_interval)?;
        if self.lease_ttl < MIN_LEASE_TTL {
            return Err(ConfigError::new(
                LAYER,
                "lease_ttl",
                "must be at least 30 ms (leases are renewed every third of it)",
            ));
        }
        if self.lease_ttl > MAX_LEASE_TTL {
            return Err(ConfigError::new(
                LAYER,
                "lease_ttl",
                "must be at most 30 days (Redis cannot expire a lease later)",
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                LAYER,
                "prefix",
                "must be non-empty and free of `{` and `}` (they delimit the hash tag)",
            ));
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| ConfigError::new(LAYER, "url", format!("is not a Redis URL: {e}")))?;
        Ok(RedisStore {
            inner: Arc::new(StoreShared {
                name: Arc::from(self.prefix),
                client,
                conn: OnceCell::new(),
                timeout: self.timeout,
                retry_interval: self.retry_interval,
                degrade: self.degrade,
                degraded: AtomicBool::new(false),
                quiet_until: AtomicU64::new(0),
                origin: Instant::now(),
                listeners: self.listeners,
                undo: Mutex::new(Undo::default()),
                stranded: AtomicBool::new(false),
                id_prefix: fastrand::u64(..),
                next_id: AtomicU64::new(0),
                delivering: tokio::sync::Mutex::new(()),
                // Refunds follow their charge within a few retries.
                // Saturating: either setting may be as long as `Duration::MAX`.
                receipt_ttl_ms: (self.timeout.saturating_add(self.retry_interval))
                    .saturating_mul(4)
                    .as_millis()
                    .clamp(1_000, u128::from(u32::MAX)) as u64,
                lease_ttl: self.lease_ttl,
                renewals: Mutex::new(Renewals::default()),
                renew_soon: tokio::sync::Notify::new(),
                scripts: Scripts {
                    gcra: Script::new(scripts::GCRA),
                    refund: Script::new(scripts::REFUND),
                    lease_acquire: Script::new(scripts::LEASE_ACQUIRE),
                    lease_renew: Script::new(scripts::LEASE_RENEW),
                    lease_release: Script::new(scripts::LEASE_RELEASE),
                    lease_count: Script::new(scripts::LEASE_COUNT),
                    breaker_sync: Script::new(scripts::BREAKER_SYNC),
                },
            }),
        })
    }
}

/// Which script to run.
#[derive(Clone, Copy)]
enum Which {
    Gcra,
    Refund,
    LeaseAcquire,
    LeaseRenew,
    LeaseRelease,
    LeaseCount,
    BreakerSync,
}

impl RedisStore {
    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.name
    }

    /// The policy followed while Redis cannot be reached.
    pub fn degrade_policy(&self) -> Degrade {
        self.inner.degrade
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Whether the last command failed (the store follows its policy).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Relaxed)
    }

    /// A GCRA rate limiter named `name`: bursts of up to `max_tokens`,
    /// `refill_rate` per second sustained, per key, across the fleet.
    /// Both must be finite and above zero, and the bucket must refill
    /// from empty within about 73 years, as for the in-memory limiter.
    pub fn rate_limiter(
        &self,
        name: &str,
        max_tokens: f64,
        refill_rate: f64,
    ) -> Result<RedisRateLimiter, ConfigError> {
        let check = Check { layer: LAYER };
        check.positive("max_tokens", max_tokens)?;
        check.positive("refill_rate", refill_rate)?;
        // Also keeps every TAT and expiry the script computes in range.
        check.refill_time(max_tokens, refill_rate)?;
        let interval_us = 1e6 / refill_rate;
        Ok(RedisRateLimiter {
            store: self.clone(),
            base: Arc::from(self.key(name, "gcra")),
            receipts: Arc::from(format!("{}:", self.key(name, "gcra-receipt"))),
            given: Arc::from(self.key(name, "gcra-given")),
            log: Arc::from(self.key(name, "gcra-refunds")),
            interval_us,
            capacity_us: interval_us * max_tokens,
            over: Arc::new(Mutex::new(Bounded::new(LOCAL_KEYS_MAX))),
            local: Arc::new(Mutex::new(Bounded::new(LOCAL_KEYS_MAX))),
            local_cache: true,
        })
    }

    /// A fleet-wide bulkhead named `name` of `max_concurrent` leases that
    /// expire the store's [`lease_ttl`](RedisStoreBuilder::lease_ttl)
    /// (5 s by default) after their holder stops renewing them.
    pub fn bulkhead(&self, name: &str, max_concurrent: u32) -> Result<RedisBulkhead, ConfigError> {
        Check { layer: LAYER }.at_least_one("max_concurrent", u64::from(max_concurrent))?;
        Ok(RedisBulkhead {
            store: self.clone(),
            keys: Arc::new(LeaseKeys {
                set: self.key(name, "bulkhead"),
                gone: self.key(name, "bulkhead-gone"),
            }),
            max: max_concurrent,
            ttl: self.inner.lease_ttl,
            local: Arc::new(tokio::sync::Semaphore::new(max_concurrent as usize)),
        })
    }

    /// Delivers every lease release and token refund queued so far (see
    /// "Calls that give up" in the module docs), each batch waiting at most
    /// `timeout`. Returns whether nothing is left to deliver; what could not
    /// be delivered stays queued and is retried in the background.
    ///
    /// A process about to exit calls this so its leases are free for the
    /// fleet at once, not after `lease_ttl`.
    pub async fn flush(&self) -> bool {
        let _one = self.inner.delivering.lock().await;
        let batch = self.take_queued(usize::MAX);
        let left = self.deliver(batch).await;
        let mut q = self.undo_queue();
        for item in left.into_iter().rev() {
            q.items.push_front(item);
        }
        q.items.is_empty()
    }

    /// `{prefix:name}:kind`: the braces make a hash tag.
    pub(crate) fn key(&self, name: &str, kind: &str) -> String {
        format!("{{{}:{}}}:{}", self.inner.name, name, kind)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request id no other request of the fleet has.
    fn request_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Relaxed);
        format!("{:016x}.{n:x}", self.inner.id_prefix)
    }

    /// Takes up to `max` queued give-backs, oldest first.
    fn take_queued(&self, max: usize) -> Vec<Item> {
        let mut q = self.undo_queue();
        let n = q.items.len().min(max);
        q.items.drain(..n).collect()
    }

    /// Degraded and not yet due to ask Redis again: follow the policy
    /// without sending anything.
    fn is_quiet(&self) -> bool {
        let inner = &*self.inner;
        inner.degraded.load(Relaxed) && self.now_ms() < inner.quiet_until.load(Relaxed)
    }

    /// Runs a script with the store's timeout. `None` when Redis could not
    /// answer in time (the caller then follows the policy), or while
    /// degraded and not yet due to try again.
    async fn run<T: FromRedisValue>(
        &self,
        which: Which,
        keys: &[&str],
        args: &[String],
    ) -> Option<T> {
        if self.is_quiet() {
            return None;
        }
        self.send(which, keys, args).await
    }

    /// [`run`](Self::run) without the quiet check: the request is sent.
    /// Switches to and from degraded, with an event.
    async fn send<T: FromRedisValue>(
        &self,
        which: Which,
        keys: &[&str],
        args: &[String],
    ) -> Option<T> {
        let inner = &*self.inner;
        if inner.stranded.load(Relaxed) && inner.stranded.swap(false, Relaxed) {
            self.kick();
        }
        match self.raw(which, keys, args).await {
            Ok(v) => {
                if inner.degraded.swap(false, Relaxed) {
                    inner.listeners.emit(&StoreEvent::Restored {
                        name: inner.name.clone(),
                    });
                }
                Some(v)
            }
            Err(error) => {
                let quiet = u64::try_from(inner.retry_interval.as_millis()).unwrap_or(u64::MAX);
                let until = self.now_ms().saturating_add(quiet);
                inner.quiet_until.store(until, Relaxed);
                if !inner.degraded.swap(true, Relaxed) {
                    inner.listeners.emit(&StoreEvent::Degraded {
                        name: inner.name.clone(),
                        policy: inner.degrade,
                        error,
                    });
                }
                None
            }
        }
    }

    /// One script, bounded by the store's timeout (connecting included).
    async fn raw<T: FromRedisValue>(
        &self,
        which: Which,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, String> {
        let inner = &*self.inner;
        let script = match which {
            Which::Gcra => &inner.scripts.gcra,
            Which::Refund => &inner.scripts.refund,
            Which::LeaseAcquire => &inner.scripts.lease_acquire,
            Which::LeaseRenew => &inner.scripts.lease_renew,
            Which::LeaseRelease => &inner.scripts.lease_release,
            Which::LeaseCount => &inner.scripts.lease_count,
            Which::BreakerSync => &inner.scripts.breaker_sync,
        };
        let call = async {
            let conn = inner
                .conn
                .get_or_try_init(|| async {
                    let cfg = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(inner.timeout))
                        .set_response_timeout(Some(inner.timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(inner.retry_interval);
                    ConnectionManager::new_lazy_with_config(inner.client.clone(), cfg)
                })
                .await?;
            let mut conn = conn.clone();
            let mut inv = script.prepare_invoke();
            for k in keys {
                inv.key(*k);
            }
            for a in args {
                inv.arg(a.as_str());
            }
            inv.invoke_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(inner.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", inner.timeout)),
        }
    }

    fn renewals(&self) -> std::sync::MutexGuard<'_, Renewals> {
        self.inner
            .renewals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Has lease `id` of `keys` renewed every `ttl_ms / 3` until
    /// [`unhold`](Self::unhold), starting the renewal task unless one
    /// runs. `false` when nothing can renew it (no tokio runtime here).
    fn hold(&self, keys: &Arc<LeaseKeys>, ttl_ms: u64, id: &str) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let period = renew_period(ttl_ms);
        let mut r = self.renewals();
        r.held
            .entry((Arc::as_ptr(keys) as usize, ttl_ms))
            .or_insert_with(|| (keys.clone(), HashSet::new()))
            .1
            .insert(id.to_owned());
        if !r.running {
            r.running = true;
            r.period = Some(period);
            drop(r);
            drop(rt.spawn(renew_all(self.clone())));
        } else if r.period.is_some_and(|p| period < p) {
            r.period = Some(period);
            drop(r);
            self.inner.renew_soon.notify_one();
        }
        true
    }

    /// Stops renewing lease `id` (it is being given back).
    fn unhold(&self, keys: &Arc<LeaseKeys>, ttl_ms: u64, id: &str) {
        let mut r = self.renewals();
        let k = (Arc::as_ptr(keys) as usize, ttl_ms);
        if let Some((_, ids)) = r.held.get_mut(&k) {
            ids.remove(id);
            if ids.is_empty() {
                r.held.remove(&k);
            }
        }
    }

    fn undo_queue(&self) -> std::sync::MutexGuard<'_, Undo> {
        self.inner.undo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a give-back and makes sure a task is delivering them.
    fn give_back(&self, item: Item) {
        {
            let mut q = self.undo_queue();
            if q.items.len() >= UNDO_MAX {
                // A lease left behind expires with its ttl; a charge, with
                // the bucket's refill.
                q.items.pop_front();
            }
            q.items.push_back(item);
        }
        self.kick();
    }

    /// Starts the delivery task unless one runs (or there is no runtime
    /// to run one: the next command, or `flush`, delivers).
    fn kick(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.stranded.store(true, Relaxed);
            return;
        };
        {
            let mut q = self.undo_queue();
            if q.running || q.items.is_empty() {
                return;
            }
            q.running = true;
        }
        rt.spawn(deliver_all(self.clone()));
    }

    /// Sends `items`, batched by script and key, until a batch gets no
    /// answer; returns what was not delivered, in order.
    async fn deliver(&self, items: Vec<Item>) -> Vec<Item> {
        // Few groups: one per limiter or bulkhead with something to give back.
        let mut groups: Vec<(BatchKey, Vec<Item>)> = Vec::new();
        for item in items {
            match groups.iter_mut().find(|(k, _)| item.in_batch(k)) {
                Some((_, g)) => g.push(item),
                None => groups.push((item.batch_key(), vec![item])),
            }
        }
        let mut left = Vec::new();
        for (_, group) in groups {
            let mut group = group.into_iter().peekable();
            while group.peek().is_some() {
                let batch: Vec<Item> = group.by_ref().take(BATCH_MAX).collect();
                if !left.is_empty() || !self.deliver_batch(&batch).await {
                    left.extend(batch);
                }
            }
        }
        left
    }

    /// One script for `batch` (items of one batch key); whether Redis
    /// answered.
    async fn deliver_batch(&self, batch: &[Item]) -> bool {
        match &batch[0] {
            Item::Lease { keys, ttl_ms, .. } => {
                let mut args = Vec::with_capacity(batch.len() + 1);
                args.push(ttl_ms.to_string());
                args.extend(batch.iter().map(|i| i.id().to_owned()));
                self.raw::<i64>(Which::LeaseRelease, &[&keys.set, &keys.gone], &args)
                    .await
                    .is_ok()
            }
            Item::Charge { .. } => {
                let mut keys: Vec<&str> = Vec::with_capacity(batch.len() * 4);
                for i in batch {
                    if let Item::Charge {
                        bucket,
                        receipt,
                        given,
                        log,
                        ..
                    } = i
                    {
                        keys.extend([bucket.as_str(), receipt, given, log]);
                    }
                }
                let ttl = [self.inner.receipt_ttl_ms.to_string()];
                self.raw::<i64>(Which::Refund, &keys, &ttl).await.is_ok()
            }
        }
    }

    /// One round of the fleet breaker protocol; `None` while unreachable.
    pub(crate) async fn breaker_sync(
        &self,
        keys: &BreakerKeys,
        report: &BreakerReport,
    ) -> Option<FleetBreaker> {
        let args = [
            report.failures.to_string(),
            u8::from(report.success_first).to_string(),
            report.opened_ms.to_string(),
            u8::from(report.closed_by_probe).to_string(),
            u8::from(report.want_probe).to_string(),
            keys.instance.clone(),
            report.failure_threshold.to_string(),
            report.open_timeout_ms.to_string(),
            report.probe_lease_ms.to_string(),
            report.half_open_max.to_string(),
            report.ttl_ms.to_string(),
            report.force.to_owned(),
        ];
        let v: Vec<i64> = self
            .run(Which::BreakerSync, &[&keys.hash, &keys.probes], &args)
            .await?;
        Some(FleetBreaker {
            state: *v.first()? as u8,
            open_remaining_ms: (*v.get(1)?).max(0) as u64,
            failures: (*v.get(2)?).max(0) as u32,
            probe_granted: *v.get(3)? == 1,
        })
    }
}

/// The keys of one fleet breaker.
#[derive(Debug)]
pub(crate) struct BreakerKeys {
    pub(crate) hash: String,
    pub(crate) probes: String,
    pub(crate) instance: String,
}

impl BreakerKeys {
    pub(crate) fn new(store: &RedisStore, name: &str) -> Self {
        Self {
            hash: store.key(name, "breaker"),
            probes: store.key(name, "breaker:probes"),
            instance: instance_id(),
        }
    }
}

/// What one process tells the fleet breaker.
#[derive(Debug, Default)]
pub(crate) struct BreakerReport {
    pub(crate) failures: u32,
    pub(crate) success_first: bool,
    pub(crate) opened_ms: u64,
    pub(crate) closed_by_probe: bool,
    pub(crate) want_probe: bool,
    pub(crate) failure_threshold: u32,
    pub(crate) open_timeout_ms: u64,
    pub(crate) probe_lease_ms: u64,
    pub(crate) half_open_max: u32,
    pub(crate) ttl_ms: u64,
    pub(crate) force: &'static str,
}

/// The fleet breaker as the last sync saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FleetBreaker {
    /// 0 closed, 1 open, 2 half-open, 3 forced open.
    pub(crate) state: u8,
    pub(crate) open_remaining_ms: u64,
    pub(crate) failures: u32,
    pub(crate) probe_granted: bool,
}

/// A process-unique id: host-independent, random, with the PID for humans.
fn instance_id() -> String {
    format!("{}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// Give-backs queued beyond this drop the oldest: a lease left behind
/// expires with its ttl anyway, and a charge with the bucket's refill.
const UNDO_MAX: usize = 100_000;

/// Give-backs sent in one script.
const BATCH_MAX: usize = 256;

/// The leases this process holds, renewed by one task per store: every
/// tick, one script per bulkhead renews all of its leases, however many.
///
/// Invariant: a lease is in `held` from the moment its holder has it until
/// it is given back, and while `held` is not empty `running` is set and a
/// task is renewing (or the runtime that ran it is gone, whose guard
/// cleared `running`, and the next lease starts another). Changes to
/// `held` and `running` happen under one mutex, so a lease added as the
/// task finds `held` empty either is seen by it or starts a new task.
#[derive(Default)]
struct Renewals {
    /// Per bulkhead (the address of its keys, which the entry keeps
    /// alive) and lease ttl: the keys and the ids held.
    held: HashMap<(usize, u64), (Arc<LeaseKeys>, HashSet<String>)>,
    /// A task is renewing.
    running: bool,
    /// How often it renews: a third of the shortest ttl held.
    period: Option<Duration>,
}

/// How often a lease of `ttl_ms` is renewed.
fn renew_period(ttl_ms: u64) -> Duration {
    Duration::from_millis((ttl_ms / 3).max(10))
}

/// Renews every lease in the store's [`Renewals`] each period, until none
/// is held.
fn renew_all(store: RedisStore) -> impl std::future::Future<Output = ()> + Send {
    /// Lets a later lease start a new task once this one ends, or is
    /// dropped with its runtime.
    struct Running(RedisStore, std::cell::Cell<bool>);
    impl Drop for Running {
        fn drop(&mut self) {
            if self.1.get() {
                let mut r = self.0.renewals();
                r.running = false;
                r.period = None;
            }
        }
    }
    let running = Running(store, std::cell::Cell::new(true));
    async move {
        let store = &running.0;
        loop {
            let period = {
                let mut r = store.renewals();
                let Some(period) = r.held.keys().map(|(_, ttl)| renew_period(*ttl)).min() else {
                    r.running = false;
                    r.period = None;
                    running.1.set(false);
                    return;
                };
                r.period = Some(period);
                period
            };
            // Woken early by a lease of a shorter ttl: renewing early
            // does no harm.
            let _ = tokio::time::timeout(period, store.inner.renew_soon.notified()).await;
            let batches: Vec<(Arc<LeaseKeys>, u64, Vec<String>)> = store
                .renewals()
                .held
                .iter()
                .map(|((_, ttl), (keys, ids))| (keys.clone(), *ttl, ids.iter().cloned().collect()))
                .collect();
            for (keys, ttl_ms, ids) in batches {
                for chunk in ids.chunks(BATCH_MAX) {
                    let mut args = Vec::with_capacity(chunk.len() + 1);
                    args.push(ttl_ms.to_string());
                    args.extend(chunk.iter().cloned());
                    let _ = store
                        .run::<i64>(Which::LeaseRenew, &[&keys.set], &args)
                        .await;
                }
            }
        }
    }
}

/// The give-back queue.
#[derive(Default)]
struct Undo {
    items: VecDeque<Item>,
    /// A task is delivering.
    running: bool,
}

/// Something a request holds in Redis that its caller no longer wants.
enum Item {
    /// A bulkhead lease: released, or refused if it has not arrived yet.
    Lease {
        keys: Arc<LeaseKeys>,
        ttl_ms: u64,
        id: String,
    },
    /// A rate-limit charge: refunded, or refused if it has not arrived
    /// yet. `tag` is the limiter's key base, which holds the hash tag.
    Charge {
        tag: Arc<str>,
        bucket: String,
        receipt: String,
        given: String,
        log: String,
    },
}

/// Which give-backs can share one script.
enum BatchKey {
    Lease(Arc<LeaseKeys>, u64),
    Charge(Arc<str>),
}

impl Item {
    fn batch_key(&self) -> BatchKey {
        match self {
            Item::Lease { keys, ttl_ms, .. } => BatchKey::Lease(keys.clone(), *ttl_ms),
            Item::Charge { tag, .. } => BatchKey::Charge(tag.clone()),
        }
    }

    fn in_batch(&self, k: &BatchKey) -> bool {
        match (self, k) {
            (Item::Lease { keys, ttl_ms, .. }, BatchKey::Lease(k, t)) => {
                keys.set == k.set && ttl_ms == t
            }
            (Item::Charge { tag, .. }, BatchKey::Charge(t)) => tag == t,
            _ => false,
        }
    }

    fn id(&self) -> &str {
        match self {
            Item::Lease { id, .. } => id,
            Item::Charge { receipt, .. } => receipt,
        }
    }
}

/// Delivers the give-back queue until it is empty; what Redis does not
/// answer is tried again every `retry_interval`.
fn deliver_all(store: RedisStore) -> impl std::future::Future<Output = ()> + Send {
    /// Lets a later give-back start a new task once this one ends, or is
    /// dropped with its runtime (even before it first ran: it is created
    /// with the future, not inside it).
    struct Running(RedisStore, std::cell::Cell<bool>);
    impl Drop for Running {
        fn drop(&mut self) {
            if self.1.get() {
                let mut q = self.0.undo_queue();
                q.running = false;
            }
        }
    }
    let running = Running(store, std::cell::Cell::new(true));
    async move {
        let store = &running.0;
        loop {
            let one = store.inner.delivering.lock().await;
            let batch: Vec<Item> = {
                let mut q = store.undo_queue();
                if q.items.is_empty() {
                    // Under the lock: a give-back queued from now on
                    // starts a new task.
                    q.running = false;
                    running.1.set(false);
                    return;
                }
                let n = q.items.len().min(BATCH_MAX * 4);
                q.items.drain(..n).collect()
            };
            let left = store.deliver(batch).await;
            let retry = !left.is_empty();
            {
                let mut q = store.undo_queue();
                for item in left.into_iter().rev() {
                    q.items.push_front(item);
                }
            }
            drop(one);
            if retry {
                tokio::time::sleep(store.inner.retry_interval).await;
            }
        }
    }
}

/// Keys kept per limiter in this process (the degraded fallback's buckets
/// and the over-limit cache), so a flood of distinct keys cannot grow them
/// without bound.
const LOCAL_KEYS_MAX: usize = 10_000;

/// A fleet-wide GCRA rate limiter: made by [`RedisStore::rate_limiter`].
#[derive(Clone)]
pub struct RedisRateLimiter {
    store: RedisStore,
    /// `{prefix:name}:gcra`: the bucket keys' base, and their hash tag.
    base: Arc<str>,
    /// `{prefix:name}:gcra-receipt:`: where admitted requests leave their
    /// receipts.
    receipts: Arc<str>,
    /// `{prefix:name}:gcra-given`: the base of the buckets' refund totals.
    given: Arc<str>,
    /// `{prefix:name}:gcra-refunds`: the base of the buckets' refund logs.
    log: Arc<str>,
    interval_us: f64,
    capacity_us: f64,
    /// Keys known to be over the limit, until when (ms since the store's
    /// origin): rejected without a round trip.
    over: Arc<Mutex<Bounded<u64>>>,
    /// The local fallback's theoretical arrival times (µs since origin).
    local: Arc<Mutex<Bounded<f64>>>,
    local_cache: bool,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("key", &self.base)
            .field("refill_rate", &(1e6 / self.interval_us))
            .field("max_tokens", &(self.capacity_us / self.interval_us))
            .finish_non_exhaustive()
    }
}

/// A charge sent to Redis whose answer the caller has not seen yet:
/// dropped armed (the caller left, or Redis did not answer in time), it
/// has the charge refunded.
struct Charge<'a> {
    limiter: &'a RedisRateLimiter,
    bucket: String,
    receipt: String,
    given: String,
    log: String,
    armed: bool,
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.limiter.store.give_back(Item::Charge {
                tag: self.limiter.base.clone(),
                bucket: std::mem::take(&mut self.bucket),
                receipt: std::mem::take(&mut self.receipt),
                given: std::mem::take(&mut self.given),
                log: std::mem::take(&mut self.log),
            });
        }
    }
}

impl RedisRateLimiter {
    /// Whether keys found over the limit are remembered locally until their
    /// retry time (default on). Turn off for an exact count of attempts in
    /// Redis.
    pub fn local_cache(mut self, on: bool) -> Self {
        self.local_cache = on;
        self
    }

    /// Takes `cost` for `key` (use `""` for one fleet-wide limit), or says
    /// how long until it could be taken.
    ///
    /// Dropping the future before it answers takes nothing: if the request
    /// reached Redis, its tokens are refunded.
    pub async fn try_acquire(&self, key: &str, cost: u32) -> Result<(), Duration> {
        self.acquire(key, f64::from(cost)).await
    }

    /// [`try_acquire`](Self::try_acquire) with a fractional cost (the rate
    /// limit layer's `cost` is in `f64` tokens).
    pub(crate) async fn acquire(&self, key: &str, cost: f64) -> Result<(), Duration> {
        let now = self.store.now_ms();
        if self.local_cache {
            let over = self.over.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(until) = over.get(key) {
                if now < until {
                    return Err(Duration::from_millis(until - now));
                }
            }
        }
        if self.store.is_quiet() {
            return self.degraded(key, cost);
        }
        let per_key = |base: &str| {
            if key.is_empty() {
                base.to_owned()
            } else {
                format!("{base}:{key}")
            }
        };
        let (bucket, given, log) = (
            per_key(&self.base),
            per_key(&self.given),
            per_key(&self.log),
        );
        let id = self.store.request_id();
        let mut charge = Charge {
            limiter: self,
            bucket,
            receipt: format!("{}{id}", self.receipts),
            given,
            log,
            armed: true,
        };
        let args = [
            format!("{}", self.interval_us),
            format!("{}", self.capacity_us),
            cost.to_string(),
            self.store.inner.receipt_ttl_ms.to_string(),
        ];
        let res: Option<Vec<i64>> = self
            .store
            .send(
                Which::Gcra,
                &[&charge.bucket, &charge.receipt, &charge.given, &charge.log],
                &args,
            )
            .await;
        // Answered: the caller learns the verdict, so nothing to give back.
        charge.armed = res.is_none();
        match res.as_deref() {
            Some([1, ..]) => Ok(()),
            Some([_, wait_us, ..]) => {
                let wait = Duration::from_micros((*wait_us).max(0) as u64);
                if self.local_cache {
                    let mut over = self.over.lock().unwrap_or_else(|e| e.into_inner());
                    // Full of live entries: this key is just not cached.
                    let _ = over.set(key, now + wait.as_millis() as u64, now);
                }
                Err(wait)
            }
            _ => self.degraded(key, cost),
        }
    }

    /// The answer while Redis cannot be reached, per the store's policy.
    fn degraded(&self, key: &str, cost: f64) -> Result<(), Duration> {
        match self.store.inner.degrade {
            Degrade::FailClosed => Err(self.store.inner.retry_interval),
            Degrade::FailOpenToLocal => self.local_acquire(key, cost),
        }
    }

    /// The same GCRA, in this process only (the degraded fallback). A new
    /// key past the cap is rejected while every key it could replace is
    /// still being limited.
    fn local_acquire(&self, key: &str, cost: f64) -> Result<(), Duration> {
        let now = self.store.inner.origin.elapsed().as_micros() as f64;
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let tat = local.get(key).unwrap_or(now).max(now);
        let new_tat = tat + self.interval_us * cost;
        let diff = new_tat - now;
        if diff > self.capacity_us {
            return Err(Duration::from_micros(
                (diff - self.capacity_us).ceil() as u64
            ));
        }
        local
            .set(key, new_tat, now)
            .map_err(|soonest| Duration::from_micros((soonest - now).ceil().max(1.0) as u64))
    }
}

/// The shortest lease ttl: renewals every third of it must have a chance.
const MIN_LEASE_TTL: Duration = Duration::from_millis(30);

/// The keys of one fleet bulkhead.
#[derive(Debug)]
struct LeaseKeys {
    /// Leases held, scored by expiry.
    set: String,
    /// Ids given back before they were taken, scored by expiry.
    gone: String,
}

/// A fleet-wide bulkhead: made by [`RedisStore::bulkhead`].
#[derive(Clone)]
pub struct RedisBulkhead {
    store: RedisStore,
    keys: Arc<LeaseKeys>,
    max: u32,
    ttl: Duration,
    /// The degraded fallback: the same cap in this process.
    local: Arc<tokio::sync::Semaphore>,
}

impl fmt::Debug for RedisBulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBulkhead")
            .field("key", &self.keys.set)
            .field("max_concurrent", &self.max)
            .field("lease_ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A lease request sent to Redis whose answer the caller has not seen yet:
/// dropped armed (the caller left, or Redis did not answer in time), it
/// has the lease released, or refused should it arrive later.
struct Asking<'a> {
    bulkhead: &'a RedisBulkhead,
    id: String,
    armed: bool,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if self.armed {
            let b = self.bulkhead;
            b.store.give_back(Item::Lease {
                keys: b.keys.clone(),
                ttl_ms: b.ttl_ms(),
                id: std::mem::take(&mut self.id),
            });
        }
    }
}

/// The longest lease ttl: the lease script doubles it and adds it to
/// the server's clock in milliseconds, which must stay a valid expiry.
const MAX_LEASE_TTL: Duration = Duration::from_secs(30 * 86_400);

impl RedisBulkhead {
    /// How long a lease outlives a holder that stopped renewing it
    /// (default: the store's [`lease_ttl`](RedisStoreBuilder::lease_ttl),
    /// 5 s unless set), from 30 ms to 30 days: a shorter one is raised and
    /// a longer one cut to these, because Redis cannot expire a key later
    /// than its clock can count. Leases are renewed every third of this
    /// while held.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.ttl = d.clamp(MIN_LEASE_TTL, MAX_LEASE_TTL);
        self
    }

    fn ttl_ms(&self) -> u64 {
        // At most `MAX_LEASE_TTL`: fits.
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes a lease if the fleet holds fewer than `max_concurrent`.
    /// Dropping the lease gives it back (in a background task), and so
    /// does dropping this future before it answers.
    pub async fn try_acquire(&self) -> Option<RedisLease> {
        if self.store.is_quiet() {
            return self.degraded();
        }
        let mut asking = Asking {
            bulkhead: self,
            id: self.store.request_id(),
            armed: true,
        };
        let args = [
            self.max.to_string(),
            self.ttl_ms().to_string(),
            asking.id.clone(),
        ];
        let keys = [self.keys.set.as_str(), self.keys.gone.as_str()];
        let res = self
            .store
            .send::<i64>(Which::LeaseAcquire, &keys, &args)
            .await;
        match res {
            Some(1) => {
                // The lease's own drop gives it back from now on.
                asking.armed = false;
                Some(RedisLease::remote(self, std::mem::take(&mut asking.id)))
            }
            Some(_) => {
                asking.armed = false;
                None
            }
            None => self.degraded(),
        }
    }

    /// The answer while Redis cannot be reached, per the store's policy.
    fn degraded(&self) -> Option<RedisLease> {
        match self.store.inner.degrade {
            Degrade::FailClosed => None,
            Degrade::FailOpenToLocal => {
                self.local
                    .clone()
                    .try_acquire_owned()
                    .ok()
                    .map(|p| RedisLease {
                        kind: LeaseKind::Local(p),
                    })
            }
        }
    }

    /// Leases held across the fleet now; `None` if Redis did not answer.
    pub async fn in_use(&self) -> Option<u32> {
        self.store
            .run::<i64>(Which::LeaseCount, &[&self.keys.set], &[])
            .await
            .map(|n| n.max(0) as u32)
    }
}

/// A bulkhead lease; dropping it gives it back.
#[derive(Debug)]
pub struct RedisLease {
    kind: LeaseKind,
}

#[derive(Debug)]
enum LeaseKind {
    Remote {
        store: RedisStore,
        keys: Arc<LeaseKeys>,
        ttl_ms: u64,
        id: String,
    },
    Local(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
}

impl RedisLease {
    fn remote(b: &RedisBulkhead, id: String) -> Self {
        // Renewed while held, so a long call keeps its lease and a dead
        // process loses it within one ttl.
        b.store.hold(&b.keys, b.ttl_ms(), &id);
        RedisLease {
            kind: LeaseKind::Remote {
                store: b.store.clone(),
                keys: b.keys.clone(),
                ttl_ms: b.ttl_ms(),
                id,
            },
        }
    }

    /// Whether the lease is held in Redis (rather than locally, while
    /// degraded).
    pub fn is_fleet_wide(&self) -> bool {
        matches!(self.kind, LeaseKind::Remote { .. })
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        if let LeaseKind::Remote {
            store,
            keys,
            ttl_ms,
            id,
        } = &mut self.kind
        {
            store.unhold(keys, *ttl_ms, id);
            store.give_back(Item::Lease {
                keys: keys.clone(),
                ttl_ms: *ttl_ms,
                id: std::mem::take(id),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A lease of bulkhead `i % 2` taken, with a short or long ttl.
        Hold(usize, bool),
        /// The `j`-th lease held (modulo their number) given back.
        Unhold(usize),
        /// Time passes: more than the longest renewal period.
        Tick,
        /// The runtime that ran the renewals is dropped; a new one runs.
        NewRuntime,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, any::<bool>()).prop_map(|(i, short)| Op::Hold(i, short)),
            3 => (0..16usize).prop_map(Op::Unhold),
            2 => Just(Op::Tick),
            1 => Just(Op::NewRuntime),
        ]
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The renewal registry's invariant (see [`Renewals`]) over
        /// histories of leases taken and given back, time passing and the
        /// renewing runtime replaced: it holds exactly the leases held;
        /// while one is held since the current runtime started, a task
        /// renews; once none is held, the task ends within a period.
        #[test]
        fn every_held_lease_has_a_renewer(ops in prop::collection::vec(op(), 1..40)) {
            // Nothing listens there: a first command fails and the store
            // stays quiet after, so no renewal touches the connection
            // (which is bound to the runtime that made it, and this test
            // drops runtimes). What is tested is who renews, not what
            // Redis says.
            let store = RedisStore::builder("redis://127.0.0.1:1/")
                .timeout(Duration::from_secs(5))
                .retry_interval(Duration::from_secs(3_600))
                .build()
                .unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let r = store.run::<i64>(Which::LeaseCount, &["a"], &[]).await;
                    assert!(r.is_none() && store.is_quiet());
                });
            let keys = [
                Arc::new(LeaseKeys { set: "a".into(), gone: "a-gone".into() }),
                Arc::new(LeaseKeys { set: "b".into(), gone: "b-gone".into() }),
            ];
            let mut rt = runtime();
            let mut held: Vec<(usize, u64, String)> = Vec::new();
            let mut renewer_expected = false;
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Hold(i, short) => {
                        let ttl = if short { 300 } else { 3_000 };
                        let id = n.to_string();
                        rt.block_on(async { assert!(store.hold(&keys[i], ttl, &id)) });
                        held.push((i, ttl, id));
                        renewer_expected = true;
                    }
                    Op::Unhold(j) => {
                        if !held.is_empty() {
                            let (i, ttl, id) = held.remove(j % held.len());
                            store.unhold(&keys[i], ttl, &id);
                        }
                    }
                    Op::Tick => rt.block_on(async { tokio::time::sleep(Duration::from_millis(1_100)).await }),
                    Op::NewRuntime => {
                        drop(rt);
                        rt = runtime();
                        renewer_expected = false;
                        prop_assert!(!store.renewals().running, "the dropped task's guard");
                    }
                }
                rt.block_on(async {
                    for _ in 0..4 {
                        tokio::task::yield_now().await;
                    }
                });
                let r = store.renewals();
                let mut registered: Vec<_> = r
                    .held
                    .iter()
                    .flat_map(|((_, ttl), (k, ids))| ids.iter().map(move |id| (k.set.clone(), *ttl, id.clone())))
                    .collect();
                registered.sort();
                let mut want: Vec<_> = held
                    .iter()
                    .map(|(i, ttl, id)| (keys[*i].set.clone(), *ttl, id.clone()))
                    .collect();
                want.sort();
                prop_assert_eq!(registered, want);
                if !held.is_empty() && renewer_expected {
                    prop_assert!(r.running, "a held lease without a renewer");
                    prop_assert!(r.period.is_some());
                }
            }
            // Nothing held: the task ends within a period.
            for (i, ttl, id) in held.drain(..) {
                store.unhold(&keys[i], ttl, &id);
            }
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(1_100)).await });
            rt.block_on(async {
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
            });
            prop_assert!(!store.renewals().running, "a renewer outlived the leases");
        }
    }
}
