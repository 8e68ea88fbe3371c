//! The state file's schema, and the transitions over it as plain functions
//! of the stored state and `now` (wall-clock Unix milliseconds).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The schema version this crate writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Everything one scope shares across processes: one breaker, one token
/// bucket and one bulkhead. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct State {
    /// The schema version ([`STATE_VERSION`]).
    pub version: u32,
    /// The breaker.
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
            circuit_breaker: BreakerState::default(),
            rate_limiter: BucketState::default(),
            bulkhead: BulkheadState::default(),
            updated_at: None,
        }
    }
}

/// A breaker's phase as stored.
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

/// The breaker's shared state.
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

/// Breaker settings the file transitions need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerCfg {
    pub(crate) failure_threshold: u32,
    pub(crate) success_threshold: u32,
    pub(crate) open_timeout: Duration,
    pub(crate) half_open_max_calls: u32,
    pub(crate) stale_attempt_timeout: Duration,
}

/// The answer to "may this call go ahead?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit {
        gen: u32,
        probe: bool,
    },
    Reject {
        phase: Phase,
        retry_after: Option<Duration>,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

impl BreakerState {
    /// Whether a call may go ahead without writing anything: the common
    /// path reads the file and stops here.
    pub(crate) fn admits_read_only(&self) -> bool {
        matches!(self.state, Phase::Closed | Phase::Disabled)
    }

    /// Decides a call, reserving a probe for `pid` when half-open.
    pub(crate) fn allow(
        &mut self,
        cfg: &BreakerCfg,
        pid: u32,
        now: u64,
        alive: impl Fn(u32) -> bool,
    ) -> Verdict {
        match self.state {
            Phase::Closed | Phase::Disabled => Verdict::Admit {
                gen: self.generation,
                probe: false,
            },
            Phase::ForcedOpen => Verdict::Reject {
                phase: Phase::ForcedOpen,
                retry_after: None,
            },
            Phase::Open => {
                let until = self.open_until.unwrap_or(0);
                if now < until {
                    return Verdict::Reject {
                        phase: Phase::Open,
                        retry_after: Some(Duration::from_millis(until - now)),
                    };
                }
                self.enter(Phase::HalfOpen);
                self.reserve(pid, now)
            }
            Phase::HalfOpen => {
                self.reclaim(cfg, now, alive);
                if self.half_open_attempts >= cfg.half_open_max_calls {
                    return Verdict::Reject {
                        phase: Phase::HalfOpen,
                        retry_after: None,
                    };
                }
                self.reserve(pid, now)
            }
        }
    }

    fn reserve(&mut self, pid: u32, now: u64) -> Verdict {
        self.half_open_attempts += 1;
        self.half_open_pids.push(pid);
        self.half_open_last_attempt_at = Some(now);
        Verdict::Admit {
            gen: self.generation,
            probe: true,
        }
    }

    /// Frees the probes of processes that died, and all probes once the
    /// last reservation is older than `stale_attempt_timeout` (a process
    /// that hung, or one whose PID was reused).
    pub(crate) fn reclaim(&mut self, cfg: &BreakerCfg, now: u64, alive: impl Fn(u32) -> bool) {
        let before = self.half_open_pids.len();
        self.half_open_pids.retain(|&p| alive(p));
        let freed = (before - self.half_open_pids.len()) as u32;
        self.half_open_attempts = self.half_open_attempts.saturating_sub(freed);
        let last = self.half_open_last_attempt_at.unwrap_or(0);
        if self.half_open_attempts > 0 && now.saturating_sub(last) >= ms(cfg.stale_attempt_timeout)
        {
            self.half_open_attempts = 0;
            self.half_open_pids.clear();
        }
    }

    /// Records the outcome of a call admitted in generation `gen`.
    pub(crate) fn record(
        &mut self,
        cfg: &BreakerCfg,
        gen: u32,
        probe: bool,
        pid: u32,
        failure: bool,
        now: u64,
    ) {
        if gen != self.generation {
            return; // the breaker moved on while the call ran
        }
        if failure {
            self.last_failure_at = Some(now);
        }
        match (self.state, probe) {
            (Phase::Closed, false) => {
                if !failure {
                    self.failures = 0;
                    return;
                }
                self.failures += 1;
                if self.failures >= cfg.failure_threshold {
                    self.open(now, cfg.open_timeout);
                }
            }
            (Phase::HalfOpen, true) => {
                self.half_open_attempts = self.half_open_attempts.saturating_sub(1);
                remove_one(&mut self.half_open_pids, pid);
                if failure {
                    return self.open(now, cfg.open_timeout);
                }
                self.successes += 1;
                if self.successes >= cfg.success_threshold {
                    self.enter(Phase::Closed);
                }
            }
            _ => {}
        }
    }

    /// Gives back a probe whose call ended without a verdict.
    pub(crate) fn release(&mut self, gen: u32, pid: u32) {
        if gen == self.generation && self.state == Phase::HalfOpen {
            self.half_open_attempts = self.half_open_attempts.saturating_sub(1);
            remove_one(&mut self.half_open_pids, pid);
        }
    }

    /// Opens the breaker for `d` from `now`.
    pub(crate) fn open(&mut self, now: u64, d: Duration) {
        self.enter(Phase::Open);
        self.opened_at = Some(now);
        self.open_until = Some(now.saturating_add(ms(d)));
    }

    /// Holds the breaker open at least `d` from `now`; a longer open
    /// period is kept.
    pub(crate) fn hold_open(&mut self, now: u64, d: Duration) {
        match self.state {
            Phase::ForcedOpen | Phase::Disabled => {}
            Phase::Open if self.open_until.unwrap_or(0) >= now.saturating_add(ms(d)) => {}
            _ => self.open(now, d),
        }
    }

    /// Starts a new generation in `phase`, counts cleared.
    pub(crate) fn enter(&mut self, phase: Phase) {
        self.state = phase;
        self.generation = self.generation.wrapping_add(1);
        self.failures = 0;
        self.successes = 0;
        self.half_open_attempts = 0;
        self.half_open_pids.clear();
        if phase != Phase::Open {
            self.open_until = None;
        }
    }

    /// The phase as a caller sees it at `now`: an open breaker whose
    /// period has passed reports half-open.
    pub(crate) fn phase_at(&self, now: u64) -> Phase {
        match self.state {
            Phase::Open if self.open_until.unwrap_or(0) <= now => Phase::HalfOpen,
            p => p,
        }
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

    const CFG: BreakerCfg = BreakerCfg {
        failure_threshold: 3,
        success_threshold: 2,
        open_timeout: Duration::from_secs(30),
        half_open_max_calls: 1,
        stale_attempt_timeout: Duration::from_secs(120),
    };

    fn alive(_: u32) -> bool {
        true
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let mut b = BreakerState::default();
        for _ in 0..3 {
            let Verdict::Admit { gen, probe } = b.allow(&CFG, 1, 0, alive) else {
                panic!()
            };
            b.record(&CFG, gen, probe, 1, true, 0);
        }
        assert_eq!(b.state, Phase::Open);
        assert_eq!(
            b.allow(&CFG, 1, 10_000, alive),
            Verdict::Reject {
                phase: Phase::Open,
                retry_after: Some(Duration::from_secs(20))
            }
        );
        let Verdict::Admit { gen, probe: true } = b.allow(&CFG, 1, 30_000, alive) else {
            panic!()
        };
        // Only one probe at a time.
        assert!(matches!(
            b.allow(&CFG, 2, 30_001, alive),
            Verdict::Reject { .. }
        ));
        b.record(&CFG, gen, true, 1, false, 30_002);
        let Verdict::Admit { gen, probe: true } = b.allow(&CFG, 2, 30_003, alive) else {
            panic!()
        };
        b.record(&CFG, gen, true, 2, false, 30_004);
        assert_eq!(b.state, Phase::Closed);
    }

    #[test]
    fn stale_and_dead_reservations_are_reclaimed() {
        let mut b = BreakerState::default();
        b.open(0, CFG.open_timeout);
        assert!(matches!(
            b.allow(&CFG, 7, 30_000, alive),
            Verdict::Admit { probe: true, .. }
        ));
        // Held by a live process: rejected until the reservation is stale.
        assert!(matches!(
            b.allow(&CFG, 8, 100_000, alive),
            Verdict::Reject { .. }
        ));
        assert!(matches!(
            b.allow(&CFG, 8, 150_000, alive),
            Verdict::Admit { probe: true, .. }
        ));
        // Held by a dead process: reclaimed at once.
        assert!(matches!(
            b.allow(&CFG, 9, 150_001, |p| p != 8),
            Verdict::Admit { probe: true, .. }
        ));
        assert_eq!(b.half_open_pids, vec![9]);
    }

    #[test]
    fn stale_outcome_is_ignored() {
        let mut b = BreakerState::default();
        let gen = b.generation;
        b.hold_open(0, Duration::from_secs(1));
        b.record(&CFG, gen, false, 1, true, 1);
        assert_eq!(b.failures, 0);
        assert_eq!(b.state, Phase::Open);
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
        s.circuit_breaker.open(5, Duration::from_secs(1));
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"version\":1"));
        assert!(text.contains("\"state\":\"open\""));
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let partial: State = serde_json::from_str(r#"{"version":1,"extra":true}"#).unwrap();
        assert_eq!(partial.circuit_breaker, BreakerState::default());
    }
}
