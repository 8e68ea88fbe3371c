//! The Redis store under faults, against a real `redis-server` started on a
//! free loopback port: callers that give up, a server frozen with SIGSTOP
//! and thawed with SIGCONT, a server killed. Each test prints the figures
//! it measured (run with `--nocapture` to see them); none asserts a time.
#![cfg(all(feature = "redis", feature = "rate-limit", feature = "bulkhead"))]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::bulkhead::BulkheadLayer;
use tower_bulwark::rate_limit::RateLimitLayer;
use tower_bulwark::store::redis::{RedisRateLimiter, RedisStore};
use tower_bulwark::store::{Degrade, StoreEvent};

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::{eventually, Events, RedisServer};

#[path = "support/child.rs"]
mod child_process;
use child_process::{spawn_child, wait_ready, DIR, ROLE};

/// The body of every child process (a no-op in a normal test run): the
/// Redis URL is in the file `url` of the directory it is given.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var(DIR).unwrap());
    let url = std::fs::read_to_string(dir.join("url")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match role.as_str() {
            // Holds the one lease of bulkhead `db`, with the default lease
            // ttl, until it is killed.
            "hold_lease" => {
                let store = RedisStore::builder(url).prefix("kill").build().unwrap();
                let bulkhead = store.bulkhead("db", 1).unwrap();
                let lease = bulkhead.try_acquire().await;
                assert!(lease.as_ref().is_some_and(|l| l.is_fleet_wide()));
                println!("OUT ready");
                tokio::time::sleep(Duration::from_secs(600)).await;
                drop(lease);
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// Redis's clock (ms): lease expiry is decided by it.
async fn redis_ms(server: &RedisServer) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    s * 1000 + us / 1000
}

/// A store with a short timeout, as in production, recording its events.
/// Its leases outlive every test, so a lease found free was given back,
/// not expired.
fn store(server: &RedisServer, prefix: &str, policy: Degrade) -> (RedisStore, Events) {
    let events = Events::default();
    let sink = events.clone();
    let store = RedisStore::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(200))
        .retry_interval(Duration::from_millis(100))
        .lease_ttl(Duration::from_secs(600))
        .degrade(policy)
        .on_event(move |e| {
            sink.lock().unwrap().push(match e {
                StoreEvent::Degraded { .. } => "degraded",
                StoreEvent::Restored { .. } => "restored",
                _ => "other",
            })
        })
        .build()
        .unwrap();
    (store, events)
}

/// Polls `fut` `polls` times, yielding to the runtime in between, then
/// drops it: `Some` with its output if it finished first.
async fn poll_then_drop<F: Future>(fut: F, polls: usize) -> Option<F::Output> {
    let mut fut = pin!(fut);
    for _ in 0..polls {
        let step = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(out) = step {
            return Some(out);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Waits until every give-back queued so far has reached Redis.
async fn flushed(store: &RedisStore) {
    eventually("the give-backs to reach Redis", async || {
        store.flush().await
    })
    .await;
}

/// The tokens a bucket holds charged now, to the microsecond: how far its
/// TAT (in Redis, under `key`) lies ahead of Redis's clock, in tokens.
async fn charged_exactly(server: &RedisServer, key: &str, refill_rate: f64) -> f64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let tat: Option<f64> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (s, us): (f64, f64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now = s * 1e6 + us;
    (tat.unwrap_or(0.0) - now).max(0.0) * refill_rate / 1e6
}

/// A refund gives back the part of a charge not yet refilled: when the
/// bucket was full at the charge and another request came before the
/// refund, what refilled in between (here 0.001 token/s over a test of a
/// few seconds) stays charged. So "exactly" means within this.
const REFILLED_MEANWHILE: f64 = 0.01;

/// How many tokens of a bucket of `max` (with no refill to speak of) have
/// been charged: `max` minus those still there.
async fn charged(limiter: &RedisRateLimiter, max: u32) -> u32 {
    let mut left = 0;
    for _ in 0..max {
        if limiter.try_acquire("", 1).await.is_ok() {
            left += 1;
        }
    }
    max - left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_lease_requests_leave_no_lease_behind() {
    let Some(server) = RedisServer::start("abandoned_leases") else {
        return;
    };
    let (store, _) = store(&server, "ghost", Degrade::FailClosed);
    let layer = BulkheadLayer::builder()
        .name("db")
        .max_concurrent(8)
        .backend(store.clone())
        .build()
        .unwrap();
    let echo = service_fn(|x: u32| async move { Ok::<_, Infallible>(x) });
    let mut svc = layer.layer(echo);
    let engine = store.bulkhead("db", 8).unwrap();
    assert_eq!(engine.in_use().await, Some(0));

    // 1000 calls, each dropped after 0..40 polls: before its request is
    // sent, while Redis runs it, after the answer, during the call.
    let mut finished = 0;
    for i in 0..1000u32 {
        svc.ready().await.unwrap();
        let fut = svc.call(i);
        if poll_then_drop(fut, (i % 41) as usize).await.is_some() {
            finished += 1;
        }
    }
    // And as many straight through the store.
    for i in 0..1000usize {
        if poll_then_drop(engine.try_acquire(), i % 41).await.is_some() {
            finished += 1;
        }
    }
    flushed(&store).await;
    let ghosts = engine.in_use().await.unwrap();
    eprintln!(
        "2000 calls, {} abandoned before their answer: {ghosts} leases held by nobody",
        2000 - finished
    );
    assert_eq!(ghosts, 0);
    let leases: Vec<_> = futures::future::join_all((0..8).map(|_| engine.try_acquire())).await;
    assert!(leases
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.is_fleet_wide())));
}

/// Freezes the server for `stall`, during which a burst of lease requests
/// is sent every store timeout (so each reaches Redis and goes unanswered).
/// Returns how many local leases the callers got meanwhile.
async fn stall_with_lease_requests(
    server: &RedisServer,
    store: &RedisStore,
    max: u32,
    stall: Duration,
) -> usize {
    let engine = store.bulkhead("db", max).unwrap();
    server.pause();
    let start = Instant::now();
    let mut local = 0;
    while start.elapsed() < stall {
        let burst = (0..2 * max).map(|_| engine.try_acquire());
        for lease in futures::future::join_all(burst).await {
            local += usize::from(lease.is_some_and(|l| !l.is_fleet_wide()));
        }
        // Paced by the releases, each of which waits out the timeout.
        assert!(!store.flush().await, "nothing reaches a frozen server");
    }
    server.resume();
    local
}

/// How long a stall lasts in the SIGSTOP tests: `BULWARK_STALL_MS`, 500 ms
/// unless set (the figures in the changelog were taken at 5000).
fn stall() -> Duration {
    let ms = std::env::var("BULWARK_STALL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_asked_during_a_stall_are_released_when_redis_answers_again() {
    let Some(server) = RedisServer::start("stall_leases") else {
        return;
    };
    let (store, events) = store(&server, "stall", Degrade::FailOpenToLocal);
    let engine = store.bulkhead("db", 8).unwrap();
    // Connected, with the scripts loaded.
    drop(engine.try_acquire().await.unwrap());
    flushed(&store).await;

    let stall = stall();
    let local = stall_with_lease_requests(&server, &store, 8, stall).await;
    assert!(events.lock().unwrap().contains(&"degraded"));
    let resumed = Instant::now();
    // The whole fleet's worth of leases is free again: none is left to
    // expire with its lease ttl.
    let mut held = Vec::new();
    eventually("8 fleet-wide leases", async || {
        if let Some(l) = engine.try_acquire().await {
            if l.is_fleet_wide() {
                held.push(l);
            }
        }
        held.len() == 8
    })
    .await;
    let admitted_after = resumed.elapsed();
    eprintln!(
        "stall of {stall:?} ({local} local leases meanwhile): the fleet admitted 8 of 8 again \
         {admitted_after:?} after SIGCONT"
    );
    assert_eq!(engine.in_use().await, Some(8));
    drop(held);
    flushed(&store).await;
    assert_eq!(engine.in_use().await, Some(0), "no lease held by nobody");
    assert!(events.lock().unwrap().contains(&"restored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_rate_limit_calls_are_not_charged() {
    let Some(server) = RedisServer::start("abandoned_charges") else {
        return;
    };
    let (store, _) = store(&server, "charge", Degrade::FailClosed);
    let layer = RateLimitLayer::builder()
        .name("api")
        .max_tokens(1000.0)
        .refill_rate(0.001)
        .backend(store.clone())
        .build()
        .unwrap();
    let echo = service_fn(|x: u32| async move { Ok::<_, Infallible>(x) });
    let mut svc = layer.layer(echo);
    // 500 calls, each dropped after 0..40 polls.
    let mut admitted = 0;
    for i in 0..500u32 {
        svc.ready().await.unwrap();
        let fut = svc.call(i);
        if let Some(res) = poll_then_drop(fut, (i % 41) as usize).await {
            admitted += u32::from(res.is_ok());
        }
    }
    flushed(&store).await;
    let charged = charged_exactly(&server, "{charge:api}:gcra", 0.001).await;
    eprintln!(
        "500 calls abandoned at every point: {charged:.6} tokens charged, {admitted} admitted"
    );
    assert!((charged - f64::from(admitted)).abs() < REFILLED_MEANWHILE);

    // Per key, straight through the store: each key's bucket is charged
    // what that key was admitted.
    let keyed = store.rate_limiter("api", 1000.0, 0.001).unwrap();
    let mut admitted_by_key = [0u32; 2];
    for i in 0..400usize {
        let key = ["alice", "bob"][i % 2];
        if let Some(Ok(())) = poll_then_drop(keyed.try_acquire(key, 1), (i / 2) % 41).await {
            admitted_by_key[i % 2] += 1;
        }
    }
    flushed(&store).await;
    for (k, key) in ["alice", "bob"].into_iter().enumerate() {
        let bucket = format!("{{charge:api}}:gcra:{key}");
        let charged = charged_exactly(&server, &bucket, 0.001).await;
        let admitted = f64::from(admitted_by_key[k]);
        eprintln!("key {key}: {charged:.6} tokens charged, {admitted} admitted");
        assert!((charged - admitted).abs() < REFILLED_MEANWHILE);
    }

    // Buckets, receipts and refund totals share the limiter's hash tag, so
    // each script touches one cluster slot.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys
        .iter()
        .any(|k| k.starts_with("{charge:api}:gcra-receipt:")));
    assert!(
        keys.iter().all(|k| k.starts_with("{charge:api}:")),
        "{keys:?}"
    );
}

/// 200 calls sent while the server is frozen, then it is thawed: returns
/// (tokens charged, calls admitted).
async fn charges_across_a_stall(policy: Degrade) -> Option<(f64, u32)> {
    let server = RedisServer::start("stall_charges")?;
    let (store, events) = store(&server, "stall", policy);
    let limiter = store.rate_limiter("api", 1000.0, 0.001).unwrap();
    // Connected, with the charge and refund scripts loaded.
    limiter.try_acquire("warm", 1).await.unwrap();
    let _ = poll_then_drop(limiter.try_acquire("warm", 1), 1).await;
    flushed(&store).await;

    server.pause();
    let calls = (0..200).map(|_| limiter.try_acquire("", 1));
    let admitted = futures::future::join_all(calls)
        .await
        .iter()
        .filter(|r| r.is_ok())
        .count() as u32;
    server.resume();
    assert!(events.lock().unwrap().contains(&"degraded"));
    flushed(&store).await;
    eventually("the store to answer again", async || {
        store
            .rate_limiter("probe", 1.0, 1.0)
            .unwrap()
            .try_acquire("", 1)
            .await
            .is_ok()
            && !store.is_degraded()
    })
    .await;
    let charged = charged_exactly(&server, "{stall:api}:gcra", 0.001).await;
    Some((charged, admitted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_admitted_locally_during_a_stall_are_not_charged_again() {
    let Some((charged, admitted)) = charges_across_a_stall(Degrade::FailOpenToLocal).await else {
        return;
    };
    eprintln!(
        "fail-open, 200 calls during a stall: {charged:.6} tokens charged in Redis, \
         {admitted} admitted locally"
    );
    assert_eq!(admitted, 200, "admitted by the local fallback");
    assert!(charged < REFILLED_MEANWHILE, "never counted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_rejected_during_a_stall_are_not_charged() {
    let Some((charged, admitted)) = charges_across_a_stall(Degrade::FailClosed).await else {
        return;
    };
    eprintln!(
        "fail-closed, 200 calls during a stall: {charged:.6} tokens charged, {admitted} admitted"
    );
    assert_eq!(admitted, 0);
    assert!(
        charged < REFILLED_MEANWHILE,
        "a rejected call is not charged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_never_hangs_a_call_and_each_policy_is_followed() {
    let Some(server) = RedisServer::start("frozen_server") else {
        return;
    };
    for policy in [Degrade::FailOpenToLocal, Degrade::FailClosed] {
        let (store, events) = store(&server, "frozen", policy);
        let limiter = store.rate_limiter("api", 5.0, 0.001).unwrap();
        let bulkhead = store.bulkhead("db", 2).unwrap();
        limiter.try_acquire("", 1).await.unwrap();
        server.pause();
        let answers = tokio::time::timeout(Duration::from_secs(10), async {
            let rate = limiter.try_acquire("", 1).await;
            let lease = bulkhead.try_acquire().await;
            (rate, lease)
        })
        .await;
        server.resume();
        let (rate, lease) = answers.expect("every call answers within the store's timeout");
        match policy {
            Degrade::FailOpenToLocal => {
                assert!(rate.is_ok());
                assert!(lease.is_some_and(|l| !l.is_fleet_wide()));
            }
            Degrade::FailClosed => {
                assert!(rate.is_err());
                assert!(lease.is_none());
            }
        }
        assert_eq!(events.lock().unwrap().as_slice(), ["degraded"]);
        eventually("the store to recover", async || {
            let _ = limiter.try_acquire("", 1).await;
            !store.is_degraded()
        })
        .await;
        assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_keeps_its_cap_and_no_key_escapes_its_limit() {
    let Some(mut server) = RedisServer::start("local_fallback_cap") else {
        return;
    };
    let store = RedisStore::builder(server.url())
        .prefix("cap")
        .timeout(Duration::from_millis(200))
        // Down for the whole test: every call is answered locally.
        .retry_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    // One call per key per 1000 s: no bucket is full again during the test.
    let limiter = store.rate_limiter("api", 1.0, 0.001).unwrap();
    server.kill();

    const KEYS: usize = 40_000;
    const CAP: usize = 10_000;
    let mut admitted = 0;
    let mut spans = Vec::new();
    let mut span = Instant::now();
    for k in 0..KEYS {
        if limiter.try_acquire(&k.to_string(), 1).await.is_ok() {
            admitted += 1;
        }
        if (k + 1) % CAP == 0 {
            spans.push(span.elapsed() / CAP as u32);
            span = Instant::now();
        }
    }
    eprintln!("local fallback, {KEYS} keys: per call {spans:?} for each 10 000");
    assert!(store.is_degraded());
    assert_eq!(
        admitted, CAP,
        "new keys past the cap are refused, not let through"
    );
    for k in [0, 1, CAP / 2, CAP - 1] {
        assert!(
            limiter.try_acquire(&k.to_string(), 1).await.is_err(),
            "key {k} is still limited"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_backs_wait_out_a_killed_server_and_reach_its_successor() {
    let Some(mut server) = RedisServer::start("killed_server") else {
        return;
    };
    let (store, events) = store(&server, "killed", Degrade::FailClosed);
    let engine = store.bulkhead("db", 4).unwrap();
    let limiter = store.rate_limiter("api", 10.0, 0.001).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(engine.try_acquire().await.unwrap());
    }
    limiter.try_acquire("", 1).await.unwrap();

    server.kill();
    // Released while nothing listens, and calls that cannot be answered.
    drop(held);
    assert!(engine.try_acquire().await.is_none());
    assert!(limiter.try_acquire("", 1).await.is_err());
    assert!(!store.flush().await, "nothing reaches a killed server");

    // The successor starts empty; the queued give-backs reach it and take
    // nothing from it (they only mark the ids as given back).
    server.restart();
    flushed(&store).await;
    eventually("the store to answer again", async || {
        engine.in_use().await == Some(0)
    })
    .await;
    let leases: Vec<_> = futures::future::join_all((0..4).map(|_| engine.try_acquire())).await;
    assert!(leases
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.is_fleet_wide())));
    let fresh = store
        .rate_limiter("api", 10.0, 0.001)
        .unwrap()
        .local_cache(false);
    assert_eq!(
        charged(&fresh, 10).await,
        0,
        "a fresh bucket on the new server"
    );
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
}

/// A process SIGKILLed while holding a lease cannot give it back: its
/// slot is free again once the lease's default ttl (5 s) runs out, not 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holders_lease_frees_its_slot_within_the_default_ttl() {
    let Some(server) = RedisServer::start("killed_holder") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("url"), server.url()).unwrap();
    let mut holder = spawn_child("hold_lease", tmp.path());
    wait_ready(&mut holder);
    let watcher = RedisStore::builder(server.url())
        .prefix("kill")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let engine = watcher.bulkhead("db", 1).unwrap();
    assert_eq!(engine.in_use().await, Some(1));
    assert!(engine.try_acquire().await.is_none(), "the child holds it");

    let killed_at = redis_ms(&server).await;
    holder.kill().unwrap(); // SIGKILL: no destructor runs
    holder.wait().unwrap();
    let mut lease = None;
    eventually("the killed holder's lease to expire", async || {
        lease = engine.try_acquire().await;
        lease.is_some()
    })
    .await;
    let freed_after = redis_ms(&server).await - killed_at;
    eprintln!("a SIGKILLed holder's slot was free again {freed_after} ms after the kill (default lease ttl 5 s)");
    assert!(lease.unwrap().is_fleet_wide());
}

/// A lease held by a live process through a call that runs for several
/// lease ttls is renewed, not lost: the fleet sees it held all along, and
/// no other process gets its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_through_a_long_call_outlives_several_ttls() {
    let Some(server) = RedisServer::start("long_lease") else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let holder = RedisStore::builder(server.url())
        .prefix("long")
        .timeout(Duration::from_millis(200))
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let layer = BulkheadLayer::builder()
        .name("db")
        .max_concurrent(1)
        .backend(holder.clone())
        .build()
        .unwrap();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let finished = std::sync::Arc::new(std::sync::Mutex::new(Some(finished)));
    let slow = service_fn(move |x: u32| {
        let done = finished.lock().unwrap().take().unwrap();
        async move {
            let _ = done.await;
            Ok::<_, Infallible>(x)
        }
    });
    let call = tokio::spawn(layer.layer(slow).oneshot(7));

    // Another process's view, with a ttl of its own that plays no part.
    let other = RedisStore::builder(server.url())
        .prefix("long")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .bulkhead("db", 1)
        .unwrap();
    eventually("the long call's lease", async || {
        other.in_use().await == Some(1)
    })
    .await;
    let start = redis_ms(&server).await;
    let ttls = 4;
    let mut checks = 0;
    while redis_ms(&server).await < start + ttls * ttl.as_millis() as u64 {
        assert_eq!(other.in_use().await, Some(1), "the lease was lost");
        assert!(
            other.try_acquire().await.is_none(),
            "its slot was given away"
        );
        checks += 1;
        // Paces the checks; Redis's clock decides when to stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("a lease of ttl {ttl:?} stayed held through a call of {ttls} ttls ({checks} checks)");
    finish.send(()).unwrap();
    assert_eq!(call.await.unwrap().unwrap(), 7);
    flushed(&holder).await;
    assert_eq!(other.in_use().await, Some(0));
}

/// The leases a process holds are renewed together: one script per
/// bulkhead each third of the ttl, however many leases, and each of them
/// outlives several ttls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_leases_are_renewed_by_one_script_per_tick() {
    let Some(server) = RedisServer::start("renew_many") else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let leases = 20;
    let holder = RedisStore::builder(server.url())
        .prefix("many")
        .timeout(Duration::from_millis(500))
        .lease_ttl(ttl)
        .build()
        .unwrap();
    let engine = holder.bulkhead("db", leases).unwrap();
    let held: Vec<_> = futures::future::join_all((0..leases).map(|_| engine.try_acquire())).await;
    assert!(held
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.is_fleet_wide())));

    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let other = RedisStore::builder(server.url())
        .prefix("many")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .bulkhead("db", leases)
        .unwrap();
    let start = redis_ms(&server).await;
    let ttls = 4;
    let mut checks = 0u64;
    while redis_ms(&server).await < start + ttls * ttl.as_millis() as u64 {
        assert_eq!(other.in_use().await, Some(leases), "a lease was lost");
        checks += 1;
        // Paces the checks; Redis's clock decides when to stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Every script here is an EVALSHA: the checks' counts, and the rest
    // the holder's renewals.
    let scripts: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let renewals = scripts - checks;
    eprintln!(
        "{leases} leases of ttl {ttl:?} held through {ttls} ttls: {renewals} renewal scripts \
         (one per lease would be about {})",
        u64::from(leases) * ttls * 3
    );
    // About three per ttl, some early: never one per lease.
    assert!(renewals <= 3 * ttls + 4, "{renewals} renewal scripts");
    drop(held);
    flushed(&holder).await;
    assert_eq!(other.in_use().await, Some(0));
}
