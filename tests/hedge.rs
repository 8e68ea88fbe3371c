//! The hedge layer through its public API, on tokio's paused clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{advance, sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::error::BoxError;
use tower_bulwark::hedge::{HedgeEvent, HedgeLayer};
use tower_bulwark::ClockSource;

const MS: Duration = Duration::from_millis(1);

/// Counts drops of the futures it hands out.
struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// An upstream whose n-th copy (of all calls) takes `plan(n)` ms, or fails
/// when that is `None`; it counts the copies sent and dropped unfinished.
#[derive(Clone)]
struct Upstream {
    sent: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    plan: Arc<dyn Fn(usize) -> Option<u64> + Send + Sync>,
}

impl Upstream {
    fn new(plan: impl Fn(usize) -> Option<u64> + Send + Sync + 'static) -> Self {
        Self {
            sent: Arc::default(),
            dropped: Arc::default(),
            plan: Arc::new(plan),
        }
    }
}

impl Service<u32> for Upstream {
    type Response = (u32, usize);
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(u32, usize), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        let nth = self.sent.fetch_add(1, SeqCst);
        let plan = (self.plan)(nth);
        let mut guard = Some(DropCounter(self.dropped.clone()));
        Box::pin(async move {
            let ms = plan.ok_or("copy failed")?;
            sleep(MS * ms as u32).await;
            // Finished: not counted as dropped unfinished.
            std::mem::forget(guard.take());
            Ok((req, nth))
        })
    }
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// These tests run on tokio's paused clock.
fn builder() -> tower_bulwark::hedge::HedgeBuilder {
    HedgeLayer::builder().clock(ClockSource::Tokio)
}

fn fixed(delay_ms: u32) -> tower_bulwark::hedge::HedgeBuilder {
    builder().delay(MS * delay_ms).max_extra_load(1.0)
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_call_is_answered_by_its_hedge_and_then_cancelled() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let layer = fixed(50)
        .on_event(move |e: &HedgeEvent| seen.lock().unwrap().push(format!("{e:?}")))
        .build()
        .unwrap();
    let handle = layer.handle();
    let up = Upstream::new(|n| Some(if n == 0 { 10_000 } else { 10 }));
    let svc = layer.layer(up.clone());

    let start = Instant::now();
    let mut call = Box::pin(svc.oneshot(7));
    assert!(poll_once(call.as_mut()).is_pending());
    advance(50 * MS).await;
    assert!(poll_once(call.as_mut()).is_pending());
    assert_eq!(up.sent.load(SeqCst), 2, "the hedge is out");
    advance(10 * MS).await;
    let Poll::Ready(answer) = poll_once(call.as_mut()) else {
        panic!("no answer")
    };
    assert_eq!(answer.unwrap(), (7, 1));
    assert_eq!(start.elapsed(), 60 * MS);
    // The loser was cancelled with the answer, before the caller dropped
    // the response future.
    assert_eq!(up.dropped.load(SeqCst), 1);
    assert_eq!(handle.hedges(), 1);
    assert!(events.lock().unwrap()[0].contains("Hedged"));
}

