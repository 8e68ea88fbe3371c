//! A bulkhead slot given back on a state file joins this process's next
//! lock round (or is written after the store's `release_delay`): one round
//! per call through the documented stack, slots free at once in this
//! process, and for other processes (real child processes here) after the
//! delay at most, never before they are free. The delay runs on tokio's
//! paused clock.
#![cfg(all(
    unix,
    feature = "file-store",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::BulkheadFull;
use tower_bulwark::rate_limit::RateLimited;
use tower_bulwark::store::file::{FileSlot, FileStore};
use tower_bulwark::store::{Degrade, StoreEvent};

#[path = "support/file_layers.rs"]
mod file_layers;
use file_layers::{breaker, bulkhead, holders_in_file as in_file, limiter, ok_service};

#[path = "support/torture.rs"]
mod torture;

#[path = "support/child.rs"]
mod child_process;
use child_process::{outputs, spawn_child, DIR, ROLE};

const DELAY: Duration = Duration::from_millis(10);

type Events = Arc<Mutex<Vec<StoreEvent>>>;

fn store_with(dir: &Path, degrade: Degrade, delay: Duration) -> (FileStore, Events) {
    let events = Events::default();
    let sink = events.clone();
    let store = FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_secs(10))
        .release_delay(delay)
        .degrade(degrade)
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    (store, events)
}

fn store(dir: &Path) -> FileStore {
    store_with(dir, Degrade::FailOpenToLocal, DELAY).0
}

type Svc = BoxCloneSyncService<u32, u32, BoxError>;

/// The README's stack (rate limit, bulkhead, breaker) over `store`,
/// around `inner`.
fn stack<S>(store: &FileStore, tokens: f64, slots: usize, inner: S) -> Svc
where
    S: Service<u32, Response = u32, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(limiter(store, tokens))
            .layer(bulkhead(store, slots))
            .layer(breaker(store))
            .service(inner),
    )
}

/// Answers at once.
fn answer() -> impl Service<
    u32,
    Response = u32,
    Error = BoxError,
    Future = std::future::Ready<Result<u32, BoxError>>,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|n: u32| std::future::ready(Ok(n)))
}

/// What a child reports of one call through a bulkhead of one on `dir`.
fn child_call(dir: &Path) -> String {
    outputs(spawn_child("one_call", dir)).join(" ")
}

/// The body of every child process. A no-op in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match role.as_str() {
            // One call through a bulkhead of one; the store is dropped
            // before the process ends, which writes the slot back.
            "one_call" => {
                let s = store(&dir);
                let r = ServiceBuilder::new()
                    .layer(bulkhead(&s, 1))
                    .service(ok_service())
                    .oneshot(1)
                    .await;
                match r {
                    Ok(_) => println!("OUT ok"),
                    Err(e) if e.is::<BulkheadFull>() => println!("OUT full"),
                    Err(e) => panic!("{e}"),
                }
            }
            // Calls through the stack (a bucket of 60, a bulkhead of 1)
            // while peers do the same; the upstream checks that no two
            // calls of any processes run at once.
            "stack" => {
                let s = store(&dir);
                let upstream = service_fn({
                    let dir = dir.clone();
                    move |n: u32| {
                        let dir = dir.clone();
                        async move {
                            let marker = (0..1).find_map(|k| {
                                let p = dir.join(format!("running-{k}"));
                                std::fs::OpenOptions::new()
                                    .write(true)
                                    .create_new(true)
                                    .open(&p)
                                    .ok()
                                    .map(|_| p)
                            });
                            let Some(marker) = marker else {
                                return Err::<u32, BoxError>("over the cap".into());
                            };
                            for _ in 0..3 {
                                tokio::task::yield_now().await;
                            }
                            std::fs::remove_file(marker).unwrap();
                            Ok(n)
                        }
                    }
                });
                let svc = stack(&s, 60.0, 1, upstream);
                let (mut ok, mut limited, mut full) = (0, 0, 0);
                for n in 0..40 {
                    match svc.clone().oneshot(n).await {
                        Ok(_) => ok += 1,
                        Err(e) if e.is::<RateLimited>() => limited += 1,
                        Err(e) if e.is::<BulkheadFull>() => full += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                println!("OUT ok={ok} limited={limited} full={full}");
                println!("OUT rounds={}", s.lock_rounds());
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// Calls in flight at once, on one runtime: every call, admitted or
/// turned away, takes one round; the slots that came back meanwhile ride
/// along, and the last ones are written after the delay.
#[tokio::test(start_paused = true)]
async fn concurrent_calls_take_one_round_each() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let upstream = service_fn(|n: u32| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, BoxError>(n)
    });
    let svc = stack(&s, 1000.0, 4, upstream);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut full = 0;
                for n in 0..25 {
                    if let Err(e) = svc.clone().oneshot(n).await {
                        assert!(e.is::<BulkheadFull>(), "{e}");
                        full += 1;
                    }
                }
                full
            })
        })
        .collect();
    let mut full = 0;
    for t in tasks {
        full += t.await.unwrap();
    }
    assert!(full > 0, "8 callers on 4 slots: some were turned away");
    assert_eq!(s.lock_rounds(), 200, "one round for each of 200 calls");
    assert_eq!(in_file(dir.path()), 4, "the last slots wait for the delay");
    tokio::time::sleep(DELAY + Duration::from_millis(1)).await;
    assert_eq!(s.lock_rounds(), 201, "then one round writes them");
    assert_eq!(in_file(dir.path()), 0);
}

