//! A breaker whose state lives in a state file, shared by every process
//! that uses the file. Each breaker name has its own entry; every process
//! runs the same transitions ([`Circuit`]) over it under the file lock.

use std::time::Duration;

use super::circuit::{Circuit, Pass, Refusal, Rules, Transition};
use super::CircuitState;
use crate::clock::Nanos;
use crate::store::file::{alive, pid, BreakerEntry, FileStore, ProbeHolder};
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

fn remove_holder(e: &mut BreakerEntry, pid: u32) {
    if let Some(i) = e.probes.iter().position(|h| h.pid == pid) {
        e.probes.swap_remove(i);
    }
}

impl FileBreaker {
    /// Runs `f` on the circuit under the file lock, after freeing the
    /// probes of processes that died or went quiet for too long.
    fn update<R>(&self, f: impl FnOnce(&mut Circuit, &mut BreakerEntry, Nanos) -> R) -> R {
        let now = unix_now();
        let stale_ms = u64::try_from(self.stale_attempt_timeout.as_millis()).unwrap_or(u64::MAX);
        self.store.update_breaker(&self.name, |e| {
            let now_ms = now / 1_000_000;
            e.probes
                .retain(|h| alive(h.pid) && now_ms.saturating_sub(h.since) < stale_ms);
            let mut c = circuit_of(e);
            let r = f(&mut c, e, now);
            store_back(e, &c);
            r
        })
    }

    pub(crate) fn admit(&self) -> (Result<Pass, Refusal>, Option<Transition>) {
        // A closed breaker is only read.
        let quick = self.store.read_breaker(&self.name, |e| {
            let c = circuit_of(e);
            matches!(c.state(), CircuitState::Closed | CircuitState::Disabled).then_some(Pass {
                generation: c.generation,
                probe: false,
            })
        });
        if let Some(pass) = quick {
            return (Ok(pass), None);
        }
        let rules = self.rules;
        self.update(|c, e, now| {
            let r = c.admit(&rules, now);
            if let Ok(pass) = r.0 {
                if pass.probe {
                    store_back(e, c);
                    e.probes.push(ProbeHolder {
                        pid: pid(),
                        since: now / 1_000_000,
                    });
                }
            }
            r
        })
    }

    pub(crate) fn book(&self, pass: Pass, failure: bool) -> Option<Transition> {
        if !failure && !pass.probe {
            // A success with nothing to clear is only read.
            let nothing = self.store.read_breaker(&self.name, |e| {
                e.generation != pass.generation || e.failures == 0
            });
            if nothing {
                return None;
            }
        }
        let rules = self.rules;
        self.update(|c, e, now| {
            if pass.probe && pass.generation == e.generation {
                remove_holder(e, pid());
            }
            if failure {
                c.fail(&rules, pass, now)
            } else {
                c.succeed(&rules, pass)
            }
        })
    }

    pub(crate) fn release(&self, pass: Pass) {
        self.update(|c, e, _| {
            if pass.generation == e.generation {
                remove_holder(e, pid());
            }
            c.release(pass);
        });
    }

    pub(crate) fn hold_open(&self, d: Duration) -> Option<Transition> {
        self.update(|c, _, now| c.hold_open(now, d))
    }

    pub(crate) fn force(&self, to: CircuitState) -> Transition {
        let rules = self.rules;
        self.update(|c, _, now| c.force(to, now, &rules))
    }

    pub(crate) fn circuit(&self) -> (Circuit, Nanos) {
        (self.store.read_breaker(&self.name, circuit_of), unix_now())
    }
}
