//! The state file's schema, and the transitions over it as plain functions
//! of the stored state and `now` (wall-clock Unix milliseconds).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema version this crate writes. Version 1 files (one breaker,
/// one bucket and one bulkhead per file) are read and migrated: their
/// breaker, bucket and bulkhead become the unnamed (`""`) entries.
pub const STATE_VERSION: u32 = 2;

/// Everything one scope shares across processes: an entry per breaker
/// name, per rate limit name and per bulkhead name. Times are Unix
/// milliseconds unless a field says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct State {
    /// The schema version ([`STATE_VERSION`]).
    pub version: u32,
    /// Each breaker's state, by the breaker's name.
    pub breakers: BTreeMap<String, BreakerEntry>,
    /// Each rate limit's state, by the limiter's name.
    pub rate_limits: BTreeMap<String, RateLimitEntry>,
    /// Each bulkhead's slots, by the bulkhead's name.
    pub bulkheads: BTreeMap<String, BulkheadEntry>,
    /// A version-1 file's breaker, read only to migrate it.
    #[serde(skip_serializing)]
    pub circuit_breaker: BreakerState,
    /// A version-1 file's token bucket, read only to migrate it.
    #[serde(skip_serializing)]
    pub rate_limiter: BucketState,
    /// A version-1 file's bulkhead, read only to migrate it.
    #[serde(skip_serializing)]
    pub bulkhead: BulkheadState,
    /// When the file was last written.
    pub updated_at: Option<u64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            breakers: BTreeMap::new(),
            rate_limits: BTreeMap::new(),
            bulkheads: BTreeMap::new(),
            circuit_breaker: BreakerState::default(),
            rate_limiter: BucketState::default(),
            bulkhead: BulkheadState::default(),
            updated_at: None,
        }
    }
}

/// A breaker's state as a version-1 file stored it (read only to migrate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Calls go through; failures are counted.
    #[default]
    Closed,
    /// Calls are rejected until `open_until`.
    Open,
    /// A limited number of probes go through.
    HalfOpen,
    /// Every call is rejected until reset.
    ForcedOpen,
    /// Every call goes through; nothing is counted.
    Disabled,
}

/// A version-1 file's breaker (read only to migrate it into
/// [`State::breakers`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BreakerState {
    /// The phase.
    pub state: Phase,
    /// Consecutive failures (closed).
    pub failures: u32,
    /// Probe successes (half-open).
    pub successes: u32,
    /// Probes in flight (half-open).
    pub half_open_attempts: u32,
    /// The processes holding those probes, one entry per probe.
    pub half_open_pids: Vec<u32>,
    /// When the last probe was reserved, to expire the reservations of a
    /// process that crashed.
    pub half_open_last_attempt_at: Option<u64>,
    /// When the last failure was recorded.
    pub last_failure_at: Option<u64>,
    /// When the breaker last opened.
    pub opened_at: Option<u64>,
    /// When the open period ends.
    pub open_until: Option<u64>,
    /// Bumped on every transition: an outcome is recorded only in the
    /// generation its call was admitted in.
    pub generation: u32,
}

/// One breaker's shared state, as the file keeps it.
///
/// These are the same fields the in-memory breaker keeps, and every
/// process runs the same transitions over them under the file lock.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BreakerEntry {
    /// The state as a number: 0 closed, 1 open, 2 half-open, 3 forced
    /// open, 4 disabled (as in the `bulwark_circuit_state` gauge).
    pub state: u8,
    /// Grows by one on every transition: a call's result is booked only
    /// in the generation it was admitted in.
    pub generation: u64,
    /// Consecutive failures (closed).
    pub failures: u32,
    /// Probe successes (half-open).
    pub successes: u32,
    /// When the open period ends, in Unix nanoseconds.
    pub open_until: u64,
    /// Open periods in a row without a recovery.
    pub opens_in_row: u32,
    /// The half-open probes in flight: who holds each, and since when.
    pub probes: Vec<ProbeHolder>,
}

/// A half-open probe held by a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProbeHolder {
    /// The holding process.
    pub pid: u32,
    /// That process's start time (Linux: clock ticks since boot, from
    /// `/proc/<pid>/stat`), so a later process reusing the PID is not
    /// taken for it. Absent where the platform does not tell it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    /// When it took the probe, in Unix milliseconds.
    pub since: u64,
}

impl ProbeHolder {
    pub(crate) fn new(pid: u32, start: Option<u64>, since: u64) -> Self {
        Self { pid, start, since }
    }
}

