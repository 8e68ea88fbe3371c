//! The rate limit, bulkhead and breaker layers on the file backend, across
//! real processes: this test binary re-executes itself (the `child` test,
//! selected with `BULWARK_CHILD`), as tests/file_store.rs does.
#![cfg(all(
    feature = "file-store",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::store::file::{BreakerEntry, FileStore};
use tower_bulwark::ConfigError;

#[path = "support/file_layers.rs"]
mod file_layers;
use file_layers::{bulkhead, limiter, ok_service};

#[path = "support/child.rs"]
mod child_process;
use child_process::{outputs, spawn_child, wait_ready, DIR, ROLE};

fn store(dir: &Path) -> FileStore {
    FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The body of every child process. A no-op in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let store = store(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match role.as_str() {
            "layer_bucket" => {
                let mut svc = ServiceBuilder::new()
                    .layer(limiter(&store, 25.0))
                    .service(ok_service());
                let mut admitted = 0;
                for i in 0..40 {
                    match svc.ready().await.unwrap().call(i).await {
                        Ok(_) => admitted += 1,
                        Err(e) => assert!(e.is::<RateLimited>(), "{e}"),
                    }
                }
                println!("OUT {admitted}");
            }
            "layer_hold_slot" => {
                let svc = ServiceBuilder::new()
                    .layer(bulkhead(&store, 1))
                    .service(service_fn(|()| async {
                        println!("OUT ready");
                        std::future::pending::<Result<(), BoxError>>().await
                    }));
                let _ = svc.oneshot(()).await;
            }
            other => panic!("unknown role {other}"),
        }
    });
}

#[test]
fn rate_limit_layer_never_over_admits_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| spawn_child("layer_bucket", dir.path()))
        .collect();
    let total: usize = children
        .into_iter()
        .map(|c| outputs(c)[0].parse::<usize>().unwrap())
        .sum();
    assert_eq!(total, 25, "4 processes x 40 calls share one bucket of 25");
}

/// Each rate limit name and each bulkhead name has its own entry: a child
/// that drains the limiter `api` and holds the bulkhead `api` leaves the
/// ones named `other` untouched.
#[tokio::test]
async fn each_name_has_its_own_entry_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(outputs(spawn_child("layer_bucket", dir.path())), ["25"]);
    let mut holder = spawn_child("layer_hold_slot", dir.path());
    wait_ready(&mut holder);
    let s = store(dir.path());
    let named = |name: &str| {
        RateLimitLayer::builder()
            .name(name)
            .max_tokens(25.0)
            .refill_rate(1e-6)
            .backend(s.clone())
            .build()
            .unwrap()
    };
    let mut admitted = [0, 0];
    for (n, name) in ["api", "other"].into_iter().enumerate() {
        let mut svc = ServiceBuilder::new()
            .layer(named(name))
            .service(ok_service());
        for i in 0..30 {
            if svc.ready().await.unwrap().call(i).await.is_ok() {
                admitted[n] += 1;
            }
        }
    }
    assert_eq!(admitted, [0, 25]);
    let other = BulkheadLayer::builder()
        .name("other")
        .max_concurrent(1)
        .backend(s.clone())
        .build()
        .unwrap();
    let err = ServiceBuilder::new()
        .layer(bulkhead(&s, 1))
        .service(ok_service())
        .oneshot(1)
        .await
        .unwrap_err();
    assert!(err.is::<BulkheadFull>(), "{err}");
    let ok = ServiceBuilder::new()
        .layer(other)
        .service(ok_service())
        .oneshot(2)
        .await;
    assert_eq!(ok.unwrap(), 2);
    let state = s.load();
    assert_eq!(
        state.rate_limits.keys().collect::<Vec<_>>(),
        ["api", "other"]
    );
    assert_eq!(state.bulkheads["api"].holders.len(), 1);
    assert_eq!(state.bulkheads["api"].holders[0].pid, holder.id());
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[tokio::test]
async fn bulkhead_layer_slot_of_a_killed_process_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child("layer_hold_slot", dir.path());
    wait_ready(&mut child);
    let layer = bulkhead(&store(dir.path()), 1);
    assert_eq!(layer.handle().in_flight(), 1, "the child's call holds it");
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(ok_service());
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(err.is::<BulkheadFull>(), "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        svc.clone().oneshot(2).await.unwrap(),
        2,
        "dead PID reclaimed"
    );
    assert_eq!(layer.handle().in_flight(), 0, "and our slot given back");
}

