//! A breaker whose state lives in a state file, shared by every process
//! that uses the file. Each breaker name has its own entry; every process
//! runs the same transitions ([`Circuit`]) over it under the file lock.
//!
//! While the file cannot be used the store's degrade policy applies: the
//! same transitions run over this process's local state
//! (`FailOpenToLocal`), or every call is rejected as if the breaker were
//! open (`FailClosed`).

use std::time::Duration;

use super::circuit::{Circuit, Pass, Refusal, Rules, Transition};
use super::CircuitState;
use crate::clock::Nanos;
use crate::store::file::{alive, me, BreakerEntry, FileStore, ProbeHolder, State, Unavailable};
use crate::store::unix_ms;

#[derive(Debug)]
pub(crate) struct FileBreaker {
    pub(crate) store: FileStore,
    pub(crate) name: String,
    pub(crate) rules: Rules,
    pub(crate) stale_attempt_timeout: Duration,
}

/// Unix nanoseconds: the state file is read by many processes, so its
/// times are wall-clock times.
fn unix_now() -> Nanos {
    unix_ms().saturating_mul(1_000_000)
}

fn circuit_of(e: &BreakerEntry) -> Circuit {
    Circuit {
        state: CircuitState::from_code(e.state).unwrap_or_default(),
        generation: e.generation,
        failures: e.failures,
        probes: u32::try_from(e.probes.len()).unwrap_or(u32::MAX),
        successes: e.successes,
        open_until: e.open_until,
        opens_in_row: e.opens_in_row,
    }
}

/// Writes `c` back into `e`. The probe holders are the probes: a new
/// generation starts with none.
fn store_back(e: &mut BreakerEntry, c: &Circuit) {
    if c.generation != e.generation {
        e.probes.clear();
    }
    e.state = c.state().code();
    e.generation = c.generation;
    e.failures = c.failures;
    e.successes = c.successes;
    e.open_until = c.open_until;
    e.opens_in_row = c.opens_in_row;
}

/// Gives back one probe of this process.
fn remove_holder(e: &mut BreakerEntry) {
    let me = me();
    if let Some(i) = e.probes.iter().position(|h| h.pid == me.pid) {
        e.probes.swap_remove(i);
    }
}

/// What a call that cannot reach the state is told under `FailClosed`.
const UNAVAILABLE: Refusal = Refusal {
    state: CircuitState::Open,
    retry_after: None,
};

/// Runs `f` over breaker `name`'s entry in `s`, after freeing the probes
/// of processes that ended or went quiet for longer than `stale_ms`.
fn run<R>(
    s: &mut State,
    name: &str,
    stale_ms: u64,
    now: Nanos,
    f: impl FnOnce(&mut Circuit, &mut BreakerEntry, Nanos) -> R,
) -> R {
    let e = s.breakers.entry(name.to_owned()).or_default();
    let now_ms = now / 1_000_000;
    e.probes
        .retain(|h| alive(h.pid, h.start) && now_ms.saturating_sub(h.since) < stale_ms);
    let mut c = circuit_of(e);
    let r = f(&mut c, e, now);
    store_back(e, &c);
    r
}

impl FileBreaker {
    fn stale_ms(&self) -> u64 {
        u64::try_from(self.stale_attempt_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the circuit under the file lock (see [`run`]).
    fn update<R>(
        &self,
        f: impl FnOnce(&mut Circuit, &mut BreakerEntry, Nanos) -> R,
    ) -> Result<R, Unavailable> {
        let (name, stale_ms, now) = (&self.name, self.stale_ms(), unix_now());
        self.store
            .round_blocking(|s| run(s, name, stale_ms, now, f))
    }

    /// Reads breaker `name`'s entry without the lock (a missing one reads
    /// as new); `None` when the file cannot be read that way.
    fn read<R>(&self, f: impl FnOnce(&BreakerEntry) -> R) -> Option<R> {
        let r = self.store.view(|s| match s.breakers.get(&self.name) {
            Some(e) => f(e),
            None => f(&BreakerEntry::default()),
        });
        r.ok()
    }

    pub(crate) fn admit(&self) -> (Result<Pass, Refusal>, Option<Transition>) {
        // Admitting while closed and rejecting while open change nothing:
        // they are only read. Only a probe (or the move to half-open)
        // takes the lock.
        let now = unix_now();
        let quick = self.read(|e| {
            let c = circuit_of(e);
            match c.state() {
                CircuitState::Closed | CircuitState::Disabled => Some(Ok(Pass {
                    generation: c.generation,
                    probe: false,
                })),
                CircuitState::ForcedOpen => Some(Err(Refusal {
                    state: CircuitState::ForcedOpen,
                    retry_after: None,
                })),
                CircuitState::Open => c.open_remaining(now).map(|left| {
                    Err(Refusal {
                        state: CircuitState::Open,
                        retry_after: Some(left),
                    })
                }),
                CircuitState::HalfOpen => None,
            }
        });
        if let Some(Some(verdict)) = quick {
            return (verdict, None);
        }
        let rules = self.rules;
        let r = self.update(|c, e, now| {
            let r = c.admit(&rules, now);
            if let Ok(pass) = r.0 {
                if pass.probe {
                    store_back(e, c);
                    let me = me();
                    e.probes
                        .push(ProbeHolder::new(me.pid, me.start, now / 1_000_000));
                }
            }
            r
        });
        r.unwrap_or((Err(UNAVAILABLE), None))
    }

    pub(crate) fn book(&self, pass: Pass, failure: bool) -> Option<Transition> {
        if !failure && !pass.probe {
            // A success with nothing to clear is only read.
            let nothing = self.read(|e| e.generation != pass.generation || e.failures == 0);
            if nothing == Some(true) {
                return None;
            }
        }
        let rules = self.rules;
        let r = self.update(|c, e, now| {
            if pass.probe && pass.generation == e.generation {
                remove_holder(e);
            }
            if failure {
                c.fail(&rules, pass, now)
            } else {
                c.succeed(&rules, pass)
            }
        });
        r.unwrap_or(None)
    }

    /// Gives a probe back, from the call's destructor: it never waits for
    /// the lock on an async worker (see `FileStore::round_detached`).
    pub(crate) fn release(&self, pass: Pass) {
        let (name, stale_ms, now) = (self.name.clone(), self.stale_ms(), unix_now());
        self.store.round_detached(move |s| {
            run(s, &name, stale_ms, now, |c, e, _| {
                if pass.generation == e.generation {
                    remove_holder(e);
                }
                c.release(pass);
            })
        });
    }

    pub(crate) fn hold_open(&self, d: Duration) -> Option<Transition> {
        self.update(|c, _, now| c.hold_open(now, d)).unwrap_or(None)
    }

    pub(crate) fn force(&self, to: CircuitState) -> Transition {
        let rules = self.rules;
        let r = self.update(|c, _, now| c.force(to, now, &rules));
        // Failing closed the change is not kept; report it as asked.
        r.unwrap_or_else(|Unavailable| Circuit::default().force(to, unix_now(), &rules))
    }

    pub(crate) fn circuit(&self) -> (Circuit, Nanos) {
        let now = unix_now();
        match self.read(circuit_of) {
            Some(c) => (c, now),
            // Failing closed: every call is rejected as if open.
            None => {
                let mut c = Circuit::default();
                c.force(CircuitState::ForcedOpen, now, &self.rules);
                (c, now)
            }
        }
    }
}
