//! The breaker's shared state machine.
//!
//! Everything here is a function of the stored state and `now`; the
//! service and future only call in. The closed, consecutive-failure path
//! touches a single atomic word with no clock read and no lock.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::window::{Recorder, Totals, Window};
use super::word::{deadline_is_newer, pack_deadline, unpack_deadline, Word};
use super::{CircuitEvent, CircuitOpen, CircuitState};
use crate::backoff::Backoff;
use crate::clock::{nanos, Clock, Nanos};
use crate::observe::{gauge, Listeners};
use crate::sync::{AtomicU32, AtomicU64};

use super::backend::Remote;
use crate::slot::{Lease, Slot};

const US: u64 = 1_000;

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
    /// The hot word lives in a type-stable slot (see `crate::slot`), so a
    /// closed call's future can reach it without a reference count.
    pub(crate) lease: Lease,
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
    /// Where the state is shared, if anywhere (see `backend`).
    pub(crate) remote: Remote,
}

impl Core {
    /// A breaker whose slot knows its way back to it.
    #[allow(dead_code)]
    pub(crate) fn new_shared(cfg: Config, listeners: Listeners<CircuitEvent>) -> Arc<Self> {
        Self::new_shared_with(cfg, listeners, Remote::None)
    }

    /// The same, with the state shared through `remote`.
    pub(crate) fn new_shared_with(
        cfg: Config,
        listeners: Listeners<CircuitEvent>,
        remote: Remote,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| {
            let mut core = Self::new(cfg, listeners, weak.clone());
            core.remote = remote;
            core
        })
    }

    pub(crate) fn new(
        cfg: Config,
        listeners: Listeners<CircuitEvent>,
        owner: std::sync::Weak<Core>,
    ) -> Self {
        // A reused slot's generation jumps far ahead, so a straggling call
        // of the slot's previous breaker finds a generation not its own.
        let lease = Lease::new(owner, |old| {
            Word::new(
                CircuitState::Closed,
                Word(old).gen().wrapping_add(1 << 28),
                0,
                0,
            )
            .0
        });
        let core = Self {
            window: cfg.window.map(|w| Mutex::new(Recorder::new(w))),
            cfg,
            lease,
            deadline: AtomicU64::new(0),
            opens_in_row: AtomicU32::new(0),
            failures_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            clock: Clock::new(),
            listeners,
            remote: Remote::None,
        };
        gauge("bulwark_circuit_state", &core.cfg.name, 0.0);
        core
    }

    #[inline]
    pub(crate) fn slot(&self) -> &'static Slot {
        self.lease.slot()
    }

    #[inline]
    fn load(&self) -> Word {
        Word(self.slot().word.load(Acquire))
    }

    #[inline]
    fn cas(&self, old: Word, new: Word) -> Result<(), Word> {
        self.slot()
            .word
            .compare_exchange_weak(old.0, new.0, AcqRel, Acquire)
            .map(|_| ())
            .map_err(Word)
    }

    /// Whether calls need their duration measured.
    pub(crate) fn needs_elapsed(&self) -> bool {
        self.cfg.slow_call_duration.is_some()
    }

    /// Whether a closed-breaker call can finish through the slot alone:
    /// consecutive mode, nothing timed, no back-off hints to read.
    pub(crate) fn slot_path(&self) -> bool {
        self.window.is_none() && !self.needs_elapsed() && !self.cfg.honor_retry_after
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
            Some(until_us) => {
                let until = until_us.saturating_mul(US);
                (now < until).then(|| Duration::from_nanos(until - now))
            }
            // The opener has not published the deadline yet: it just opened.
            None => Some(self.cfg.open_timeout),
        }
    }

    #[cold]
    pub(crate) fn reject(&self, state: CircuitState, retry_after: Option<Duration>) -> CircuitOpen {
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
        // Only a time window needs the time.
        let now = match self.cfg.window {
            Some(Window::Time(_)) => self.clock.now(),
            _ => 0,
        };
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
        // Rounded down: `retry_after` never exceeds the configured time.
        let packed = pack_deadline(gen, now.saturating_add(nanos(d)) / US);
        // Only the opener of `gen` writes here, but it may be late: never
        // overwrite the deadline of a later generation.
        let mut cur = self.deadline.load(Acquire);
        while !deadline_is_newer(cur, gen) {
            match self
                .deadline
                .compare_exchange_weak(cur, packed, AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
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

    pub(crate) fn changed(
        &self,
        from: CircuitState,
        to: CircuitState,
        why: Option<(Cause, Duration)>,
    ) {
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

/// The generation of a closed breaker's slot word, `None` in any other
/// state: admission on the hot path.
#[inline]
pub(crate) fn closed_generation(slot: &Slot) -> Option<u32> {
    let w = Word(slot.word.load(Acquire));
    w.is_closed().then(|| w.gen())
}

/// Records a closed-generation success straight on a breaker's slot word:
/// clears the consecutive-failure count if there is one. Usually a single
/// load.
#[inline]
pub(crate) fn record_success(word: &AtomicU64, gen: u32) {
    let mut w = Word(word.load(Acquire));
    while w.gen() == gen && w.is_closed() && w.a() != 0 {
        match word.compare_exchange_weak(w.0, w.with_a(0).0, AcqRel, Acquire) {
            Ok(_) => return,
            Err(cur) => w = Word(cur),
        }
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use tokio::time::advance;

    use super::*;
    use crate::circuit_breaker::{CircuitBreakerBuilder, CircuitBreakerLayer};

    fn layer(b: CircuitBreakerBuilder) -> CircuitBreakerLayer {
        b.name("t").build().unwrap()
    }

    fn fail(core: &Core) {
        let t = core.try_acquire().unwrap();
        core.record(t, true, false);
    }

    fn succeed(core: &Core) {
        let t = core.try_acquire().unwrap();
        core.record(t, false, false);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_and_success_resets() {
        let l = layer(CircuitBreakerLayer::builder().failure_threshold(3));
        let core = &l.core;
        fail(core);
        fail(core);
        succeed(core); // resets the run
        fail(core);
        fail(core);
        assert_eq!(core.state(), CircuitState::Closed);
        fail(core);
        assert_eq!(core.state(), CircuitState::Open);
        let err = core.try_acquire().unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
        advance(Duration::from_secs(10)).await;
        let err = core.try_acquire().unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_limited_probes_and_closes() {
        let l = layer(
            CircuitBreakerLayer::builder()
                .failure_threshold(1)
                .half_open_max_calls(2)
                .success_threshold(2),
        );
        let core = &l.core;
        fail(core);
        advance(Duration::from_secs(30)).await;
        assert_eq!(core.state(), CircuitState::HalfOpen);
        let p1 = core.try_acquire().unwrap();
        let p2 = core.try_acquire().unwrap();
        assert!(p1.probe && p2.probe);
        let third = core.try_acquire().unwrap_err();
        assert_eq!(third.state(), CircuitState::HalfOpen);
        core.record(p1, false, false);
        assert_eq!(core.state(), CircuitState::HalfOpen);
        core.record(p2, false, false);
        assert_eq!(core.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_released_slot_is_reusable() {
        let l = layer(CircuitBreakerLayer::builder().failure_threshold(1));
        let core = &l.core;
        fail(core);
        advance(Duration::from_secs(30)).await;
        let p = core.try_acquire().unwrap();
        assert!(core.try_acquire().is_err());
        core.release_probe(p); // dropped: neither success nor failure
        let p = core.try_acquire().unwrap();
        core.record(p, true, false);
        assert_eq!(core.state(), CircuitState::Open);
        assert_eq!(
            core.snapshot().open_remaining,
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_generation_is_ignored() {
        let l = layer(CircuitBreakerLayer::builder().failure_threshold(1));
        let core = &l.core;
        let slow = core.try_acquire().unwrap(); // starts while closed
        fail(core); // opens
        advance(Duration::from_secs(30)).await;
        let probe = core.try_acquire().unwrap();
        // The slow call from the closed generation finishes now, badly: it
        // must not reopen the half-open breaker.
        core.record(slow, true, false);
        assert_eq!(core.load().state(), CircuitState::HalfOpen);
        core.record(probe, false, false);
        let again = core.try_acquire().unwrap();
        core.record(again, false, false);
        assert_eq!(core.state(), CircuitState::Closed);
        // And a success from an old generation cannot close an open breaker.
        let old = core.try_acquire().unwrap();
        fail(core);
        core.record(old, false, false);
        assert_eq!(core.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn open_backoff_grows_and_resets_on_close() {
        let l = layer(
            CircuitBreakerLayer::builder()
                .failure_threshold(1)
                .success_threshold(1)
                .open_backoff(
                    Backoff::exponential(Duration::from_secs(1)).max_delay(Duration::from_secs(3)),
                ),
        );
        let core = &l.core;
        fail(core);
        let open = |c: &Core| c.snapshot().open_remaining;
        assert_eq!(open(core), Some(Duration::from_secs(1)));
        for expect in [2, 3, 3] {
            advance(open(core).unwrap()).await;
            fail(core); // the probe fails
            assert_eq!(open(core), Some(Duration::from_secs(expect)));
        }
        advance(Duration::from_secs(3)).await;
        succeed(core);
        assert_eq!(core.state(), CircuitState::Closed);
        fail(core);
        assert_eq!(open(core), Some(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn hold_open_extends_but_never_shortens() {
        let l = layer(CircuitBreakerLayer::builder());
        let core = &l.core;
        core.hold_open(Duration::from_secs(5));
        assert_eq!(core.snapshot().open_remaining, Some(Duration::from_secs(5)));
        core.hold_open(Duration::from_secs(2));
        assert_eq!(core.snapshot().open_remaining, Some(Duration::from_secs(5)));
        core.hold_open(Duration::from_secs(60));
        assert_eq!(
            core.snapshot().open_remaining,
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_reused_slot_ignores_the_old_breakers_calls() {
        let old = layer(CircuitBreakerLayer::builder());
        let slot = old.core.slot();
        let stale = old.core.try_acquire().unwrap();
        drop(old);
        // Lease slots until the freed one comes back (other tests may take it).
        let fresh: Vec<_> = (0..64)
            .map(|_| layer(CircuitBreakerLayer::builder().failure_threshold(9)))
            .collect();
        if let Some(l) = fresh.iter().find(|l| std::ptr::eq(l.core.slot(), slot)) {
            let core = &l.core;
            assert_ne!(core.load().gen(), stale.gen);
            fail(core);
            record_success(&core.slot().word, stale.gen);
            assert_eq!(
                core.snapshot().consecutive_failures,
                1,
                "stale success ignored"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_deadline_writer_cannot_overwrite_a_newer_one() {
        let l = layer(CircuitBreakerLayer::builder());
        let core = &l.core;
        core.hold_open(Duration::from_secs(5));
        let gen = core.load().gen();
        // The opener of the previous generation publishes late.
        core.publish_deadline(gen.wrapping_sub(1), Duration::from_secs(100));
        assert_eq!(core.snapshot().open_remaining, Some(Duration::from_secs(5)));
        advance(Duration::from_secs(5)).await;
        assert_eq!(core.state(), CircuitState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn count_window_honours_minimum_calls_before_full() {
        let l = layer(
            CircuitBreakerLayer::builder()
                .window(Window::count(100))
                .minimum_calls(4)
                .failure_rate_threshold(0.5),
        );
        let core = &l.core;
        fail(core);
        succeed(core);
        fail(core);
        assert_eq!(core.state(), CircuitState::Closed); // 3 calls < minimum
        succeed(core);
        // 4 calls, 50 % failures: opens although the window holds 4 of 100.
        assert_eq!(core.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_failures() {
        let l = layer(
            CircuitBreakerLayer::builder()
                .window(Window::time(Duration::from_secs(10)))
                .minimum_calls(2)
                .failure_rate_threshold(1.0),
        );
        let core = &l.core;
        fail(core);
        advance(Duration::from_secs(11)).await;
        fail(core); // the first failure has left the window
        assert_eq!(core.state(), CircuitState::Closed);
        fail(core);
        assert_eq!(core.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_call_rate_opens_window_breaker() {
        let l = layer(
            CircuitBreakerLayer::builder()
                .window(Window::count(4))
                .slow_call_duration(Duration::from_secs(1))
                .slow_call_rate_threshold(0.5),
        );
        let core = &l.core;
        for slow in [true, false, true] {
            let t = core.try_acquire().unwrap();
            core.record(t, false, slow);
        }
        assert_eq!(core.state(), CircuitState::Closed);
        let t = core.try_acquire().unwrap();
        core.record(t, false, false);
        assert_eq!(core.state(), CircuitState::Open);
        assert_eq!(core.snapshot().failures_total, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_and_disabled_states() {
        let l = layer(CircuitBreakerLayer::builder().failure_threshold(1));
        let core = &l.core;
        core.force(CircuitState::ForcedOpen);
        assert_eq!(
            core.try_acquire().unwrap_err().state(),
            CircuitState::ForcedOpen
        );
        advance(Duration::from_secs(3600)).await;
        assert!(core.try_acquire().is_err());
        core.force(CircuitState::Disabled);
        fail(core);
        fail(core);
        assert_eq!(core.state(), CircuitState::Disabled);
        assert_eq!(core.snapshot().failures_total, 2);
        core.force(CircuitState::Closed);
        fail(core);
        assert_eq!(core.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_one_half_open_transition_under_contention() {
        let transitions = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = transitions.clone();
        let l = CircuitBreakerLayer::builder()
            .failure_threshold(1)
            .half_open_max_calls(3)
            .on_event(move |e| {
                if let crate::circuit_breaker::CircuitEvent::StateChanged {
                    to: CircuitState::HalfOpen,
                    ..
                } = e
                {
                    seen.fetch_add(1, SeqCst);
                }
            })
            .build()
            .unwrap();
        let core = &l.core;
        fail(core);
        advance(Duration::from_secs(30)).await;
        // Real threads, on the paused runtime's clock.
        let rt = tokio::runtime::Handle::current();
        let admitted = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let rt = rt.clone();
                    s.spawn(move || {
                        let _clock = rt.enter();
                        core.try_acquire().is_ok()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|ok| *ok)
                .count()
        });
        assert_eq!(admitted, 3);
        assert_eq!(transitions.load(SeqCst), 1);
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use std::sync::atomic::Ordering::Release;

    use loom::thread;

    use super::*;
    use crate::circuit_breaker::CircuitBreakerLayer;

    fn core(threshold: u32, probes: u32, successes: u32) -> Arc<Core> {
        let layer = CircuitBreakerLayer::builder()
            .failure_threshold(threshold)
            .half_open_max_calls(probes)
            .success_threshold(successes)
            .build()
            .unwrap();
        let cfg = layer.core.cfg.clone();
        Arc::new_cyclic(|w| Core::new(cfg, Listeners::default(), w.clone()))
    }

    /// Opens the breaker with a deadline already in the past.
    fn expired_open(core: &Core) {
        let next = core.load().next(CircuitState::Open);
        core.slot().word.store(next.0, Release);
        core.deadline.store(pack_deadline(next.gen(), 0), Release);
    }

    #[test]
    fn loom_one_half_open_transition() {
        loom::model(|| {
            let c = core(1, 1, 1);
            expired_open(&c);
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let c = c.clone();
                    thread::spawn(move || c.try_acquire().ok())
                })
                .collect();
            let tickets: Vec<_> = hs.into_iter().filter_map(|h| h.join().unwrap()).collect();
            assert_eq!(tickets.len(), 1, "exactly one probe admitted");
            let w = c.load();
            assert_eq!(w.state(), CircuitState::HalfOpen);
            assert_eq!(w.a(), 1);
        });
    }

    #[test]
    fn loom_concurrent_failures_open_once() {
        loom::model(|| {
            let c = core(2, 1, 1);
            let start_gen = c.load().gen();
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let c = c.clone();
                    thread::spawn(move || {
                        let t = c.try_acquire().unwrap();
                        c.record(t, true, false);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            let w = c.load();
            assert_eq!(w.state(), CircuitState::Open);
            assert_eq!(w.gen(), start_gen + 1, "one transition");
        });
    }

    #[test]
    fn loom_probe_release_and_success_race() {
        loom::model(|| {
            let c = core(1, 2, 1);
            expired_open(&c);
            let a = c.try_acquire().unwrap();
            let b = c.try_acquire().unwrap();
            let c1 = c.clone();
            let h = thread::spawn(move || c1.release_probe(a));
            c.record(b, false, false);
            h.join().unwrap();
            let w = c.load();
            // The success closed it; the release either came first or found a
            // new generation. Either way nothing underflowed.
            assert_eq!(w.state(), CircuitState::Closed);
            assert_eq!(w.a(), 0);
        });
    }
}
