//! The hedge's shared state: the delay, the recent latencies it comes
//! from, and the budget that caps hedges to a share of calls.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::HedgeEvent;
use crate::clock::{nanos, Clock};
use crate::observe::Listeners;
use crate::sync::AtomicU64 as BalanceWord;

/// No delay known yet (too few latencies seen): no hedging.
pub(crate) const UNKNOWN: u64 = u64::MAX;

/// One hedge in budget units; a call earns `share × UNIT`.
pub(crate) const UNIT: u64 = 1_000_000;

/// Unspent share accumulates up to this many hedges.
pub(crate) const BURST: u64 = 10;

/// Hedges paid for by calls.
///
/// Invariant (property-tested over arbitrary histories): the balance
/// starts at zero, every call adds `deposit` and every hedge takes `UNIT`
/// out, and a hedge is only taken when the balance covers it, so after
/// `c` calls at most `c × deposit / UNIT` hedges were sent: never more
/// than `max_extra_load` of the calls (to a millionth of a call each).
#[derive(Debug)]
pub(crate) struct Budget {
    balance: BalanceWord,
    deposit: u64,
    cap: u64,
}

impl Budget {
    pub(crate) fn new(share: f64) -> Self {
        let deposit = (share * UNIT as f64).floor() as u64;
        Self {
            balance: BalanceWord::new(0),
            deposit,
            cap: (BURST * UNIT).max(deposit),
        }
    }

    /// A call's share of hedges.
    #[inline]
    pub(crate) fn deposit(&self) {
        let cur = self.balance.load(Relaxed);
        if cur >= self.cap {
            return;
        }
        let _ = self
            .balance
            .fetch_update(AcqRel, Acquire, |b| Some((b + self.deposit).min(self.cap)));
    }

    /// Whether a hedge could be paid for now.
    #[inline]
    pub(crate) fn affordable(&self) -> bool {
        self.balance.load(Relaxed) >= UNIT
    }

    /// Pays for one hedge, if the balance covers it.
    pub(crate) fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(AcqRel, Acquire, |b| b.checked_sub(UNIT))
            .is_ok()
    }
}

/// The most recent latencies, and the percentile recomputed from them
/// every few samples.
#[derive(Debug)]
pub(crate) struct Window {
    samples: Vec<u64>,
    next: usize,
    since_refresh: usize,
    scratch: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Percentile {
    pub(crate) p: f64,
    pub(crate) min_delay: Duration,
    pub(crate) min_data_points: usize,
    pub(crate) window: usize,
}

#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) name: Arc<str>,
    pub(crate) max_hedges: u32,
    pub(crate) budget: Budget,
    /// The hedge delay in nanoseconds, or [`UNKNOWN`].
    delay: AtomicU64,
    percentile: Option<(Percentile, Mutex<Window>)>,
    hedges: AtomicU64,
    pub(crate) listeners: Listeners<HedgeEvent>,
    /// Where call starts, hedge deadlines and latencies are read.
    pub(crate) clock: Clock,
}

impl Core {
    pub(crate) fn new(
        name: Arc<str>,
        fixed: Option<Duration>,
        percentile: Option<Percentile>,
        max_hedges: u32,
        share: f64,
        listeners: Listeners<HedgeEvent>,
        clock: Clock,
    ) -> Self {
        Self {
            name,
            max_hedges,
            budget: Budget::new(share),
            delay: AtomicU64::new(fixed.map_or(UNKNOWN, nanos)),
            percentile: percentile.map(|p| {
                let w = Window {
                    samples: Vec::with_capacity(p.window),
                    next: 0,
                    since_refresh: 0,
                    scratch: Vec::with_capacity(p.window),
                };
                (p, Mutex::new(w))
            }),
            hedges: AtomicU64::new(0),
            listeners,
            clock,
        }
    }