impl BreakerEntry {
    /// A version-1 file's breaker, in this schema.
    fn migrate(v1: &BreakerState) -> Self {
        let ms = 1_000_000;
        Self {
            state: match v1.state {
                Phase::Closed => 0,
                Phase::Open => 1,
                Phase::HalfOpen => 2,
                Phase::ForcedOpen => 3,
                Phase::Disabled => 4,
            },
            generation: u64::from(v1.generation),
            failures: v1.failures,
            successes: v1.successes,
            open_until: v1.open_until.unwrap_or(0).saturating_mul(ms),
            opens_in_row: 0,
            probes: v1
                .half_open_pids
                .iter()
                .map(|&pid| ProbeHolder {
                    pid,
                    start: None,
                    since: v1.half_open_last_attempt_at.unwrap_or(0),
                })
                .collect(),
        }
    }
}

impl State {
    /// Brings a state read from an older file up to this schema: a
    /// version-1 breaker, bucket and bulkhead become the unnamed (`""`)
    /// entries, unless the file already has those.
    pub(crate) fn migrate(&mut self) {
        if self.version < 2 && self.circuit_breaker != BreakerState::default() {
            let entry = BreakerEntry::migrate(&self.circuit_breaker);
            self.breakers.entry(String::new()).or_insert(entry);
        }
        let bucket = std::mem::take(&mut self.rate_limiter);
        if bucket != BucketState::default() {
            self.rate_limits
                .entry(String::new())
                .or_insert(RateLimitEntry {
                    tat: 0,
                    v1: Some(bucket),
                });
        }
        let pids = std::mem::take(&mut self.bulkhead.active_pids);
        if !pids.is_empty() {
            let since = self.updated_at.unwrap_or(0);
            let entry = self.bulkheads.entry(String::new()).or_default();
            if entry.holders.is_empty() {
                entry.holders = pids
                    .into_iter()
                    .map(|pid| Holder {
                        pid,
                        start: None,
                        since,
                        id: fastrand::u64(..),
                    })
                    .collect();
            }
        }
        self.circuit_breaker = BreakerState::default();
        self.version = STATE_VERSION;
    }
}

/// A version-1 file's token bucket (read only to migrate it into
/// [`State::rate_limits`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BucketState {
    /// Tokens left; `None` until first used (a full bucket).
    pub tokens: Option<f64>,
    /// When tokens were last added.
    pub last_refill_at: Option<u64>,
    /// No call is admitted before this time (an upstream's `Retry-After`).
    pub retry_after_until: Option<u64>,
}

/// A version-1 file's bulkhead (read only to migrate it into
/// [`State::bulkheads`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BulkheadState {
    /// The process holding each slot, one entry per slot.
    pub active_pids: Vec<u32>,
}

/// One rate limit's shared state: the GCRA theoretical arrival time, the
/// same one number the in-memory limiter keeps, and every process runs
/// the same decision over it under the file lock.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RateLimitEntry {
    /// The theoretical arrival time, in Unix nanoseconds: the instant the
    /// bucket is full again if nothing more is admitted. An upstream's
    /// `Retry-After` is folded into it. `0` is a full bucket.
    pub tat: u64,
    /// A version-1 bucket not yet converted: its tokens become a TAT the
    /// first time a limiter (which knows the bucket's shape) uses it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v1: Option<BucketState>,
}

/// One bulkhead's slots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BulkheadEntry {
    /// Who holds each slot. Slots of processes that ended (or whose PID
    /// now names another process), and slots held longer than the store's
    /// `slot_timeout`, are reclaimed.
    pub holders: Vec<Holder>,
}

/// A bulkhead slot held by a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Holder {
    /// The holding process.
    pub pid: u32,
    /// That process's start time, as in [`ProbeHolder::start`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    /// When the slot was taken, in Unix milliseconds.
    pub since: u64,
    /// Names this one slot, so a process gives back exactly the slots it
    /// took.
    pub id: u64,
}

#[cfg(feature = "rate-limit")]
mod gcra_entry {
    use super::{BucketState, RateLimitEntry};
    use crate::clock::Nanos;
    use crate::rate_limit::gcra::{self, Decision, Params};

    const MS: u64 = 1_000_000;

    impl RateLimitEntry {
        /// The TAT, converting a version-1 bucket first: `tokens` left at
        /// `last_refill_at` is a debt of `max_tokens - tokens` then, and a
        /// `Retry-After` block is folded in as `gcra::block_until` does.
        fn settle(&mut self, p: &Params) -> Nanos {
            if let Some(v1) = self.v1.take() {
                let at = v1.last_refill_at.unwrap_or(0).saturating_mul(MS);
                self.tat = match v1.tokens {
                    None => 0,
                    Some(t) => {
                        let have = (t.max(0.0) * p.per_token).min(p.tau as f64) as Nanos;
                        at.saturating_add(p.tau - have)
                    }
                };
                if let Some(until) = v1.retry_after_until {
                    let one = p.increment(1.0).unwrap_or(p.tau).min(p.tau);
                    self.tat = gcra::block_until(self.tat, until.saturating_mul(MS), one, p);
                }
            }
            self.tat
        }