/// The documented gate order, outermost first: rate limit, bulkhead,
/// breaker. A call the bucket or the bulkhead rejects never reaches the
/// breaker's `call`: the probe its readiness took is given back with the
/// service, never spent or leaked.
#[tokio::test]
async fn rejected_calls_never_take_a_half_open_probe() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .half_open_max_calls(1)
        .success_threshold(1)
        .backend(s.clone())
        .build()
        .unwrap();
    let limiter = RateLimitLayer::builder()
        .max_tokens(1.0)
        .refill_rate(1e-6)
        .backend(s.clone())
        .build()
        .unwrap();
    let gate = |inner| {
        ServiceBuilder::new()
            .layer(limiter.clone())
            .layer(bulkhead(&s, 1))
            .layer(breaker.clone())
            .service(inner)
    };
    // Open, its open period over: the next call the breaker sees probes.
    let half_open = || {
        s.update(|st| {
            let b = st.breakers.entry("api".into()).or_default();
            b.state = CircuitState::Open.code();
            b.open_until = 0;
        })
    };
    half_open();

    // The bulkhead is full (another process holds the one slot).
    let held = s.bulkhead(1).unwrap().named("api").try_acquire().unwrap();
    let err = gate(ok_service()).oneshot(1).await.unwrap_err();
    assert!(err.is::<BulkheadFull>(), "{err}");
    // Free the slot; empty the bucket.
    drop(held);
    limiter.handle().set_retry_after(Duration::from_secs(600));
    let err = gate(ok_service()).oneshot(2).await.unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");

    let b = api(&s);
    assert!(b.probes.is_empty(), "no probe kept by a rejected call");
    assert_ne!(
        b.state,
        CircuitState::Open.code(),
        "no failure counted: the period is over, the next call probes"
    );

    // The probe slot is still there for the first call admitted.
    limiter.handle().reset();
    assert_eq!(gate(ok_service()).oneshot(3).await.unwrap(), 3);
    let b = api(&s);
    assert_eq!((b.state, b.probes.len()), (CircuitState::Closed.code(), 0));

    // The other order leaks nothing either way a test can see in one
    // process, but it spends the probe on a call the bucket rejects:
    half_open();
    limiter.handle().set_retry_after(Duration::from_secs(600));
    let wrong = ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(limiter.clone())
        .service(ok_service());
    let err = wrong.oneshot(4).await.unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
    assert_eq!(
        api(&s).state,
        CircuitState::Open.code(),
        "the rejection was counted as the probe's failure and reopened the breaker"
    );
    let err = gate(ok_service()).oneshot(5).await.unwrap_err();
    assert!(err.is::<RateLimited>() || err.is::<CircuitOpen>(), "{err}");
}

