//! `ReplayBodyLayer` with a real hyper client and a real axum server on
//! 127.0.0.1: retry and fallback resend streamed request bodies with no
//! hand-written body glue.
#![cfg(all(feature = "http", feature = "retry", feature = "fallback"))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::any, Router};
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_bulwark::http::{HttpRetryPolicy, ReplayBody, ReplayBodyLayer};
use tower_bulwark::retry::Backoff;
use tower_bulwark::{FallbackLayer, RetryLayer};

type Chunks =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A body that arrives in pieces, as a proxied upload does: not `Clone`.
fn streamed(parts: &[&'static str]) -> Chunks {
    let frames: Vec<_> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    StreamBody::new(futures::stream::iter(frames))
}

#[derive(Default)]
struct Upstream {
    bodies: Vec<Bytes>,
    /// Answers 503 to this many requests first.
    failures: usize,
}

type Shared = Arc<Mutex<Upstream>>;

async fn serve(failures: usize) -> (SocketAddr, Shared) {
    async fn handler(State(up): State<Shared>, body: Bytes) -> StatusCode {
        let mut up = up.lock().unwrap();
        up.bodies.push(body);
        if up.failures > 0 {
            up.failures -= 1;
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }
    let shared = Arc::new(Mutex::new(Upstream {
        failures,
        ..Upstream::default()
    }));
    let app = Router::new()
        .route("/{*path}", any(handler))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, shared)
}

/// A hyper client that sends replayable bodies as they are.
fn client() -> Client<HttpConnector, ReplayBody<Chunks>> {
    Client::builder(TokioExecutor::new())
        // No idle-pool timer: with the clock paused it would only spin.
        .pool_idle_timeout(None)
        .build_http()
}

fn retry() -> RetryLayer<HttpRetryPolicy> {
    RetryLayer::builder()
        .policy(HttpRetryPolicy::new())
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .build()
        .unwrap()
}

fn bodies(up: &Shared) -> Vec<Bytes> {
    up.lock().unwrap().bodies.clone()
}

#[tokio::test(start_paused = true)]
async fn retry_resends_a_streamed_body() {
    let (addr, up) = serve(1).await;
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(1024))
        .layer(retry())
        .service(client());
    let req = http::Request::put(format!("http://{addr}/doc"))
        .body(streamed(&["version ", "two"]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    // The first attempt got a 503; the retry carried the same bytes.
    assert_eq!(bodies(&up), ["version two", "version two"]);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_sent_once() {
    let (addr, up) = serve(1).await;
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(8))
        .layer(retry())
        .service(client());
    let req = http::Request::put(format!("http://{addr}/doc"))
        .body(streamed(&["far more ", "than eight ", "bytes"]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    // The upstream's own answer, not a failed resend.
    assert_eq!(res.status(), 503);
    assert_eq!(bodies(&up), ["far more than eight bytes"]);
}

#[tokio::test(start_paused = true)]
async fn fallback_resends_a_streamed_body_to_the_secondary() {
    let (primary, primary_up) = serve(usize::MAX).await;
    let (secondary, secondary_up) = serve(0).await;
    let to_secondary = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<ReplayBody<Chunks>>| {
            // Same path, other host.
            *req.uri_mut() = format!("http://{secondary}{}", req.uri().path())
                .parse()
                .unwrap();
            req
        })
        .service(client());
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(1024))
        .layer(
            FallbackLayer::http_builder()
                .fallback("secondary", to_secondary)
                .build()
                .unwrap(),
        )
        .service(client());
    let req = http::Request::put(format!("http://{primary}/doc"))
        .body(streamed(&["hello ", "again"]))
        .unwrap();
    let res = svc.oneshot(req).await.map_err(|e: BoxError| e).unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(bodies(&primary_up), ["hello again"]);
    assert_eq!(bodies(&secondary_up), ["hello again"]);
}
