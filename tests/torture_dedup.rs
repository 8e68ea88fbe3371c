//! Random histories through the dedup layer: shared and distinct keys,
//! callers dropped at every await point, callers (leaders among them) that
//! keep their response future unpolled, or stop polling it, until every
//! other caller has ended, panics in `poll_ready`, `call`, the inner
//! future, the key closure and the `on_event` listener, on tokio's
//! current-thread and multi-thread runtimes, through two services of one
//! layer. No caller waits on a parked one; no caller gets the other
//! upstream's answer (unless the layer shares one table); afterwards no
//! entry is in flight, no inner future is left alive, and every key answers
//! again.
#![cfg(feature = "dedup")]

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::dedup::{Dedup, DedupEvent, DedupLayer, KeyFn};

#[path = "support/torture.rs"]
mod torture;
use torture::quiet_panics;

/// Keys `0..KEYS`; key 0 is never deduplicated.
const KEYS: u8 = 4;

/// What one caller does, and what its own inner call would do.
#[derive(Clone, Copy, Debug, Default)]
struct Plan {
    key: u8,
    /// The key closure panics.
    key_panics: bool,
    /// The inner service panics in `poll_ready`.
    ready_panics: bool,
    /// The inner service panics in `call`.
    call_panics: bool,
    /// The listener panics on the next leader, joined or cache-hit event.
    arm_listener: bool,
    /// The inner future yields this many times, then answers.
    yields: u8,
    /// The inner future panics at this poll.
    fut_panics_at: Option<u8>,
    /// The inner future answers with an error.
    fails: bool,
    /// The caller drops its response future after this many polls.
    drop_after: Option<u8>,
    /// The caller parks its response future after this many polls (0:
    /// never polled) until every caller that does not park has ended.
    park_after: Option<u8>,
    /// A parked caller then drops its future instead of polling it to the
    /// end.
    park_then_drop: bool,
}

impl Plan {
    fn random(rng: &mut fastrand::Rng) -> Self {
        let one_in = |rng: &mut fastrand::Rng, n: u32| rng.u32(0..n) == 0;
        Self {
            key: rng.u8(0..KEYS),
            key_panics: one_in(rng, 25),
            ready_panics: one_in(rng, 25),
            call_panics: one_in(rng, 20),
            arm_listener: one_in(rng, 20),
            yields: rng.u8(0..4),
            fut_panics_at: one_in(rng, 10).then(|| rng.u8(0..4)),
            fails: one_in(rng, 10),
            drop_after: one_in(rng, 3).then(|| rng.u8(0..6)),
            park_after: one_in(rng, 5).then(|| rng.u8(0..3)),
            park_then_drop: rng.bool(),
        }
    }

    /// The answer of upstream `tag` to this plan's key.
    fn answer(&self, tag: u64) -> u64 {
        u64::from(self.key) * 10 + tag
    }
}

/// The upstream: follows each request's plan, and counts its futures that
/// are alive.
#[derive(Clone)]
struct Torture {
    /// Which upstream this is: part of every answer.
    tag: u64,
    ready_panics: bool,
    alive: Arc<AtomicUsize>,
}

struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<Plan> for Torture {
    type Response = u64;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        assert!(!self.ready_panics, "torture: poll_ready");
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, plan: Plan) -> Self::Future {
        assert!(!plan.call_panics, "torture: call");
        self.alive.fetch_add(1, Ordering::SeqCst);
        let alive = Alive(self.alive.clone());
        let tag = self.tag;
        Box::pin(async move {
            let _alive = alive;
            for i in 0..=plan.yields {
                assert!(plan.fut_panics_at != Some(i), "torture: future");
                if i < plan.yields {
                    tokio::task::yield_now().await;
                }
            }
            if plan.fails {
                return Err("torture: failed".into());
            }
            Ok(plan.answer(tag))
        })
    }
}

fn key(plan: &Plan) -> Option<u8> {
    assert!(!plan.key_panics, "torture: key");
    (plan.key != 0).then_some(plan.key)
}

type KeyOf = KeyFn<fn(&Plan) -> Option<u8>, u8>;
type Svc = Dedup<Torture, KeyOf>;

struct History {
    layer: DedupLayer<KeyOf>,
    /// Two upstreams behind one layer, each with its own service.
    svcs: [Svc; 2],
    /// Whether the layer shares one table between them.
    shared: bool,
    armed: Arc<AtomicBool>,
    alive: Arc<AtomicUsize>,
}

fn history(rng: &mut fastrand::Rng) -> History {
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let mut b = DedupLayer::builder()
        .key(key as fn(&Plan) -> Option<u8>)
        .max_entries(rng.usize(1..5))
        .on_event(move |e: &DedupEvent| {
            let hit = matches!(
                e,
                DedupEvent::Leader { .. } | DedupEvent::Joined { .. } | DedupEvent::CacheHit { .. }
            );
            if hit && a.swap(false, Ordering::SeqCst) {
                panic!("torture: listener");
            }
        });
    if rng.bool() {
        b = b.cache_ttl(Duration::from_millis(rng.u64(1..20)));
    }
    if rng.u32(0..4) == 0 {
        b = b.error_ttl(Duration::from_millis(rng.u64(1..20)));
    }
    let shared = rng.u32(0..4) == 0;
    if shared {
        b = b.share_between_services();
    }
    let layer = b.build().unwrap();
    let alive = Arc::new(AtomicUsize::new(0));
    let svcs = [0, 1].map(|tag| {
        layer.layer(Torture {
            tag,
            ready_panics: false,
            alive: alive.clone(),
        })
    });
    History {
        layer,
        svcs,
        shared,
        armed,
        alive,
    }
}