#[test]
fn modes_the_file_cannot_keep_are_refused_at_build() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let err: ConfigError = RateLimitLayer::builder()
        .key(|r: &String| r.clone())
        .backend(s.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "backend");
    let err = RateLimitLayer::builder()
        .backend(s.clone())
        .key(|r: &String| r.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "backend");
    let err = RateLimitLayer::builder()
        .max_wait(Duration::from_secs(1))
        .backend(s.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_wait");
    let err = BulkheadLayer::builder()
        .max_wait(Duration::from_secs(1))
        .backend(s.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_wait");
    let err = BulkheadLayer::builder()
        .max_concurrent(4)
        .soft_limit(2)
        .backend(s.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "soft_limit");
    // The file keeps wall-clock time for every process: it cannot follow
    // tokio's (paused) clock.
    let err = RateLimitLayer::builder()
        .clock(tower_bulwark::ClockSource::Tokio)
        .backend(s.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "clock");
    // Everything else a layer offers works on the file: a cost per
    // request, an upstream's Retry-After, names.
    assert!(RateLimitLayer::builder()
        .name("costly")
        .cost(|r: &u32| f64::from(*r))
        .backend(s.clone())
        .build()
        .is_ok());
}

#[tokio::test]
async fn retry_after_through_the_layer_blocks_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let a = limiter(&s, 25.0);
    a.handle().set_retry_after(Duration::from_secs(600));
    // Another process's layer on the same file (a fresh store: nothing
    // cached in memory) sees the block.
    let b = limiter(&store(dir.path()), 25.0);
    let err = ServiceBuilder::new()
        .layer(b.clone())
        .service(ok_service())
        .oneshot(1)
        .await
        .unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().unwrap();
    assert!(limited.retry_after() > Duration::from_secs(500));
    // The block is in the limiter's own entry, folded into its TAT.
    let tat = s.load().rate_limits["api"].tat;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(Duration::from_nanos(tat) > now + Duration::from_secs(500));
}

/// The entry of the breaker named `api`, as the file holds it.
fn api(s: &FileStore) -> BreakerEntry {
    s.load().breakers.get("api").cloned().unwrap_or_default()
}

/// A state file left by an earlier release (schema version 1: one breaker,
/// one bucket, one bulkhead) keeps its limits for the unnamed layers: the
/// bucket it emptied stays empty, the slot a live process holds stays
/// held, the breaker it opened stays open. The next write is version 2.
#[tokio::test]
async fn a_version_1_file_keeps_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut holder = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let v1 = format!(
        r#"{{"version":1,
        "circuit_breaker":{{"state":"open","failures":0,"successes":0,"half_open_attempts":0,
          "half_open_pids":[],"half_open_last_attempt_at":null,"last_failure_at":{now},
          "opened_at":{now},"open_until":{until},"generation":4}},
        "rate_limiter":{{"tokens":0.0,"last_refill_at":{now},"retry_after_until":null}},
        "bulkhead":{{"active_pids":[{pid}]}},"updated_at":{now}}}"#,
        until = now + 600_000,
        pid = holder.id()
    );
    std::fs::write(s.path(), v1).unwrap();

    let limiter = RateLimitLayer::builder()
        .max_tokens(5.0)
        .refill_rate(1e-6)
        .backend(s.clone())
        .build()
        .unwrap();
    let err = ServiceBuilder::new()
        .layer(limiter)
        .service(ok_service())
        .oneshot(1)
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
    let bulkhead = BulkheadLayer::builder()
        .max_concurrent(1)
        .backend(s.clone())
        .build()
        .unwrap();
    let err = ServiceBuilder::new()
        .layer(bulkhead)
        .service(ok_service())
        .oneshot(2)
        .await
        .unwrap_err();
    assert!(err.is::<BulkheadFull>(), "{err}");
    let breaker = CircuitBreakerLayer::builder()
        .backend(s.clone())
        .build()
        .unwrap();
    assert_eq!(breaker.handle().state(), CircuitState::Open);
    let err = ServiceBuilder::new()
        .layer(breaker)
        .service(ok_service())
        .oneshot(3)
        .await
        .unwrap_err();
    assert!(err.is::<CircuitOpen>(), "{err}");

    let text = std::fs::read_to_string(s.path()).unwrap();
    assert!(text.starts_with(r#"{"version":2"#), "{text}");
    for old in ["circuit_breaker", "rate_limiter", "active_pids"] {
        assert!(!text.contains(old), "{old} in {text}");
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
}
