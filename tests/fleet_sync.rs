//! The Redis fleet breaker's background sync under faults of the process
//! around it, against a real `redis-server`: a panicking store listener,
//! the runtime that ran the sync task going away, and one that stops
//! driving it.
#![cfg(all(feature = "redis", feature = "circuit-breaker"))]

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "support/breaker_call.rs"]
mod breaker_call;
use breaker_call::call;
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitEvent, CircuitState};
use tower_bulwark::store::redis::RedisStore;
use tower_bulwark::store::{Degrade, StoreEvent};

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::{eventually, store, RedisServer};

fn fleet_breaker(
    store: RedisStore,
    events: Option<Arc<Mutex<Vec<CircuitEvent>>>>,
) -> CircuitBreakerLayer {
    let mut b = CircuitBreakerLayer::builder()
        .name("sync")
        .failure_threshold(1)
        .open_timeout(Duration::from_secs(60))
        .sync_interval(Duration::from_millis(50));
    if let Some(events) = events {
        b = b.on_event(move |e| events.lock().unwrap().push(e.clone()));
    }
    b.backend(store).build().unwrap()
}

/// Makes the first call of `layer` (which starts its sync task) on a
/// runtime of its own, and returns that runtime.
fn first_call_elsewhere(layer: &CircuitBreakerLayer) -> tokio::runtime::Runtime {
    let layer = layer.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(call(&layer, false)), Some(true));
        rt
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_store_listener_does_not_stop_the_sync() {
    let Some(mut server) = RedisServer::start("panicking_store_listener") else {
        return;
    };
    let panicked = Arc::new(AtomicBool::new(false));
    let seen = panicked.clone();
    let a_store = RedisStore::builder(server.url())
        .prefix("sync")
        .timeout(Duration::from_millis(500))
        .retry_interval(Duration::from_millis(50))
        .on_event(move |e| {
            if matches!(e, StoreEvent::Degraded { .. }) && !seen.swap(true, SeqCst) {
                panic!("a listener with a bug");
            }
        })
        .build()
        .unwrap();
    let a = fleet_breaker(a_store, None);
    assert_eq!(call(&a, false).await, Some(true));
    // Redis goes away: the next sync round degrades, and the listener
    // panics inside the sync task.
    server.kill();
    eventually("the listener to panic", async || panicked.load(SeqCst)).await;
    server.restart();
    // Another instance opens the fleet breaker; this one must hear of it.
    let b = fleet_breaker(store(&server, "sync"), None);
    assert_eq!(call(&b, true).await, Some(false));
    let h = a.handle();
    eventually(
        "the instance with the panicking listener to open",
        async || {
            let _ = call(&a, false).await;
            h.state() == CircuitState::Open
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_task_lost_with_its_runtime_is_started_again() {
    let Some(server) = RedisServer::start("sync_task_lost") else {
        return;
    };
    let a = fleet_breaker(store(&server, "lost"), None);
    // The task goes with its runtime.
    first_call_elsewhere(&a).shutdown_background();
    let b = fleet_breaker(store(&server, "lost"), None);
    assert_eq!(call(&b, true).await, Some(false));
    let h = a.handle();
    eventually("the instance to hear the fleet again", async || {
        let _ = call(&a, false).await;
        h.state() == CircuitState::Open
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_that_no_longer_hears_the_fleet_degrades_as_configured() {
    let Some(server) = RedisServer::start("fleet_unheard") else {
        return;
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let store = RedisStore::builder(server.url())
        .prefix("unheard")
        .timeout(Duration::from_millis(200))
        .degrade(Degrade::FailClosed)
        .build()
        .unwrap();
    let a = fleet_breaker(store, Some(events.clone()));
    // The runtime that runs the sync task stays alive but is never driven
    // again: the task is stuck, not gone.
    let parked = first_call_elsewhere(&a);
    let h = a.handle();
    eventually("the breaker to stop admitting", async || {
        call(&a, false).await.is_none()
    })
    .await;
    assert_eq!(h.state(), CircuitState::Open);
    let unheard = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(
                e,
                CircuitEvent::FleetUnheard {
                    policy: Degrade::FailClosed,
                    ..
                }
            )
        })
        .count();
    assert_eq!(unheard, 1, "one event for the whole quiet spell");
    parked.shutdown_background();
}
