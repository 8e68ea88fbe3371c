//! The rate limit and bulkhead layers on the Redis backend, against a real
//! `redis-server` started on a free loopback port.
#![cfg(all(feature = "redis", feature = "rate-limit", feature = "bulkhead"))]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::store::redis::RedisStore;
use tower_bulwark::store::Degrade;

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::{degrading_store, eventually, store, RedisServer};

fn limiter(store: RedisStore, max: f64, rate: f64) -> RateLimitLayer {
    RateLimitLayer::builder()
        .name("api")
        .max_tokens(max)
        .refill_rate(rate)
        .backend(store)
        .build()
        .unwrap()
}

fn bulkhead(store: RedisStore, max: usize) -> BulkheadLayer {
    BulkheadLayer::builder()
        .name("db")
        .max_concurrent(max)
        .backend(store)
        .build()
        .unwrap()
}

type Ok = std::future::Ready<Result<u32, Infallible>>;

fn ok_service() -> tower::util::ServiceFn<fn(u32) -> Ok> {
    service_fn((|x| std::future::ready(Ok(x))) as fn(u32) -> Ok)
}

/// A service whose calls signal `entered` and then run until `gate` lets
/// them finish.
fn held_service() -> (
    Arc<Semaphore>,
    Arc<Semaphore>,
    impl tower::Service<
            u32,
            Response = u32,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<u32, Infallible>> + Send,
        > + Clone
        + Send,
) {
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(Semaphore::new(0));
    let (g, e) = (gate.clone(), entered.clone());
    let svc = service_fn(move |x: u32| {
        let (gate, entered) = (g.clone(), e.clone());
        async move {
            entered.add_permits(1);
            gate.acquire().await.unwrap().forget();
            Ok::<_, Infallible>(x)
        }
    });
    (gate, entered, svc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_on_different_connections_share_one_limit_exactly() {
    let Some(server) = RedisServer::start("layers_share_one_limit") else {
        return;
    };
    // Four processes' worth of layers, each store with its own connection.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let svc = ServiceBuilder::new()
                .layer(limiter(store(&server, "share"), 30.0, 0.001))
                .service(ok_service());
            tokio::spawn(async move {
                let mut admitted = 0;
                for i in 0..25 {
                    match svc.clone().oneshot(i).await {
                        Ok(_) => admitted += 1,
                        Err(e) => assert!(e.is::<RateLimited>(), "{e}"),
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
    assert_eq!(total, 30, "100 calls against a fleet burst of 30");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_layer_keeps_one_redis_bucket_per_key_across_instances() {
    let Some(server) = RedisServer::start("keyed_layer") else {
        return;
    };
    let keyed = |s: RedisStore| {
        RateLimitLayer::builder()
            .name("per-user")
            .max_tokens(2.0)
            .refill_rate(0.001)
            .key(|user: &String| user.clone())
            .backend(s)
            .build()
            .unwrap()
    };
    let echo = service_fn(|u: String| async move { Ok::<_, Infallible>(u) });
    let a = ServiceBuilder::new()
        .layer(keyed(store(&server, "keyed")))
        .service(echo);
    let b = ServiceBuilder::new()
        .layer(keyed(store(&server, "keyed")))
        .service(echo);
    assert!(a.clone().oneshot("alice".into()).await.is_ok());
    assert!(b.clone().oneshot("alice".into()).await.is_ok());
    let err = a.clone().oneshot("alice".into()).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("alice is over");
    assert!(limited.retry_after() > Duration::from_secs(100));
    assert!(
        b.clone().oneshot("bob".into()).await.is_ok(),
        "bob has his own"
    );
    // The key is part of the (hash-tagged, prefixed) Redis key.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{keyed:per-user}:gcra:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(
        keys,
        ["{keyed:per-user}:gcra:alice", "{keyed:per-user}:gcra:bob"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_layer_caps_the_fleet() {
    let Some(server) = RedisServer::start("bulkhead_layer_caps_the_fleet") else {
        return;
    };
    let (gate, entered, held) = held_service();
    let a = ServiceBuilder::new()
        .layer(bulkhead(store(&server, "fleet"), 2))
        .service(held.clone());
    let b_layer = bulkhead(store(&server, "fleet"), 2);
    let b = ServiceBuilder::new()
        .layer(b_layer.clone())
        .service(held.clone());
    let c1 = tokio::spawn(a.clone().oneshot(1));
    let c2 = tokio::spawn(b.clone().oneshot(2));
    entered.acquire_many(2).await.unwrap().forget();
    let engine = store(&server, "fleet").bulkhead("db", 2).unwrap();
    assert_eq!(engine.in_use().await, Some(2), "both calls hold a lease");
    assert_eq!(b_layer.handle().in_flight(), 1, "this instance's own lease");
    for svc in [a.clone(), b.clone()] {
        let err = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(3))
            .await
            .expect("a full fleet rejects at once")
            .unwrap_err();
        assert!(err.is::<BulkheadFull>(), "{err}");
    }
    gate.add_permits(2);
    assert_eq!(c1.await.unwrap().unwrap(), 1);
    assert_eq!(c2.await.unwrap().unwrap(), 2);
    eventually("the leases to be given back", async || {
        engine.in_use().await == Some(0)
    })
    .await;
    assert_eq!(b_layer.handle().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_fails_open_to_local_limits_through_the_layers() {
    let Some(mut server) = RedisServer::start("layers_fail_open") else {
        return;
    };
    let (store, events) = degrading_store(&server, Degrade::FailOpenToLocal);
    let rate = ServiceBuilder::new()
        .layer(limiter(store.clone(), 3.0, 0.001))
        .service(ok_service());
    let (gate, entered, held) = held_service();
    let bh = ServiceBuilder::new()
        .layer(bulkhead(store.clone(), 1))
        .service(held);
    assert!(rate.clone().oneshot(0).await.is_ok());

    server.kill();
    let admitted = tokio::time::timeout(Duration::from_secs(5), async {
        let mut admitted = 0;
        for i in 0..5 {
            if rate.clone().oneshot(i).await.is_ok() {
                admitted += 1;
            }
        }
        admitted
    })
    .await
    .expect("calls answer while Redis is down");
    assert_eq!(admitted, 3, "the same limit, enforced in this process");
    // The bulkhead's local fallback holds the same cap.
    let first = tokio::spawn(bh.clone().oneshot(1));
    entered.acquire().await.unwrap().forget();
    let second = tokio::time::timeout(Duration::from_secs(5), bh.clone().oneshot(2))
        .await
        .expect("a full bulkhead rejects at once");
    assert!(
        second.unwrap_err().is::<BulkheadFull>(),
        "the local cap holds"
    );
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(events.lock().unwrap().first(), Some(&"degraded"));

    server.restart();
    eventually("the store to reconnect", async || {
        let _ = rate.clone().oneshot(9).await;
        !store.is_degraded()
    })
    .await;
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_fails_closed_through_the_layers() {
    let Some(mut server) = RedisServer::start("layers_fail_closed") else {
        return;
    };
    let (store, events) = degrading_store(&server, Degrade::FailClosed);
    let rate = ServiceBuilder::new()
        .layer(limiter(store.clone(), 100.0, 100.0))
        .service(ok_service());
    let bh = ServiceBuilder::new()
        .layer(bulkhead(store.clone(), 5))
        .service(ok_service());
    assert!(rate.clone().oneshot(0).await.is_ok());
    assert!(bh.clone().oneshot(0).await.is_ok());

    server.kill();
    let (r, b) = tokio::time::timeout(Duration::from_secs(5), async {
        (rate.clone().oneshot(1).await, bh.clone().oneshot(1).await)
    })
    .await
    .expect("calls answer while Redis is down");
    assert!(r.unwrap_err().is::<RateLimited>());
    assert!(b.unwrap_err().is::<BulkheadFull>());
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded"]);

    server.restart();
    eventually("the store to reconnect", async || {
        rate.clone().oneshot(2).await.is_ok()
    })
    .await;
    assert!(bh.clone().oneshot(3).await.is_ok());
    assert_eq!(events.lock().unwrap().as_slice(), ["degraded", "restored"]);
}

#[test]
fn keyed_layer_needs_the_backend_after_the_key() {
    let s = RedisStore::builder("redis://127.0.0.1:1/").build().unwrap();
    let err = RateLimitLayer::builder()
        .backend(s.clone())
        .key(|r: &String| r.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "backend");
    let err = BulkheadLayer::builder()
        .soft_limit(2)
        .backend(s)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "soft_limit");
}
