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

/// Each arrival is reported on the returned channel as (method, path).
/// The first arrival on each path waits until `release` is set; later
/// ones answer at once. Every answer says which arrival on its path it was.
fn start_slow_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Method, String)>,
    tokio::sync::watch::Sender<bool>,
) {
    let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
            let handler = move |method: Method, uri: axum::http::Uri| {
                let path = uri.path().to_owned();
                let n = {
                    let mut seen = seen.lock().unwrap();
                    let n: &mut usize = seen.entry(path.clone()).or_default();
                    *n += 1;
                    *n - 1
                };
                arrived.send((method, path)).unwrap();
                let mut released = released.clone();
                async move {
                    if n == 0 {
                        released.wait_for(|r| *r).await.unwrap();
                    }
                    format!("copy {n}")
                }
            };
            let app = Router::new().fallback(handler);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), arrivals, release)
}

#[tokio::test(start_paused = true)]
async fn the_http_builder_hedges_a_slow_get_and_never_a_slow_post() {
    use http_body_util::BodyExt;

    let (addr, mut arrivals, release) = start_slow_upstream();
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    // Counted on the client side, where a hedge would be sent.
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let counted = tower::service_fn(move |req: Request<Body>| {
        s.fetch_add(1, SeqCst);
        client.clone().oneshot(req)
    });
    let hedge = HedgeLayer::http_builder()
        .delay(Duration::from_millis(50))
        .max_extra_load(1.0)
        .build()
        .unwrap();
    let handle = hedge.handle();
    let svc = ServiceBuilder::new().layer(hedge).service(counted);
    let req = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(Body::new())
            .unwrap()
    };
    let text = |res: hyper::Response<hyper::body::Incoming>| async move {
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let arrival = |method: Method, path: &str| Some((method, path.to_owned()));

    // A slow GET is hedged (the paused clock passes its delay as soon as
    // the client is idle), and the copy that answers wins.
    let res = svc.clone().oneshot(req(Method::GET, "/get")).await.unwrap();
    assert_eq!(text(res).await, "copy 1");
    assert_eq!(handle.hedges(), 1);
    assert_eq!(sent.load(SeqCst), 2);
    for _ in 0..2 {
        assert_eq!(arrivals.recv().await, arrival(Method::GET, "/get"));
    }

    // A slow POST: once it is at the server, the clock moves well past
    // the hedge delay and the call's task runs, but no copy is sent.
    let post = tokio::spawn(svc.clone().oneshot(req(Method::POST, "/post")));
    assert_eq!(arrivals.recv().await, arrival(Method::POST, "/post"));
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(sent.load(SeqCst), 3, "a POST is not hedged");
    release.send(true).unwrap();
    assert_eq!(text(post.await.unwrap().unwrap()).await, "copy 0");
    assert_eq!(handle.hedges(), 1);
    release.send(false).unwrap();

    // With an idempotency key a POST may go twice, so it is hedged.
    let mut keyed = req(Method::POST, "/keyed");
    keyed
        .headers_mut()
        .insert("idempotency-key", "order-7".parse().unwrap());
    let res = svc.oneshot(keyed).await.unwrap();
    assert_eq!(text(res).await, "copy 1");
    assert_eq!(handle.hedges(), 2);
    assert_eq!(sent.load(SeqCst), 5);
}
