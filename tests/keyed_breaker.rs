//! Keyed circuit breakers through the public API: one breaker per key with
//! the full semantics, a bounded table that forgets idle keys first and
//! never an open one before its period ends, cancellation and panics, and
//! a real hyper client calling two axum servers keyed by authority.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::advance;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
use tower_bulwark::BoxError;

const OPEN: Duration = Duration::from_secs(10);

/// An upstream per key: keys below 1000 fail, the rest answer.
fn upstream() -> impl Service<u32, Response = u32, Error = BoxError> + Clone {
    service_fn(|k: u32| async move {
        if k < 1000 {
            Err::<u32, BoxError>("down".into())
        } else {
            Ok(k)
        }
    })
}

fn builder() -> tower_bulwark::circuit_breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .name("hosts")
        .failure_threshold(2)
        .success_threshold(1)
        .open_timeout(OPEN)
}

#[tokio::test(start_paused = true)]
async fn each_key_has_its_own_breaker() {
    let layer = builder().key(|k: &u32| *k).build().unwrap();
    let h = layer.handle();
    let svc = layer.layer(upstream());
    for _ in 0..2 {
        svc.clone().oneshot(7).await.unwrap_err();
    }
    assert_eq!(h.state(&7), Some(CircuitState::Open));
    let err = svc.clone().oneshot(7).await.unwrap_err();
    let open = err
        .downcast_ref::<CircuitOpen>()
        .expect("rejected by the breaker");
    assert_eq!(open.name(), "hosts[7]");
    // Another key is untouched.
    assert_eq!(svc.clone().oneshot(1001).await.unwrap(), 1001);
    assert_eq!(h.state(&1001), Some(CircuitState::Closed));
    // After the open period the key probes, and a success closes it.
    advance(OPEN).await;
    assert_eq!(h.state(&7), Some(CircuitState::HalfOpen));
    h.breaker(&7).unwrap().reset();
    assert_eq!(h.state(&7), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn the_table_is_bounded_and_forgets_idle_keys_first() {
    let layer = builder().key(|k: &u32| *k).max_keys(4).build().unwrap();
    let h = layer.handle();
    let svc = layer.layer(upstream());
    for k in 1000..1100 {
        svc.clone().oneshot(k).await.unwrap();
        assert!(h.len() <= 4);
    }
    // A key in use keeps its place against a stream of one-off keys.
    for k in 2000..2100 {
        svc.clone().oneshot(1500).await.unwrap();
        svc.clone().oneshot(k).await.unwrap();
    }
    assert!(h.keys().contains(&1500));
}

#[tokio::test(start_paused = true)]
async fn an_open_key_is_not_forgotten_before_its_period_ends() {
    let layer = builder().key(|k: &u32| *k).max_keys(3).build().unwrap();
    let h = layer.handle();
    let svc = layer.layer(upstream());
    for k in 0..3 {
        for _ in 0..2 {
            svc.clone().oneshot(k).await.unwrap_err();
        }
        assert_eq!(h.state(&k), Some(CircuitState::Open));
    }
    // The table is full of open keys: new keys share the overflow breaker
    // and the open ones stay.
    for k in 1000..1050 {
        assert_eq!(svc.clone().oneshot(k).await.unwrap(), k);
    }
    for k in 0..3 {
        assert_eq!(h.state(&k), Some(CircuitState::Open), "key {k} kept");
        assert!(svc
            .clone()
            .oneshot(k)
            .await
            .unwrap_err()
            .is::<CircuitOpen>());
    }
    assert_eq!(h.overflow().metrics().state, CircuitState::Closed);
    // Once their period is over they may go.
    advance(OPEN).await;
    for k in 2000..2010 {
        svc.clone().oneshot(k).await.unwrap();
    }
    assert!(h.keys().iter().all(|k| *k >= 2000));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_or_panicking_probe_gives_its_slot_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let layer = builder().key(|k: &u32| *k).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(move |k: u32| {
        let n = seen.fetch_add(1, SeqCst);
        if n == 3 {
            panic!("inner call panics");
        }
        async move {
            if n < 2 {
                Err::<u32, BoxError>("down".into())
            } else {
                std::future::pending::<()>().await;
                Ok(k)
            }
        }
    }));
    for _ in 0..2 {
        svc.ready().await.unwrap().call(5).await.unwrap_err();
    }
    advance(OPEN).await;
    // A probe that never answers, dropped.
    let probe = svc.ready().await.unwrap().call(5);
    assert_eq!(h.breaker(&5).unwrap().metrics().half_open_in_flight, 1);
    drop(probe);
    assert_eq!(h.breaker(&5).unwrap().metrics().half_open_in_flight, 0);
    // A probe whose inner call panics.
    let ready = svc.ready().await.unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ready.call(5)));
    assert!(panicked.is_err());
    assert_eq!(h.breaker(&5).unwrap().metrics().half_open_in_flight, 0);
}

#[test]
fn bad_settings_name_the_field() {
    let err = builder().key(|k: &u32| *k).max_keys(0).build().unwrap_err();
    assert_eq!(err.field(), "max_keys");
    let err = builder()
        .failure_threshold(0)
        .key(|k: &u32| *k)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "failure_threshold");
}

#[cfg(feature = "file-store")]
#[test]
fn a_shared_backend_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = tower_bulwark::store::file::FileStore::builder()
        .dir(dir.path())
        .build()
        .unwrap();
    let err = builder()
        .backend(store)
        .key(|k: &u32| *k)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "backend");
}

/// Two real servers on 127.0.0.1, one failing: a hyper client keyed by
/// authority opens the failing host's breaker only.
#[cfg(feature = "axum")]
#[tokio::test]
async fn a_hyper_client_keyed_by_authority() {
    use axum::http::StatusCode;
    use axum::routing::get;
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower_bulwark::circuit_breaker::authority_key;
    use tower_bulwark::http::StatusClassifier;

    async fn serve(status: StatusCode) -> std::net::SocketAddr {
        let app = axum::Router::new().route("/", get(move || async move { (status, "body") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }
    let good = serve(StatusCode::OK).await;
    let bad = serve(StatusCode::SERVICE_UNAVAILABLE).await;
    let layer = builder()
        .classify(StatusClassifier::default())
        .key(authority_key::<Empty<Bytes>>)
        .build()
        .unwrap();
    let h = layer.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let svc = layer.layer(client);
    let get = |addr: std::net::SocketAddr| {
        hyper::Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap()
    };
    for _ in 0..2 {
        let res = svc.clone().oneshot(get(bad)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let err = svc.clone().oneshot(get(bad)).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    let res = svc.clone().oneshot(get(good)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.state(&bad.to_string()), Some(CircuitState::Open));
    assert_eq!(h.state(&good.to_string()), Some(CircuitState::Closed));
}
