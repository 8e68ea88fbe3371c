//! The breaker's state machine: plain data and plain functions of it and
//! of `now`.
//!
//! Every backend runs these same functions. The memory backend keeps one
//! [`Circuit`] behind a mutex (and mirrors the few fields its lock-free
//! reads need, see `state`); the file backend keeps one per breaker name
//! in the state file and runs them under the file lock. So the same
//! configuration admits the same calls wherever the state lives.
//!
//! Time is plain nanoseconds on the backend's clock: tokio's clock since
//! the layer was built in memory, the Unix epoch in a state file.

use std::time::Duration;

use super::CircuitState;
use crate::backoff::Backoff;
use crate::clock::{nanos, Nanos};

/// What the transitions need to know of the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rules {
    pub(crate) failure_threshold: u32,
    pub(crate) success_threshold: u32,
    pub(crate) half_open_max_calls: u32,
    pub(crate) open_timeout: Duration,
    pub(crate) open_backoff: Option<Backoff>,
}

/// Why the breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Failures while closed (consecutive, or a window's rate).
    Failures,
    /// A half-open probe failed.
    ProbeFailed,
    /// An upstream's back-off hint, or the handle's `hold_open`.
    RetryAfter,
    /// The handle moved it, or a fleet's view did.
    Steered,
}

/// A state change, for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
    /// When opening: for how long.
    pub(crate) open_for: Option<Duration>,
    pub(crate) cause: Cause,
}

/// A call let through: the generation it belongs to and whether it holds
/// a half-open probe slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    pub(crate) generation: u64,
    pub(crate) probe: bool,
}

/// A call turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) state: CircuitState,
    /// Time until the next probe, when known.
    pub(crate) retry_after: Option<Duration>,
}

/// One breaker's state.
///
/// # Generations
///
/// `generation` grows by one on every transition and never goes back, so
/// a call's result is booked only in the generation it was admitted in: a
/// slow call that started before the breaker opened cannot close it, and
/// one that started before a reset cannot count against the fresh count.
/// It is a `u64` and the memory backend publishes it in 61 bits (see
/// `state`): each transition takes a lock and does some work, well over a
/// nanosecond, so reaching 2^61 transitions would take over 70 years of
/// nothing but transitions at a billion a second. No history a process
/// can reach wraps it, so two generations of one breaker never compare
/// equal. Nothing outside one breaker ever holds its generations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Circuit {
    pub(crate) state: CircuitState,
    pub(crate) generation: u64,
    /// Closed: consecutive failures.
    pub(crate) failures: u32,
    /// Half-open: probes in flight.
    pub(crate) probes: u32,
    /// Half-open: probe successes.
    pub(crate) successes: u32,
    /// Open: when the open period ends.
    pub(crate) open_until: Nanos,
    /// Open periods in a row without a recovery, for `open_backoff`.
    pub(crate) opens_in_row: u32,
}

impl Circuit {
    pub(crate) fn state(&self) -> CircuitState {
        self.state
    }

    /// The state as a caller would see it at `now`: an open breaker whose
    /// period has passed reports half-open (the next call probes).
    pub(crate) fn state_at(&self, now: Nanos) -> CircuitState {
        match self.state() {
            CircuitState::Open if now >= self.open_until => CircuitState::HalfOpen,
            s => s,
        }
    }

    /// Time left in the open period, if open and not yet over.
    pub(crate) fn open_remaining(&self, now: Nanos) -> Option<Duration> {
        (self.state() == CircuitState::Open && now < self.open_until)
            .then(|| Duration::from_nanos(self.open_until - now))
    }

    /// Admits a call or says why not. An open breaker whose period has
    /// passed moves to half-open and admits this call as its first probe.
    pub(crate) fn admit(
        &mut self,
        rules: &Rules,
        now: Nanos,
    ) -> (Result<Pass, Refusal>, Option<Transition>) {
        let pass = |c: &Self, probe| Pass {
            generation: c.generation,
            probe,
        };
        match self.state() {
            CircuitState::Closed | CircuitState::Disabled => (Ok(pass(self, false)), None),
            CircuitState::ForcedOpen => (
                Err(Refusal {
                    state: CircuitState::ForcedOpen,
                    retry_after: None,
                }),
                None,
            ),
            CircuitState::Open => match self.open_remaining(now) {
                Some(left) => (
                    Err(Refusal {
                        state: CircuitState::Open,
                        retry_after: Some(left),
                    }),
                    None,
                ),
                None => {
                    let t = self.enter(CircuitState::HalfOpen, Cause::Failures, None);
                    self.probes = 1;
                    (Ok(pass(self, true)), Some(t))
                }
            },
            CircuitState::HalfOpen => {
                if self.probes >= rules.half_open_max_calls {
                    return (
                        Err(Refusal {
                            state: CircuitState::HalfOpen,
                            retry_after: None,
                        }),
                        None,
                    );
                }
                self.probes += 1;
                (Ok(pass(self, true)), None)
            }
        }
    }

    /// Books a success of a call admitted as `pass`.
    pub(crate) fn succeed(&mut self, rules: &Rules, pass: Pass) -> Option<Transition> {
        if pass.generation != self.generation {
            return None; // the breaker moved on while the call ran
        }
        match (self.state(), pass.probe) {
            (CircuitState::Closed, false) => {
                self.failures = 0;
                None
            }
            (CircuitState::HalfOpen, true) => {
                self.probes = self.probes.saturating_sub(1);
                self.successes += 1;
                if self.successes < rules.success_threshold {
                    return None;
                }
                self.opens_in_row = 0;
                Some(self.enter(CircuitState::Closed, Cause::Failures, None))
            }
            _ => None,
        }
    }

