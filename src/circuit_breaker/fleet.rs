//! A breaker shared by a fleet through Redis.
//!
//! Every call is decided by the local breaker (memory speed). A background
//! task reports what happened here to Redis and brings back the fleet's
//! view; the next call applies that view to the local breaker. The task
//! never touches the breaker itself, so it needs nothing generic.
//!
//! The task must not be lost quietly: if it ends (a panic in code it
//! calls, a runtime shutting down) the next call starts a new one, and a
//! breaker that has not heard from the fleet for three sync intervals
//! plus two store timeouts degrades as the store is configured to
//! (`Degrade::FailClosed`: hold open; `FailOpenToLocal`: local decisions
//! only), with a [`CircuitEvent::FleetUnheard`](super::CircuitEvent) event.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::SharedCfg;
use super::circuit::Transition;
use super::state::{Config, Core, Source};
use super::{CircuitEvent, CircuitState};
use crate::store::redis::{BreakerKeys, BreakerReport, FleetBreaker, RedisStore};
use crate::store::Degrade;

const FORCE_NONE: u8 = 0;
const FORCE_CLOSED: u8 = 1;
const FORCE_OPEN: u8 = 2;

#[derive(Debug, Clone, Copy)]
enum View {
    Fleet(FleetBreaker, Instant),
    Unavailable,
}

pub(crate) struct FleetSync {
    store: RedisStore,
    keys: BreakerKeys,
    interval: Duration,
    stale: Duration,
    failure_threshold: u32,
    open_timeout: Duration,
    half_open_max: u32,
    origin: Instant,
    running: AtomicBool,
    wake: Notify,
    // Reported by calls and transitions, taken by the task.
    failures: AtomicU32,
    success_first: AtomicBool,
    opened_ms: AtomicU64,
    closed_by_probe: AtomicBool,
    force: AtomicU8,
    rejected: AtomicU64,
    local_state: AtomicU8,
    /// When the task last finished a round (ms since `origin`).
    heard_ms: AtomicU64,
    unheard: AtomicBool,
    // Brought back by the task, applied by the next call.
    dirty: AtomicBool,
    view: Mutex<Option<View>>,
}

/// Marks the task gone when it ends, however it ends, so the next call
/// starts another.
struct Running(Weak<FleetSync>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(f) = self.0.upgrade() {
            f.running.store(false, Relaxed);
        }
    }
}

