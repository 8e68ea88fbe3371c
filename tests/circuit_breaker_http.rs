//! The breaker between a real hyper client and a real axum server on
//! 127.0.0.1, and on the server side behind axum's `HandleErrorLayer`.
#![cfg(feature = "axum")]

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::advance;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
use tower_bulwark::http::{handle_error, StatusClassifier};

#[derive(Clone, Default)]
struct Upstream {
    /// The status the server answers with.
    status: Arc<AtomicU16>,
    /// Requests that reached the server.
    hits: Arc<AtomicUsize>,
}

async fn serve(upstream: Upstream) -> std::net::SocketAddr {
    async fn handler(State(u): State<Upstream>) -> (StatusCode, HeaderMap, &'static str) {
        u.hits.fetch_add(1, SeqCst);
        let status = StatusCode::from_u16(u.status.load(SeqCst)).unwrap();
        let mut headers = HeaderMap::new();
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert("retry-after", "120".parse().unwrap());
        }
        (status, headers, "body")
    }
    let app = Router::new().route("/", get(handler)).with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

type Breaker = tower_bulwark::circuit_breaker::CircuitBreaker<
    Client<HttpConnector, Empty<Bytes>>,
    StatusClassifier,
>;

async fn send(
    svc: &mut Breaker,
    addr: std::net::SocketAddr,
) -> Result<hyper::Response<hyper::body::Incoming>, tower_bulwark::BoxError> {
    svc.ready().await?.call(get_req(addr)).await
}

fn get_req(addr: std::net::SocketAddr) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn opens_on_5xx_and_recovers_when_the_server_does() {
    let upstream = Upstream::default();
    upstream.status.store(503, SeqCst);
    let addr = serve(upstream.clone()).await;
    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .failure_threshold(3)
        .success_threshold(2)
        .open_timeout(Duration::from_secs(10))
        .classify(StatusClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut svc = ServiceBuilder::new().layer(breaker).service(client());

    for _ in 0..3 {
        let res = send(&mut svc, addr).await.unwrap();
        assert_eq!(res.status(), 503); // a 5xx is still an Ok response
    }
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(handle.metrics().failures_total, 3);

    // Open: fails fast, the server sees nothing.
    for _ in 0..5 {
        let err = send(&mut svc, addr).await.unwrap_err();
        assert!(err.is::<CircuitOpen>());
    }
    assert_eq!(upstream.hits.load(SeqCst), 3);

    // The server recovers; after the open timeout two probes close it.
    upstream.status.store(200, SeqCst);
    advance(Duration::from_secs(10)).await;
    for _ in 0..2 {
        let res = send(&mut svc, addr).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(upstream.hits.load(SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn retry_after_holds_the_breaker_open() {
    let upstream = Upstream::default();
    upstream.status.store(429, SeqCst);
    let addr = serve(upstream.clone()).await;
    let breaker = CircuitBreakerLayer::builder()
        .open_timeout(Duration::from_secs(5))
        .honor_retry_after(true)
        // Above the default cap (60 s), so the hint is honoured whole.
        .max_retry_after(Duration::from_secs(300))
        .classify(StatusClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut svc = ServiceBuilder::new().layer(breaker).service(client());

    let res = send(&mut svc, addr).await.unwrap();
    assert_eq!(res.status(), 429);
    // One 429 with `Retry-After: 120` opens it for 120 s, not 5 s.
    assert_eq!(handle.state(), CircuitState::Open);
    let err = send(&mut svc, addr).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert!(open.retry_after().unwrap() > Duration::from_secs(119));
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.state(), CircuitState::Open);
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn server_side_rejections_become_503_with_retry_after() {
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .open_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(handle_error))
            .layer(breaker),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let c = client();
    let res = c.request(get_req(addr)).await.unwrap();
    assert_eq!(res.status(), 200);

    handle.force_open();
    let res = c.request(get_req(addr)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_none()); // forced: no known end

    handle.reset();
    handle.hold_open(Duration::from_millis(2500));
    let res = c.request(get_req(addr)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "3"); // rounded up
}
