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

/// A route whose first response streams chunks sent on `tx`, ending when
/// `tx` is dropped; later responses are a short "done".
fn streaming_route(rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>) -> Router {
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    Router::new().route(
        "/",
        get(move || {
            let rx = rx.lock().unwrap().take();
            async move {
                match rx {
                    Some(rx) => axum::body::Body::from_stream(futures::stream::unfold(
                        rx,
                        |mut rx| async move {
                            let chunk = rx.recv().await?;
                            Some((Ok::<_, std::convert::Infallible>(chunk), rx))
                        },
                    )),
                    None => axum::body::Body::from("done"),
                }
            }
        }),
    )
}

async fn serve(app: Router) -> hyper::Uri {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/").parse().unwrap()
}

async fn text(res: hyper::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// With `hold_until_body_end`, a streaming body keeps its slot: while it
/// streams, the one slot is taken and another request gets 503; once the
/// body has ended, the slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_holds_its_slot_until_it_ends() {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let bulkhead = BulkheadLayer::builder()
        .name("downloads")
        .max_concurrent(1)
        .build()
        .unwrap()
        .hold_until_body_end();
    let slots = bulkhead.handle();
    let uri = serve(
        streaming_route(rx).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(bulkhead),
        ),
    )
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let res = client.get(uri.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    // The handler has returned and the head is here, but the body is not.
    assert_eq!(slots.in_flight(), 1);
    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"first")).unwrap();
    let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(chunk, "first");
    assert_eq!(slots.in_flight(), 1);

    let busy = client.get(uri.clone()).await.unwrap();
    assert_eq!(busy.status(), 503);
    assert!(busy.headers().get("retry-after").is_some());
    assert_eq!(slots.in_flight(), 1);

    tx.send(Bytes::from_static(b"second")).unwrap();
    let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(chunk, "second");
    drop(tx);
    // The server gave the slot back before it wrote the body's end.
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert_eq!(slots.in_flight(), 0);

    let again = client.get(uri).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(text(again).await, "done");
    assert_eq!(slots.in_flight(), 0);
}

/// Without the option, the slot is free as soon as the head is ready, so a
/// second request runs while the first body still streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_slot_is_freed_with_the_head() {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let bulkhead = BulkheadLayer::builder().max_concurrent(1).build().unwrap();
    let slots = bulkhead.handle();
    let uri = serve(
        streaming_route(rx).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(bulkhead),
        ),
    )
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let res = client.get(uri.clone()).await.unwrap();
    assert_eq!(slots.in_flight(), 0);
    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"first")).unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    let other = client.get(uri).await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(text(other).await, "done");
    drop(tx);
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}
