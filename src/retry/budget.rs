//! The retry budget: how many retries the callers of one upstream may make,
//! as a floor of retries per second plus a share of recent calls.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{nanos, Clock};
use crate::error::ConfigError;

const LAYER: &str = "retry";

/// The window is kept as this many slots; a deposit or withdrawal expires
/// when its slot leaves the window.
const SLOTS: usize = 10;

/// Percentages are exact to a hundredth of a percent: one retry is worth
/// `UNIT` and one call earns `percent * 100` units (before reducing the
/// fraction).
const UNIT: u64 = 10_000;

/// Caps the share of calls at 1000 %, as tower does.
const MAX_PERCENT: f64 = 1000.0;

/// A retry budget shared by every clone: at most `min_per_second` retries
/// per second plus `percent` % of the calls made over the last `window`.
///
/// Every call deposits `percent / 100` of a retry, every retry withdraws
/// one; both expire after `window`. A constant reserve of
/// `min_per_second * window` retries lets a quiet service retry at all.
/// When the budget is empty the layer returns the attempt's failure as is,
/// and reports `budget_exhausted`.
///
/// The accounting is in integers: 30 % is three retries per ten calls,
/// never three per nine as with a truncated reciprocal (tower#857), and
/// any percentage given to two decimals is exact.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::retry::RetryBudget;
///
/// let budget = RetryBudget::builder()
///     .min_per_second(0)
///     .percent(30.0)
///     .window(Duration::from_secs(10))
///     .build()?;
/// # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// # rt.block_on(async {
/// for _ in 0..10 {
///     budget.deposit();
/// }
/// let granted = (0..10).filter(|_| budget.try_withdraw()).count();
/// assert_eq!(granted, 3);
/// # });
/// # Ok::<(), tower_bulwark::ConfigError>(())
/// ```
///
/// Deposits are one clock read and one compare-and-swap, with no lock;
/// withdrawals (only made when an attempt failed) take a short lock so two
/// concurrent retries cannot both spend the last unit.
///
/// The budget reads tokio's clock, so it must be used inside a tokio
/// runtime.
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<BudgetState>,
}

struct BudgetState {
    clock: Clock,
    slot_nanos: u64,
    /// `(epoch: u32) << 32 | (balance: i32)` per slot.
    slots: [AtomicU64; SLOTS],
    reserve: i64,
    deposit: i64,
    withdraw: i64,
    withdraw_lock: Mutex<()>,
    min_per_second: u32,
    percent: f64,
    window: Duration,
}

/// Configures a [`RetryBudget`].
#[derive(Debug, Clone)]
pub struct RetryBudgetBuilder {
    min_per_second: u32,
    percent: f64,
    window: Duration,
}

impl Default for RetryBudgetBuilder {
    fn default() -> Self {
        Self {
            min_per_second: 10,
            percent: 20.0,
            window: Duration::from_secs(10),
        }
    }
}

impl RetryBudgetBuilder {
    /// Retries per second allowed however few calls are made (default 10).
    pub fn min_per_second(mut self, n: u32) -> Self {
        self.min_per_second = n;
        self
    }

    /// Extra retries as a percentage of recent calls, in `[0, 1000]`
    /// (default 20, i.e. one retry per five calls). Exact to 0.01 %.
    pub fn percent(mut self, percent: f64) -> Self {
        self.percent = percent;
        self
    }

