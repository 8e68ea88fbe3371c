//! The hedge and timeout layers over real HTTP: an axum server on
//! 127.0.0.1 (on its own thread and runtime, on the real clock) and a
//! hyper client whose runtime runs on tokio's paused clock, so delays and
//! deadlines pass as soon as the client is idle.
#![cfg(feature = "http")]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::hedge::HedgeLayer;
use tower_bulwark::timeout::{grpc_timeout, TimedOut, TimeoutLayer};
use tower_bulwark::ClockSource;

#[derive(Default)]
struct Seen {
    gets: AtomicUsize,
    posts: AtomicUsize,
}

/// The first GET never answers; later GETs and every POST answer at once.
/// `/hang` never answers a GET or a POST.
fn start_upstream() -> (std::net::SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let (g, p) = (s.clone(), s);
            let app = Router::new()
                .route(
                    "/",
                    get(move || {
                        let first = g.gets.fetch_add(1, SeqCst) == 0;
                        async move {
                            if first {
                                std::future::pending::<()>().await;
                            }
                            "hedged"
                        }
                    })
                    .post(move || {
                        p.posts.fetch_add(1, SeqCst);
                        async { "posted" }
                    }),
                )
                .route(
                    "/hang",
                    get(std::future::pending::<&'static str>)
                        .post(std::future::pending::<&'static str>),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), seen)
}

type Body = Empty<Bytes>;

#[tokio::test(start_paused = true)]
async fn a_hung_get_is_answered_by_its_hedge_and_a_post_is_never_sent_twice() {
    let (addr, seen) = start_upstream();
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let hedge = HedgeLayer::builder()
        .clock(ClockSource::Tokio)
        .delay(Duration::from_millis(50))
        .max_extra_load(1.0)
        .hedge_if(|req: &Request<Body>| req.method().is_idempotent())
        .build()
        .unwrap();
    let handle = hedge.handle();
    let svc = ServiceBuilder::new().layer(hedge).service(client);
    let req = |method: Method| {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}/"))
            .body(Body::new())
            .unwrap()
    };

    let res = svc.clone().oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.gets.load(SeqCst), 2);
    assert_eq!(handle.hedges(), 1);

    let res = svc.oneshot(req(Method::POST)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.posts.load(SeqCst), 1);
    assert_eq!(handle.hedges(), 1, "a POST is not hedged");
}

#[tokio::test(start_paused = true)]
async fn a_hung_post_is_never_sent_twice() {
    let (addr, _) = start_upstream();
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    // Counted on the client side, where a hedge would be sent: the count
    // does not depend on how fast the server sees it.
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let counted = tower::service_fn(move |req: Request<Body>| {
        s.fetch_add(1, SeqCst);
        client.clone().oneshot(req)
    });
    let svc = ServiceBuilder::new()
        .layer(
            TimeoutLayer::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
        .layer(
            HedgeLayer::builder()
                .clock(ClockSource::Tokio)
                .delay(Duration::from_millis(50))
                .max_extra_load(1.0)
                .hedge_if(|req: &Request<Body>| req.method().is_idempotent())
                .build()
                .unwrap(),
        )
        .service(counted);
    let req = |method: Method| {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}/hang"))
            .body(Body::new())
            .unwrap()
    };
    // The hedge is due long before the deadline: a GET is sent twice...
    let err = svc.clone().oneshot(req(Method::GET)).await.unwrap_err();
    assert!(err.is::<TimedOut>());
    assert_eq!(sent.load(SeqCst), 2);
    // ...a POST once.
    let err = svc.oneshot(req(Method::POST)).await.unwrap_err();
    assert!(err.is::<TimedOut>());
    assert_eq!(sent.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_header_shortens_the_deadline_of_a_real_call() {
    let (addr, _) = start_upstream();
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let layer = TimeoutLayer::builder()
        .timeout(Duration::from_secs(30))
        .per_request(|req: &Request<Body>| grpc_timeout(req.headers()))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(client);
    let req = Request::get(format!("http://{addr}/hang"))
        .header("grpc-timeout", "200m")
        .body(Body::new())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let t = err.downcast_ref::<TimedOut>().expect("a TimedOut");
    assert_eq!(t.timeout(), Duration::from_millis(200));
}