    /// The delay before a hedge, if one is known.
    #[inline]
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay.load(Relaxed) {
            UNKNOWN => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Whether attempts' latencies are recorded (percentile mode).
    #[inline]
    pub(crate) fn records(&self) -> bool {
        self.percentile.is_some()
    }

    pub(crate) fn hedges(&self) -> u64 {
        self.hedges.load(Relaxed)
    }

    /// Records one finished attempt's latency.
    pub(crate) fn record(&self, latency: Duration) {
        let Some((p, window)) = &self.percentile else {
            return;
        };
        let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
        let ns = nanos(latency);
        if w.samples.len() < p.window {
            w.samples.push(ns);
        } else {
            let i = w.next;
            w.samples[i] = ns;
        }
        w.next = (w.next + 1) % p.window;
        w.since_refresh += 1;
        // Recomputed every sixteenth of a window (and at once while the
        // window fills up to its minimum): a selection over the window is
        // too dear for every call.
        let every = (p.window / 16).max(1);
        if w.samples.len() < p.min_data_points || w.since_refresh < every {
            return;
        }
        w.since_refresh = 0;
        let w = &mut *w;
        w.scratch.clear();
        w.scratch.extend_from_slice(&w.samples);
        let rank = ((w.scratch.len() - 1) as f64 * p.p).round() as usize;
        let (_, &mut at, _) = w.scratch.select_nth_unstable(rank);
        let delay = at.max(nanos(p.min_delay)).min(UNKNOWN - 1);
        self.delay.store(delay, Relaxed);
    }

    #[cold]
    pub(crate) fn hedged(&self, attempt: u32, delay: Duration) {
        self.hedges.fetch_add(1, Relaxed);
        if self.listeners.active() {
            self.listeners.emit(&HedgeEvent::Hedged {
                name: self.name.clone(),
                attempt,
                delay,
            });
        }
    }

    #[cold]
    pub(crate) fn over_budget(&self) {
        if self.listeners.active() {
            self.listeners.emit(&HedgeEvent::OverBudget {
                name: self.name.clone(),
            });
        }
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the order of calls and hedge attempts, hedges never
        /// exceed the share of calls.
        #[test]
        fn hedges_never_exceed_their_share_of_calls(
            share in 0.0001f64..=4.0,
            history in prop::collection::vec(any::<bool>(), 0..5_000),
        ) {
            let b = Budget::new(share);
            let (mut calls, mut hedges) = (0u64, 0u64);
            for call in history {
                if call {
                    b.deposit();
                    calls += 1;
                } else if b.withdraw() {
                    hedges += 1;
                }
                prop_assert!(hedges as f64 <= calls as f64 * share + 1e-9,
                    "{hedges} hedges for {calls} calls at {share}");
            }
        }
    }

    #[test]
    fn the_percentile_follows_recent_latencies_above_the_floor() {
        let p = Percentile {
            p: 0.9,
            min_delay: Duration::from_millis(2),
            min_data_points: 10,
            window: 100,
        };
        let core = Core::new(
            "".into(),
            None,
            Some(p),
            1,
            0.1,
            Listeners::default(),
            Clock::new(),
        );
        for ms in 1..=9 {
            core.record(Duration::from_millis(ms));
        }
        assert_eq!(core.delay(), None, "too few data points");
        core.record(Duration::from_millis(10));
        assert_eq!(core.delay(), Some(Duration::from_millis(9)));
        // A faster upstream: the old latencies leave the window.
        for _ in 0..100 {
            core.record(Duration::from_micros(10));
        }
        assert_eq!(core.delay(), Some(Duration::from_millis(2)), "the floor");
    }
}

#[cfg(all(test, bulwark_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two calls, each earning half a hedge and trying to spend one,
    /// after a call that earned its half: three halves pay for one hedge,
    /// never two, and every unit earned is either spent or still in the
    /// balance.
    #[test]
    fn loom_hedge_budget_never_pays_twice() {
        loom::model(|| {
            let b = Arc::new(Budget::new(0.5));
            b.deposit();
            let call = |b: &Budget| {
                b.deposit();
                b.withdraw()
            };
            let other = {
                let b = b.clone();
                thread::spawn(move || call(&b))
            };
            let mine = call(&b);
            let theirs = other.join().unwrap();
            let paid = u64::from(mine) + u64::from(theirs);
            assert!(paid <= 1);
            assert_eq!(b.balance.load(Acquire) + paid * UNIT, 3 * UNIT / 2);
        });
    }

    /// Two calls earning at once on a balance one deposit short of its
    /// cap: it ends at the cap exactly, never above.
    #[test]
    fn loom_hedge_budget_stays_at_its_cap() {
        loom::model(|| {
            let b = Arc::new(Budget::new(0.5));
            for _ in 0..2 * BURST - 1 {
                b.deposit();
            }
            let t = {
                let b = b.clone();
                thread::spawn(move || b.deposit())
            };
            b.deposit();
            t.join().unwrap();
            assert_eq!(b.balance.load(Acquire), BURST * UNIT);
        });
    }
}
