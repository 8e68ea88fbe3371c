//! The circuit breaker through its public API: readiness, rejection,
//! shared state, cancellation, a reference model, and a real HTTP upstream.

#[path = "support/breaker_ops.rs"]
mod breaker_ops;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{
    CircuitBreaker, CircuitBreakerLayer, CircuitEvent, CircuitHandle, CircuitOpen, CircuitState,
    Window,
};
use tower_bulwark::classify::{classify_fn, Outcome};
use tower_bulwark::error::{rejection, BoxError};
use tower_test::mock;

type Svc = CircuitBreaker<
    mock::Mock<&'static str, &'static str>,
    tower_bulwark::classify::DefaultClassifier,
>;

fn spawn(
    layer: &CircuitBreakerLayer,
) -> (mock::Spawn<Svc>, mock::Handle<&'static str, &'static str>) {
    let (svc, handle) = mock::pair();
    (mock::Spawn::new(layer.layer(svc)), handle)
}

/// Sends one call through, answering it with `answer` at the mock.
async fn roundtrip(
    svc: &mut mock::Spawn<Svc>,
    handle: &mut mock::Handle<&'static str, &'static str>,
    answer: Result<&'static str, &'static str>,
) -> Result<&'static str, BoxError> {
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call("req"));
    if fut.poll().is_pending() {
        let (_, send) = handle
            .next_request()
            .await
            .expect("request reached the mock");
        match answer {
            Ok(v) => send.send_response(v),
            Err(e) => send.send_error(e),
        }
    }
    fut.await
}

#[tokio::test(start_paused = true)]
async fn open_breaker_is_ready_and_rejects_from_call() {
    let layer = CircuitBreakerLayer::builder()
        .name("payments")
        .failure_threshold(2)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, mut handle) = spawn(&layer);
    for _ in 0..2 {
        assert!(roundtrip(&mut svc, &mut handle, Err("boom")).await.is_err());
    }
    assert_eq!(h.state(), CircuitState::Open);

    handle.allow(1);
    // Ready: an open breaker never poisons the service.
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call("req").await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("a CircuitOpen");
    assert_eq!(open.name(), "payments");
    assert_eq!(open.state(), CircuitState::Open);
    assert_eq!(open.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(open.to_string(), "circuit `payments` is open");
    // The inner service never saw the rejected call.
    assert_pending!(tokio_test::task::spawn(handle.next_request()).poll());

    let r = rejection(err.as_ref()).expect("a rejection");
    assert_eq!((r.layer(), r.name()), ("circuit_breaker", "payments"));
}