/// How one caller ended.
#[derive(Debug)]
enum End {
    Answered(Result<u64, BoxError>),
    Dropped,
    Panicked(String),
}

async fn caller(
    mut svc: Svc,
    plan: Plan,
    armed: Arc<AtomicBool>,
    mut release: watch::Receiver<bool>,
) -> End {
    svc.get_mut().ready_panics = plan.ready_panics;
    let run = async move {
        svc.ready().await?;
        if plan.arm_listener {
            armed.store(true, Ordering::SeqCst);
        }
        let mut fut = svc.call(plan);
        if let Some(polls) = plan.park_after {
            let mut n = 0;
            let polled = poll_fn(|cx| {
                if n == polls {
                    return Poll::Ready(None);
                }
                n += 1;
                Pin::new(&mut fut).poll(cx).map(Some)
            })
            .await;
            if let Some(answer) = polled {
                return answer.map(Some);
            }
            // Parked: nobody polls this future until the others ended.
            release.wait_for(|r| *r).await.expect("released");
            if plan.park_then_drop {
                return Ok(None);
            }
            return fut.await.map(Some);
        }
        let Some(limit) = plan.drop_after else {
            return fut.await.map(Some);
        };
        let mut fut = pin!(fut);
        let mut polls = 0;
        poll_fn(|cx| {
            if polls == limit {
                return Poll::Ready(Ok(None));
            }
            polls += 1;
            fut.as_mut().poll(cx).map(|r| r.map(Some))
        })
        .await
    };
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(Ok(Some(v))) => End::Answered(Ok(v)),
        Ok(Ok(None)) => End::Dropped,
        Ok(Err(e)) => End::Answered(Err(e)),
        Err(p) => End::Panicked(
            p.downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        ),
    }
}

/// Runs `histories` random histories of up to 16 callers each.
async fn run(seed: u64, histories: usize) {
    quiet_panics();
    let mut rng = fastrand::Rng::with_seed(seed);
    // How callers ended: answered, failed, dropped, panicked.
    let mut seen = [0usize; 4];
    for n in 0..histories {
        let h = history(&mut rng);
        let callers = rng.usize(1..16);
        // Each caller's plan, and the upstream it calls.
        let plans: Vec<(Plan, usize)> = (0..callers)
            .map(|_| (Plan::random(&mut rng), rng.usize(0..2)))
            .collect();
        let (release, released) = watch::channel(false);
        let mut tasks: Vec<_> = plans
            .iter()
            .map(|&(plan, up)| {
                let c = caller(h.svcs[up].clone(), plan, h.armed.clone(), released.clone());
                Some(tokio::spawn(c))
            })
            .collect();
        // Every caller that does not park ends while the parked ones hold
        // their futures.
        let mut ends: Vec<Option<End>> = (0..callers).map(|_| None).collect();
        let running: Vec<usize> = (0..callers)
            .filter(|&i| plans[i].0.park_after.is_none())
            .collect();
        let first = futures::future::join_all(running.iter().map(|&i| tasks[i].take().unwrap()));
        let first = tokio::time::timeout(Duration::from_secs(60), first)
            .await
            .unwrap_or_else(|_| panic!("history {n} (seed {seed}) wedged: {plans:?}"));
        for (&i, end) in running.iter().zip(first) {
            ends[i] = Some(end.expect("a caller's task ended"));
        }
        release.send(true).unwrap();
        for (i, task) in tasks.iter_mut().enumerate() {
            if let Some(task) = task.take() {
                let end = tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .unwrap_or_else(|_| panic!("history {n} (seed {seed}): parked {i} wedged"));
                ends[i] = Some(end.expect("a caller's task ended"));
            }
        }
        for (&(plan, up), end) in plans.iter().zip(ends) {
            match end.expect("every caller ended") {
                End::Answered(Ok(v)) => {
                    // Only a layer that shares one table may answer from
                    // the other upstream.
                    let other = h.shared && v == plan.answer(1 - up as u64);
                    assert!(
                        v == plan.answer(up as u64) || other,
                        "history {n}: {plan:?} {v}"
                    );
                    seen[0] += 1;
                }
                End::Answered(Err(_)) => seen[1] += 1,
                End::Dropped => seen[2] += 1,
                End::Panicked(m) => {
                    assert!(m.starts_with("torture: "), "history {n}: {m}");
                    seen[3] += 1;
                }
            }
        }
        h.armed.store(false, Ordering::SeqCst);
        let handle = h.layer.handle();
        assert_eq!(
            handle.in_flight(),
            0,
            "history {n} (seed {seed}): {plans:?}"
        );
        assert_eq!(
            h.alive.load(Ordering::SeqCst),
            0,
            "history {n}: inner futures alive"
        );
        // Every key answers again, shared and distinct, on both upstreams
        // (cached errors forgotten first).
        handle.clear_cache();
        for k in 0..KEYS {
            for (up, svc) in h.svcs.iter().enumerate() {
                let plan = Plan {
                    key: k,
                    ..Plan::default()
                };
                let again =
                    tokio::time::timeout(Duration::from_secs(60), svc.clone().oneshot(plan))
                        .await
                        .unwrap_or_else(|_| panic!("history {n}: key {k} wedged"))
                        .unwrap();
                let other = h.shared && again == plan.answer(1 - up as u64);
                assert!(
                    again == plan.answer(up as u64) || other,
                    "history {n}: key {k}"
                );
            }
        }
        assert_eq!(handle.in_flight(), 0);
        assert_eq!(h.alive.load(Ordering::SeqCst), 0);
    }
    // Every way of ending came up, many times.
    assert!(seen.iter().all(|&n| n > histories / 10), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn random_histories_current_thread() {
    run(0x5eed_0001, 1500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_multi_thread() {
    run(0x5eed_0002, 600).await;
}