/// Callers on several threads contend for the lock: a call that finds it
/// held waits for it in its response future and then makes the one round
/// of the whole stack there, so each call still takes one round. (A long
/// delay keeps the give-backs' own flush out of the count.)
#[test]
fn calls_contending_for_the_lock_take_one_round_each() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = store_with(
        dir.path(),
        Degrade::FailOpenToLocal,
        Duration::from_secs(60),
    );
    let upstream = service_fn(|n: u32| async move {
        tokio::task::yield_now().await;
        Ok::<_, BoxError>(n)
    });
    let svc = stack(&s, 1000.0, 8, upstream);
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    for n in 0..50 {
                        assert_eq!(svc.clone().oneshot(n).await.unwrap(), n);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(s.lock_rounds(), 400);
    drop(rt);
    drop(svc);
    drop(s);
    assert_eq!(in_file(dir.path()), 0, "the store's drop wrote the rest");
}

/// A slot given back is free at once here (the next call takes it in its
/// one round) and in the file, for a child process, after the delay: not
/// before.
#[tokio::test(start_paused = true)]
async fn a_slot_is_free_here_at_once_and_for_peers_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let svc = stack(&s, 100.0, 1, answer());
    let layer = bulkhead(&s, 1);
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert_eq!(layer.handle().in_flight(), 0, "free here");
    assert_eq!(in_file(dir.path()), 1, "not yet written");
    assert_eq!(child_call(dir.path()), "full", "a peer still sees it held");

    let rounds = s.lock_rounds();
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2, "taken again");
    assert_eq!(s.lock_rounds(), rounds + 1);

    tokio::time::sleep(DELAY - Duration::from_millis(1)).await;
    assert_eq!(s.lock_rounds(), rounds + 1, "not before the delay");
    assert_eq!(child_call(dir.path()), "full");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(s.lock_rounds(), rounds + 2, "written in a round of its own");
    assert_eq!(in_file(dir.path()), 0);
    assert_eq!(child_call(dir.path()), "ok");
    // The child's store wrote its own slot back as it ended.
    assert_eq!(in_file(dir.path()), 0);
}

/// `release_delay(ZERO)` gives each slot back at once, in its own round.
#[tokio::test(start_paused = true)]
async fn a_zero_delay_gives_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = store_with(dir.path(), Degrade::FailOpenToLocal, Duration::ZERO);
    let svc = stack(&s, 100.0, 1, answer());
    for n in 0..5 {
        let rounds = s.lock_rounds();
        assert_eq!(svc.clone().oneshot(n).await.unwrap(), n);
        assert_eq!(s.lock_rounds(), rounds + 2);
        assert_eq!(in_file(dir.path()), 0);
    }
    assert_eq!(child_call(dir.path()), "ok");
}

/// Outside a runtime a slot is written back when it is dropped; `flush`
/// writes what is queued, and dropping the store does too.
#[test]
fn without_a_runtime_flush_or_drop_writes_the_slots() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let b = s.bulkhead(1).unwrap().named("api");
    drop(b.try_acquire().unwrap());
    assert_eq!(in_file(dir.path()), 0, "no runtime: at once");

    let rt = torture::paused_runtime();
    let queued = |slot: FileSlot| rt.block_on(async move { drop(slot) });
    queued(b.try_acquire().unwrap());
    assert_eq!(in_file(dir.path()), 1);
    let rounds = s.lock_rounds();
    s.flush();
    assert_eq!(s.lock_rounds(), rounds + 1);
    assert_eq!(in_file(dir.path()), 0);
    s.flush();
    assert_eq!(s.lock_rounds(), rounds + 1, "nothing queued: no round");

    queued(b.try_acquire().unwrap());
    assert_eq!(in_file(dir.path()), 1);
    drop(b);
    drop(s);
    assert_eq!(in_file(dir.path()), 0, "the store's drop wrote it");
}

