//! The half-open probe a file-backed breaker takes in `poll_ready`, over
//! random histories of readiness, calls, results, cancellations, dropped
//! services and re-openings by another process.
//!
//! The property: the probes the state file records for the current
//! generation are exactly the reservations services hold for it plus the
//! probe calls in flight in it, never more than `half_open_max_calls`; a
//! reservation from an earlier generation never lets a call through an
//! open breaker; and once every service and call is gone, no probe is
//! left.
#![cfg(all(feature = "file-store", feature = "circuit-breaker"))]

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tokio::sync::oneshot;
use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
use tower_bulwark::store::file::FileStore;

const SERVICES: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Readiness of service `i`, driven to the end (the lock is free).
    Ready(usize),
    /// A call on service `i`, if its readiness was polled since its last
    /// call.
    Call(usize),
    /// The `j`-th call in flight (modulo their number) answers.
    Answer(usize, bool),
    /// The `j`-th call in flight is dropped.
    DropCall(usize),
    /// Service `i` is dropped and replaced by a fresh one.
    DropService(usize),
    /// Another process opens the breaker: with its period already over
    /// (the next call probes), or still running.
    Reopen { over: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SERVICES).prop_map(Op::Ready),
        4 => (0..SERVICES).prop_map(Op::Call),
        3 => (0..8usize, any::<bool>()).prop_map(|(j, ok)| Op::Answer(j, ok)),
        1 => (0..8usize).prop_map(Op::DropCall),
        1 => (0..SERVICES).prop_map(Op::DropService),
        2 => any::<bool>().prop_map(|over| Op::Reopen { over }),
    ]
}

type Answers = Arc<Mutex<Vec<oneshot::Sender<bool>>>>;
type Svc = tower_bulwark::circuit_breaker::CircuitBreaker<
    tower::util::BoxCloneService<u32, u32, BoxError>,
    tower_bulwark::classify::DefaultClassifier,
>;

/// What the test knows of a service.
struct Slot {
    svc: Svc,
    /// Readiness polled since the last call.
    ready: bool,
    /// The generation of the probe it reserved, if it did.
    reserved: Option<u64>,
}

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, BoxError>>>>;

/// A call in flight: its future, the generation of its probe if it is
/// one, and the sender that answers it.
struct InFlight {
    fut: Call,
    probe: Option<u64>,
    answer: oneshot::Sender<bool>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// (state, generation, probes recorded) of breaker `api`.
fn read(s: &FileStore) -> (u8, u64, usize, u64) {
    let st = s.load();
    st.breakers.get("api").map_or((0, 0, 0, 0), |e| {
        (e.state, e.generation, e.probes.len(), e.open_until)
    })
}

fn run(max_probes: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::builder().dir(dir.path()).build().unwrap();
    let layer = CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(2)
        .success_threshold(2)
        .half_open_max_calls(max_probes)
        .backend(s.clone())
        .build()
        .unwrap();
    let answers: Answers = Answers::default();
    let upstream = {
        let answers = answers.clone();
        tower::util::BoxCloneService::new(service_fn(move |x: u32| {
            let (tx, rx) = oneshot::channel();
            answers.lock().unwrap().push(tx);
            async move {
                match rx.await {
                    Ok(true) => Ok(x),
                    _ => Err::<u32, BoxError>("down".into()),
                }
            }
        }))
    };
    let fresh = || Slot {
        svc: Svc::new(upstream.clone(), &layer),
        ready: false,
        reserved: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut slots: Vec<Slot> = (0..SERVICES).map(|_| fresh()).collect();
        let mut calls: Vec<InFlight> = Vec::new();
        for op in ops {
            let (state, gen, probes, open_until) = read(&s);
            match op {
                Op::Ready(i) => {
                    let slot = &mut slots[i];
                    slot.svc.ready().await.unwrap();
                    slot.ready = true;
                    let (_, gen_after, probes_after, _) = read(&s);
                    if gen_after != gen {
                        // Only a move to half-open changes the generation
                        // here, and it takes the first probe.
                        prop_assert_eq!(probes_after, 1);
                    }
                    let taken = gen_after != gen || probes_after > probes;
                    if taken {
                        prop_assert!(
                            slot.reserved.is_none(),
                            "a service holds one reservation at most"
                        );
                        slot.reserved = Some(gen_after);
                    }
                }
                Op::Call(i) => {
                    let slot = &mut slots[i];
                    if !slot.ready {
                        continue;
                    }
                    slot.ready = false;
                    let reserved = slot.reserved.take();
                    let before = answers.lock().unwrap().len();
                    let mut fut: Call = Box::pin(slot.svc.call(7));
                    let polled = futures::poll!(&mut fut);
                    let admitted = answers.lock().unwrap().len() > before;
                    let (_, gen_after, probes_after, _) = read(&s);
                    let open_running = state == CircuitState::Open.code() && open_until > now_ns();
                    if open_running || state == CircuitState::ForcedOpen.code() {
                        prop_assert!(!admitted, "a call went through an open breaker");
                    }
                    if !admitted {
                        let err = match polled {
                            std::task::Poll::Ready(Err(e)) => e,
                            other => return Err(TestCaseError::fail(format!("{other:?}"))),
                        };
                        prop_assert!(err.is::<CircuitOpen>());
                        continue;
                    }
                    let answer = answers.lock().unwrap().pop().unwrap();
                    let probe = if reserved == Some(gen) {
                        prop_assert_eq!(probes_after, probes, "the reservation became the call");
                        Some(gen)
                    } else if gen_after != gen || probes_after > probes {
                        Some(gen_after)
                    } else {
                        prop_assert_eq!(state, CircuitState::Closed.code());
                        None
                    };
                    calls.push(InFlight { fut, probe, answer });
                }
                Op::Answer(j, ok) => {
                    if calls.is_empty() {
                        continue;
                    }
                    let call = calls.remove(j % calls.len());
                    let _ = call.answer.send(ok);
                    let res = call.fut.await;
                    prop_assert_eq!(res.is_ok(), ok);
                }
                Op::DropCall(j) => {
                    if !calls.is_empty() {
                        drop(calls.remove(j % calls.len()));
                    }
                }
                Op::DropService(i) => slots[i] = fresh(),
                Op::Reopen { over } => {
                    let until = if over {
                        now_ns() - 1
                    } else {
                        now_ns() + 3_600_000_000_000
                    };
                    s.update(|st| {
                        let e = st.breakers.entry("api".to_owned()).or_default();
                        e.state = CircuitState::Open.code();
                        e.generation += 1;
                        e.open_until = until;
                        e.failures = 0;
                        e.successes = 0;
                        e.probes.clear();
                    });
                }
            }
            // The invariant, after every step.
            let (state, gen, probes, _) = read(&s);
            let held = slots.iter().filter(|x| x.reserved == Some(gen)).count()
                + calls.iter().filter(|c| c.probe == Some(gen)).count();
            prop_assert_eq!(probes, held, "recorded probes vs their owners");
            if state == CircuitState::HalfOpen.code() {
                prop_assert!(probes <= max_probes as usize);
            } else {
                prop_assert_eq!(probes, 0);
            }
        }
        drop(calls);
        drop(slots);
        Ok(())
    })?;
    drop(rt);
    prop_assert_eq!(read(&s).2, 0, "a probe left behind");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn reserved_probes_have_exactly_one_owner(
        max_probes in 1u32..=3,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(max_probes, ops)?;
    }
}
