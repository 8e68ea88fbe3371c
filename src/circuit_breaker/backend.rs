//! Where a breaker keeps its state: in memory (the default), in a state
//! file shared by processes, or in Redis shared by a fleet.
//!
//! The service asks [`Shared`](super::future::Shared) to admit and record
//! calls; for the memory backend that is a discriminant check and then the
//! lock-free core, unchanged.

use std::fmt;
use std::time::Duration;

use super::state::{Core, Ticket};
use super::CircuitOpen;

pub use crate::backend::Backend;

/// Settings of the shared backends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteCfg {
    #[allow(dead_code)]
    pub(crate) stale_attempt_timeout: Duration,
    #[allow(dead_code)]
    pub(crate) sync_interval: Duration,
}

/// The backend as the running breaker holds it.
pub(crate) enum Remote {
    None,
    #[cfg(feature = "file-store")]
    File(file::FileRemote),
    #[cfg(feature = "redis")]
    Redis(std::sync::Arc<fleet::Fleet>),
}

impl Remote {
    #[inline]
    pub(crate) fn is_memory(&self) -> bool {
        matches!(self, Remote::None)
    }
}

/// The breaker's steps, routed to the backend. The memory backend's
/// closed path never comes here (it finishes through its slot).
impl Core {
    /// Admits a call through a shared backend.
    pub(crate) fn acquire_shared(&self) -> Result<Ticket, CircuitOpen> {
        match &self.remote {
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.acquire(self),
            #[cfg(feature = "redis")]
            Remote::Redis(f) => {
                f.before_call(self);
                self.try_acquire()
            }
            _ => self.try_acquire(),
        }
    }

    #[inline]
    pub(crate) fn record_shared(&self, t: Ticket, failure: bool, slow: bool) {
        match &self.remote {
            Remote::None => self.record(t, failure, slow),
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.record(self, t, failure || slow),
            #[cfg(feature = "redis")]
            Remote::Redis(f) => {
                if !t.probe {
                    f.outcome(failure || slow);
                }
                self.record(t, failure, slow)
            }
        }
    }

    pub(crate) fn release_shared(&self, t: Ticket) {
        match &self.remote {
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.release(t),
            _ => self.release_probe(t),
        }
    }

    pub(crate) fn hold_open_shared(&self, d: Duration) {
        match &self.remote {
            #[cfg(feature = "file-store")]
            Remote::File(f) => f.hold_open(d),
            _ => self.hold_open(d),
        }
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::None => f.write_str("Memory"),
            #[cfg(feature = "file-store")]
            Remote::File(r) => f.debug_tuple("File").field(&r.store).finish(),
            #[cfg(feature = "redis")]
            Remote::Redis(_) => f.write_str("Redis"),
        }
    }
}

#[cfg(feature = "file-store")]
pub(crate) mod file {
    use super::super::state::{Core, Ticket};
    use super::super::{CircuitOpen, CircuitState};
    use crate::store::file::{BreakerCfg, FileStore, Phase, Verdict};
    use crate::store::unix_ms;

    pub(crate) struct FileRemote {
        pub(crate) store: FileStore,
        pub(crate) cfg: BreakerCfg,
    }

    pub(crate) fn state_of(p: Phase) -> CircuitState {
        match p {
            Phase::Closed => CircuitState::Closed,
            Phase::Open => CircuitState::Open,
            Phase::HalfOpen => CircuitState::HalfOpen,
            Phase::ForcedOpen => CircuitState::ForcedOpen,
            Phase::Disabled => CircuitState::Disabled,
        }
    }

    impl FileRemote {
        pub(crate) fn acquire(&self, core: &Core) -> Result<Ticket, CircuitOpen> {
            match self.store.breaker_acquire(&self.cfg) {
                Verdict::Admit { gen, probe } => Ok(Ticket { gen, probe }),
                Verdict::Reject { phase, retry_after } => {
                    Err(core.reject(state_of(phase), retry_after))
                }
            }
        }

        pub(crate) fn record(&self, core: &Core, t: Ticket, failure: bool) {
            if let Some((from, to)) = self
                .store
                .breaker_record(&self.cfg, t.gen, t.probe, failure)
            {
                let open_for = (to == Phase::Open).then_some(self.cfg.open_timeout);
                core.changed(
                    state_of(from),
                    state_of(to),
                    open_for.map(|d| (super::super::state::Cause::Failures, d)),
                );
            }
        }

        pub(crate) fn release(&self, t: Ticket) {
            self.store.breaker_release(t.gen);
        }

        pub(crate) fn hold_open(&self, d: std::time::Duration) {
            self.store
                .update(|s| s.circuit_breaker.hold_open(unix_ms(), d));
        }