        /// Admits a request of increment `inc` at `now` (Unix nanos) and
        /// records it, or says how long until it would be admitted. A
        /// shared bucket never queues: `p.max_wait` is zero.
        pub(crate) fn acquire(&mut self, now: Nanos, inc: Nanos, p: &Params) -> Result<(), Nanos> {
            match gcra::decide(self.settle(p), now, inc, p) {
                Decision::Admit { tat } => {
                    self.tat = tat;
                    Ok(())
                }
                Decision::Wait { wait, .. } => Err(wait),
                Decision::Reject { retry_after } => Err(retry_after),
            }
        }

        /// Nothing is admitted before `until` (an upstream's block).
        pub(crate) fn block_until(&mut self, until: Nanos, inc: Nanos, p: &Params) {
            self.tat = gcra::block_until(self.settle(p), until, inc, p);
        }

        /// Tokens available at `now`.
        pub(crate) fn tokens(&self, now: Nanos, p: &Params) -> f64 {
            let mut e = self.clone();
            gcra::tokens(e.settle(p), now, p)
        }
    }

    impl BucketState {
        #[cfg(test)]
        pub(crate) fn v1(tokens: f64, at_ms: u64) -> Self {
            Self {
                tokens: Some(tokens),
                last_refill_at: Some(at_ms),
                retry_after_until: None,
            }
        }
    }
}

impl BulkheadEntry {
    /// Drops the slots of holders that ended or went stale.
    pub(crate) fn reclaim(&mut self, now_ms: u64, stale_ms: u64, alive: impl Fn(&Holder) -> bool) {
        self.holders
            .retain(|h| now_ms.saturating_sub(h.since) < stale_ms && alive(h));
    }

    /// Takes a slot for `holder` if fewer than `max` are held.
    pub(crate) fn acquire(&mut self, max: u32, holder: Holder) -> bool {
        if self.holders.len() as u64 >= u64::from(max) {
            return false;
        }
        self.holders.push(holder);
        true
    }

