//! Upstream back-off through HTTP: a real axum server on 127.0.0.1 answers
//! 429 with `Retry-After`, and the limiter in front of the hyper client
//! blocks until then (seed 001's `SetRetryAfter`).
#![cfg(all(feature = "rate-limit", feature = "http"))]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::get, Router};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};
use tower_bulwark::http::StatusClassifier;
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::ClockSource;

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_blocks_the_limiter_until_then() {
    // The first request is turned away with `Retry-After: 3`, the rest answered.
    async fn handler(
        State(hits): State<Arc<AtomicUsize>>,
    ) -> (StatusCode, [(&'static str, &'static str); 1]) {
        if hits.fetch_add(1, SeqCst) == 0 {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")])
        } else {
            (StatusCode::OK, [("x-ok", "1")])
        }
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/", get(handler))
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let layer = RateLimitLayer::builder()
        .clock(ClockSource::Tokio) // paused time drives this test
        .max_tokens(100.0)
        .refill_rate(100.0)
        .retry_after_from(StatusClassifier::new())
        .build()
        .unwrap();
    let handle = layer.handle();
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut svc = layer.layer(client);
    let req = || {
        Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap()
    };

    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(handle.blocked_for(), Some(Duration::from_secs(3)));

    // Blocked: rejected here, without reaching the server.
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("a RateLimited");
    assert!(limited.retry_after() <= Duration::from_secs(3));
    assert_eq!(hits.load(SeqCst), 1);

    advance(Duration::from_secs(3)).await;
    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(SeqCst), 2);
}

/// An upstream's `Retry-After` is capped: a `503` asking for three thousand
/// years blocks the limiter for `max_retry_after` and says so.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_blocks_for_the_cap_only() {
    async fn handler(
        State(hits): State<Arc<AtomicUsize>>,
    ) -> (StatusCode, [(&'static str, &'static str); 1]) {
        if hits.fetch_add(1, SeqCst) == 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "99999999999")],
            )
        } else {
            (StatusCode::OK, [("x-ok", "1")])
        }
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/", get(handler))
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let cap = Duration::from_secs(30);
    let layer = RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .max_tokens(100.0)
        .refill_rate(100.0)
        .retry_after_from(StatusClassifier::new())
        .max_retry_after(cap)
        .on_event(move |e| seen.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let handle = layer.handle();
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut svc = layer.layer(client);
    let req = || {
        Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap()
    };

    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(handle.blocked_for(), Some(cap));
    let clamped = events.lock().unwrap().iter().any(|e| {
        matches!(e, tower_bulwark::rate_limit::RateLimitEvent::RetryAfterClamped { requested, applied, .. }
            if *requested == Duration::from_secs(99_999_999_999) && *applied == cap)
    });
    assert!(clamped, "{:?}", events.lock().unwrap());
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert!(err.downcast_ref::<RateLimited>().unwrap().retry_after() <= cap);

    advance(cap).await;
    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(SeqCst), 2);
}

/// Without a cap of its own the limiter honours at most the shared default.
#[tokio::test(start_paused = true)]
async fn the_default_cap_is_the_shared_one() {
    let layer = RateLimitLayer::builder()
        .clock(ClockSource::Tokio)
        .retry_after_from(StatusClassifier::new())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|_: ()| async {
        Ok::<_, std::convert::Infallible>(
            axum::http::Response::builder()
                .status(429)
                .header("retry-after", "86400")
                .body(())
                .unwrap(),
        )
    }));
    svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(
        handle.blocked_for(),
        Some(tower_bulwark::classify::DEFAULT_MAX_RETRY_AFTER)
    );
    assert!(tower_bulwark::classify::DEFAULT_MAX_RETRY_AFTER <= Duration::from_secs(3600));
}