#[tokio::test(start_paused = true)]
async fn a_call_faster_than_the_delay_is_not_hedged() {
    let layer = fixed(50).build().unwrap();
    let up = Upstream::new(|_| Some(49));
    let svc = layer.layer(up.clone());
    for i in 0..10 {
        assert_eq!(svc.clone().oneshot(i).await.unwrap().0, i);
    }
    assert_eq!(up.sent.load(SeqCst), 10);
    assert_eq!(layer.handle().hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_hedges_at_their_share_of_calls() {
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let layer = builder()
        .delay(10 * MS)
        .max_extra_load(0.1)
        .on_event(move |ev: &HedgeEvent| {
            if matches!(ev, HedgeEvent::OverBudget { .. }) {
                e.fetch_add(1, SeqCst);
            }
        })
        .build()
        .unwrap();
    // Every copy is slow: every call would be hedged without a budget.
    let up = Upstream::new(|_| Some(100));
    let svc = layer.layer(up.clone());
    // Sequential calls...
    for i in 0..100 {
        svc.clone().oneshot(i).await.unwrap();
    }
    assert_eq!(layer.handle().hedges(), 10);
    // ...and 1000 at once.
    let calls = (0..1000).map(|i| svc.clone().oneshot(i));
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    let hedges = layer.handle().hedges();
    assert!(hedges <= 110, "{hedges} hedges for 1100 calls");
    assert_eq!(up.sent.load(SeqCst) as u64, 1100 + hedges);
    assert!(
        events.load(SeqCst) > 0,
        "hedges refused by the budget are reported"
    );
}

#[tokio::test(start_paused = true)]
async fn several_hedges_are_spaced_by_the_delay_and_every_loser_is_cancelled() {
    let layer = fixed(20).max_hedges(2).max_extra_load(2.0).build().unwrap();
    let up = Upstream::new(|n| Some(if n < 2 { 10_000 } else { 5 }));
    let svc = layer.layer(up.clone());
    let start = Instant::now();
    assert_eq!(svc.oneshot(1).await.unwrap(), (1, 2));
    assert_eq!(start.elapsed(), 45 * MS);
    assert_eq!(up.sent.load(SeqCst), 3);
    assert_eq!(up.dropped.load(SeqCst), 2);
    assert_eq!(layer.handle().hedges(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_error_is_not_hedged_but_a_running_copy_can_still_answer() {
    // The first call fails at once: that is the answer, no hedge.
    let layer = fixed(10).build().unwrap();
    let up = Upstream::new(|n| if n == 0 { None } else { Some(1) });
    let err = layer.layer(up.clone()).oneshot(1).await.unwrap_err();
    assert_eq!(err.to_string(), "copy failed");
    assert_eq!(up.sent.load(SeqCst), 1);

    // The hedge fails while the first call still runs: the first call's
    // answer is taken.
    let up = Upstream::new(|n| if n == 0 { Some(30) } else { None });
    assert_eq!(
        fixed(10)
            .build()
            .unwrap()
            .layer(up.clone())
            .oneshot(2)
            .await
            .unwrap(),
        (2, 0)
    );
    assert_eq!(up.sent.load(SeqCst), 2);

    // Both fail: the error of the last to fail is the answer.
    let up = Upstream::new(|n| if n == 0 { Some(30) } else { None });
    let both = Upstream {
        plan: Arc::new(|n| if n == 0 { Some(30) } else { None }),
        ..up
    };
    let failing_first = service_fn(move |n: u32| {
        let mut both = both.clone();
        async move {
            let r = both.call(n).await;
            // The first call gets through the upstream, then fails too.
            r.and_then(|_| Err::<(u32, usize), BoxError>("first failed late".into()))
        }
    });
    let err = fixed(10)
        .build()
        .unwrap()
        .layer(failing_first)
        .oneshot(3)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "first failed late");
}

#[tokio::test(start_paused = true)]
async fn a_copy_the_classifier_calls_failed_does_not_win_while_another_runs() {
    use tower_bulwark::classify::{classify_fn, Outcome};
    // The first copy answers 503 at 30 ms; the hedge, sent at 10 ms,
    // answers 200 at 40 ms.
    let upstream = || {
        let n = Arc::new(AtomicUsize::new(0));
        service_fn(move |_: u32| {
            let first = n.fetch_add(1, SeqCst) == 0;
            async move {
                sleep(30 * MS).await;
                Ok::<u16, BoxError>(if first { 503 } else { 200 })
            }
        })
    };
    let by_status = classify_fn(|r: &Result<u16, BoxError>| match r {
        Ok(s) if *s >= 500 => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    });
    let classified = fixed(10).classify(by_status).build().unwrap();
    assert_eq!(classified.layer(upstream()).oneshot(1).await.unwrap(), 200);
    // By default an `Ok` is an answer, whatever it holds.
    let plain = fixed(10).build().unwrap();
    assert_eq!(plain.layer(upstream()).oneshot(1).await.unwrap(), 503);
    // A failed answer with no other copy running is still the answer.
    let once = builder()
        .delay(Duration::MAX)
        .classify(by_status)
        .build()
        .unwrap();
    assert_eq!(once.layer(upstream()).oneshot(1).await.unwrap(), 503);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_at_every_point_cancels_every_copy() {
    let layer = fixed(10).build().unwrap();
    let up = Upstream::new(|_| Some(10_000));
    let svc = layer.layer(up.clone());

    let call = svc.clone().oneshot(1);
    drop(call);
    assert_eq!(up.sent.load(SeqCst), 0, "never polled: never sent");

    let mut call = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(call.as_mut()).is_pending());
    drop(call);
    assert_eq!((up.sent.load(SeqCst), up.dropped.load(SeqCst)), (1, 1));

    let mut call = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(call.as_mut()).is_pending());
    advance(10 * MS).await;
    assert!(poll_once(call.as_mut()).is_pending());
    assert_eq!(up.sent.load(SeqCst), 3);
    drop(call);
    assert_eq!(up.dropped.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_is_sent_only_to_an_instance_that_reported_ready() {
    /// Each clone is a new instance that must be readied before its call.
    struct Strict {
        ready: bool,
        ready_after: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }
    impl Clone for Strict {
        fn clone(&self) -> Self {
            Strict {
                ready: false,
                ready_after: self.ready_after.clone(),
                calls: self.calls.clone(),
            }
        }
    }
    impl Service<u32> for Strict {
        type Response = usize;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            // Not ready on the first asking, as a pool filling up would be.
            if self.ready_after.fetch_sub(1, SeqCst) > 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = true;
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: u32) -> Self::Future {
            assert!(
                std::mem::take(&mut self.ready),
                "called without being ready"
            );
            let n = self.calls.fetch_add(1, SeqCst);
            Box::pin(async move {
                sleep(if n == 0 { Duration::from_secs(10) } else { MS }).await;
                Ok(n)
            })
        }
    }
    let svc = Strict {
        ready: false,
        ready_after: Arc::new(AtomicUsize::new(0)),
        calls: Arc::default(),
    };
    let ready_after = svc.ready_after.clone();
    let layer = fixed(10).build().unwrap();
    let mut svc = layer.layer(svc);
    let mut call = Box::pin(svc.ready().await.unwrap().call(1));
    ready_after.store(3, SeqCst); // the hedge's instance takes a while
    assert_eq!(call.as_mut().await.unwrap(), 1);
    assert_eq!(layer.handle().hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_whose_service_fails_readiness_leaves_the_first_call_alone() {
    #[derive(Clone)]
    struct Broken(Arc<AtomicBool>);
    impl Service<u32> for Broken {
        type Response = u32;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.0.load(SeqCst) {
                Poll::Ready(Err("gone".into()))
            } else {
                Poll::Ready(Ok(()))
            }
        }
        fn call(&mut self, n: u32) -> Self::Future {
            Box::pin(async move {
                sleep(50 * MS).await;
                Ok(n)
            })
        }
    }
    let broken = Arc::new(AtomicBool::new(false));
    let layer = fixed(10).build().unwrap();
    let mut svc = layer.layer(Broken(broken.clone()));
    let call = svc.ready().await.unwrap().call(5);
    broken.store(true, SeqCst);
    assert_eq!(call.await.unwrap(), 5);
    assert_eq!(layer.handle().hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_percentile_delay_waits_for_data_and_then_follows_latency() {
    let layer = builder()
        .percentile(0.9)
        .min_data_points(10)
        .window(100)
        .min_delay(5 * MS)
        .max_extra_load(1.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    // Copies take 1..=20 ms in turn.
    let up = Upstream::new(|n| Some(1 + (n % 20) as u64));
    let svc = layer.layer(up.clone());
    for i in 0..9 {
        svc.clone().oneshot(i).await.unwrap();
    }
    assert_eq!(handle.delay(), None);
    assert_eq!(handle.hedges(), 0, "no hedge before min_data_points");
    for i in 9..100 {
        svc.clone().oneshot(i).await.unwrap();
    }
    let delay = handle.delay().unwrap();
    assert!(
        delay >= 15 * MS && delay <= 20 * MS,
        "p90 of 1..=20 ms: {delay:?}"
    );
    assert!(handle.hedges() > 0);
}

#[tokio::test(start_paused = true)]
async fn hedge_if_keeps_some_requests_to_one_copy() {
    let layer = builder()
        .delay(MS)
        .max_extra_load(1.0)
        .hedge_if(|req: &u32| req.is_multiple_of(2))
        .build()
        .unwrap();
    let up = Upstream::new(|_| Some(10));
    let svc = layer.layer(up.clone());
    svc.clone().oneshot(1).await.unwrap();
    assert_eq!(up.sent.load(SeqCst), 1);
    svc.oneshot(2).await.unwrap();
    assert_eq!(up.sent.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn extreme_delays_neither_panic_nor_misbehave() {
    let up = Upstream::new(|_| Some(10));
    let never = fixed(0).delay(Duration::MAX).build().unwrap();
    never.layer(up.clone()).oneshot(1).await.unwrap();
    assert_eq!(never.handle().hedges(), 0);
    let at_once = fixed(0).build().unwrap();
    at_once.layer(up.clone()).oneshot(1).await.unwrap();
    assert_eq!(at_once.handle().hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_copy_reaches_the_caller_and_cancels_the_rest() {
    let layer = fixed(10).build().unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(service_fn(move |_: u32| {
        let nth = n.fetch_add(1, SeqCst);
        let guard = DropCounter(d.clone());
        async move {
            let _guard = guard;
            if nth == 0 {
                sleep(Duration::from_secs(10)).await;
            }
            assert!(nth == 0, "hedge panicked");
            Ok::<_, BoxError>(())
        }
    }));
    let caught =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(svc.oneshot(1))).await;
    assert!(caught.is_err());
    assert_eq!(dropped.load(SeqCst), 2);
}

#[test]
fn build_refuses_unsound_configs_naming_the_field() {
    let field = |b: tower_bulwark::hedge::HedgeBuilder| b.build().unwrap_err().field();
    let b = HedgeLayer::builder;
    assert_eq!(field(b().max_hedges(0)), "max_hedges");
    assert_eq!(field(b().max_hedges(17)), "max_hedges");
    assert_eq!(field(b().max_extra_load(0.0)), "max_extra_load");
    assert_eq!(field(b().max_extra_load(f64::NAN)), "max_extra_load");
    assert_eq!(field(b().max_extra_load(1.5)), "max_extra_load");
    assert_eq!(field(b().percentile(0.0)), "percentile");
    assert_eq!(field(b().percentile(1.01)), "percentile");
    assert_eq!(field(b().window(0)), "window");
    assert_eq!(field(b().window(1 << 20)), "window");
    assert_eq!(field(b().min_data_points(0)), "min_data_points");
    assert_eq!(field(b().min_data_points(2000)), "min_data_points");
    assert!(b().max_hedges(3).max_extra_load(3.0).build().is_ok());
    assert_eq!(b().max_hedges(0).build().unwrap_err().layer(), "hedge");
}

#[test]
fn public_types_are_send_sync_and_debug() {
    fn send_sync<T: Send + Sync + std::fmt::Debug>() {}
    send_sync::<HedgeLayer>();
    send_sync::<tower_bulwark::hedge::HedgeHandle>();
    let layer = builder().build().unwrap();
    assert!(format!("{layer:?}").contains("HedgeLayer"));
}