    /// How long deposits and withdrawals count, from 1 s to 60 s (default
    /// 10 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Validates the configuration and makes the budget.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if !self.percent.is_finite() || !(0.0..=MAX_PERCENT).contains(&self.percent) {
            return Err(ConfigError::new(
                LAYER,
                "budget.percent",
                format!("must be a number in [0, 1000] (got {})", self.percent),
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(60) {
            return Err(ConfigError::new(
                LAYER,
                "budget.window",
                format!("must be from 1 s to 60 s (got {:?})", self.window),
            ));
        }
        // Hundredths of a percent, as an integer: 0.3 % -> 30, 12.5 % -> 1250.
        let earn = (self.percent * 100.0).round() as u64;
        let g = gcd(earn, UNIT);
        let (deposit, withdraw) = (earn / g, UNIT / g);
        // min/s * window, in units; at most 2^32 * 60_000 * 10_000 / 1000, so
        // no overflow.
        let window_ms = self.window.as_millis() as u64;
        let reserve = u64::from(self.min_per_second) * window_ms * withdraw / 1000;
        Ok(RetryBudget {
            inner: Arc::new(BudgetState {
                clock: Clock::new(),
                slot_nanos: nanos(self.window / SLOTS as u32).max(1),
                slots: Default::default(),
                reserve: reserve as i64,
                deposit: deposit as i64,
                withdraw: withdraw as i64,
                withdraw_lock: Mutex::new(()),
                min_per_second: self.min_per_second,
                percent: self.percent,
                window: self.window,
            }),
        })
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

#[inline]
fn pack(epoch: u32, balance: i32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(balance as u32)
}

#[inline]
fn unpack(word: u64) -> (u32, i32) {
    ((word >> 32) as u32, word as u32 as i32)
}

impl RetryBudget {
    /// A builder with the defaults: 10 retries per second plus 20 % of the
    /// calls of the last 10 s.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder::default()
    }

    /// Records a call: earns `percent / 100` of a retry for the next
    /// `window`. The layer does this once per call.
    #[inline]
    pub fn deposit(&self) {
        if self.inner.deposit != 0 {
            self.inner.add(self.inner.epoch(), self.inner.deposit);
        }
    }

    /// Spends one retry if the budget has one. The layer does this before
    /// every retry.
    pub fn try_withdraw(&self) -> bool {
        let inner = &*self.inner;
        // Serialises withdrawals: the check and the spend are one step.
        let _guard = inner
            .withdraw_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let epoch = inner.epoch();
        if inner.balance_units(epoch) < inner.withdraw {
            return false;
        }
        inner.add(epoch, -inner.withdraw);
        true
    }

    /// Retries available right now (whole retries, rounded down).
    pub fn available(&self) -> u64 {
        let inner = &*self.inner;
        let units = inner.balance_units(inner.epoch()).max(0);
        (units / inner.withdraw) as u64
    }

    /// The configured floor of retries per second.
    pub fn min_per_second(&self) -> u32 {
        self.inner.min_per_second
    }

    /// The configured share of calls, in percent.
    pub fn percent(&self) -> f64 {
        self.inner.percent
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.inner.window
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudgetBuilder::default()
            .build()
            .expect("the default budget is valid")
    }
}

impl BudgetState {
    #[inline]
    fn epoch(&self) -> u32 {
        // Wraps after 2^32 slots (13 years with 100 ms slots).
        (self.clock.now() / self.slot_nanos) as u32
    }

    #[inline]
    fn add(&self, epoch: u32, amount: i64) {
        let slot = &self.slots[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (tag, bal) = unpack(cur);
            let base = if tag == epoch { i64::from(bal) } else { 0 };
            let next = (base + amount).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
            match slot.compare_exchange_weak(
                cur,
                pack(epoch, next),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn balance_units(&self, epoch: u32) -> i64 {
        let live: i64 = self
            .slots
            .iter()
            .map(|s| unpack(s.load(Ordering::Acquire)))
            .filter(|(tag, _)| (epoch.wrapping_sub(*tag) as usize) < SLOTS)
            .map(|(_, bal)| i64::from(bal))
            .sum();
        self.reserve + live
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("min_per_second", &self.inner.min_per_second)
            .field("percent", &self.inner.percent)
            .field("window", &self.inner.window)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget(min: u32, percent: f64, secs: u64) -> RetryBudget {
        RetryBudget::builder()
            .min_per_second(min)
            .percent(percent)
            .window(Duration::from_secs(secs))
            .build()
            .unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn fractional_percentages_are_exact() {
        rt().block_on(async {
            // tower#857: 1 / 0.3 truncates to 3, so tower grants one retry
            // per 3 calls (33 %) instead of 30 %.
            for (percent, calls, want) in [
                (30.0, 10, 3),
                (30.0, 100, 30),
                (30.0, 9, 2),
                (12.5, 8, 1),
                (12.5, 80, 10),
                (33.33, 10_000, 3333),
                (150.0, 2, 3),
                (0.3, 1000, 3),
                (1000.0, 1, 10),
                (0.0, 100, 0),
            ] {
                let b = budget(0, percent, 10);
                for _ in 0..calls {
                    b.deposit();
                }
                let granted = std::iter::from_fn(|| b.try_withdraw().then_some(()))
                    .take(100_000)
                    .count();
                assert_eq!(granted, want, "{percent} % of {calls}");
            }
        });
    }

    #[test]
    fn reserve_refills_per_window() {
        rt().block_on(async {
            let b = budget(2, 0.0, 1);
            assert_eq!(b.available(), 2);
            assert!(b.try_withdraw() && b.try_withdraw());
            assert!(!b.try_withdraw());
            tokio::time::advance(Duration::from_millis(1000)).await;
            assert_eq!(b.available(), 2);
        });
    }

    #[test]
    fn config_errors() {
        let e = RetryBudget::builder()
            .percent(f64::NAN)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "budget.percent");
        let e = RetryBudget::builder().percent(1000.5).build().unwrap_err();
        assert_eq!(e.field(), "budget.percent");
        let e = RetryBudget::builder()
            .window(Duration::from_millis(999))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "budget.window");
        let e = RetryBudget::builder()
            .window(Duration::from_secs(61))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "budget.window");
        assert!(format!("{:?}", RetryBudget::default()).contains("percent"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Deposit(u8),
        Withdraw(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..50).prop_map(Op::Deposit),
            (1u8..10).prop_map(Op::Withdraw),
            (0u16..3000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// The budget against a model in exact rational arithmetic: a
        /// withdrawal succeeds iff
        /// `min * window + percent/100 * live_calls - live_retries >= 1`,
        /// where an event is live while its slot (window / 10 wide) is one
        /// of the last ten.
        #[test]
        fn matches_the_model(
            min in 0u32..5,
            hundredths in 0u32..100_000,
            secs in 1u64..5,
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let percent = f64::from(hundredths) / 100.0;
            rt().block_on(async {
                let b = budget(min, percent, secs);
                let slot_ms = secs * 1000 / SLOTS as u64;
                let mut now_ms = 0u64;
                // (slot index, calls, retries)
                let mut events: Vec<(u64, i64, i64)> = Vec::new();
                for op in ops {
                    match op {
                        Op::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(u64::from(ms))).await;
                            now_ms += u64::from(ms);
                        }
                        Op::Deposit(n) => {
                            for _ in 0..n {
                                b.deposit();
                            }
                            events.push((now_ms / slot_ms, i64::from(n), 0));
                        }
                        Op::Withdraw(n) => {
                            for _ in 0..n {
                                let cur = now_ms / slot_ms;
                                let live = events.iter().filter(|e| cur - e.0 < SLOTS as u64);
                                let (calls, retries) = live.fold((0, 0), |a, e| (a.0 + e.1, a.1 + e.2));
                                // Everything times 10_000 (hundredths of a percent of a retry).
                                let balance = i64::from(min) * secs as i64 * 10_000
                                    + calls * i64::from(hundredths)
                                    - retries * 10_000;
                                let want = balance >= 10_000;
                                prop_assert_eq!(b.try_withdraw(), want);
                                if want {
                                    events.push((cur, 0, 1));
                                }
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
