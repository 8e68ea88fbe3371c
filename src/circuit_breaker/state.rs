//! The breaker's shared state machine.
//!
//! Everything here is a function of the stored state and `now`; the
//! service and future only call in. The closed, consecutive-failure path
//! touches a single atomic word with no clock read and no lock.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::window::{Recorder, Totals, Window};
use super::word::{pack_deadline, unpack_deadline, Word};
use super::{CircuitEvent, CircuitOpen, CircuitState};
use crate::backoff::Backoff;
use crate::clock::{nanos, Clock, Nanos};
use crate::observe::{gauge, Listeners};

const MS: u64 = 1_000_000;

/// Immutable settings, validated by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) failure_threshold: u16,
    pub(crate) open_timeout: Duration,
    pub(crate) open_backoff: Option<Backoff>,
    pub(crate) half_open_max_calls: u16,
    pub(crate) success_threshold: u16,
    pub(crate) window: Option<Window>,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) minimum_calls: u32,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) honor_retry_after: bool,
}

/// A call's admission: which generation it belongs to and whether it holds
/// a half-open probe slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) gen: u32,
    pub(crate) probe: bool,
}

/// Why a transition happened; carried by events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Failures,
    ProbeFailed,
    RetryAfter,
}

#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) cfg: Config,
    word: AtomicU64,
    /// The open deadline, tagged with its generation (see `pack_deadline`).
    deadline: AtomicU64,
    /// Consecutive open periods without a successful recovery, for the
    /// optional open-duration back-off.
    opens_in_row: AtomicU32,
    window: Option<Mutex<Recorder>>,
    failures_total: AtomicU64,
    rejected_total: AtomicU64,
    pub(crate) clock: Clock,
    pub(crate) listeners: Listeners<CircuitEvent>,
}

impl Core {
    pub(crate) fn new(cfg: Config, listeners: Listeners<CircuitEvent>) -> Self {
        let core = Self {
            window: cfg.window.map(|w| Mutex::new(Recorder::new(w))),
            cfg,
            word: AtomicU64::new(Word::new(CircuitState::Closed, 0, 0, 0).0),
            deadline: AtomicU64::new(0),
            opens_in_row: AtomicU32::new(0),
            failures_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            clock: Clock::new(),
            listeners,
        };
        gauge("bulwark_circuit_state", &core.cfg.name, 0.0);
        core
    }

    #[inline]
    fn load(&self) -> Word {
        Word(self.word.load(Acquire))
    }

    #[inline]
    fn cas(&self, old: Word, new: Word) -> Result<(), Word> {
        self.word
            .compare_exchange_weak(old.0, new.0, AcqRel, Acquire)
            .map(|_| ())
            .map_err(Word)
    }

    /// Whether calls need their duration measured.
    pub(crate) fn needs_elapsed(&self) -> bool {
        self.cfg.slow_call_duration.is_some()
    }