    /// Gives back the slot `id`.
    pub(crate) fn release(&mut self, id: u64) {
        if let Some(i) = self.holders.iter().position(|h| h.id == id) {
            self.holders.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(_: &Holder) -> bool {
        true
    }

    fn holder(pid: u32, id: u64, since: u64) -> Holder {
        Holder {
            pid,
            start: None,
            since,
            id,
        }
    }

    #[test]
    fn bulkhead_reclaims_dead_and_stale_holders_and_releases_by_id() {
        let mut s = BulkheadEntry::default();
        assert!(s.acquire(2, holder(1, 10, 0)));
        assert!(s.acquire(2, holder(1, 11, 50)));
        assert!(!s.acquire(2, holder(3, 12, 50)));
        s.reclaim(60, 1000, |h| h.id != 10);
        assert!(s.acquire(2, holder(3, 12, 60)));
        // The same process's other slot stays when one is given back.
        s.release(12);
        assert_eq!(s.holders, vec![holder(1, 11, 50)]);
        s.reclaim(1050, 1000, alive);
        assert!(s.holders.is_empty(), "held past the staleness bound");
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let mut s = State::default();
        s.breakers.insert(
            "payments".into(),
            BreakerEntry {
                state: 1,
                generation: 3,
                open_until: 5_000_000,
                ..BreakerEntry::default()
            },
        );
        s.rate_limits
            .insert("api".into(), RateLimitEntry { tat: 7, v1: None });
        s.bulkheads
            .entry("api".into())
            .or_default()
            .holders
            .push(holder(4, 5, 6));
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"version\":2"));
        assert!(text.contains("\"payments\":{\"state\":1"));
        assert!(
            text.contains("\"rate_limits\":{\"api\":{\"tat\":7}}"),
            "{text}"
        );
        assert!(
            text.contains(
                "\"bulkheads\":{\"api\":{\"holders\":[{\"pid\":4,\"since\":6,\"id\":5}]}}"
            ),
            "{text}"
        );
        for old in ["circuit_breaker", "rate_limiter", "\"bulkhead\""] {
            assert!(
                !text.contains(old),
                "the version-1 field {old} is not written"
            );
        }
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let partial: State = serde_json::from_str(r#"{"version":2,"extra":true}"#).unwrap();
        assert!(partial.breakers.is_empty());
    }

    /// A file written by version 1 of the schema, as a process of an
    /// earlier release left it: its breaker open, one probe of pid 7.
    const V1_FILE: &str = r#"{"version":1,"circuit_breaker":{"state":"half_open","failures":0,
        "successes":1,"half_open_attempts":1,"half_open_pids":[7],
        "half_open_last_attempt_at":1700000000000,"last_failure_at":1699999990000,
        "opened_at":1699999970000,"open_until":1700000000000,"generation":41},
        "rate_limiter":{"tokens":3.5,"last_refill_at":1700000000000,"retry_after_until":null},
        "bulkhead":{"active_pids":[7,9]},"updated_at":1700000000000}"#;

    #[test]
    fn a_version_1_file_is_migrated() {
        let mut s: State = serde_json::from_str(V1_FILE).unwrap();
        assert_eq!(s.version, 1);
        s.migrate();
        assert_eq!(s.version, STATE_VERSION);
        let b = &s.breakers[""];
        assert_eq!((b.state, b.generation, b.successes), (2, 41, 1));
        assert_eq!(
            b.probes,
            vec![ProbeHolder {
                pid: 7,
                start: None,
                since: 1_700_000_000_000
            }]
        );
        assert_eq!(b.open_until, 1_700_000_000_000 * 1_000_000);
        let pids: Vec<u32> = s.bulkheads[""].holders.iter().map(|h| h.pid).collect();
        assert_eq!(pids, vec![7, 9]);
        assert!(s.bulkheads[""]
            .holders
            .iter()
            .all(|h| h.since == 1_700_000_000_000 && h.start.is_none()));
        assert_eq!(s.rate_limits[""].v1.as_ref().unwrap().tokens, Some(3.5));
        let text = serde_json::to_string(&s).unwrap();
        for old in ["circuit_breaker", "rate_limiter", "active_pids"] {
            assert!(!text.contains(old), "{old} in {text}");
        }
        // Migrating again (a version-2 file) changes nothing.
        let mut again: State = serde_json::from_str(&text).unwrap();
        again.migrate();
        assert_eq!(again, s);
    }

    #[cfg(feature = "rate-limit")]
    #[test]
    fn a_version_1_bucket_becomes_the_same_bucket_in_gcra() {
        use crate::rate_limit::gcra::Params;
        const S: u64 = 1_000_000_000;
        // 10 tokens, 1 a second; 3.5 left at t = 100 s.
        let p = Params::new(10.0, 1.0, 0);
        let mut e = RateLimitEntry {
            tat: 0,
            v1: Some(BucketState::v1(3.5, 100_000)),
        };
        assert!((e.tokens(100 * S, &p) - 3.5).abs() < 1e-6);
        assert!((e.tokens(102 * S, &p) - 5.5).abs() < 1e-6);
        assert!((e.tokens(200 * S, &p) - 10.0).abs() < 1e-6);
        let inc = p.increment(1.0).unwrap();
        for _ in 0..3 {
            assert!(e.acquire(100 * S, inc, &p).is_ok());
        }
        assert!(e.v1.is_none(), "converted on first use");
        assert_eq!(e.acquire(100 * S, inc, &p), Err(S / 2));
        // A version-1 block is kept.
        let mut blocked = RateLimitEntry {
            tat: 0,
            v1: Some(BucketState {
                tokens: None,
                last_refill_at: None,
                retry_after_until: Some(150_000),
            }),
        };
        assert_eq!(blocked.acquire(140 * S, inc, &p), Err(10 * S));
        assert!(blocked.acquire(150 * S, inc, &p).is_ok());
    }

    #[cfg(feature = "rate-limit")]
    mod v1_buckets {
        use proptest::prelude::*;

        use super::*;
        use crate::rate_limit::gcra::Params;

        proptest! {
            /// A version-1 bucket becomes the TAT that holds the same
            /// tokens at every later time: what it had, plus what refilled
            /// since, up to the bucket's size.
            #[test]
            fn keeps_its_tokens_at_every_later_time(
                max in 1.0f64..1000.0,
                rate in 0.01f64..1000.0,
                fill in 0.0f64..=1.0,
                at_ms in 1u64..4_000_000_000_000,
                later_ms in 0u64..10_000_000,
            ) {
                let p = Params::new(max, rate, 0);
                let had = max * fill;
                let e = RateLimitEntry {
                    tat: 0,
                    v1: Some(BucketState::v1(had, at_ms)),
                };
                let now = (at_ms + later_ms) * 1_000_000;
                let want = (had + later_ms as f64 / 1000.0 * rate).min(max);
                let got = e.tokens(now, &p);
                // The TAT is whole nanoseconds: a token's worth of rounding.
                prop_assert!((got - want).abs() <= 1e-6 * max.max(1.0) + 1e-9 * rate, "{got} vs {want}");
            }
        }
    }
}
