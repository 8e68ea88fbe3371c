//! Fallback between two real axum upstreams on 127.0.0.1, through a hyper
//! client: the first goes down and comes back. And the HTTP dedup key
//! keeping two users apart.
#![cfg(all(feature = "fallback", feature = "dedup", feature = "http"))]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{routing::get, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitOpen, CircuitState};
use tower_bulwark::dedup::DedupLayer;
use tower_bulwark::fallback::{AllFailed, FallbackLayer};
use tower_bulwark::http::StatusClassifier;
use tower_bulwark::CircuitBreakerLayer;

async fn serve(addr: SocketAddr, name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let app = Router::new().route("/", get(move || async move { name }));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A service that GETs `/` on `addr` and returns the body as a string.
fn upstream(
    client: &HttpClient,
    addr: SocketAddr,
) -> impl Service<(), Response = Response<String>, Error = BoxError, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let client = client.clone();
    service_fn(move |()| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{addr}/")).body(Empty::new())?;
            let res = client.request(req).await?;
            let (parts, body) = res.into_parts();
            let body = String::from_utf8(body.collect().await?.to_bytes().to_vec())?;
            Ok::<_, BoxError>(Response::from_parts(parts, body))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn first_upstream_goes_down_and_comes_back() {
    let (a_addr, a_task) = serve("127.0.0.1:0".parse().unwrap(), "a").await;
    let (b_addr, _b_task) = serve("127.0.0.1:0".parse().unwrap(), "b").await;
    // No pooled connections: a stopped server must refuse the next call.
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();

    let layer = FallbackLayer::builder()
        .primary_name("a")
        .fallback("b", upstream(&client, b_addr))
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(2)
                .open_timeout(Duration::from_secs(5))
                .success_threshold(1),
        )
        .classify(StatusClassifier::new())
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(upstream(&client, a_addr));
    let body = |r: Response<String>| r.into_body();

    assert_eq!(
        body(svc.ready().await.unwrap().call(()).await.unwrap()),
        "a"
    );

    // a goes down: calls fail over to b, and a's breaker opens.
    a_task.abort();
    let _ = a_task.await;
    for _ in 0..3 {
        assert_eq!(
            body(svc.ready().await.unwrap().call(()).await.unwrap()),
            "b"
        );
    }
    assert_eq!(h.breaker("a").unwrap().state(), CircuitState::Open);
    assert_eq!(h.breaker("b").unwrap().state(), CircuitState::Closed);

    // a comes back on the same address; after the open period a probe
    // reaches it and it answers again.
    let (_, _a_task) = serve(a_addr, "a").await;
    assert_eq!(
        body(svc.ready().await.unwrap().call(()).await.unwrap()),
        "b"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(
        body(svc.ready().await.unwrap().call(()).await.unwrap()),
        "a"
    );
    assert_eq!(h.breaker("a").unwrap().state(), CircuitState::Closed);

    // Both down: AllFailed names both, with a's and b's own errors.
    h.breaker("b").unwrap().force_open();
    _a_task.abort();
    let _ = _a_task.await;
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    let all = err.downcast_ref::<AllFailed>().unwrap();
    assert_eq!(all.errors()[0].0.as_ref(), "a");
    assert!(all.errors()[1].1.is::<CircuitOpen>());
}

#[tokio::test(start_paused = true)]
async fn http_key_keeps_two_users_apart() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // Answers "hello <authorization>" after a while.
    let inner = service_fn(move |req: Request<()>| {
        c.fetch_add(1, Ordering::SeqCst);
        let who = req.headers()["authorization"].to_str().unwrap().to_owned();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(format!(
                "hello {who}"
            )))))
        }
    });
    // The default key under `http`: method, URI and the headers that
    // change the answer.
    let svc = DedupLayer::builder().build().unwrap().layer(inner);
    let call = |user: &'static str| {
        let req = Request::get("/me")
            .header("authorization", user)
            .body(())
            .unwrap();
        svc.clone().oneshot(req)
    };
    let answers =
        futures::future::join_all([call("alice"), call("bob"), call("alice"), call("bob")]).await;
    let mut bodies = Vec::new();
    for a in answers {
        bodies.push(a.unwrap().into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(
        bodies,
        ["hello alice", "hello bob", "hello alice", "hello bob"]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call per user");
}