    /// Admits a call or says why not.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Result<Ticket, CircuitOpen> {
        let mut w = self.load();
        loop {
            match w.state() {
                CircuitState::Closed | CircuitState::Disabled => {
                    return Ok(Ticket {
                        gen: w.gen(),
                        probe: false,
                    })
                }
                CircuitState::Open => {
                    let now = self.clock.now();
                    match self.open_remaining(w, now) {
                        Some(left) => return Err(self.reject(CircuitState::Open, Some(left))),
                        None => {
                            // The timeout has passed: exactly one caller moves
                            // the breaker to half-open and takes the first slot.
                            let next = w.next(CircuitState::HalfOpen).with_a(1);
                            match self.cas(w, next) {
                                Ok(()) => {
                                    self.changed(CircuitState::Open, CircuitState::HalfOpen, None);
                                    return Ok(Ticket {
                                        gen: next.gen(),
                                        probe: true,
                                    });
                                }
                                Err(cur) => w = cur,
                            }
                        }
                    }
                }
                CircuitState::HalfOpen => {
                    if w.a() >= self.cfg.half_open_max_calls {
                        return Err(self.reject(CircuitState::HalfOpen, None));
                    }
                    match self.cas(w, w.with_a(w.a() + 1)) {
                        Ok(()) => {
                            return Ok(Ticket {
                                gen: w.gen(),
                                probe: true,
                            })
                        }
                        Err(cur) => w = cur,
                    }
                }
                CircuitState::ForcedOpen => {
                    return Err(self.reject(CircuitState::ForcedOpen, None));
                }
            }
        }
    }

    /// Time left in an open word, `None` once the deadline has passed.
    fn open_remaining(&self, w: Word, now: Nanos) -> Option<Duration> {
        match unpack_deadline(self.deadline.load(Acquire), w.gen()) {
            Some(until_ms) => {
                let until = until_ms.saturating_mul(MS);
                (now < until).then(|| Duration::from_nanos(until - now))
            }
            // The opener has not published the deadline yet: it just opened.
            None => Some(self.cfg.open_timeout),
        }
    }

    #[cold]
    fn reject(&self, state: CircuitState, retry_after: Option<Duration>) -> CircuitOpen {
        self.rejected_total.fetch_add(1, Relaxed);
        let err = CircuitOpen::new(self.cfg.name.clone(), state, retry_after);
        self.listeners.emit(&CircuitEvent::Rejected {
            name: self.cfg.name.clone(),
            state,
            retry_after,
        });
        err
    }

    /// Records a finished call. `slow` is set when the call exceeded the
    /// slow-call duration.
    #[inline]
    pub(crate) fn record(&self, t: Ticket, failure: bool, slow: bool) {
        if t.probe {
            return self.record_probe(t, failure || slow);
        }
        if failure {
            self.failures_total.fetch_add(1, Relaxed);
        }
        if self.window.is_some() {
            return self.record_window(t, failure, slow);
        }
        let failure = failure || slow;
        let mut w = self.load();
        loop {
            if w.gen() != t.gen || !w.is_closed() {
                return; // stale result, or disabled
            }
            let next = if failure {
                let n = w.a().saturating_add(1);
                if n >= self.cfg.failure_threshold {
                    return self.open_from(w, Cause::Failures);
                }
                w.with_a(n)
            } else if w.a() == 0 {
                return; // the common case: nothing to write
            } else {
                w.with_a(0)
            };
            match self.cas(w, next) {
                Ok(()) => return,
                Err(cur) => w = cur,
            }
        }
    }

    #[cold]
    fn record_window(&self, t: Ticket, failure: bool, slow: bool) {
        let Some(window) = &self.window else { return };
        let now = self.clock.now();
        let mut rec = window.lock().unwrap_or_else(|e| e.into_inner());
        let w = self.load();
        if w.gen() != t.gen || !w.is_closed() {
            return;
        }
        let totals = rec.record(failure, slow, now);
        if self.trips(totals) {
            rec.clear();
            drop(rec);
            self.open_from(w, Cause::Failures);
        }
    }

    fn trips(&self, t: Totals) -> bool {
        t.calls >= self.cfg.minimum_calls
            && (t.failures > 0 && t.failure_rate() >= self.cfg.failure_rate_threshold
                || self.cfg.slow_call_duration.is_some()
                    && t.slow > 0
                    && t.slow_rate() >= self.cfg.slow_call_rate_threshold)
    }

    fn record_probe(&self, t: Ticket, failure: bool) {
        let mut w = self.load();
        loop {
            if w.gen() != t.gen || w.state() != CircuitState::HalfOpen {
                return;
            }
            if failure {
                return self.open_from(w, Cause::ProbeFailed);
            }
            let successes = w.b() + 1;
            if successes >= self.cfg.success_threshold {
                match self.cas(w, w.next(CircuitState::Closed)) {
                    Ok(()) => {
                        self.opens_in_row.store(0, Relaxed);
                        if let Some(window) = &self.window {
                            window.lock().unwrap_or_else(|e| e.into_inner()).clear();
                        }
                        return self.changed(CircuitState::HalfOpen, CircuitState::Closed, None);
                    }
                    Err(cur) => w = cur,
                }
            } else {
                match self.cas(w, w.with_a(w.a().saturating_sub(1)).with_b(successes)) {
                    Ok(()) => return,
                    Err(cur) => w = cur,
                }
            }
        }
    }

    /// Gives back a probe slot whose call ended without a verdict (dropped,
    /// panicked, or classified `Ignore`).
    pub(crate) fn release_probe(&self, t: Ticket) {
        let mut w = self.load();
        while w.gen() == t.gen && w.state() == CircuitState::HalfOpen && w.a() > 0 {
            match self.cas(w, w.with_a(w.a() - 1)) {
                Ok(()) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Opens the breaker from word `w` (closed or half-open). Only the
    /// caller whose CAS wins publishes the deadline and the event.
    fn open_from(&self, mut w: Word, cause: Cause) {
        loop {
            let from = w.state();
            let next = w.next(CircuitState::Open);
            match self.cas(w, next) {
                Ok(()) => {
                    let n = self.opens_in_row.fetch_add(1, Relaxed) + 1;
                    let d = self.open_duration(n);
                    self.publish_deadline(next.gen(), d);
                    return self.changed(from, CircuitState::Open, Some((cause, d)));
                }
                Err(cur) => {
                    if cur.gen() != w.gen() {
                        return; // someone else moved it on
                    }
                    w = cur; // only the counts changed: try again
                }
            }
        }
    }

    fn open_duration(&self, opens_in_row: u32) -> Duration {
        match &self.cfg.open_backoff {
            None => self.cfg.open_timeout,
            Some(b) => b.jittered(opens_in_row, Duration::ZERO, &mut fastrand::Rng::new()),
        }
    }

    fn publish_deadline(&self, gen: u32, d: Duration) {
        let now = self.clock.now();
        let until_ms = now.saturating_add(nanos(d)).div_ceil(MS);
        self.deadline.store(pack_deadline(gen, until_ms), Release);
    }

    /// Holds the breaker open for at least `d` from now (an upstream's
    /// `Retry-After`, or the handle). Never shortens a longer open period.
    pub(crate) fn hold_open(&self, d: Duration) {
        let now = self.clock.now();
        let mut w = self.load();
        loop {
            match w.state() {
                CircuitState::ForcedOpen | CircuitState::Disabled => return,
                CircuitState::Open => {
                    if let Some(left) = self.open_remaining(w, now) {
                        if left >= d {
                            return;
                        }
                    }
                }
                _ => {}
            }
            let from = w.state();
            let next = w.next(CircuitState::Open);
            match self.cas(w, next) {
                Ok(()) => {
                    self.publish_deadline(next.gen(), d);
                    let to = CircuitState::Open;
                    return self.changed(from, to, Some((Cause::RetryAfter, d)));
                }
                Err(cur) => w = cur,
            }
        }
    }

    /// Moves to `to` from any state (handle operations).
    pub(crate) fn force(&self, to: CircuitState) {
        let mut w = self.load();
        loop {
            match self.cas(w, w.next(to)) {
                Ok(()) => break,
                Err(cur) => w = cur,
            }
        }
        if to == CircuitState::Closed {
            self.opens_in_row.store(0, Relaxed);
            if let Some(window) = &self.window {
                window.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
        }
        self.changed(w.state(), to, None);
    }

    fn changed(&self, from: CircuitState, to: CircuitState, why: Option<(Cause, Duration)>) {
        gauge("bulwark_circuit_state", &self.cfg.name, to.gauge_value());
        self.listeners.emit(&CircuitEvent::StateChanged {
            name: self.cfg.name.clone(),
            from,
            to,
            open_for: why.map(|(_, d)| d),
            retry_after_hint: matches!(why, Some((Cause::RetryAfter, _))),
        });
    }

    /// The state as a caller would see it now: an open breaker whose
    /// timeout has passed reports half-open (the next call probes).
    pub(crate) fn state(&self) -> CircuitState {
        let w = self.load();
        if w.state() == CircuitState::Open && self.open_remaining(w, self.clock.now()).is_none() {
            return CircuitState::HalfOpen;
        }
        w.state()
    }

    pub(crate) fn snapshot(&self) -> super::CircuitMetrics {
        let w = self.load();
        let now = self.clock.now();
        let totals = self
            .window
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).totals(now));
        super::CircuitMetrics {
            state: self.state(),
            consecutive_failures: if w.is_closed() && self.window.is_none() {
                u32::from(w.a())
            } else {
                0
            },
            half_open_in_flight: if w.state() == CircuitState::HalfOpen {
                u32::from(w.a())
            } else {
                0
            },
            window_calls: totals.map_or(0, |t| t.calls),
            failure_rate: totals.filter(|t| t.calls > 0).map(|t| t.failure_rate()),
            slow_call_rate: totals.filter(|t| t.calls > 0).map(|t| t.slow_rate()),
            failures_total: self.failures_total.load(Relaxed),
            rejected_total: self.rejected_total.load(Relaxed),
            open_remaining: if w.state() == CircuitState::Open {
                self.open_remaining(w, now)
            } else {
                None
            },
        }
    }
}
