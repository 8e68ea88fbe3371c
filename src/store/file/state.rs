//! The state file's schema, and the transitions over it as plain functions
//! of the stored state and `now` (wall-clock Unix milliseconds).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The schema version this crate writes. Version 1 files (one breaker,
/// one bucket and one bulkhead per file) are read and migrated: their
/// breaker becomes the entry of the unnamed breaker (`""`).
pub const STATE_VERSION: u32 = 2;

/// Everything one scope shares across processes: a breaker per name, one
/// token bucket and one bulkhead. Times are Unix milliseconds unless a
/// field says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct State {
    /// The schema version ([`STATE_VERSION`]).
    pub version: u32,
    /// Each breaker's state, by the breaker's name.
    pub breakers: std::collections::BTreeMap<String, BreakerEntry>,
    /// A version-1 file's breaker, read only to migrate it.
    #[serde(skip_serializing)]
    pub circuit_breaker: BreakerState,
    /// The token bucket.
    pub rate_limiter: BucketState,
    /// The bulkhead.
    pub bulkhead: BulkheadState,
    /// When the file was last written.
    pub updated_at: Option<u64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            breakers: Default::default(),
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
    /// When it took the probe, in Unix milliseconds.
    pub since: u64,
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
                    since: v1.half_open_last_attempt_at.unwrap_or(0),
                })
                .collect(),
        }
    }
}

impl State {
    /// Brings a state read from an older file up to this schema.
    pub(crate) fn migrate(&mut self) {
        if self.version < 2 && self.circuit_breaker != BreakerState::default() {
            let entry = BreakerEntry::migrate(&self.circuit_breaker);
            self.breakers.entry(String::new()).or_insert(entry);
        }
        self.circuit_breaker = BreakerState::default();
        self.version = STATE_VERSION;
    }
}

/// The token bucket's shared state.
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

/// The bulkhead's shared state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BulkheadState {
    /// The process holding each slot, one entry per slot (a process may
    /// hold several). Entries of dead processes are reclaimed.
    pub active_pids: Vec<u32>,
}

fn remove_one(v: &mut Vec<u32>, pid: u32) -> bool {
    match v.iter().position(|&p| p == pid) {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    }
}

/// Token-bucket settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BucketCfg {
    pub(crate) max_tokens: f64,
    pub(crate) refill_rate: f64,
}

impl BucketState {
    /// Takes `cost` tokens, or says how long until they would be there.
    pub(crate) fn take(&mut self, cfg: &BucketCfg, cost: f64, now: u64) -> Result<(), Duration> {
        if let Some(until) = self.retry_after_until {
            if now < until {
                return Err(Duration::from_millis(until - now));
            }
            self.retry_after_until = None;
        }
        let mut tokens = self.tokens.unwrap_or(cfg.max_tokens);
        if let Some(last) = self.last_refill_at {
            let elapsed = now.saturating_sub(last) as f64 / 1000.0;
            tokens = (tokens + elapsed * cfg.refill_rate).min(cfg.max_tokens);
        }
        self.last_refill_at = Some(now);
        if tokens + 1e-9 >= cost {
            self.tokens = Some((tokens - cost).max(0.0));
            Ok(())
        } else {
            self.tokens = Some(tokens);
            Err(Duration::from_secs_f64((cost - tokens) / cfg.refill_rate))
        }
    }

    /// Blocks the bucket until `until` (an upstream's `Retry-After`); a
    /// later block is kept.
    pub(crate) fn block_until(&mut self, until: u64) {
        self.retry_after_until = Some(self.retry_after_until.unwrap_or(0).max(until));
    }

    /// Tokens available at `now`, without taking any.
    pub(crate) fn available(&self, cfg: &BucketCfg, now: u64) -> f64 {
        let tokens = self.tokens.unwrap_or(cfg.max_tokens);
        match self.last_refill_at {
            Some(last) => {
                let elapsed = now.saturating_sub(last) as f64 / 1000.0;
                (tokens + elapsed * cfg.refill_rate).min(cfg.max_tokens)
            }
            None => tokens,
        }
    }
}

impl BulkheadState {
    /// Takes a slot for `pid` if fewer than `max` are held by live
    /// processes.
    pub(crate) fn acquire(&mut self, max: u32, pid: u32, alive: impl Fn(u32) -> bool) -> bool {
        self.reclaim(alive);
        if self.active_pids.len() as u64 >= u64::from(max) {
            return false;
        }
        self.active_pids.push(pid);
        true
    }

    /// Drops the slots of dead processes.
    pub(crate) fn reclaim(&mut self, alive: impl Fn(u32) -> bool) {
        self.active_pids.retain(|&p| alive(p));
    }

    /// Gives back one slot of `pid`.
    pub(crate) fn release(&mut self, pid: u32) {
        remove_one(&mut self.active_pids, pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(_: u32) -> bool {
        true
    }

    #[test]
    fn bucket_refills_and_honours_retry_after() {
        let cfg = BucketCfg {
            max_tokens: 2.0,
            refill_rate: 1.0,
        };
        let mut s = BucketState::default();
        assert!(s.take(&cfg, 1.0, 0).is_ok());
        assert!(s.take(&cfg, 1.0, 0).is_ok());
        assert_eq!(s.take(&cfg, 1.0, 0), Err(Duration::from_secs(1)));
        assert!(s.take(&cfg, 1.0, 1000).is_ok());
        s.block_until(5000);
        assert_eq!(s.take(&cfg, 1.0, 4000), Err(Duration::from_secs(1)));
        assert!(s.take(&cfg, 1.0, 5000).is_ok());
    }

    #[test]
    fn bulkhead_reclaims_dead_pids() {
        let mut s = BulkheadState::default();
        assert!(s.acquire(2, 1, alive));
        assert!(s.acquire(2, 2, alive));
        assert!(!s.acquire(2, 3, alive));
        assert!(s.acquire(2, 3, |p| p != 1));
        s.release(3);
        assert_eq!(s.active_pids, vec![2]);
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
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"version\":2"));
        assert!(text.contains("\"payments\":{\"state\":1"));
        assert!(
            !text.contains("circuit_breaker"),
            "the old field is not written"
        );
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
                since: 1_700_000_000_000
            }]
        );
        assert_eq!(b.open_until, 1_700_000_000_000 * 1_000_000);
        assert_eq!(s.bulkhead.active_pids, vec![7, 9]);
        assert_eq!(s.rate_limiter.tokens, Some(3.5));
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("circuit_breaker"));
    }
}