#[tokio::test(start_paused = true)]
async fn poll_ready_forwards_to_inner() {
    let layer = CircuitBreakerLayer::builder().build().unwrap();
    let (mut svc, mut handle) = spawn(&layer);
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
    handle.send_error("inner broke");
    let (mut svc2, mut handle2) = spawn(&layer);
    handle2.send_error("not ready, ever");
    assert_ready_err!(svc2.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn services_and_clones_share_one_breaker() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(2)
        .build()
        .unwrap();
    let failing = service_fn(|_: ()| async { Err::<(), _>("down") });
    let mut a = layer.layer(failing);
    let mut b = layer.clone().layer(failing).clone();
    let _ = a.ready().await.unwrap().call(()).await;
    let _ = b.ready().await.unwrap().call(()).await;
    assert_eq!(layer.handle().state(), CircuitState::Open);
    assert_eq!(a.handle().state(), CircuitState::Open);
    let err = a.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
}

#[tokio::test(start_paused = true)]
async fn recovers_through_half_open_probes() {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .success_threshold(2)
        .open_timeout(Duration::from_secs(5))
        .on_event(move |e| {
            if let CircuitEvent::StateChanged { from, to, .. } = e {
                seen.lock().unwrap().push((*from, *to));
            }
        })
        .build()
        .unwrap();
    let (mut svc, mut handle) = spawn(&layer);
    roundtrip(&mut svc, &mut handle, Err("x"))
        .await
        .unwrap_err();
    advance(Duration::from_secs(5)).await;
    assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
    roundtrip(&mut svc, &mut handle, Ok("a")).await.unwrap();
    roundtrip(&mut svc, &mut handle, Ok("b")).await.unwrap();
    assert_eq!(layer.handle().state(), CircuitState::Closed);
    use CircuitState::*;
    assert_eq!(
        *events.lock().unwrap(),
        [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
    );
}

/// An inner service whose calls pass several await points before they
/// answer, so a caller can drop the future at any of them.
#[derive(Clone)]
struct Steps(usize);

impl Service<()> for Steps {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let n = self.0;
        Box::pin(async move {
            for _ in 0..n {
                tokio::task::yield_now().await;
            }
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_probes_free_their_slot_at_every_await_point() {
    const STEPS: usize = 4;
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .half_open_max_calls(1)
        .success_threshold(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Steps(STEPS));
    for polls in 0..=STEPS {
        h.hold_open(Duration::from_secs(1));
        advance(Duration::from_secs(1)).await;
        let mut probe = tokio_test::task::spawn(svc.call(()));
        for _ in 0..polls {
            assert_pending!(probe.poll());
        }
        assert_eq!(h.metrics().half_open_in_flight, 1);
        // While the probe runs, nobody else gets in.
        let other = svc.call(()).await.unwrap_err();
        assert_eq!(
            other.downcast_ref::<CircuitOpen>().unwrap().state(),
            CircuitState::HalfOpen
        );
        drop(probe);
        assert_eq!(
            h.metrics().half_open_in_flight,
            0,
            "dropped after {polls} polls"
        );
        assert_eq!(
            h.state(),
            CircuitState::HalfOpen,
            "a dropped probe is no verdict"
        );
    }
    // The slot is still usable: a probe that completes closes the breaker.
    svc.call(()).await.unwrap();
    assert_eq!(h.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn panicking_probe_frees_its_slot() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .build()
        .unwrap();
    let h = layer.handle();
    h.hold_open(Duration::from_secs(1));
    advance(Duration::from_secs(1)).await;
    let svc = layer.layer(service_fn(|_: ()| async {
        panic!("inner service panicked");
        #[allow(unreachable_code)]
        Ok::<(), BoxError>(())
    }));
    let joined = tokio::spawn(svc.oneshot(())).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(h.metrics().half_open_in_flight, 0);
    assert_eq!(h.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_call_from_before_the_opening_cannot_close_it() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .success_threshold(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let (tx, rx) = oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let svc = layer.layer(service_fn(move |slow: bool| {
        let rx = rx.clone();
        async move {
            if slow {
                let rx = rx.lock().await.take().unwrap();
                rx.await.unwrap();
                Ok(())
            } else {
                Err::<(), BoxError>("fast failure".into())
            }
        }
    }));
    let mut slow = tokio_test::task::spawn(svc.clone().oneshot(true));
    assert_pending!(slow.poll());
    let _ = svc.clone().oneshot(false).await; // opens
    assert_eq!(h.state(), CircuitState::Open);
    tx.send(()).unwrap();
    assert_ready!(slow.poll()).unwrap();
    // The slow success began in the closed generation: it does not count.
    assert_eq!(h.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn classification_decides_and_ignore_is_not_counted() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(2)
        .window(Window::count(10))
        .minimum_calls(2)
        .failure_rate_threshold(1.0)
        .classify(classify_fn(|r: &Result<u16, BoxError>| match r {
            Ok(s) if *s >= 500 => Outcome::Failure,
            Ok(s) if *s == 499 => Outcome::Ignore,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }))
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(service_fn(
        |code: u16| async move { Ok::<_, BoxError>(code) },
    ));
    svc.clone().oneshot(503).await.unwrap();
    svc.clone().oneshot(499).await.unwrap();
    assert_eq!(h.metrics().window_calls, 1);
    assert_eq!(h.state(), CircuitState::Closed);
    svc.clone().oneshot(500).await.unwrap();
    assert_eq!(h.state(), CircuitState::Open);
}

#[test]
fn invalid_config_names_the_field() {
    let b = CircuitBreakerLayer::builder;
    let field = |r: Result<CircuitBreakerLayer, tower_bulwark::ConfigError>| r.unwrap_err().field();
    assert_eq!(field(b().failure_threshold(0).build()), "failure_threshold");
    // Counts are plain integers: any threshold a `u32` holds is sound.
    assert!(b().failure_threshold(u32::MAX).build().is_ok());
    assert_eq!(
        field(b().max_retry_after(Duration::ZERO).build()),
        "max_retry_after"
    );
    // A setting of a backend the breaker does not use is refused, not
    // silently ignored.
    assert_eq!(
        field(b().sync_interval(Duration::from_secs(1)).build()),
        "sync_interval"
    );
    assert_eq!(
        field(b().half_open_max_calls(0).build()),
        "half_open_max_calls"
    );
    assert_eq!(field(b().success_threshold(0).build()), "success_threshold");
    assert_eq!(
        field(b().open_timeout(Duration::ZERO).build()),
        "open_timeout"
    );
    assert_eq!(
        field(b().failure_rate_threshold(f64::NAN).build()),
        "failure_rate_threshold"
    );
    assert_eq!(
        field(b().failure_rate_threshold(1.5).build()),
        "failure_rate_threshold"
    );
    assert_eq!(
        field(b().slow_call_rate_threshold(0.0).build()),
        "slow_call_rate_threshold"
    );
    assert_eq!(field(b().window(Window::count(0)).build()), "window");
    assert_eq!(
        field(b().window(Window::time(Duration::ZERO)).build()),
        "window"
    );
    assert_eq!(
        field(b().window(Window::count(5)).minimum_calls(6).build()),
        "minimum_calls"
    );
    assert_eq!(
        field(b().slow_call_duration(Duration::ZERO).build()),
        "slow_call_duration"
    );
    let backoff = tower_bulwark::backoff::Backoff::exponential(Duration::from_secs(2))
        .max_delay(Duration::from_secs(1));
    assert_eq!(field(b().open_backoff(backoff).build()), "open_backoff");
}

#[test]
fn public_types_are_send_sync_and_debug() {
    fn check<T: Send + Sync + std::fmt::Debug>() {}
    check::<CircuitBreakerLayer>();
    check::<Svc>();
    check::<CircuitHandle>();
    check::<CircuitOpen>();
    check::<CircuitEvent>();
    check::<
        tower_bulwark::circuit_breaker::future::ResponseFuture<
            std::future::Ready<Result<(), BoxError>>,
            tower_bulwark::classify::DefaultClassifier,
        >,
    >();
}

mod model {
    //! The breaker against a plain reference model over random sequences of
    //! starting, finishing and dropping calls and of time passing.

    use super::*;
    use proptest::prelude::*;

    const THRESHOLD: u32 = 3;
    const OPEN_MS: u64 = 1_000;
    const PROBES: u32 = 2;
    const SUCCESSES: u32 = 2;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Closed { fails: u32 },
        Open { until: u64 },
        HalfOpen { inflight: u32, ok: u32 },
    }

    #[derive(Debug, Clone, Copy)]
    struct Ticket {
        gen: u32,
        probe: bool,
    }

    struct Model {
        state: State,
        gen: u32,
        now: u64,
    }

    impl Model {
        fn open(&mut self) {
            self.state = State::Open {
                until: self.now + OPEN_MS,
            };
            self.gen += 1;
        }

        /// `Ok(ticket)` or `Err(retry_after_ms)`.
        fn start(&mut self) -> Result<Ticket, Option<u64>> {
            match self.state {
                State::Closed { .. } => Ok(Ticket {
                    gen: self.gen,
                    probe: false,
                }),
                State::Open { until } if self.now < until => Err(Some(until - self.now)),
                State::Open { .. } => {
                    self.gen += 1;
                    self.state = State::HalfOpen { inflight: 1, ok: 0 };
                    Ok(Ticket {
                        gen: self.gen,
                        probe: true,
                    })
                }
                State::HalfOpen { inflight, ok } if inflight < PROBES => {
                    self.state = State::HalfOpen {
                        inflight: inflight + 1,
                        ok,
                    };
                    Ok(Ticket {
                        gen: self.gen,
                        probe: true,
                    })
                }
                State::HalfOpen { .. } => Err(None),
            }
        }

        fn finish(&mut self, t: Ticket, outcome: Option<Outcome>) {
            if t.gen != self.gen {
                return;
            }
            match (self.state, outcome) {
                (State::Closed { fails }, Some(Outcome::Failure)) if !t.probe => {
                    if fails + 1 >= THRESHOLD {
                        self.open();
                    } else {
                        self.state = State::Closed { fails: fails + 1 };
                    }
                }
                (State::Closed { .. }, Some(Outcome::Success)) if !t.probe => {
                    self.state = State::Closed { fails: 0 };
                }
                (State::HalfOpen { .. }, Some(Outcome::Failure)) if t.probe => self.open(),
                (State::HalfOpen { inflight, ok }, Some(Outcome::Success)) if t.probe => {
                    if ok + 1 >= SUCCESSES {
                        self.gen += 1;
                        self.state = State::Closed { fails: 0 };
                    } else {
                        self.state = State::HalfOpen {
                            inflight: inflight - 1,
                            ok: ok + 1,
                        };
                    }
                }
                // Ignored, or dropped before it finished.
                (State::HalfOpen { inflight, ok }, Some(Outcome::Ignore) | None) if t.probe => {
                    self.state = State::HalfOpen {
                        inflight: inflight - 1,
                        ok,
                    };
                }
                _ => {}
            }
        }

        fn observed(&self) -> CircuitState {
            match self.state {
                State::Closed { .. } => CircuitState::Closed,
                State::Open { until } if self.now < until => CircuitState::Open,
                State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
            }
        }
    }

    use crate::breaker_ops::{op, Op};

    type Call = (
        Ticket,
        oneshot::Sender<Outcome>,
        tokio_test::task::Spawn<
            tower_bulwark::circuit_breaker::future::ResponseFuture<
                Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>,
                tower_bulwark::classify::ClassifyFn<fn(&Result<Outcome, BoxError>) -> Outcome>,
            >,
        >,
    );

    fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let by_value: fn(&Result<Outcome, BoxError>) -> Outcome =
                |r| *r.as_ref().unwrap_or(&Outcome::Failure);
            let layer = CircuitBreakerLayer::builder()
                .failure_threshold(THRESHOLD)
                .open_timeout(Duration::from_millis(OPEN_MS))
                .half_open_max_calls(PROBES)
                .success_threshold(SUCCESSES)
                .classify(classify_fn(by_value))
                .build()
                .unwrap();
            let h = layer.handle();
            // Each call answers with whatever outcome its test sends it.
            let mut svc = layer.layer(service_fn(|rx: oneshot::Receiver<Outcome>| {
                Box::pin(async move { rx.await.map_err(|_| BoxError::from("gone")) })
                    as Pin<Box<dyn Future<Output = _> + Send>>
            }));
            let mut model = Model {
                state: State::Closed { fails: 0 },
                gen: 0,
                now: 0,
            };
            let mut running: Vec<Call> = Vec::new();
            for op in ops {
                match op {
                    Op::Start => {
                        let (tx, rx) = oneshot::channel();
                        let mut fut = tokio_test::task::spawn(svc.call(rx));
                        match model.start() {
                            Ok(t) => {
                                prop_assert!(fut.poll().is_pending(), "admitted");
                                running.push((t, tx, fut));
                            }
                            Err(after) => {
                                let err = match fut.poll() {
                                    Poll::Ready(Err(e)) => e,
                                    other => {
                                        return Err(TestCaseError::fail(format!(
                                            "expected rejection, got {other:?}"
                                        )))
                                    }
                                };
                                let open = err.downcast_ref::<CircuitOpen>().unwrap();
                                prop_assert_eq!(
                                    open.retry_after(),
                                    after.map(Duration::from_millis)
                                );
                            }
                        }
                    }
                    Op::Finish(i, outcome) if !running.is_empty() => {
                        let (t, tx, mut fut) = running.remove(i % running.len());
                        match outcome {
                            Some(o) => {
                                tx.send(o).unwrap();
                                prop_assert!(fut.poll().is_ready());
                            }
                            None => drop(fut),
                        }
                        model.finish(t, outcome);
                    }
                    Op::Finish(..) => {}
                    Op::Advance(ms) => {
                        advance(Duration::from_millis(ms)).await;
                        model.now += ms;
                    }
                }
                prop_assert_eq!(h.state(), model.observed(), "model {:?}", model.state);
                if let State::HalfOpen { inflight, .. } = model.state {
                    prop_assert_eq!(h.metrics().half_open_in_flight, inflight);
                }
            }
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn breaker_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
            run(ops)?;
        }
    }
}
