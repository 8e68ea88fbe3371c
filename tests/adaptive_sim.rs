//! The adaptive limit against a simulated upstream on tokio's paused clock.
//!
//! The upstream serves `capacity` calls at its base latency; beyond that
//! its workers are shared, so each call's latency grows in proportion to
//! the calls in flight (its knee is at `capacity`). Clients send ten times
//! what it can serve and only count answers that arrive within a deadline
//! (goodput).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::adaptive::{
    AdaptiveHandle, AdaptiveLimitLayer, Aimd, Algorithm, Gradient, Vegas,
};
use tower_bulwark::error::BoxError;
use tower_bulwark::{BulkheadLayer, ClockSource};

const BASE: Duration = Duration::from_millis(10);
const DEADLINE: Duration = Duration::from_millis(40);

struct Upstream {
    capacity: AtomicUsize,
    in_flight: AtomicUsize,
}

struct Leave<'a>(&'a AtomicUsize);
impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

fn upstream(
    sim: Arc<Upstream>,
) -> impl Service<(), Response = (), Error = BoxError, Future: Send> + Clone + Send {
    service_fn(move |()| {
        let sim = sim.clone();
        async move {
            let n = sim.in_flight.fetch_add(1, SeqCst) + 1;
            let _leave = Leave(&sim.in_flight);
            let cap = sim.capacity.load(SeqCst);
            let share = (n as f64 / cap as f64).max(1.0);
            sleep(BASE.mul_f64(share)).await;
            Ok::<_, BoxError>(())
        }
    })
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    good: AtomicU64,
}

/// Sends `per_ms` calls every millisecond for `for_ms`, each on its own
/// task; returns the calls answered within the deadline, per second.
async fn load<S>(svc: &S, per_ms: u64, for_ms: u64) -> f64
where
    S: Service<(), Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..for_ms {
        for _ in 0..per_ms {
            let svc = svc.clone();
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                tally.sent.fetch_add(1, SeqCst);
                let start = Instant::now();
                if svc.oneshot(()).await.is_ok() && start.elapsed() <= DEADLINE {
                    tally.good.fetch_add(1, SeqCst);
                }
            }));
        }
        sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally.good.load(SeqCst) as f64 * 1000.0 / for_ms as f64
}

/// One phase of the run: the limit at its end and the goodput during it.
#[derive(Debug)]
struct Phase {
    capacity: usize,
    limit: usize,
    goodput: f64,
}

async fn run(algorithm: Algorithm) -> Vec<Phase> {
    let sim = Arc::new(Upstream {
        capacity: AtomicUsize::new(10),
        in_flight: AtomicUsize::new(0),
    });
    let layer = AdaptiveLimitLayer::builder()
        .algorithm(algorithm)
        // The simulation runs on tokio's paused clock.
        .clock(ClockSource::Tokio)
        .initial_limit(50)
        .max_limit(1000)
        .build()
        .unwrap();
    let handle: AdaptiveHandle = layer.handle();
    let svc = layer.layer(upstream(sim.clone()));
    let mut phases = Vec::new();
    // Healthy, degraded to 4 workers, recovered; each at 10x capacity
    // (capacity = workers / base latency = workers per 10 ms).
    for cap in [10usize, 4, 10] {
        sim.capacity.store(cap, SeqCst);
        let per_ms = cap as u64; // 10x of cap/10 per ms
        load(&svc, per_ms, 2_000).await; // settle
        let goodput = load(&svc, per_ms, 1_000).await;
        phases.push(Phase {
            capacity: cap,
            limit: handle.limit(),
            goodput,
        });
    }
    assert_eq!(handle.in_flight(), 0);
    phases
}

/// Asserts each phase settled with its limit within `band` times the
/// knee, and goodput at least 70% of capacity.
fn assert_converged(name: &str, phases: &[Phase], band: (f64, f64)) {
    for p in phases {
        let capacity_rps = p.capacity as f64 * 100.0;
        println!(
            "{name}: workers {} -> limit {}, goodput {:.0}/s of {:.0}/s ({:.0}%)",
            p.capacity,
            p.limit,
            p.goodput,
            capacity_rps,
            100.0 * p.goodput / capacity_rps
        );
        let knee = p.capacity as f64;
        assert!(
            (band.0 * knee..=band.1 * knee).contains(&(p.limit as f64)),
            "{name}: limit {} outside {band:?} x the knee at {}",
            p.limit,
            p.capacity
        );
        assert!(
            p.goodput >= 0.7 * capacity_rps,
            "{name}: goodput {} of {capacity_rps}",
            p.goodput
        );
    }
}

/// Gradient settles where the queue it allows (`√limit` by default) sits
/// on top of the knee: `limit = knee + √limit`, 13.7 for a knee of 10 and
/// 6.6 for 4, plus at most one call because admission uses the whole part
/// of the limit. 1.6x holds both; the old 1.5 tolerance and fixed queue of
/// 4 settled at 2.3x and 3x.
const GRADIENT_BAND: (f64, f64) = (0.7, 1.6);
/// Vegas and AIMD are only held to the same neighbourhood: Vegas's
/// `3·log10` queue floor is a queue of 3 calls even at a knee of 4.
const LOOSE_BAND: (f64, f64) = (0.5, 3.0);

#[tokio::test(start_paused = true)]
async fn gradient_converges_near_the_knee_and_recovers() {
    let phases = run(Gradient::default().into()).await;
    assert_converged("gradient", &phases, GRADIENT_BAND);
}

#[tokio::test(start_paused = true)]
async fn gradient_with_a_tolerance_settles_that_far_above_the_knee_and_no_further() {
    // Tolerating 1.5x the normal latency is tolerating 1.5x the knee's
    // calls; the limit must not creep beyond that across the phases (an
    // overloaded start or a slow spell taught as "normal" latency would
    // make it).
    let phases = run(Gradient::default().tolerance(1.5).into()).await;
    assert_converged("gradient(1.5)", &phases, (1.5 * 0.7, 1.5 * 1.6));
}

#[tokio::test(start_paused = true)]
async fn vegas_converges_near_the_knee_and_recovers() {
    assert_converged("vegas", &run(Vegas::default().into()).await, LOOSE_BAND);
}

#[tokio::test(start_paused = true)]
async fn aimd_with_a_latency_threshold_converges_near_the_knee_and_recovers() {
    let aimd = Aimd::default().latency_threshold(BASE.mul_f64(1.5));
    assert_converged("aimd", &run(aimd.into()).await, LOOSE_BAND);
}

#[tokio::test(start_paused = true)]
async fn a_fixed_bulkhead_set_too_high_collapses_under_the_same_overload() {
    let sim = Arc::new(Upstream {
        capacity: AtomicUsize::new(10),
        in_flight: AtomicUsize::new(0),
    });
    let bulkhead = BulkheadLayer::builder()
        .max_concurrent(100)
        .build()
        .unwrap();
    let svc = bulkhead.layer(upstream(sim));
    load(&svc, 10, 2_000).await;
    let goodput = load(&svc, 10, 1_000).await;
    println!("bulkhead(100): goodput {goodput:.0}/s of 1000/s");
    assert!(goodput < 0.1 * 1000.0, "goodput {goodput}");
}
