//! The limit algorithms, as plain functions of the current limit and one
//! finished call, so they can be tested without any service around them.
//!
//! Invariant (property-tested over arbitrary histories): whatever the
//! samples (zero or huge latencies, any count in flight, any mix of
//! failures), an update returns a finite limit within `[min, max]`.

use std::time::Duration;

/// One finished call, as the algorithms see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// How long the call took, in nanoseconds.
    pub(crate) rtt: f64,
    /// Calls in flight when it started, itself included.
    pub(crate) in_flight: usize,
    /// Calls in flight when it ended, itself included.
    pub(crate) in_flight_end: usize,
    /// Whether it failed (by the classifier): a sign of overload.
    pub(crate) dropped: bool,
    /// When it started, in nanoseconds since the layer was built.
    pub(crate) start: f64,
}

/// Additive increase, multiplicative decrease: the limit grows by
/// [`increase`](Aimd::increase) per round of calls (as many calls as the
/// limit) while calls succeed with the limit in use, and is multiplied by
/// [`backoff_ratio`](Aimd::backoff_ratio) on a failure or a call slower
/// than [`latency_threshold`](Aimd::latency_threshold), once per round:
/// the calls already in flight at a back-off do not back off again.
///
/// Reacts to failures and to a latency bound you know; it does not learn
/// what latency is normal (see [`Gradient`] and [`Vegas`] for that).
#[derive(Debug, Clone, Copy)]
pub struct Aimd {
    pub(crate) backoff_ratio: f64,
    pub(crate) increase: f64,
    pub(crate) latency_threshold: Duration,
}

impl Default for Aimd {
    /// Back off to 0.9 of the limit, grow by 1, a latency threshold of 5 s.
    fn default() -> Self {
        Self {
            backoff_ratio: 0.9,
            increase: 1.0,
            latency_threshold: Duration::from_secs(5),
        }
    }
}

impl Aimd {
    /// What the limit is multiplied by on a failure or a slow call, in
    /// `[0.5, 1)` (default 0.9).
    pub fn backoff_ratio(mut self, r: f64) -> Self {
        self.backoff_ratio = r;
        self
    }

    /// How much the limit grows per round of successful calls that used
    /// it, above zero (default 1).
    pub fn increase(mut self, n: f64) -> Self {
        self.increase = n;
        self
    }

    /// A call slower than this counts as a failure (default 5 s).
    pub fn latency_threshold(mut self, d: Duration) -> Self {
        self.latency_threshold = d;
        self
    }
}

/// Gradient (gradient2, as in Netflix's concurrency-limits): compares the
/// recent latency with its long-term average. While recent calls are no
/// slower than [`tolerance`](Gradient::tolerance) times the long-term
/// latency, the limit grows by a small queue allowance; when they are
/// slower, it shrinks in proportion. A failure counts as the steepest
/// slow-down.
///
/// Past its knee an upstream's latency grows with the calls it holds, so
/// the limit settles where `limit = tolerance × knee + queue allowance`:
/// with the defaults (no tolerance, an allowance of `√limit`) that is a
/// few calls above the knee, about 1.4× a knee of 10 and 1.03× a knee of
/// 1000. Raise the tolerance only for an upstream whose latency is noisy
/// at any load; each step above 1 lets the limit overshoot by that much.
///
/// The long-term average follows the latency slowly, and is pulled down
/// at once when calls become much faster than it (the upstream
/// recovered), so the limit can grow back.
#[derive(Debug, Clone, Copy)]
pub struct Gradient {
    pub(crate) tolerance: f64,
    pub(crate) smoothing: f64,
    pub(crate) window: u32,
    pub(crate) long_window: u32,
    /// `None`: the square root of the limit.
    pub(crate) queue_size: Option<f64>,
}

impl Default for Gradient {
    /// Tolerance 1 (shrink as soon as calls queue), smoothing 0.2, short
    /// windows of 10 calls, a long-term average over about 600 calls, a
    /// queue allowance of the square root of the limit.
    fn default() -> Self {
        Self {
            tolerance: 1.0,
            smoothing: 0.2,
            window: 10,
            long_window: 600,
            queue_size: None,
        }
    }
}

impl Gradient {
    /// How much slower than the long-term latency recent calls may be
    /// before the limit shrinks, at least 1 (default 1: any queueing
    /// shrinks it). The limit settles near `tolerance` times the
    /// upstream's knee.
    pub fn tolerance(mut self, t: f64) -> Self {
        self.tolerance = t;
        self
    }

    /// How far each update moves the limit toward its new estimate, in
    /// `(0, 1]` (default 0.2).
    pub fn smoothing(mut self, s: f64) -> Self {
        self.smoothing = s;
        self
    }

