//! GCRA, the generic cell rate algorithm: a token bucket kept as one number.
//!
//! The whole state of a bucket is its *theoretical arrival time* (TAT), in
//! nanoseconds on the layer's clock: the instant at which the bucket would
//! be full again if nothing else were admitted. With `t` the time one token
//! takes to refill and `tau = max_tokens * t` the burst tolerance, a
//! request costing `inc = cost * t` is admitted at `now` when
//!
//! ```text
//! max(tat, now) + inc - tau <= now          and then tat' = max(tat, now) + inc
//! ```
//!
//! Every function here is plain arithmetic over the stored word and `now`,
//! so it is tested without a service and can be run by any store (an
//! atomic in memory, a file, a Redis script).
//!
//! Why the bound holds: each admission moves the TAT forward by its `inc`,
//! and may only happen while the TAT stays within `tau` of `now`. So over a
//! window `[t0, t1]` the increments admitted add up to at most
//! `t1 - t0 + tau`; since every `inc` is rounded up, the admitted cost is at
//! most `max_tokens + refill_rate * (t1 - t0)` (to the nanosecond rounding of
//! `tau`).

use crate::clock::Nanos;

const NANOS_PER_SEC: f64 = 1e9;

/// The bucket's shape in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Params {
    /// Nanoseconds to refill one token.
    pub(crate) per_token: f64,
    /// Burst tolerance: `max_tokens` worth of refill time, rounded up.
    pub(crate) tau: Nanos,
    /// The longest a caller may wait for its turn (0: reject at once).
    pub(crate) max_wait: Nanos,
}

impl Params {
    pub(crate) fn new(max_tokens: f64, refill_rate: f64, max_wait: Nanos) -> Self {
        let per_token = NANOS_PER_SEC / refill_rate;
        Self {
            per_token,
            tau: ceil_nanos(max_tokens * per_token),
            max_wait,
        }
    }

    /// The TAT increment of a request costing `cost` tokens, rounded up so
    /// the bound can only err on the safe side; `None` if the cost can
    /// never be admitted (above the bucket, negative or not a number).
    #[inline]
    pub(crate) fn increment(&self, cost: f64) -> Option<Nanos> {
        if cost.is_nan() || cost < 0.0 {
            return None;
        }
        let inc = ceil_nanos(cost * self.per_token);
        (inc <= self.tau).then_some(inc)
    }
}

#[inline]
fn ceil_nanos(x: f64) -> Nanos {
    // `as` saturates: huge values become u64::MAX, which `increment` rejects.
    x.ceil() as Nanos
}

/// What a request gets from the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Admitted now; store `tat`.
    Admit { tat: Nanos },
    /// Admitted `wait` from now (at most `max_wait`); store `tat`, which is
    /// also the reservation to give back if the caller leaves early.
    Wait { tat: Nanos, wait: Nanos },
    /// Not admitted: the same request would be in `retry_after`.
    Reject { retry_after: Nanos },
}

/// Decides a request of increment `inc` at `now` against the stored `tat`.
#[inline]
pub(crate) fn decide(tat: Nanos, now: Nanos, inc: Nanos, p: &Params) -> Decision {
    let next = tat.max(now).saturating_add(inc);
    let wait = next.saturating_sub(p.tau).saturating_sub(now);
    if wait == 0 {
        Decision::Admit { tat: next }
    } else if wait <= p.max_wait {
        Decision::Wait { tat: next, wait }
    } else {
        Decision::Reject { retry_after: wait }
    }
}

/// The TAT after an upstream said "not before `until`": nothing is
/// admitted before `until`, and from then the bucket refills from holding
/// one request of increment `inc` (a slow start rather than a burst).
#[inline]
pub(crate) fn block_until(tat: Nanos, until: Nanos, inc: Nanos, p: &Params) -> Nanos {
    tat.max(until.saturating_add(p.tau).saturating_sub(inc))
}

/// The TAT after giving back the reservation `mine` of increment `inc`, or
/// `None` when a later reservation was made since: taking the increment
/// out from under later waiters would let a newcomer share their instant
/// and break the bound, so that reservation is left to expire instead.
#[inline]
pub(crate) fn refund(tat: Nanos, mine: Nanos, inc: Nanos) -> Option<Nanos> {
    (tat == mine).then(|| mine - inc)
}

/// Tokens available at `now`.
#[inline]
pub(crate) fn tokens(tat: Nanos, now: Nanos, p: &Params) -> f64 {
    let debt = tat.saturating_sub(now);
    (p.tau.saturating_sub(debt)) as f64 / p.per_token
}

