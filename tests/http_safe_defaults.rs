//! Safe HTTP defaults with real axum servers and a hyper client on
//! 127.0.0.1: the fallback does not resend what must not be resent, and
//! `handle_error` answers timeouts with 504 and load shedding with 503.
#![cfg(all(feature = "axum", feature = "fallback", feature = "circuit-breaker"))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{
    error_handling::HandleErrorLayer, extract::State, http::StatusCode, routing::get,
    routing::post, Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::CircuitState;
use tower_bulwark::http::{
    handle_error, ErrorHandler, ReplayBody, ReplayBodyLayer, StatusClassifier,
};
use tower_bulwark::{CircuitBreakerLayer, FallbackLayer};

type Chunks =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Seen = Arc<Mutex<Vec<Bytes>>>;

fn streamed(parts: &[&'static str]) -> Chunks {
    let frames: Vec<_> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    StreamBody::new(futures::stream::iter(frames))
}

async fn listen(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Records every body and answers `status`.
async fn upstream(status: StatusCode) -> (SocketAddr, Seen) {
    async fn handler(State((seen, status)): State<(Seen, StatusCode)>, body: Bytes) -> StatusCode {
        seen.lock().unwrap().push(body);
        status
    }
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(handler).put(handler))
        .with_state((seen.clone(), status));
    (listen(app).await, seen)
}

fn client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(None)
        .build_http()
}

/// Primary answering 503, secondary 200, behind `http_builder()`.
async fn failover() -> (
    impl tower::Service<
            http::Request<Chunks>,
            Response = http::Response<hyper::body::Incoming>,
            Error = tower::BoxError,
        > + Clone,
    SocketAddr,
    Seen,
    Seen,
) {
    let (primary, primary_seen) = upstream(StatusCode::SERVICE_UNAVAILABLE).await;
    let (secondary, secondary_seen) = upstream(StatusCode::OK).await;
    let to_secondary = ServiceBuilder::new()
        .map_request(move |mut req: http::Request<ReplayBody<Chunks>>| {
            *req.uri_mut() = format!("http://{secondary}{}", req.uri().path())
                .parse()
                .unwrap();
            req
        })
        .service(client());
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::new(16))
        .layer(
            FallbackLayer::http_builder()
                .fallback("secondary", to_secondary)
                .build()
                .unwrap(),
        )
        .service(client());
    (svc, primary, primary_seen, secondary_seen)
}

#[tokio::test(start_paused = true)]
async fn fallback_sends_a_post_once() {
    let (svc, primary, primary_seen, secondary_seen) = failover().await;

    // A POST may have taken effect at the primary: its 503 is the answer.
    let post = http::Request::post(format!("http://{primary}/orders"))
        .body(streamed(&["order 1"]))
        .unwrap();
    let res = svc.clone().oneshot(post).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(primary_seen.lock().unwrap().len(), 1);
    assert!(secondary_seen.lock().unwrap().is_empty());

    // With an idempotency key the upstream deduplicates: it fails over.
    let keyed = http::Request::post(format!("http://{primary}/orders"))
        .header("idempotency-key", "order-2")
        .body(streamed(&["order 2"]))
        .unwrap();
    let res = svc.clone().oneshot(keyed).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*secondary_seen.lock().unwrap(), ["order 2"]);
}

#[tokio::test(start_paused = true)]
async fn fallback_does_not_resend_a_body_over_its_limit() {
    let (svc, primary, primary_seen, secondary_seen) = failover().await;
    // A short PUT fails over: the secondary is reachable.
    let short = http::Request::put(format!("http://{primary}/orders"))
        .body(streamed(&["short"]))
        .unwrap();
    assert_eq!(svc.clone().oneshot(short).await.unwrap().status(), 200);
    assert_eq!(*secondary_seen.lock().unwrap(), ["short"]);
    let put = http::Request::put(format!("http://{primary}/orders"))
        .body(streamed(&["a body longer ", "than sixteen bytes"]))
        .unwrap();
    // The primary's own answer, not an opaque error from a failed resend.
    let res = svc.clone().oneshot(put).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        primary_seen.lock().unwrap()[1],
        "a body longer than sixteen bytes"
    );
    assert_eq!(*secondary_seen.lock().unwrap(), ["short"]);
}