/// A call dropped at any of its await points, or never polled, gives
/// its slot back: free here at once, in the file after the delay, and
/// each call still one round.
#[tokio::test(start_paused = true)]
async fn calls_dropped_at_every_await_point_give_their_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let upstream = service_fn(|n: u32| async move {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        Ok::<_, BoxError>(n)
    });
    let svc = stack(&s, 100.0, 1, upstream);
    let layer = bulkhead(&s, 1);
    let mut cx = Context::from_waker(Waker::noop());
    for polls in 0..5 {
        let mut caller = svc.clone();
        caller.ready().await.unwrap();
        let mut call = pin!(caller.call(polls));
        let mut done = false;
        for _ in 0..polls {
            if let Poll::Ready(r) = call.as_mut().poll(&mut cx) {
                assert_eq!(r.unwrap(), polls);
                done = true;
                break;
            }
        }
        assert_eq!(done, polls == 4, "three awaits, then the answer");
        if !done {
            assert_eq!(layer.handle().in_flight(), 1, "held at poll {polls}");
        }
    }
    assert_eq!(layer.handle().in_flight(), 0);
    assert_eq!(s.lock_rounds(), 5);
    tokio::time::sleep(DELAY + Duration::from_millis(1)).await;
    assert_eq!(s.lock_rounds(), 6);
    assert_eq!(in_file(dir.path()), 0);
}

/// Slots queued while the file cannot be written stay queued and reach
/// the file once it can be written again; meanwhile the limits hold as
/// the policy says.
#[tokio::test(start_paused = true)]
async fn slots_queued_while_the_file_is_read_only_are_written_later() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    for degrade in [Degrade::FailOpenToLocal, Degrade::FailClosed] {
        let dir = tempfile::tempdir().unwrap();
        let (s, events) = store_with(dir.path(), degrade, DELAY);
        let svc = stack(&s, 100.0, 1, answer());
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
        assert_eq!(in_file(dir.path()), 1, "queued");
        mode(s.path(), 0o400);
        // The flush and its retries cannot write.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(s.is_degraded(), "{degrade:?}");
        assert_eq!(in_file(dir.path()), 1, "{degrade:?}: still queued");
        let r = svc.clone().oneshot(2).await;
        match degrade {
            // Local limits: the slot this process gave back is free.
            Degrade::FailOpenToLocal => assert_eq!(r.unwrap(), 2),
            Degrade::FailClosed => assert!(r.unwrap_err().is::<RateLimited>()),
        }
        mode(s.path(), 0o600);
        // The next retry (at most a second later) writes it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(in_file(dir.path()), 0, "{degrade:?}");
        assert!(!s.is_degraded());
        let restored = events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, StoreEvent::Restored { .. }));
        assert!(restored, "{degrade:?}");
        assert_eq!(child_call(dir.path()), "ok", "{degrade:?}");
    }
}

/// A store listener that panics in the rounds that fail to write the
/// queue and then write it (on the flush task, in the caller's thread)
/// loses no slot.
#[tokio::test(start_paused = true)]
async fn a_panicking_listener_loses_no_slot() {
    use std::os::unix::fs::PermissionsExt;
    torture::quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let heard = Arc::new(Mutex::new(0));
    let count = heard.clone();
    let s = FileStore::builder()
        .dir(dir.path())
        .release_delay(DELAY)
        .on_event(move |e| {
            *count.lock().unwrap() += 1;
            panic!("torture: a listener panics on {e:?}");
        })
        .build()
        .unwrap();
    let svc = stack(&s, 100.0, 1, answer());
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    let mode = |m| std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(m));
    mode(0o400).unwrap();
    tokio::time::sleep(DELAY + Duration::from_millis(1)).await;
    assert!(s.is_degraded());
    assert_eq!(in_file(dir.path()), 1, "still queued");
    mode(0o600).unwrap();
    s.flush();
    assert!(!s.is_degraded());
    assert_eq!(*heard.lock().unwrap(), 2, "degraded, restored");
    assert_eq!(in_file(dir.path()), 0);
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
}