/// Whether a bucket is full at `now`, so forgetting it changes nothing: a
/// fresh bucket (TAT 0) decides exactly the same.
#[inline]
pub(crate) fn is_idle(tat: Nanos, now: Nanos) -> bool {
    tat <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn p(max: f64, rate: f64, wait: Nanos) -> Params {
        Params::new(max, rate, wait)
    }

    #[test]
    fn burst_then_refill() {
        let p = p(3.0, 1.0, 0);
        let inc = p.increment(1.0).unwrap();
        let mut tat = 0;
        for _ in 0..3 {
            match decide(tat, 0, inc, &p) {
                Decision::Admit { tat: t } => tat = t,
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(decide(tat, 0, inc, &p), Decision::Reject { retry_after: S });
        assert_eq!(tokens(tat, 0, &p), 0.0);
        assert!(matches!(decide(tat, S, inc, &p), Decision::Admit { .. }));
        assert_eq!(tokens(tat, 3 * S, &p), 3.0);
        assert!(is_idle(tat, 3 * S));
    }

    #[test]
    fn cost_bounds() {
        let p = p(50.0, 3.0, 0);
        assert_eq!(p.increment(50.0), Some(p.tau));
        assert_eq!(p.increment(50.0001), None);
        assert_eq!(p.increment(-1.0), None);
        assert_eq!(p.increment(f64::NAN), None);
        assert_eq!(p.increment(f64::INFINITY), None);
        assert_eq!(p.increment(0.0), Some(0));
    }

    #[test]
    fn wait_within_max_wait() {
        let p = p(1.0, 1.0, 2 * S);
        let inc = p.increment(1.0).unwrap();
        assert_eq!(decide(0, 0, inc, &p), Decision::Admit { tat: S });
        assert_eq!(
            decide(S, 0, inc, &p),
            Decision::Wait {
                tat: 2 * S,
                wait: S
            }
        );
        assert_eq!(
            decide(2 * S, 0, inc, &p),
            Decision::Wait {
                tat: 3 * S,
                wait: 2 * S
            }
        );
        assert_eq!(
            decide(3 * S, 0, inc, &p),
            Decision::Reject { retry_after: 3 * S }
        );
    }

    #[test]
    fn refund_only_the_newest() {
        assert_eq!(refund(5 * S, 5 * S, S), Some(4 * S));
        assert_eq!(refund(6 * S, 5 * S, S), None);
    }

    #[test]
    fn block_holds_until_then_slow_starts() {
        let p = p(10.0, 1.0, 0);
        let inc = p.increment(1.0).unwrap();
        let tat = block_until(0, 5 * S, inc, &p);
        assert!(matches!(
            decide(tat, 5 * S - 1, inc, &p),
            Decision::Reject { retry_after: 1 }
        ));
        let Decision::Admit { tat } = decide(tat, 5 * S, inc, &p) else {
            panic!()
        };
        assert!(matches!(
            decide(tat, 5 * S, inc, &p),
            Decision::Reject { .. }
        ));
        // A later TAT already in force is kept.
        assert_eq!(block_until(20 * S, 0, inc, &p), 20 * S);
    }

    mod bound {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// For random arrivals and costs, in reject and wait modes, the
            /// cost admitted over every window `[t_i, t_j]` of admission
            /// times stays within `max_tokens + refill_rate * (t_j - t_i)`.
            #[test]
            fn admitted_cost_never_exceeds_the_bound(
                max_tokens in 1.0f64..20.0,
                refill_rate in 0.5f64..50.0,
                wait_ms in prop_oneof![Just(0u64), 1u64..3000],
                arrivals in proptest::collection::vec((0u64..400_000_000, 0.0f64..1.0), 1..120),
            ) {
                let p = Params::new(max_tokens, refill_rate, wait_ms * 1_000_000);
                let mut tat = 0;
                let mut now = 0;
                let mut admitted: Vec<(Nanos, f64)> = Vec::new();
                for (gap, frac) in arrivals {
                    now += gap;
                    let cost = frac * max_tokens;
                    let inc = p.increment(cost).expect("within the bucket");
                    match decide(tat, now, inc, &p) {
                        Decision::Admit { tat: t } => { tat = t; admitted.push((now, cost)); }
                        Decision::Wait { tat: t, wait } => {
                            prop_assert!(wait <= p.max_wait);
                            tat = t;
                            admitted.push((now + wait, cost));
                        }
                        Decision::Reject { retry_after } => prop_assert!(retry_after > p.max_wait),
                    }
                }
                admitted.sort_by_key(|a| a.0);
                for i in 0..admitted.len() {
                    let mut sum = 0.0;
                    for j in i..admitted.len() {
                        sum += admitted[j].1;
                        let elapsed = (admitted[j].0 - admitted[i].0) as f64 / 1e9;
                        let bound = max_tokens + refill_rate * elapsed;
                        // Exact up to the nanosecond rounding of `tau`.
                        prop_assert!(sum <= bound + 1e-6, "{sum} > {bound}");
                    }
                }
            }

            /// A full burst is always available after a long enough pause.
            #[test]
            fn full_after_idle(max_tokens in 1.0f64..100.0, refill_rate in 0.1f64..100.0) {
                let p = Params::new(max_tokens, refill_rate, 0);
                let inc = p.increment(1.0).unwrap_or(p.tau);
                let mut tat = 0;
                for _ in 0..1000 {
                    if let Decision::Admit { tat: t } = decide(tat, 0, inc, &p) { tat = t } else { break }
                }
                let later = tat + 1;
                prop_assert!((tokens(tat, later, &p) - max_tokens).abs() < 1e-6);
            }
        }
    }
}
