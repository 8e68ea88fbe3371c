//! HTTP response sharing through a real axum server on 127.0.0.1 and a
//! hyper client: one upstream hit for a burst of identical GETs, a body
//! over the limit not shared (everyone still gets all of it), and two users
//! kept apart.
#![cfg(all(feature = "dedup", feature = "http"))]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body as AxumBody;
use axum::http::HeaderMap;
use axum::{routing::get, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};
use tower_bulwark::dedup::{DedupEvent, DedupLayer};
use tower_bulwark::http::dedup::{HttpDedupLayer, HttpKey};

const CHUNK: usize = 4096;
const CHUNKS: usize = 16;

fn big() -> Vec<u8> {
    (0..CHUNK * CHUNKS).map(|i| (i % 251) as u8).collect()
}

struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

/// Every route counts its hit, then waits for the gate to open.
async fn upstream() -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let (gate, rx) = watch::channel(false);
    let wait = move |hits: Arc<AtomicUsize>, mut rx: watch::Receiver<bool>| async move {
        hits.fetch_add(1, Ordering::SeqCst);
        rx.wait_for(|open| *open).await.unwrap();
    };
    let (h1, r1) = (hits.clone(), rx.clone());
    let (h2, r2) = (hits.clone(), rx.clone());
    let (h3, r3) = (hits.clone(), rx);
    let app = Router::new()
        .route(
            "/small",
            get(move || {
                let (h, r) = (h1.clone(), r1.clone());
                async move {
                    wait(h, r).await;
                    "hello"
                }
            }),
        )
        .route(
            "/big",
            get(move || {
                let (h, r) = (h2.clone(), r2.clone());
                async move {
                    wait(h, r).await;
                    // Streamed in chunks, with no length: the limit is only
                    // found while reading.
                    let body = big();
                    let chunks: Vec<Result<Bytes, std::io::Error>> = body
                        .chunks(CHUNK)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    AxumBody::from_stream(futures::stream::iter(chunks))
                }
            }),
        )
        .route(
            "/me",
            get(move |headers: HeaderMap| {
                let (h, r) = (h3.clone(), r3.clone());
                async move {
                    wait(h, r).await;
                    format!("{:?}", headers.get("authorization"))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream { addr, hits, gate }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get_req(addr: SocketAddr, path: &str, auth: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(format!("http://{addr}{path}"));
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Empty::new()).unwrap()
}

/// A dedup layer that counts the callers who joined a shared call.
fn layer() -> (HttpDedupLayer<HttpKey>, Arc<AtomicUsize>) {
    let joined = Arc::new(AtomicUsize::new(0));
    let j = joined.clone();
    let dedup = DedupLayer::builder()
        .key_by(HttpKey::new())
        .on_event(move |e| {
            if matches!(e, DedupEvent::Joined { .. }) {
                j.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    (HttpDedupLayer::new(dedup).body_limit(CHUNK * 4), joined)
}

async fn until(n: usize, counter: &AtomicUsize) {
    while counter.load(Ordering::SeqCst) < n {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_gets_share_one_upstream_call() {
    let up = upstream().await;
    let (layer, joined) = layer();
    let svc = layer.layer(client());
    let n = 8;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/small", None);
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                assert!(res.body().is_shared());
                res.into_body().collect().await.unwrap().to_bytes()
            })
        })
        .collect();
    until(n - 1, &joined).await;
    up.gate.send(true).unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "hello");
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_not_shared_but_reaches_everyone() {
    let up = upstream().await;
    let (layer, joined) = layer();
    let svc = layer.layer(client());
    let n = 4;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/big", None);
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                assert!(!res.body().is_shared());
                res.into_body().collect().await.unwrap().to_bytes()
            })
        })
        .collect();
    until(n - 1, &joined).await;
    up.gate.send(true).unwrap();
    let expected = big();
    for t in tasks {
        assert_eq!(t.await.unwrap(), expected);
    }
    // The shared call, then one call of its own for each other waiter.
    assert_eq!(up.hits.load(Ordering::SeqCst), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_make_two_calls() {
    let up = upstream().await;
    let (layer, _) = layer();
    let svc = layer.layer(client());
    let tasks: Vec<_> = ["Bearer alice", "Bearer bob", "Bearer alice"]
        .into_iter()
        .map(|user| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/me", Some(user));
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (user, body)
            })
        })
        .collect();
    until(2, &up.hits).await;
    up.gate.send(true).unwrap();
    for t in tasks {
        let (user, body) = t.await.unwrap();
        assert_eq!(body, format!("Some({user:?})"));
    }
    // Alice's two calls may or may not overlap; Bob never shares hers.
    let hits = up.hits.load(Ordering::SeqCst);
    assert!((2..=3).contains(&hits), "{hits} hits");
}