    /// Calls per short window: the limit is updated once per window, from
    /// the window's average latency (default 10).
    pub fn window(mut self, calls: u32) -> Self {
        self.window = calls;
        self
    }

    /// Calls the long-term average spans, at least `window` (default 600).
    pub fn long_window(mut self, calls: u32) -> Self {
        self.long_window = calls;
        self
    }

    /// Calls allowed to queue at the upstream beyond the estimate, at
    /// least 0: also how fast the limit grows while latency holds (by
    /// `smoothing × queue_size` per window). By default the square root of
    /// the limit, at least 1: a small limit stays close to the knee, and a
    /// large one grows back quickly and is not worn down by latency noise.
    pub fn queue_size(mut self, n: f64) -> Self {
        self.queue_size = Some(n);
        self
    }
}

/// Vegas (as in TCP Vegas and Netflix's concurrency-limits): estimates
/// the calls queued at the upstream from the lowest latency seen
/// (`limit × (1 − min_rtt / rtt)`) and grows the limit while that queue is
/// short, shrinks it when long. A failure shrinks it too.
///
/// The lowest latency is measured again every
/// [`probe_interval`](Vegas::probe_interval) calls, so an upstream that
/// became permanently slower is not held to an old best.
#[derive(Debug, Clone, Copy)]
pub struct Vegas {
    pub(crate) alpha: f64,
    pub(crate) beta: f64,
    pub(crate) probe_interval: u32,
}

impl Default for Vegas {
    /// Grow below a queue of 3·log10(limit), shrink above 6·log10(limit),
    /// measure the lowest latency again every 1000 calls.
    fn default() -> Self {
        Self {
            alpha: 3.0,
            beta: 6.0,
            probe_interval: 1000,
        }
    }
}

impl Vegas {
    /// The limit grows while the estimated queue is below
    /// `alpha × log10(limit)` (default 3).
    pub fn alpha(mut self, a: f64) -> Self {
        self.alpha = a;
        self
    }

    /// The limit shrinks when the estimated queue is above
    /// `beta × log10(limit)`; above `alpha` (default 6).
    pub fn beta(mut self, b: f64) -> Self {
        self.beta = b;
        self
    }

    /// Calls between fresh measurements of the lowest latency, at least 1
    /// (default 1000).
    pub fn probe_interval(mut self, calls: u32) -> Self {
        self.probe_interval = calls;
        self
    }
}

/// Which algorithm sets the limit. `Aimd`, `Gradient` and `Vegas` convert
/// into it, so the builder takes any of them.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Algorithm {
    /// See [`Aimd`].
    Aimd(Aimd),
    /// See [`Gradient`].
    Gradient(Gradient),
    /// See [`Vegas`].
    Vegas(Vegas),
}

impl Default for Algorithm {
    /// [`Gradient`] with its defaults.
    fn default() -> Self {
        Algorithm::Gradient(Gradient::default())
    }
}

impl From<Aimd> for Algorithm {
    fn from(a: Aimd) -> Self {
        Algorithm::Aimd(a)
    }
}

impl From<Gradient> for Algorithm {
    fn from(g: Gradient) -> Self {
        Algorithm::Gradient(g)
    }
}

impl From<Vegas> for Algorithm {
    fn from(v: Vegas) -> Self {
        Algorithm::Vegas(v)
    }
}

/// An algorithm with what it has learned so far.
#[derive(Debug, Clone)]
pub(crate) struct Estimator {
    algorithm: Algorithm,
    pub(crate) limit: f64,
    min: f64,
    max: f64,
    // Gradient: the current short window and the long-term average.
    sum: f64,
    count: u32,
    peak_in_flight: usize,
    dropped: bool,
    long_rtt: f64,
    // Aimd: when the last back-off was decided.
    backed_off_at: f64,
    // Vegas: the lowest latency and calls until it is measured again.
    min_rtt: f64,
    until_probe: u32,
}

/// `max(1, log10(n))`: Vegas's step, never below one call.
fn log10_step(n: f64) -> f64 {
    n.log10().max(1.0)
}

impl Estimator {
    pub(crate) fn new(algorithm: Algorithm, initial: usize, min: usize, max: usize) -> Self {
        let probe = match algorithm {
            Algorithm::Vegas(v) => v.probe_interval,
            _ => 0,
        };
        Self {
            algorithm,
            limit: initial as f64,
            min: min as f64,
            max: max as f64,
            sum: 0.0,
            count: 0,
            peak_in_flight: 0,
            dropped: false,
            long_rtt: 0.0,
            backed_off_at: 0.0,
            min_rtt: 0.0,
            until_probe: probe,
        }
    }

