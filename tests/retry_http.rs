//! The retry layer over real HTTP: an axum server on 127.0.0.1 that answers
//! 503 with `Retry-After: 2` once, then 200; a hyper client sending a
//! streaming POST body through `ReplayBody`.
#![cfg(all(feature = "http", feature = "retry"))]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_bulwark::http::{HttpRetryPolicy, Idempotent, ReplayBody};
use tower_bulwark::retry::{Backoff, RetryEvent, RetryLayer};

type Chunks =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Body = ReplayBody<Chunks>;

#[derive(Default)]
struct Upstream {
    /// Bodies received, in order.
    bodies: Vec<Bytes>,
}

/// Answers 503 + `Retry-After: 2` to the first request, 200 after. Runs on
/// its own thread and runtime, on the real clock, so the client's paused
/// clock never holds it up.
fn start_upstream() -> (std::net::SocketAddr, Arc<Mutex<Upstream>>) {
    async fn handler(
        State(up): State<Arc<Mutex<Upstream>>>,
        body: Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
        let mut up = up.lock().unwrap();
        up.bodies.push(body);
        if up.bodies.len() == 1 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "2")],
                "busy",
            )
        } else {
            (StatusCode::OK, [("x-served", "yes")], "done")
        }
    }
    let state = Arc::new(Mutex::new(Upstream::default()));
    let app = Router::new()
        .route("/", post(handler))
        .with_state(state.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, state)
}

fn streaming_body(limit: usize) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = ["alpha,", "beta,", "gamma"]
        .into_iter()
        .map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
        .collect();
    ReplayBody::new(StreamBody::new(futures::stream::iter(frames)), limit)
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        // No idle-pool timer: with the clock paused it would only spin.
        .pool_idle_timeout(None)
        .build_http()
}

type Recorded = Arc<Mutex<Vec<RetryEvent>>>;

fn layer(events: &Recorded) -> RetryLayer<HttpRetryPolicy> {
    let sink = events.clone();
    RetryLayer::builder()
        .name("upstream")
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .policy(HttpRetryPolicy::new())
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap()
}

fn post_req(addr: std::net::SocketAddr, body: Body, idempotent: bool) -> http::Request<Body> {
    let mut req = http::Request::post(format!("http://{addr}/"))
        .body(body)
        .unwrap();
    if idempotent {
        req.extensions_mut().insert(Idempotent);
    }
    req
}

/// Marked idempotent: the 503 is retried after at least the 2 s the
/// upstream asked for, and the replayed body arrives intact. The client's
/// clock is paused, so the wait is virtual (tokio advances it when the
/// runtime is idle).
#[tokio::test(start_paused = true)]
async fn retries_an_idempotent_streaming_post_after_retry_after() {
    let (addr, upstream) = start_upstream();
    let events = Recorded::default();
    let mut svc = ServiceBuilder::new()
        .layer(layer(&events))
        .service(client());
    let start = tokio::time::Instant::now();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(post_req(addr, streaming_body(1024), true))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-served"], "yes");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "done");

    let bodies = upstream.lock().unwrap().bodies.clone();
    assert_eq!(bodies, ["alpha,beta,gamma", "alpha,beta,gamma"]);
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        RetryEvent::Retry { attempt, delay, .. } => {
            assert_eq!(*attempt, 2);
            assert_eq!(*delay, Duration::from_secs(2));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Virtual time: at least the Retry-After passed.
    assert!(start.elapsed() >= Duration::from_secs(2));
}

/// Not marked: a POST is sent once and its 503 returned.
#[tokio::test(start_paused = true)]
async fn does_not_retry_a_plain_post() {
    let (addr, upstream) = start_upstream();
    let events = Recorded::default();
    let svc = ServiceBuilder::new()
        .layer(layer(&events))
        .service(client());
    let res = svc
        .oneshot(post_req(addr, streaming_body(1024), false))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.lock().unwrap().bodies.len(), 1);
    assert!(events.lock().unwrap().is_empty());
}

/// Over the replay limit: sent once in full, not retried.
#[tokio::test(start_paused = true)]
async fn does_not_retry_a_body_over_the_limit() {
    let (addr, upstream) = start_upstream();
    let events = Recorded::default();
    let svc = ServiceBuilder::new()
        .layer(layer(&events))
        .service(client());
    let res = svc
        .oneshot(post_req(addr, streaming_body(8), true))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        upstream.lock().unwrap().bodies.as_slice(),
        ["alpha,beta,gamma"]
    );
    assert!(events.lock().unwrap().is_empty());
}

/// A connection error (nothing listening) is retried for an idempotent
/// request, and the last error is returned.
#[tokio::test(start_paused = true)]
async fn retries_connection_errors() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let events = Recorded::default();
    let svc = ServiceBuilder::new()
        .layer(layer(&events))
        .service(client());
    let req = http::Request::get(format!("http://{addr}/"))
        .body(streaming_body(64))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(err
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect()));
    let kinds: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .map(tower_bulwark::observe::Event::kind)
        .collect();
    assert_eq!(kinds, ["retry", "retry", "gave_up"]);
}
