//! A breaker whose state lives in a state file, shared by every process
//! that uses the file. Each breaker name has its own entry; every process
//! runs the same transitions ([`Circuit`]) over it under the file lock.
//!
//! While the file cannot be used the store's degrade policy applies: the
//! same transitions run over this process's local state
//! (`FailOpenToLocal`), or every call is rejected as if the breaker were
//! open (`FailClosed`).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use super::backend::Attached;
use super::circuit::{Circuit, Pass, Refusal, Rules, Transition};
use super::state::{Admission, Core, Source};
use super::CircuitState;
use crate::clock::Nanos;
use crate::store::file::{
    alive, me, BreakerEntry, FileStore, LockWait, ProbeHolder, State, Unavailable,
};
use crate::store::unix_ms;

#[derive(Debug)]
pub(crate) struct FileBreaker {
    pub(crate) store: FileStore,
    pub(crate) name: String,
    pub(crate) rules: Rules,
    pub(crate) stale_attempt_timeout: Duration,
    /// The state as this process last read it, and the end of its open
    /// period: a hint that spares `poll_ready` a read of the file while
    /// the breaker is closed or still open. Only a hint: `call` reads the
    /// file (and refreshes it) whatever it says.
    pub(crate) seen: Seen,
}

/// See [`FileBreaker::seen`].
#[derive(Debug)]
pub(crate) struct Seen {
    state: AtomicU8,
    open_until: AtomicU64,
}