    /// Takes one finished call into account; returns the new limit.
    pub(crate) fn update(&mut self, s: Sample) -> f64 {
        let next = match self.algorithm {
            Algorithm::Aimd(a) => self.aimd(a, s),
            Algorithm::Gradient(g) => self.gradient(g, s),
            Algorithm::Vegas(v) => self.vegas(v, s),
        };
        // A NaN (which no path should make) keeps the old limit.
        if next.is_finite() {
            self.limit = next.clamp(self.min, self.max);
        }
        self.limit
    }

    fn aimd(&mut self, a: Aimd, s: Sample) -> f64 {
        let slow = s.rtt > a.latency_threshold.as_nanos() as f64;
        if s.dropped || slow {
            // One back-off per round of calls: the calls that started
            // before the last back-off saw the old limit, and their news
            // is already acted on.
            if s.start < self.backed_off_at {
                return self.limit;
            }
            self.backed_off_at = s.start + s.rtt;
            self.limit * a.backoff_ratio
        } else if s.in_flight as f64 * 2.0 >= self.limit {
            // `increase` per round of `limit` calls.
            self.limit + a.increase / self.limit
        } else {
            // The limit was not in use: success says nothing about it.
            self.limit
        }
    }

    fn gradient(&mut self, g: Gradient, s: Sample) -> f64 {
        if self.long_rtt == 0.0 {
            // The first call is the best guess of unloaded latency there is.
            self.long_rtt = s.rtt;
        }
        self.sum += s.rtt;
        self.count += 1;
        // A call that started with room to spare but ended among a full
        // limit was slowed by the calls that joined it: its latency is not
        // the unloaded one either.
        self.peak_in_flight = self.peak_in_flight.max(s.in_flight).max(s.in_flight_end);
        self.dropped |= s.dropped;
        if self.count < g.window {
            return self.limit;
        }
        let short = self.sum / f64::from(self.count);
        let (peak, dropped) = (self.peak_in_flight, self.dropped);
        self.sum = 0.0;
        self.count = 0;
        self.peak_in_flight = 0;
        self.dropped = false;

        // The long-term latency is what "normal" means, so it learns a
        // rise only from windows that did not fill the limit (or at the
        // floor, where nothing else can be learnt): latency measured while
        // calls queue for the limit is not normal, and learning it would
        // let the limit drift up without end under sustained load. It
        // follows a fall at once when calls become much faster.
        // (Admission uses the whole part of the limit.)
        let saturated = peak as f64 >= self.limit.floor() && self.limit > self.min;
        let alpha = f64::from(g.window) / f64::from(g.long_window);
        if short < self.long_rtt || !saturated {
            self.long_rtt += (short - self.long_rtt) * alpha;
        }
        if self.long_rtt > 2.0 * short {
            self.long_rtt = 2.0 * short;
        }
        if !dropped && (peak as f64) < self.limit / 2.0 {
            // Not using the limit: latency says nothing about it.
            return self.limit;
        }
        let gradient = if dropped {
            0.5
        } else if short <= 0.0 {
            1.0
        } else {
            (g.tolerance * self.long_rtt / short).clamp(0.5, 1.0)
        };
        let queue = g.queue_size.unwrap_or_else(|| self.limit.sqrt().max(1.0));
        let estimate = self.limit * gradient + queue;
        self.limit * (1.0 - g.smoothing) + estimate * g.smoothing
    }

