//! The Redis store against a real `redis-server` started on a free
//! loopback port.
#![cfg(all(feature = "redis", feature = "circuit-breaker"))]

use std::time::Duration;

#[path = "support/breaker_call.rs"]
mod breaker_call;
use breaker_call::call;
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_bulwark::store::redis::RedisStore;
use tower_bulwark::store::Degrade;

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::{degrading_store, eventually, store, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_different_connections_share_one_limit_exactly() {
    let Some(server) = RedisServer::start("instances_share_one_limit") else {
        return;
    };
    // Four processes' worth of stores, each with its own connection.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let limiter = store(&server, "share")
                .rate_limiter("api", 30.0, 0.001)
                .unwrap()
                .local_cache(false);
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..25 {
                    if limiter.try_acquire("", 1).await.is_ok() {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 30, "100 attempts against a fleet burst of 30");

    // Keys are limited separately; a rejection says when to come back.
    let limiter = store(&server, "share")
        .rate_limiter("keyed", 2.0, 1.0)
        .unwrap();
    assert!(limiter.try_acquire("a", 1).await.is_ok());
    assert!(limiter.try_acquire("a", 1).await.is_ok());
    let wait = limiter.try_acquire("a", 1).await.unwrap_err();
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    assert!(limiter.try_acquire("b", 1).await.is_ok());
    // The over-limit cache answers again without a round trip, the same way.
    assert!(limiter.try_acquire("a", 1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_caps_the_fleet_and_a_dead_holders_lease_expires() {
    let Some(server) = RedisServer::start("bulkhead_caps_the_fleet") else {
        return;
    };
    let a = store(&server, "bh").bulkhead("db", 2).unwrap();
    let b = store(&server, "bh").bulkhead("db", 2).unwrap();
    let l1 = a.try_acquire().await.unwrap();
    let _l2 = b.try_acquire().await.unwrap();
    assert!(l1.is_fleet_wide());
    assert!(a.try_acquire().await.is_none());
    assert_eq!(b.in_use().await, Some(2));
    drop(l1);
    eventually("the released lease", async || b.in_use().await == Some(1)).await;

    // A holder that dies without releasing: its runtime (and renewal task)
    // goes away and the lease is forgotten. The lease expires after its ttl.
    let short = store(&server, "bh")
        .bulkhead("db", 2)
        .unwrap()
        .lease_ttl(Duration::from_millis(300));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lease = rt.block_on(short.try_acquire()).unwrap();
        std::mem::forget(lease);
    })
    .join()
    .unwrap();
    assert!(b.try_acquire().await.is_none());
    eventually("the dead holder's lease to expire", async || {
        b.in_use().await == Some(1)
    })
    .await;
    assert!(b.try_acquire().await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_to_local_and_comes_back() {
    let Some(mut server) = RedisServer::start("redis_down_fails_open") else {
        return;
    };
    let (store, events) = degrading_store(&server, Degrade::FailOpenToLocal);
    let limiter = store.rate_limiter("api", 3.0, 0.001).unwrap();
    let bulkhead = store.bulkhead("db", 1).unwrap();
    assert!(limiter.try_acquire("", 1).await.is_ok());
    assert!(!store.is_degraded());

    server.kill();
    // Never a hang: every call answers within the store's timeout.
    let local = tokio::time::timeout(Duration::from_secs(5), async {
        let mut admitted = 0;
        for _ in 0..5 {
            if limiter.try_acquire("", 1).await.is_ok() {
                admitted += 1;
            }
        }
        admitted
    })
    .await
    .expect("calls answer while Redis is down");
    // The local fallback enforces the same limit in this process.
    assert_eq!(local, 3);
    assert!(store.is_degraded());
    let lease = bulkhead.try_acquire().await.expect("local slot");
    assert!(!lease.is_fleet_wide());
    assert!(
        bulkhead.try_acquire().await.is_none(),
        "the local cap holds"
    );
    drop(lease);
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded"]);

    server.restart();
    eventually("the store to reconnect", async || {
        let _ = limiter.try_acquire("fresh", 1).await;
        !store.is_degraded()
    })
    .await;
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
    assert!(bulkhead.try_acquire().await.unwrap().is_fleet_wide());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_when_configured() {
    let Some(mut server) = RedisServer::start("redis_down_fails_closed") else {
        return;
    };
    let (store, events) = degrading_store(&server, Degrade::FailClosed);
    let limiter = store.rate_limiter("api", 100.0, 100.0).unwrap();
    let bulkhead = store.bulkhead("db", 5).unwrap();
    assert!(limiter.try_acquire("", 1).await.is_ok());

    server.kill();
    let (rate, slot) = tokio::time::timeout(Duration::from_secs(5), async {
        (
            limiter.try_acquire("", 1).await,
            bulkhead.try_acquire().await,
        )
    })
    .await
    .expect("calls answer while Redis is down");
    assert!(rate.is_err());
    assert!(slot.is_none());
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded"]);

    server.restart();
    eventually("the store to reconnect", async || {
        limiter.try_acquire("", 1).await.is_ok()
    })
    .await;
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
}

fn fleet_breaker(store: RedisStore) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .name("payments")
        .failure_threshold(4)
        .open_timeout(Duration::from_secs(60))
        .sync_interval(Duration::from_millis(50))
        .backend(store)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_breaker_adds_up_failures_and_opens_everywhere() {
    let Some(server) = RedisServer::start("fleet_breaker_opens") else {
        return;
    };
    let fleet: Vec<_> = (0..3)
        .map(|_| fleet_breaker(store(&server, "cb")))
        .collect();
    // 2 + 1 + 1 failures: no process reaches 4 on its own.
    assert_eq!(call(&fleet[0], true).await, Some(false));
    assert_eq!(call(&fleet[0], true).await, Some(false));
    assert_eq!(call(&fleet[1], true).await, Some(false));
    assert_eq!(call(&fleet[2], true).await, Some(false));
    for (i, layer) in fleet.iter().enumerate() {
        let h = layer.handle();
        eventually(&format!("instance {i} to open"), async || {
            h.state() == CircuitState::Open
        })
        .await;
        assert_eq!(call(layer, false).await, None);
    }
    // A process that joins later learns the state from the fleet.
    let late = fleet_breaker(store(&server, "cb"));
    let _ = call(&late, false).await; // starts its sync
    let h = late.handle();
    eventually("the late instance to open", async || {
        h.state() == CircuitState::Open
    })
    .await;

    // A reset anywhere closes the breaker everywhere.
    fleet[1].handle().reset();
    let h = fleet[2].handle();
    eventually("the reset to spread", async || {
        h.state() == CircuitState::Closed
    })
    .await;
    assert_eq!(call(&fleet[2], false).await, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_breaker_probes_once_across_the_fleet() {
    let Some(server) = RedisServer::start("fleet_breaker_probes") else {
        return;
    };
    let layer = |s| {
        CircuitBreakerLayer::builder()
            .name("probe")
            .failure_threshold(1)
            .success_threshold(1)
            .open_timeout(Duration::from_millis(200))
            .sync_interval(Duration::from_millis(50))
            .backend(s)
            .build()
            .unwrap()
    };
    let fleet: Vec<_> = (0..3).map(|_| layer(store(&server, "probe"))).collect();
    assert_eq!(call(&fleet[0], true).await, Some(false));
    for l in &fleet {
        let h = l.handle();
        let _ = call(l, false).await;
        eventually("the fleet to open", async || {
            h.state() == CircuitState::Open
        })
        .await;
    }
    // Once the open period is over, every instance wants to probe; the
    // fleet grants one probe at a time, and its success closes the breaker
    // everywhere.
    let mut outcomes = Vec::new();
    eventually("one probe to be admitted", async || {
        for l in &fleet {
            outcomes.push(call(l, false).await);
        }
        outcomes.contains(&Some(true))
    })
    .await;
    let first = outcomes.iter().position(|o| *o == Some(true)).unwrap();
    assert!(outcomes[..first].iter().all(Option::is_none));
    for l in &fleet {
        let h = l.handle();
        eventually("the fleet to close", async || {
            h.state() == CircuitState::Closed
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_breaker_with_redis_down_follows_the_policy() {
    let Some(mut server) = RedisServer::start("fleet_breaker_redis_down") else {
        return;
    };
    let (open_store, _) = degrading_store(&server, Degrade::FailOpenToLocal);
    let (closed_store, events) = degrading_store(&server, Degrade::FailClosed);
    let fail_open = fleet_breaker(open_store);
    let fail_closed = fleet_breaker(closed_store);
    assert_eq!(call(&fail_open, false).await, Some(true));
    assert_eq!(call(&fail_closed, false).await, Some(true));

    server.kill();
    let h = fail_closed.handle();
    eventually("fail-closed to reject", async || {
        let _ = call(&fail_closed, false).await;
        h.state() == CircuitState::Open
    })
    .await;
    assert_eq!(call(&fail_closed, false).await, None);
    // Fail-open: the local breaker carries on alone, and never waits.
    let r = tokio::time::timeout(Duration::from_secs(5), call(&fail_open, false)).await;
    assert_eq!(r.expect("no hang"), Some(true));
    assert_eq!(events.lock().unwrap().first(), Some(&"degraded"));

    server.restart();
    eventually("fail-closed to recover", async || {
        let _ = call(&fail_closed, false).await;
        h.state() == CircuitState::Closed
    })
    .await;
    eventually("fail-closed to admit again", async || {
        call(&fail_closed, false).await == Some(true)
    })
    .await;
    assert!(events.lock().unwrap().contains(&"restored"));
}

#[test]
fn bad_config_is_rejected() {
    let err = RedisStore::builder("not a url").build().unwrap_err();
    assert_eq!(err.field(), "url");
    let err = RedisStore::builder("redis://127.0.0.1/")
        .prefix("a{b}")
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "prefix");
    let err = RedisStore::builder("redis://127.0.0.1/")
        .lease_ttl(std::time::Duration::from_millis(29))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "lease_ttl");
    let store = RedisStore::builder("redis://127.0.0.1/").build().unwrap();
    assert_eq!(
        store.rate_limiter("x", 0.0, 1.0).unwrap_err().field(),
        "max_tokens"
    );
    assert_eq!(
        store.bulkhead("x", 0).unwrap_err().field(),
        "max_concurrent"
    );
}