    /// Books a failure of a call admitted as `pass`: counts it when closed
    /// and opens at the threshold; a failed probe opens at once.
    pub(crate) fn fail(&mut self, rules: &Rules, pass: Pass, now: Nanos) -> Option<Transition> {
        if pass.generation != self.generation {
            return None;
        }
        match (self.state(), pass.probe) {
            (CircuitState::Closed, false) => {
                self.failures = self.failures.saturating_add(1);
                (self.failures >= rules.failure_threshold)
                    .then(|| self.open(rules, now, Cause::Failures))
            }
            (CircuitState::HalfOpen, true) => Some(self.open(rules, now, Cause::ProbeFailed)),
            _ => None,
        }
    }

    /// Opens a closed breaker of generation `pass.generation` (a window's
    /// failure rate tripped it).
    pub(crate) fn trip(&mut self, rules: &Rules, pass: Pass, now: Nanos) -> Option<Transition> {
        (pass.generation == self.generation && self.state() == CircuitState::Closed)
            .then(|| self.open(rules, now, Cause::Failures))
    }

    /// Gives back the probe slot of a call that ended without a verdict
    /// (dropped, panicked, or classified `Ignore`).
    pub(crate) fn release(&mut self, pass: Pass) {
        if pass.probe
            && pass.generation == self.generation
            && self.state() == CircuitState::HalfOpen
        {
            self.probes = self.probes.saturating_sub(1);
        }
    }

    /// Holds the breaker open for at least `d` from `now`. Never shortens
    /// a longer open period; a forced or disabled breaker stays as it is.
    pub(crate) fn hold_open(&mut self, now: Nanos, d: Duration) -> Option<Transition> {
        let until = now.saturating_add(nanos(d));
        match self.state() {
            CircuitState::ForcedOpen | CircuitState::Disabled => None,
            CircuitState::Open if self.open_until >= until => None,
            CircuitState::Open => {
                // Same open period, longer: no new generation is needed,
                // but a straggler of it gains nothing either way.
                self.open_until = until;
                None
            }
            _ => Some(self.enter(CircuitState::Open, Cause::RetryAfter, Some((now, d)))),
        }
    }

    /// Moves to `to` from any state (the handle, or a fleet's view).
    pub(crate) fn force(&mut self, to: CircuitState, now: Nanos, rules: &Rules) -> Transition {
        if to == CircuitState::Closed {
            self.opens_in_row = 0;
        }
        let open = (to == CircuitState::Open).then_some((now, rules.open_timeout));
        self.enter(to, Cause::Steered, open)
    }

    fn open(&mut self, rules: &Rules, now: Nanos, cause: Cause) -> Transition {
        self.opens_in_row = self.opens_in_row.saturating_add(1);
        let d = match &rules.open_backoff {
            None => rules.open_timeout,
            Some(b) => b.jittered(self.opens_in_row, Duration::ZERO, &mut fastrand::Rng::new()),
        };
        self.enter(CircuitState::Open, cause, Some((now, d)))
    }

    /// Starts the next generation in `to`, counts cleared.
    fn enter(
        &mut self,
        to: CircuitState,
        cause: Cause,
        open: Option<(Nanos, Duration)>,
    ) -> Transition {
        let from = self.state();
        self.state = to;
        self.generation += 1;
        self.failures = 0;
        self.probes = 0;
        self.successes = 0;
        self.open_until = open.map_or(0, |(now, d)| now.saturating_add(nanos(d)));
        Transition {
            from,
            to,
            open_for: open.map(|(_, d)| d),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules {
            failure_threshold: 2,
            success_threshold: 2,
            half_open_max_calls: 2,
            open_timeout: S,
            open_backoff: None,
        }
    }

    fn pass(c: &mut Circuit, now: Nanos) -> Pass {
        c.admit(&rules(), now).0.unwrap()
    }

    #[test]
    fn closes_after_probe_successes_and_ignores_stragglers() {
        let r = rules();
        let mut c = Circuit::default();
        let early = pass(&mut c, 0);
        let p = pass(&mut c, 0);
        assert_eq!(c.fail(&r, p, 0), None);
        let p = pass(&mut c, 0);
        let t = c.fail(&r, p, 0).unwrap();
        assert_eq!(
            (t.from, t.to, t.open_for),
            (CircuitState::Closed, CircuitState::Open, Some(S))
        );
        assert_eq!(
            c.admit(&r, 10).0.unwrap_err().retry_after,
            Some(S - Duration::from_nanos(10))
        );
        // A call admitted before the opening cannot close it.
        assert_eq!(c.succeed(&r, early), None);
        let now = nanos(S);
        let (p1, t) = c.admit(&r, now);
        assert_eq!(t.unwrap().to, CircuitState::HalfOpen);
        let p1 = p1.unwrap();
        let p2 = pass(&mut c, now);
        assert_eq!(
            c.admit(&r, now).0.unwrap_err().state,
            CircuitState::HalfOpen
        );
        assert_eq!(c.succeed(&r, p1), None);
        assert_eq!(c.succeed(&r, p2).unwrap().to, CircuitState::Closed);
        assert_eq!((c.failures, c.probes, c.successes), (0, 0, 0));
    }

    #[test]
    fn hold_open_never_shortens() {
        let mut c = Circuit::default();
        assert!(c.hold_open(0, 5 * S).is_some());
        assert!(c.hold_open(0, 2 * S).is_none());
        assert_eq!(c.open_remaining(0), Some(5 * S));
        c.hold_open(0, 9 * S);
        assert_eq!(c.open_remaining(0), Some(9 * S));
        assert_eq!(c.state_at(nanos(9 * S)), CircuitState::HalfOpen);
    }
}