/// Three processes run the stack on one file at once: never two calls in
/// the upstream with a bulkhead of 1, exactly the bucket's 60 tokens
/// spent, and no slot left held once they end.
#[test]
fn across_processes_the_cap_and_the_bucket_hold() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..3).map(|_| spawn_child("stack", dir.path())).collect();
    let mut admitted = 0;
    let mut report = Vec::new();
    for c in children {
        let out = outputs(c);
        let field = |line: &str, key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        admitted += field(&out[0], "ok=") + field(&out[0], "full=");
        report.push(format!("{} {}", out[0], out[1]));
    }
    // Every call the bucket let through was answered or turned away by
    // the bulkhead; none reached the upstream over the cap.
    assert_eq!(admitted, 60, "{report:?}");
    assert_eq!(in_file(dir.path()), 0, "{report:?}");
    println!("3 processes x 40 calls: {report:?}");
}

#[test]
fn a_release_delay_must_be_below_the_slot_timeout() {
    let err = FileStore::builder()
        .dir("/tmp")
        .slot_timeout(Duration::from_secs(1))
        .release_delay(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "release_delay");
    // The default stays below a short slot timeout.
    let short = FileStore::builder()
        .dir("/tmp")
        .slot_timeout(Duration::from_millis(4))
        .build();
    assert!(short.is_ok());
}

#[derive(Debug, Clone)]
enum Op {
    /// Process `0` or `1` takes a slot.
    Take(usize),
    /// The `n`th slot still held is given back.
    GiveBack(usize),
    /// Process `0` or `1` makes a round of its own (another layer's).
    Round(usize),
    /// Time passes (milliseconds).
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..2).prop_map(Op::Take),
        3 => (0usize..16).prop_map(Op::GiveBack),
        1 => (0usize..2).prop_map(Op::Round),
        2 => (1u64..25).prop_map(Op::Wait),
    ]
}

/// What each process has given back and not written: its slots, and when
/// its queue last went from empty to not empty.
#[derive(Default)]
struct Queued {
    slots: usize,
    since: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Two stores on one file (two processes, as far as the queues go)
    /// against a model: the file lists exactly the slots held plus those
    /// queued; a process is refused a slot only when the slots held plus
    /// the other's queued ones fill the bulkhead (never more than the
    /// capacity is held); a queue is written once it has waited the delay
    /// or by its process's next round; nothing is left at the end.
    #[test]
    fn give_backs_queue_until_a_round_or_the_delay(
        cap in 1u32..4,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let rt = torture::paused_runtime();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let stores = [store(dir.path()), store(dir.path())];
            let bulkheads: Vec<_> = stores
                .iter()
                .map(|s| s.bulkhead(cap).unwrap().named("api"))
                .collect();
            let mut held: Vec<(usize, FileSlot)> = Vec::new();
            let mut queued = [Queued::default(), Queued::default()];
            let mut now = 0u64;
            let delay = DELAY.as_millis() as u64;
            for op in &ops {
                match *op {
                    Op::Take(p) => {
                        // Its round writes its own queue first.
                        queued[p].slots = 0;
                        let want = held.len() + queued[1 - p].slots < cap as usize;
                        let got = bulkheads[p].try_acquire();
                        prop_assert_eq!(got.is_some(), want, "{:?}", op);
                        if let Some(slot) = got {
                            held.push((p, slot));
                        }
                    }
                    Op::GiveBack(i) if i < held.len() => {
                        let (p, slot) = held.remove(i);
                        drop(slot);
                        if queued[p].slots == 0 {
                            queued[p].since = now;
                        }
                        queued[p].slots += 1;
                    }
                    Op::GiveBack(_) => {}
                    Op::Round(p) => {
                        stores[p].update(|_| ());
                        queued[p].slots = 0;
                    }
                    Op::Wait(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        now += ms;
                        for q in &mut queued {
                            if q.slots > 0 && q.since + delay <= now {
                                q.slots = 0;
                            }
                        }
                    }
                }
                let listed = held.len() + queued[0].slots + queued[1].slots;
                prop_assert_eq!(in_file(dir.path()), listed, "after {:?}", op);
                for p in 0..2 {
                    let free_here = cap as usize - held.len() - queued[1 - p].slots;
                    prop_assert_eq!(bulkheads[p].available() as usize, free_here.min(cap as usize));
                }
                prop_assert!(held.len() <= cap as usize);
            }
            drop(held);
            tokio::time::sleep(DELAY + Duration::from_millis(1)).await;
            prop_assert_eq!(in_file(dir.path()), 0, "every slot written back");
            Ok::<(), TestCaseError>(())
        })?;
    }
}
