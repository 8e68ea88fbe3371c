//! Both admission layers in front of a real axum server on 127.0.0.1,
//! under a burst of concurrent requests from a hyper client.
#![cfg(all(feature = "axum", feature = "rate-limit", feature = "bulkhead"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::{error_handling::HandleErrorLayer, extract::State, routing::get, Router};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_bulwark::http::handle_error;
use tower_bulwark::{BulkheadLayer, RateLimitLayer};

#[derive(Clone)]
struct Upstream {
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

async fn work(State(u): State<Upstream>) -> &'static str {
    let now = u.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    u.peak.fetch_max(now, Ordering::SeqCst);
    u.gate.acquire().await.unwrap().forget();
    u.in_flight.fetch_sub(1, Ordering::SeqCst);
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_hold_and_excess_gets_429_or_503() {
    const CAP: usize = 5;
    const BURST: usize = 20;
    const CLIENTS: usize = 40;
    let up = Upstream {
        in_flight: Arc::new(AtomicUsize::new(0)),
        peak: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Semaphore::new(0)),
    };
    let rate = RateLimitLayer::builder()
        .name("api")
        .max_tokens(BURST as f64)
        .refill_rate(0.001)
        .build()
        .unwrap();
    let bulkhead = BulkheadLayer::builder()
        .name("workers")
        .max_concurrent(CAP)
        .build()
        .unwrap();
    let slots = bulkhead.handle();
    let app = Router::new()
        .route("/", get(work))
        .with_state(up.clone())
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(rate)
                .layer(bulkhead),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..CLIENTS {
        let client = client.clone();
        let tx = tx.clone();
        let uri: hyper::Uri = format!("http://{addr}/").parse().unwrap();
        tokio::spawn(async move {
            let res = client.get(uri).await.expect("the connection works");
            let retry_after = res.headers().get("retry-after").cloned();
            let limit = res.headers().get("ratelimit-limit").cloned();
            tx.send((res.status().as_u16(), retry_after, limit))
                .unwrap();
        });
    }
    // Everything beyond the cap is answered while the admitted calls hold.
    let mut statuses = Vec::new();
    for _ in 0..CLIENTS - CAP {
        statuses.push(rx.recv().await.unwrap());
    }
    assert_eq!(up.in_flight.load(Ordering::SeqCst), CAP);
    assert_eq!(slots.in_flight(), CAP);
    up.gate.add_permits(CAP);
    for _ in 0..CAP {
        statuses.push(rx.recv().await.unwrap());
    }

    assert!(up.peak.load(Ordering::SeqCst) <= CAP);
    let count = |s| statuses.iter().filter(|(c, ..)| *c == s).count();
    assert_eq!(count(200), CAP);
    assert_eq!(count(429), CLIENTS - BURST);
    assert_eq!(count(503), BURST - CAP);
    for (status, retry_after, limit) in &statuses {
        match status {
            200 => {}
            429 => {
                assert!(retry_after.is_some());
                assert_eq!(limit.as_ref().unwrap(), "20");
            }
            503 => assert!(retry_after.is_some()),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(slots.in_flight(), 0);
}