async fn fetch(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let res = client::<Empty<Bytes>>()
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_504_with_the_default_or_a_custom_body() {
    let app = Router::new()
        .route("/slow", get(std::future::pending::<&'static str>))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .timeout(Duration::from_secs(5)),
        )
        .route(
            "/slow-json",
            get(std::future::pending::<&'static str>).route_layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(
                        ErrorHandler::new()
                            .content_type("application/json")
                            .body(|e| format!(r#"{{"error":"{}"}}"#, e.message()))
                            .into_handler(),
                    ))
                    .timeout(Duration::from_secs(5)),
            ),
        );
    let addr = listen(app).await;

    // The paused clock jumps to the timeout while the handler waits.
    assert_eq!(
        fetch(addr, "/slow").await,
        (StatusCode::GATEWAY_TIMEOUT, "request timed out".into())
    );
    assert_eq!(
        fetch(addr, "/slow-json").await,
        (
            StatusCode::GATEWAY_TIMEOUT,
            r#"{"error":"request timed out"}"#.into()
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_breaker_on_a_router_counts_5xx_with_status_classifier() {
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(3)
        .classify(StatusClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let app = Router::new()
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "oops") }),
        )
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(breaker),
        )
        .route("/other", get(|| async { "fine" }));
    let addr = listen(app).await;
    for _ in 0..3 {
        assert_eq!(
            fetch(addr, "/fail").await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(handle.state(), CircuitState::Open);
    let (status, body) = fetch(addr, "/fail").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("circuit `api` is open"), "{body}");
    // The breaker is on its route only.
    assert_eq!(fetch(addr, "/other").await, (StatusCode::OK, "fine".into()));
}

/// tower's load shedding over a concurrency limit of one, on a real
/// server: while one call is held inside its handler, a second is shed
/// and `handle_error` answers it 503.
///
/// The held call is released by the test, not by a timer, once the
/// second call has its answer; only the first call waits.
#[tokio::test(start_paused = true)]
async fn load_shedding_is_503_while_a_call_holds_the_only_slot() {
    // axum applies a Router's layers once per connection, and tower's
    // `ConcurrencyLimitLayer` makes a new semaphore each time it is
    // applied: each connection would get a slot of its own, the second
    // call would be let in and wait for the release too. The global limit
    // shares one semaphore.
    let gate = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(handle_error))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1));
    one_slot_held(|route| route.layer(gate), "service overloaded").await;
}

/// The adaptive limit, at its floor of one call, turns the next one away
/// with 503 while the first is held; every service a layer makes (one per
/// connection here) shares the limit.
#[cfg(feature = "adaptive")]
#[tokio::test]
async fn an_adaptive_limit_reached_is_503() {
    use tower_bulwark::adaptive::AdaptiveLimitLayer;

    let limit = AdaptiveLimitLayer::builder()
        .name("work")
        .min_limit(1)
        .initial_limit(1)
        .max_limit(1)
        .build()
        .unwrap();
    let gate = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(handle_error))
        .layer(limit);
    one_slot_held(
        |route| route.layer(gate),
        "adaptive limit `work` reached (1 calls in flight)",
    )
    .await;
}

/// Serves `/work` through `gate` (a router with one slot), holds a first
/// call inside its handler, and checks that a second is answered 503 with
/// `message`, then that the first answers and the slot is free again.
async fn one_slot_held(gate: impl FnOnce(Router) -> Router, message: &str) {
    use tokio::sync::{oneshot, Notify};

    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let entered = Arc::new(Mutex::new(Some(entered_tx)));
    let release = Arc::new(Notify::new());
    let held = {
        let release = release.clone();
        move || {
            let entered = entered.lock().unwrap().take();
            let release = release.clone();
            async move {
                if let Some(tx) = entered {
                    tx.send(()).unwrap();
                    // Only the first call waits for the test.
                    release.notified().await;
                }
                "done"
            }
        }
    };
    let addr = listen(gate(Router::new().route("/work", get(held)))).await;

    let first = tokio::spawn(fetch(addr, "/work"));
    entered_rx.await.unwrap();
    assert_eq!(
        fetch(addr, "/work").await,
        (StatusCode::SERVICE_UNAVAILABLE, message.into())
    );

    // `notify_one` keeps the permit if the handler is not waiting yet.
    release.notify_one();
    assert_eq!(first.await.unwrap(), (StatusCode::OK, "done".into()));
    // The slot is free again.
    assert_eq!(fetch(addr, "/work").await, (StatusCode::OK, "done".into()));
}