        pub(crate) fn force(&self, to: CircuitState) {
            let phase = match to {
                CircuitState::ForcedOpen => Phase::ForcedOpen,
                CircuitState::Disabled => Phase::Disabled,
                _ => Phase::Closed,
            };
            self.store.update(|s| s.circuit_breaker.enter(phase));
        }

        pub(crate) fn state(&self) -> CircuitState {
            let now = unix_ms();
            self.store
                .view(|s| state_of(s.circuit_breaker.phase_at(now)))
        }

        /// (consecutive failures, probes in flight, open remaining)
        pub(crate) fn counts(&self) -> (u32, u32, Option<std::time::Duration>) {
            let now = unix_ms();
            self.store.view(|s| {
                let b = &s.circuit_breaker;
                let open = (b.phase_at(now) == Phase::Open)
                    .then(|| std::time::Duration::from_millis(b.open_until.unwrap_or(0) - now));
                (b.failures, b.half_open_attempts, open)
            })
        }
    }
}

#[cfg(feature = "redis")]
pub(crate) mod fleet {
    //! The fleet breaker's glue. The local core decides every call; a
    //! background task reports what happened here to Redis and brings back
    //! the fleet's view, which the next call applies to the core. The task
    //! never touches the core itself, so it needs nothing generic.

    use std::cell::Cell;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8};
    use std::sync::{Arc, Mutex, Weak};
    use std::time::Duration;

    use tokio::sync::Notify;
    use tokio::time::Instant;

    use super::super::state::Core;
    use super::super::{CircuitEvent, CircuitState};
    use crate::store::redis::{BreakerKeys, BreakerReport, FleetBreaker, RedisStore};
    use crate::store::Degrade;

    thread_local! {
        /// Set while this thread applies the fleet's view to the core, so
        /// the resulting events are not reported back as local decisions.
        static APPLYING: Cell<bool> = const { Cell::new(false) };
    }

    const FORCE_NONE: u8 = 0;
    const FORCE_CLOSED: u8 = 1;
    const FORCE_OPEN: u8 = 2;

    #[derive(Debug, Clone, Copy)]
    enum View {
        Fleet(FleetBreaker, Instant),
        Unavailable,
    }

    pub(crate) struct Fleet {
        store: RedisStore,
        keys: BreakerKeys,
        interval: Duration,
        stale: Duration,
        failure_threshold: u32,
        open_timeout: Duration,
        half_open_max: u32,
        started: AtomicBool,
        wake: Notify,
        // Reported by calls and events, taken by the task.
        failures: AtomicU32,
        success_first: AtomicBool,
        opened_ms: AtomicU64,
        closed_by_probe: AtomicBool,
        force: AtomicU8,
        rejected: AtomicU64,
        local_state: AtomicU8,
        // Brought back by the task, applied by the next call.
        dirty: AtomicBool,
        view: Mutex<Option<View>>,
    }

    fn code(s: CircuitState) -> u8 {
        match s {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
            CircuitState::ForcedOpen => 3,
            CircuitState::Disabled => 4,
        }
    }

    impl Fleet {
        pub(crate) fn new(
            store: RedisStore,
            name: &str,
            cfg: &super::super::state::Config,
            remote: &super::RemoteCfg,
        ) -> Arc<Self> {
            Arc::new(Self {
                keys: BreakerKeys::new(&store, name),
                store,
                interval: remote.sync_interval,
                stale: remote.stale_attempt_timeout,
                failure_threshold: u32::from(cfg.failure_threshold),
                open_timeout: cfg.open_timeout,
                half_open_max: u32::from(cfg.half_open_max_calls),
                started: AtomicBool::new(false),
                wake: Notify::new(),
                failures: AtomicU32::new(0),
                success_first: AtomicBool::new(false),
                opened_ms: AtomicU64::new(0),
                closed_by_probe: AtomicBool::new(false),
                force: AtomicU8::new(FORCE_NONE),
                rejected: AtomicU64::new(0),
                local_state: AtomicU8::new(0),
                dirty: AtomicBool::new(false),
                view: Mutex::new(None),
            })
        }

        /// The listener the builder installs on the core's events.
        pub(crate) fn listener(self: &Arc<Self>) -> impl Fn(&CircuitEvent) + Send + Sync {
            let weak = Arc::downgrade(self);
            move |e| {
                let Some(f) = weak.upgrade() else { return };
                match e {
                    CircuitEvent::StateChanged {
                        from, to, open_for, ..
                    } => {
                        f.local_state.store(code(*to), Relaxed);
                        if APPLYING.with(Cell::get) {
                            return;
                        }
                        match to {
                            CircuitState::Open => {
                                let ms = open_for.unwrap_or(f.open_timeout).as_millis();
                                f.opened_ms.store((ms as u64).max(1), Relaxed);
                                f.wake.notify_one();
                            }
                            CircuitState::Closed if *from == CircuitState::HalfOpen => {
                                f.closed_by_probe.store(true, Relaxed);
                                f.wake.notify_one();
                            }
                            _ => {}
                        }
                    }
                    CircuitEvent::Rejected { .. } => {
                        f.rejected.fetch_add(1, Relaxed);
                    }
                    #[allow(unreachable_patterns)]
                    _ => {}
                }
            }
        }

        /// Called before each admission: starts the task once, and applies
        /// a fresh fleet view.
        #[inline]
        pub(crate) fn before_call(self: &Arc<Self>, core: &Core) {
            if !self.started.load(Relaxed) {
                self.start();
            }
            if self.dirty.load(Relaxed) && self.dirty.swap(false, Relaxed) {
                self.apply(core);
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
            if self.started.swap(true, Relaxed) {
                return;
            }
            rt.spawn(run(Arc::downgrade(self)));
        }

        #[cold]
        fn apply(&self, core: &Core) {
            let Some(view) = *self.view.lock().unwrap_or_else(|e| e.into_inner()) else {
                return;
            };
            APPLYING.with(|a| a.set(true));
            let local = core.state();
            // Until the next view can arrive: the sync task waits one
            // interval between rounds and a round takes at most the store's
            // timeout. A shorter hold would let a fail-closed breaker admit
            // a local probe while a slow round is still deciding.
            let hold = self.interval * 2 + self.store.timeout();
            match view {
                View::Unavailable => core.hold_open(hold),
                View::Fleet(fb, seen) => match fb.state {
                    1 => {
                        let left = Duration::from_millis(fb.open_remaining_ms)
                            .saturating_sub(seen.elapsed());
                        core.hold_open(left + hold);
                    }
                    2 if fb.probe_granted => {
                        if local != CircuitState::HalfOpen {
                            core.force(CircuitState::HalfOpen);
                        }
                    }
                    2 => core.hold_open(hold),
                    3 => {
                        if local != CircuitState::ForcedOpen {
                            core.force(CircuitState::ForcedOpen);
                        }
                    }
                    _ => {
                        if !matches!(local, CircuitState::Closed | CircuitState::Disabled) {
                            core.force(CircuitState::Closed);
                        }
                    }
                },
            }
            APPLYING.with(|a| a.set(false));
        }
    }

    async fn run(weak: Weak<Fleet>) {
        let mut last_rejected = 0;
        let mut half_open_since: Option<Instant> = None;
        loop {
            let Some(f) = weak.upgrade() else { return };
            if Arc::strong_count(&f) == 1 {
                return; // the breaker is gone
            }
            let local = f.local_state.load(Relaxed);
            let rejected = f.rejected.load(Relaxed);
            let demand = rejected != last_rejected;
            last_rejected = rejected;
            half_open_since = match (local, half_open_since) {
                (2, None) => Some(Instant::now()),
                (2, s) => s,
                _ => None,
            };
            let probing_too_long = half_open_since.is_some_and(|s| s.elapsed() >= f.stale);
            let report = BreakerReport {
                failures: f.failures.swap(0, Relaxed),
                success_first: f.success_first.swap(false, Relaxed),
                opened_ms: f.opened_ms.swap(0, Relaxed),
                closed_by_probe: f.closed_by_probe.swap(false, Relaxed),
                want_probe: (local == 2 && !probing_too_long) || (local == 1 && demand),
                failure_threshold: f.failure_threshold,
                open_timeout_ms: f.open_timeout.as_millis() as u64,
                probe_lease_ms: (f.interval * 3).as_millis() as u64,
                half_open_max: f.half_open_max,
                ttl_ms: (f.open_timeout * 4)
                    .max(Duration::from_secs(60))
                    .as_millis() as u64,
                force: match f.force.swap(FORCE_NONE, Relaxed) {
                    FORCE_CLOSED => "closed",
                    FORCE_OPEN => "forced_open",
                    _ => "",
                },
            };
            let view = match f.store.breaker_sync(&f.keys, &report).await {
                Some(fb) => Some(View::Fleet(fb, Instant::now())),
                None if f.store.degrade_policy() == Degrade::FailClosed => Some(View::Unavailable),
                None => None,
            };
            *f.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
            if view.is_some() {
                f.dirty.store(true, Relaxed);
            }
            let interval = f.interval;
            let wake = async { f.wake.notified().await };
            let _ = tokio::time::timeout(interval, wake).await;
        }
    }
}
