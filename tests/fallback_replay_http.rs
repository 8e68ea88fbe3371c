//! Fallback over HTTP with a streaming request body: the primary (a real
//! axum server on 127.0.0.1) reads the whole body and answers 503; the
//! secondary receives the same bytes, replayed by `ReplayBody`.
#![cfg(all(feature = "fallback", feature = "http"))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::{extract::State, http::StatusCode, routing::post, Router};
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_bulwark::fallback::FallbackLayer;
use tower_bulwark::http::{ReplayBody, StatusClassifier};

type Chunks =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Body = ReplayBody<Chunks>;
type Seen = Arc<Mutex<Vec<Bytes>>>;

/// An upstream that records each body it reads and answers `status`.
async fn serve(status: StatusCode) -> (SocketAddr, Seen) {
    async fn handler(State((seen, status)): State<(Seen, StatusCode)>, body: Bytes) -> StatusCode {
        seen.lock().unwrap().push(body);
        status
    }
    let seen = Seen::default();
    let app = Router::new()
        .route("/", post(handler))
        .with_state((seen.clone(), status));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

#[tokio::test]
async fn a_streamed_body_reaches_the_fallback_intact() {
    let (primary_addr, primary_seen) = serve(StatusCode::SERVICE_UNAVAILABLE).await;
    let (secondary_addr, secondary_seen) = serve(StatusCode::OK).await;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();

    // Each entry sends the request to its own server.
    let to = move |addr: SocketAddr| {
        let client = client.clone();
        service_fn(move |mut req: Request<Body>| {
            let client = client.clone();
            *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
            async move { Ok::<_, BoxError>(client.request(req).await?.map(|_| ())) }
        })
    };
    let layer = FallbackLayer::builder()
        .primary_name("primary")
        .fallback("secondary", to(secondary_addr))
        .classify(StatusClassifier::new())
        .build()
        .unwrap();
    let svc = layer.layer(to(primary_addr));

    let frames: Vec<Result<Frame<Bytes>, Infallible>> = ["alpha,", "beta,", "gamma"]
        .into_iter()
        .map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
        .collect();
    let body = ReplayBody::new(StreamBody::new(futures::stream::iter(frames)), 1024);
    let req = Request::post("http://placeholder/").body(body).unwrap();

    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        *primary_seen.lock().unwrap(),
        [Bytes::from("alpha,beta,gamma")]
    );
    assert_eq!(
        *secondary_seen.lock().unwrap(),
        [Bytes::from("alpha,beta,gamma")]
    );
}