impl Default for Seen {
    /// Nothing seen yet: the first readiness reads the file.
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CircuitState::HalfOpen.code()),
            open_until: AtomicU64::new(0),
        }
    }
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

    /// The admission decided from a read without the lock: a closed
    /// breaker's pass, and the rejections of an open one whose period is
    /// still running, of a forced-open one, and of a half-open one whose
    /// probes are all out (held by live processes, none stale). `None`
    /// when only the locked round can decide: a probe may be free.
    pub(crate) fn quick(&self) -> Option<Result<Pass, Refusal>> {
        let now = unix_now();
        let (max_probes, stale_ms) = (self.rules.half_open_max_calls, self.stale_ms());
        let quick = self.read(|e| {
            let c = circuit_of(e);
            self.seen.state.store(c.state().code(), Relaxed);
            self.seen.open_until.store(c.open_until, Relaxed);
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
                CircuitState::HalfOpen => {
                    let now_ms = now / 1_000_000;
                    let held = e
                        .probes
                        .iter()
                        .filter(|h| {
                            now_ms.saturating_sub(h.since) < stale_ms && alive(h.pid, h.start)
                        })
                        .count();
                    (u32::try_from(held).unwrap_or(u32::MAX) >= max_probes).then_some(Err(
                        Refusal {
                            state: CircuitState::HalfOpen,
                            retry_after: None,
                        },
                    ))
                }
            }
        });
        quick.flatten()
    }

    /// The locked part of an admission: the move to half-open and the
    /// probe, with this process recorded as the probe's holder.
    fn admit_locked(
        rules: Rules,
        c: &mut Circuit,
        e: &mut BreakerEntry,
        now: Nanos,
    ) -> (Result<Pass, Refusal>, Option<Transition>) {
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
    }

    /// Whether, as this process last read the file, the next call cannot
    /// be a probe: the breaker was closed, disabled, forced open, or open
    /// with its period still running. Reads no file.
    pub(crate) fn no_probe_due(&self) -> bool {
        match CircuitState::from_code(self.seen.state.load(Relaxed)) {
            Some(CircuitState::Closed | CircuitState::Disabled | CircuitState::ForcedOpen) => true,
            Some(CircuitState::Open) => unix_now() < self.seen.open_until.load(Relaxed),
            _ => false,
        }
    }

    /// Whether the file still counts probe `pass` as held by this process:
    /// its generation is current and a probe of this process is recorded.
    fn holds(&self, pass: Pass) -> bool {
        let me = me();
        let held = self
            .read(|e| e.generation == pass.generation && e.probes.iter().any(|h| h.pid == me.pid));
        held == Some(true)
    }

    /// Admits a call without ever waiting for the lock: when a probe may
    /// be free and a peer holds the lock right now, the call is rejected
    /// as the half-open breaker rejects calls beyond its probes. (The
    /// breaker's service waits for the lock in `poll_ready` instead, with
    /// [`poll_probe`](Self::poll_probe); this is for a call whose
    /// readiness found nothing to reserve.)
    pub(crate) fn admit_now(&self) -> (Result<Pass, Refusal>, Option<Transition>) {
        if let Some(verdict) = self.quick() {
            return (verdict, None);
        }
        let (name, stale_ms, now, rules) = (&self.name, self.stale_ms(), unix_now(), self.rules);
        let busy = (
            Err(Refusal {
                state: CircuitState::HalfOpen,
                retry_after: None,
            }),
            None,
        );
        match self.store.try_round(|s| {
            run(s, name, stale_ms, now, |c, e, now| {
                Self::admit_locked(rules, c, e, now)
            })
        }) {
            Ok(r) => r.unwrap_or((Err(UNAVAILABLE), None)),
            Err(_) => busy,
        }
    }

    /// The locked admission as a poll, waiting for a peer's lock with
    /// tokio timers (`wait` keeps the wait between polls).
    pub(crate) fn poll_probe(
        &self,
        wait: &mut Option<LockWait>,
        cx: &mut Context<'_>,
    ) -> Poll<(Result<Pass, Refusal>, Option<Transition>)> {
        let (name, stale_ms, rules) = (&self.name, self.stale_ms(), self.rules);
        let r = ready!(self.store.poll_round(wait, cx, |s| {
            run(s, name, stale_ms, unix_now(), |c, e, now| {
                Self::admit_locked(rules, c, e, now)
            })
        }));
        Poll::Ready(r.unwrap_or((Err(UNAVAILABLE), None)))
    }

    /// Books a result. The caller does not wait for a peer's lock: the
    /// booking runs now if the lock is free, else off the caller's thread,
    /// and `then` gets the transition it caused, if any.
    pub(crate) fn book(
        &self,
        pass: Pass,
        failure: bool,
        then: impl FnOnce(Option<Transition>) + Send + 'static,
    ) {
        if !failure && !pass.probe {
            // A success with nothing to clear is only read.
            let nothing = self.read(|e| e.generation != pass.generation || e.failures == 0);
            if nothing == Some(true) {
                return;
            }
        }
        let (name, stale_ms, rules) = (self.name.clone(), self.stale_ms(), self.rules);
        let now = unix_now();
        self.store.round_then(
            move |s| {
                run(s, &name, stale_ms, now, |c, e, now| {
                    if pass.probe && pass.generation == e.generation {
                        remove_holder(e);
                    }
                    if failure {
                        c.fail(&rules, pass, now)
                    } else {
                        c.succeed(&rules, pass)
                    }
                })
            },
            move |r| then(r.unwrap_or(None)),
        );
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

    /// Holds the breaker open (see [`book`](Self::book) for `then`).
    pub(crate) fn hold_open(
        &self,
        d: Duration,
        then: impl FnOnce(Option<Transition>) + Send + 'static,
    ) {
        let (name, stale_ms, now) = (self.name.clone(), self.stale_ms(), unix_now());
        self.store.round_then(
            move |s| run(s, &name, stale_ms, now, |c, _, now| c.hold_open(now, d)),
            move |r| then(r.unwrap_or(None)),
        );
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

/// A half-open probe taken in `poll_ready` for the service's next call,
/// and the wait for the file lock that takes it.
///
/// Invariant: a probe recorded in the file for this service is held by
/// exactly one owner at a time: by `probe` until `call` takes it, then
/// by that call's admission. Whoever holds it when dropped gives it back
/// (the admission's guard), so a service dropped between `poll_ready`
/// and `call` leaks nothing. A wait dropped midway holds nothing: the
/// lock is only held within one poll.
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    wait: Option<LockWait>,
    probe: Option<Admission<Arc<Core>>>,
}

impl Reserve {
    /// Takes a probe for the next call if the breaker is file-backed and a
    /// probe may be free, waiting for a peer's lock with tokio timers.
    /// Ready with nothing reserved when no probe is needed (a closed
    /// breaker, an open one) or none is free: `call` then decides alone.
    ///
    /// While this process last saw the breaker closed or still open, the
    /// file is not read at all: the closed path costs no more than before.
    /// If a peer moved it meanwhile, that call finds out (see
    /// `FileBreaker::admit_now`) and the next readiness reserves.
    #[inline]
    pub(crate) fn poll(&mut self, core: &Arc<Core>, cx: &mut Context<'_>) -> Poll<()> {
        match &core.attached {
            Attached::File(f) => self.poll_file(f, core, cx),
            _ => Poll::Ready(()),
        }
    }

    #[inline(never)]
    fn poll_file(&mut self, f: &FileBreaker, core: &Arc<Core>, cx: &mut Context<'_>) -> Poll<()> {
        if self.probe.is_some() || self.wait.is_none() && (f.no_probe_due() || f.quick().is_some())
        {
            return Poll::Ready(());
        }
        let (verdict, transition) = ready!(f.poll_probe(&mut self.wait, cx));
        if let Ok(pass) = verdict {
            if pass.probe {
                // The probe is the reservation's before any listener runs.
                self.probe = Some(Admission::granted(core.clone(), pass));
            }
        }
        if let Some(t) = transition {
            core.changed(t, Source::Local);
        }
        Poll::Ready(())
    }

    /// Whether a probe is reserved.
    #[inline]
    pub(crate) fn holds_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// The reserved probe, for the call about to be made, if it still
    /// stands: a reservation kept by an idle service may have outlived its
    /// generation (the breaker reopened meanwhile) or been reclaimed as
    /// stale, and must not let a call through. Such a one is dropped (it
    /// gives back nothing the file still counts) and the call is admitted
    /// afresh.
    #[inline]
    pub(crate) fn take(&mut self, core: &Core) -> Option<Admission<Arc<Core>>> {
        let probe = self.probe.take()?;
        match &core.attached {
            Attached::File(f) if f.holds(probe.pass()) => Some(probe),
            _ => None,
        }
    }
}