    fn vegas(&mut self, v: Vegas, s: Sample) -> f64 {
        self.until_probe = self.until_probe.saturating_sub(1);
        if self.until_probe == 0 {
            self.until_probe = v.probe_interval;
            self.min_rtt = 0.0;
        }
        if s.rtt > 0.0 && (self.min_rtt == 0.0 || s.rtt < self.min_rtt) {
            self.min_rtt = s.rtt;
        }
        let step = log10_step(self.limit);
        if s.dropped {
            return self.limit - step;
        }
        if (s.in_flight as f64) * 2.0 < self.limit || s.rtt <= 0.0 {
            return self.limit;
        }
        let queue = self.limit * (1.0 - self.min_rtt / s.rtt);
        let log = self.limit.log10().max(1.0);
        if queue <= v.alpha * log {
            self.limit + step
        } else if queue >= v.beta * log {
            self.limit - step
        } else {
            self.limit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn algorithms() -> impl Strategy<Value = Algorithm> {
        prop_oneof![
            (0.5f64..1.0, 0.001f64..1e6, 0u64..u64::MAX).prop_map(|(b, i, t)| {
                Aimd::default()
                    .backoff_ratio(b)
                    .increase(i)
                    .latency_threshold(Duration::from_nanos(t))
                    .into()
            }),
            (
                1.0f64..10.0,
                0.001f64..=1.0,
                1u32..50,
                prop::option::of(0.0f64..1e3)
            )
                .prop_map(|(t, s, w, q)| {
                    let g = Gradient::default()
                        .tolerance(t)
                        .smoothing(s)
                        .window(w)
                        .long_window(w * 60);
                    match q {
                        Some(q) => g.queue_size(q).into(),
                        None => g.into(),
                    }
                }),
            (0.0f64..10.0, 1u32..2000).prop_map(|(a, p)| {
                Vegas::default()
                    .alpha(a)
                    .beta(a + 1.0)
                    .probe_interval(p)
                    .into()
            }),
        ]
    }

    fn samples() -> impl Strategy<Value = Vec<Sample>> {
        let rtt = prop_oneof![Just(0.0), 0.0f64..1e3, 1e3f64..1e10, Just(u64::MAX as f64)];
        prop::collection::vec(
            (
                rtt,
                0usize..100_000,
                0usize..100_000,
                any::<bool>(),
                0f64..1e12,
            )
                .prop_map(|(rtt, in_flight, in_flight_end, dropped, start)| Sample {
                    rtt,
                    in_flight,
                    in_flight_end,
                    dropped,
                    start,
                }),
            0..400,
        )
    }

    proptest! {
        #[test]
        fn the_limit_stays_finite_and_within_bounds(
            alg in algorithms(),
            min in 1usize..50,
            span in 0usize..10_000,
            history in samples(),
        ) {
            let max = min + span;
            let mut e = Estimator::new(alg, min + span / 2, min, max);
            for s in history {
                let l = e.update(s);
                prop_assert!(l.is_finite());
                prop_assert!(l >= min as f64 && l <= max as f64, "{l} outside [{min}, {max}]");
            }
        }
    }

    #[test]
    fn aimd_backs_off_on_failure_and_grows_when_the_limit_is_used() {
        let mut e = Estimator::new(Aimd::default().into(), 10, 1, 100);
        let ok = |in_flight| Sample {
            rtt: 1e6,
            in_flight,
            in_flight_end: in_flight,
            dropped: false,
            start: 5e6,
        };
        assert_eq!(e.update(ok(10)), 10.1);
        assert_eq!(e.update(ok(1)), 10.1);
        let failed = Sample {
            dropped: true,
            ..ok(10)
        };
        assert!((e.update(failed) - 9.09).abs() < 1e-9);
        // A call that started before that back-off was decided does not
        // back off again; one that started after it does.
        let early = Sample {
            start: 5.5e6,
            ..failed
        };
        assert!((e.update(early) - 9.09).abs() < 1e-9);
        let late = Sample {
            start: 7e6,
            ..failed
        };
        assert!(e.update(late) < 9.0);
    }

    #[test]
    fn gradient_grows_by_the_square_root_of_the_limit_and_settles_above_the_knee_by_it() {
        let mut e = Estimator::new(Gradient::default().into(), 100, 1, 1000);
        let call = |rtt: f64, n| Sample {
            rtt,
            in_flight: n,
            in_flight_end: n,
            dropped: false,
            start: 0.0,
        };
        // Steady latency with the limit in use: one window grows it by
        // smoothing x sqrt(100).
        for _ in 0..10 {
            e.update(call(1e6, 100));
        }
        assert!((e.limit - 102.0).abs() < 1e-9, "{}", e.limit);
        // An upstream whose latency grows with its calls past a knee of 36:
        // the limit settles at knee + sqrt(limit) = 42.6.
        for _ in 0..20_000 {
            let n = e.limit.floor() as usize;
            e.update(call(1e6 * (n as f64 / 36.0).max(1.0), n));
        }
        assert!((41.0..=44.0).contains(&e.limit), "{}", e.limit);
    }

    #[test]
    fn vegas_grows_on_an_idle_upstream_and_shrinks_on_a_queue() {
        let mut e = Estimator::new(Vegas::default().into(), 20, 1, 1000);
        let at = |rtt: f64, in_flight| Sample {
            rtt,
            in_flight,
            in_flight_end: in_flight,
            dropped: false,
            start: 0.0,
        };
        e.update(at(10e6, 20));
        assert!(e.limit > 20.0);
        let before = e.limit;
        // Twice the lowest latency: half the calls are queued.
        e.update(at(20e6, 21));
        assert!(e.limit < before);
    }
}