impl FleetSync {
    pub(crate) fn new(store: RedisStore, cfg: &Config, shared: &SharedCfg) -> Arc<Self> {
        Arc::new(Self {
            keys: BreakerKeys::new(&store, &cfg.name),
            store,
            interval: shared.sync_interval,
            stale: shared.stale_attempt_timeout,
            failure_threshold: cfg.rules.failure_threshold,
            open_timeout: cfg.rules.open_timeout,
            half_open_max: cfg.rules.half_open_max_calls,
            origin: Instant::now(),
            running: AtomicBool::new(false),
            wake: Notify::new(),
            failures: AtomicU32::new(0),
            success_first: AtomicBool::new(false),
            opened_ms: AtomicU64::new(0),
            closed_by_probe: AtomicBool::new(false),
            force: AtomicU8::new(FORCE_NONE),
            rejected: AtomicU64::new(0),
            local_state: AtomicU8::new(0),
            heard_ms: AtomicU64::new(0),
            unheard: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            view: Mutex::new(None),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the fleet may go unheard before the breaker degrades.
    fn unheard_after(&self) -> Duration {
        self.interval
            .saturating_mul(3)
            .saturating_add(self.store.timeout().saturating_mul(2))
    }

    /// How long a view holds: until the next one can arrive. The task
    /// waits one interval between rounds and a round takes at most the
    /// store's timeout; a shorter hold would let a fail-closed breaker
    /// admit a local probe while a slow round is still deciding.
    fn hold(&self) -> Duration {
        self.interval
            .saturating_mul(2)
            .saturating_add(self.store.timeout())
    }

    /// A transition of the local breaker. Those that apply the fleet's
    /// view are not reported back to it.
    pub(crate) fn changed(&self, t: &Transition, source: Source) {
        self.local_state.store(t.to.code(), Relaxed);
        if source == Source::Fleet {
            return;
        }
        match t.to {
            CircuitState::Open => {
                let d = t.open_for.unwrap_or(self.open_timeout);
                let ms = script_ms(d).max(1);
                self.opened_ms.store(ms, Relaxed);
                self.wake.notify_one();
            }
            CircuitState::Closed if t.from == CircuitState::HalfOpen => {
                self.closed_by_probe.store(true, Relaxed);
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// A call the local breaker rejected: demand for a probe.
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    /// Called before each admission: keeps the task running, applies a
    /// fresh fleet view, and degrades if the fleet has gone unheard.
    #[inline]
    pub(crate) fn before_call(self: &Arc<Self>, core: &Core) {
        if !self.running.load(Relaxed) {
            self.start();
        }
        if self.dirty.load(Relaxed) && self.dirty.swap(false, Relaxed) {
            self.apply(core);
        }
        let heard = self.heard_ms.load(Relaxed);
        let quiet = Duration::from_millis(self.now_ms().saturating_sub(heard));
        if quiet > self.unheard_after() {
            self.unheard(core, quiet);
        }
    }

    /// Notes a non-probe outcome for the next report.
    #[inline]
    pub(crate) fn outcome(&self, failure: bool) {
        if failure {
            self.failures.fetch_add(1, Relaxed);
        } else if self.failures.load(Relaxed) != 0 || !self.success_first.load(Relaxed) {
            self.failures.store(0, Relaxed);
            self.success_first.store(true, Relaxed);
        }
    }

    /// A handle operation, reported to the fleet at once.
    pub(crate) fn force(&self, to: CircuitState) {
        let f = match to {
            CircuitState::Closed => FORCE_CLOSED,
            CircuitState::ForcedOpen => FORCE_OPEN,
            _ => return,
        };
        self.force.store(f, Relaxed);
        self.wake.notify_one();
    }

    #[cold]
    fn start(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime here: try again on the next call
        };
        if self.running.swap(true, Relaxed) {
            return;
        }
        if self.heard_ms.load(Relaxed) == 0 {
            // The first round has not had its chance yet.
            self.heard_ms.store(self.now_ms().max(1), Relaxed);
        }
        let weak = Arc::downgrade(self);
        // Made before the task is spawned: a task dropped unpolled (its
        // runtime shut down) still marks itself gone.
        let running = Running(weak.clone());
        rt.spawn(async move {
            let _running = running;
            run(weak).await;
        });
    }

    #[cold]
    fn unheard(&self, core: &Core, quiet: Duration) {
        if !self.unheard.swap(true, Relaxed) {
            core.listeners.emit(&CircuitEvent::FleetUnheard {
                name: core.cfg.name.clone(),
                policy: self.store.degrade_policy(),
                quiet,
            });
        }
        if self.store.degrade_policy() == Degrade::FailClosed {
            core.hold_open(self.hold(), Source::Fleet);
        }
    }

    #[cold]
    fn apply(&self, core: &Core) {
        let Some(view) = *self.view.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        let local = core.state();
        let hold = self.hold();
        match view {
            View::Unavailable => core.hold_open(hold, Source::Fleet),
            View::Fleet(fb, seen) => match CircuitState::from_code(fb.state) {
                Some(CircuitState::Open) => {
                    let left =
                        Duration::from_millis(fb.open_remaining_ms).saturating_sub(seen.elapsed());
                    core.hold_open(left.saturating_add(hold), Source::Fleet);
                }
                Some(CircuitState::HalfOpen) if fb.probe_granted => {
                    if local != CircuitState::HalfOpen {
                        core.force(CircuitState::HalfOpen, Source::Fleet);
                    }
                }
                Some(CircuitState::HalfOpen) => core.hold_open(hold, Source::Fleet),
                Some(CircuitState::ForcedOpen) => {
                    if local != CircuitState::ForcedOpen {
                        core.force(CircuitState::ForcedOpen, Source::Fleet);
                    }
                }
                _ => {
                    if !matches!(local, CircuitState::Closed | CircuitState::Disabled) {
                        core.force(CircuitState::Closed, Source::Fleet);
                    }
                }
            },
        }
    }

    fn report(
        &self,
        last_rejected: &mut u64,
        half_open_since: &mut Option<Instant>,
    ) -> BreakerReport {
        let local = CircuitState::from_code(self.local_state.load(Relaxed));
        let rejected = self.rejected.load(Relaxed);
        let demand = rejected != *last_rejected;
        *last_rejected = rejected;
        *half_open_since = match (local, *half_open_since) {
            (Some(CircuitState::HalfOpen), None) => Some(Instant::now()),
            (Some(CircuitState::HalfOpen), s) => s,
            _ => None,
        };
        let probing_too_long = half_open_since.is_some_and(|s| s.elapsed() >= self.stale);
        BreakerReport {
            failures: self.failures.swap(0, Relaxed),
            success_first: self.success_first.swap(false, Relaxed),
            opened_ms: self.opened_ms.swap(0, Relaxed),
            closed_by_probe: self.closed_by_probe.swap(false, Relaxed),
            want_probe: (local == Some(CircuitState::HalfOpen) && !probing_too_long)
                || (local == Some(CircuitState::Open) && demand),
            failure_threshold: self.failure_threshold,
            open_timeout_ms: script_ms(self.open_timeout),
            probe_lease_ms: script_ms(self.interval.saturating_mul(3)),
            half_open_max: self.half_open_max,
            ttl_ms: script_ms(
                self.open_timeout
                    .saturating_mul(4)
                    .max(Duration::from_secs(60)),
            ),
            force: match self.force.swap(FORCE_NONE, Relaxed) {
                FORCE_CLOSED => "closed",
                FORCE_OPEN => "forced_open",
                _ => "",
            },
        }
    }
}

/// Milliseconds for the sync script, at most 30 years: Redis refuses an
/// expiry later than its clock can count (and the whole round with it), and
/// an opening that long outlives any process anyway, as `clock::instant_after`
/// caps timers.
fn script_ms(d: Duration) -> u64 {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    u64::try_from(d.min(FAR).as_millis()).unwrap_or(u64::MAX)
}

async fn run(weak: Weak<FleetSync>) {
    let mut last_rejected = 0;
    let mut half_open_since: Option<Instant> = None;
    loop {
        let Some(f) = weak.upgrade() else { return };
        if Arc::strong_count(&f) == 1 {
            return; // the breaker is gone
        }
        let report = f.report(&mut last_rejected, &mut half_open_since);
        let view = match f.store.breaker_sync(&f.keys, &report).await {
            Some(fb) => Some(View::Fleet(fb, Instant::now())),
            None if f.store.degrade_policy() == Degrade::FailClosed => Some(View::Unavailable),
            None => None,
        };
        // A round that reached Redis, or that applied the policy for an
        // unreachable one, counts as heard.
        f.heard_ms.store(f.now_ms().max(1), Relaxed);
        f.unheard.store(false, Relaxed);
        *f.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
        if view.is_some() {
            f.dirty.store(true, Relaxed);
        }
        let interval = f.interval;
        let wake = async { f.wake.notified().await };
        let _ = tokio::time::timeout(interval, wake).await;
    }
}
