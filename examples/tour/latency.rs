//! Timeout, hedging and the adaptive limit: three answers to a slow
//! upstream.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::{routing::get, Router};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::adaptive::{AdaptiveLimitLayer, LimitReached, Vegas};
use tower_bulwark::hedge::HedgeLayer;
use tower_bulwark::timeout::{TimedOut, TimeoutLayer};

use crate::common::{banner, say};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// An upstream on 127.0.0.1: `/ms/N` answers after N ms; `/tail` answers
/// in 20 ms, except every other request, which takes 400 ms; `/work` is
/// served by 4 workers taking 20 ms each, so its latency grows with the
/// calls queued for them.
async fn upstream() -> std::io::Result<std::net::SocketAddr> {
    let nth = Arc::new(AtomicU64::new(0));
    let workers = Arc::new(tokio::sync::Semaphore::new(4));
    let app = Router::new()
        .route(
            "/ms/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                "done"
            }),
        )
        .route(
            "/tail",
            get(move || {
                let slow = nth.fetch_add(1, Ordering::SeqCst).is_multiple_of(2);
                async move {
                    let ms = if slow { 400 } else { 20 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    "done"
                }
            }),
        )
        .route(
            "/work",
            get(move || {
                let workers = workers.clone();
                async move {
                    let _worker = workers.acquire().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    "done"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

pub(crate) async fn run() -> Result<(), Error> {
    let addr = upstream().await?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let get = move |path: &str| Request::get(format!("http://{addr}{path}")).body(Empty::new());

    banner("timeout: 100 ms, or less when the caller asks for less");
    let timeout = TimeoutLayer::builder()
        .name("upstream")
        .timeout(Duration::from_millis(100))
        .per_request(|req: &Request<Empty<Bytes>>| {
            let ms = req.headers().get("x-request-timeout-ms")?.to_str().ok()?;
            Some(Duration::from_millis(ms.parse().ok()?))
        })
        .build()?;
    let svc = ServiceBuilder::new().layer(timeout).service(client.clone());
    for (path, asked) in [("/ms/30", None), ("/ms/300", None), ("/ms/30", Some("10"))] {
        let mut req = get(path)?;
        if let Some(ms) = asked {
            req.headers_mut()
                .insert("x-request-timeout-ms", ms.parse()?);
        }
        let start = Instant::now();
        let res = svc.clone().oneshot(req).await;
        let took = start.elapsed().as_millis();
        match res {
            Ok(r) => say(format!("GET {path}: {} in {took} ms", r.status())),
            Err(e) => match e.downcast_ref::<TimedOut>() {
                Some(t) => say(format!("GET {path} (asked {asked:?} ms): {t}")),
                None => say(format!("GET {path}: failed: {e}")),
            },
        }
    }

    banner("hedge: every other call is slow; a copy after 50 ms answers it, one hedge per two calls at most");
    let hedge = HedgeLayer::builder()
        .name("tail")
        .delay(Duration::from_millis(50))
        .max_extra_load(0.5)
        // Only requests safe to send twice; with the `http` feature,
        // `HedgeLayer::http_builder()` applies that rule by default.
        .hedge_if(|req: &Request<Empty<Bytes>>| req.method().is_idempotent())
        .build()?;
    let hedges = hedge.handle();
    let svc = ServiceBuilder::new().layer(hedge).service(client.clone());
    for i in 1..=6 {
        let start = Instant::now();
        let r = svc.clone().oneshot(get("/tail")?).await?;
        say(format!(
            "call {i}: {} in {} ms ({} hedges so far)",
            r.status(),
            start.elapsed().as_millis(),
            hedges.hedges()
        ));
    }

    banner("adaptive limit: 40 callers against 4 workers");
    let layer = AdaptiveLimitLayer::builder()
        .name("work")
        .algorithm(Vegas::default())
        .initial_limit(40)
        .build()?;
    let limit = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(client);
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let until = Instant::now() + Duration::from_millis(1500);
    let callers: Vec<_> = (0..40)
        .map(|_| {
            let (svc, ok, refused) = (svc.clone(), ok.clone(), refused.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    match svc.clone().oneshot(get("/work").unwrap()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.is::<LimitReached>() => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            0
                        }
                        Err(_) => 0,
                    };
                }
            })
        })
        .collect();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        say(format!(
            "limit {:>2}, in flight {:>2}; {} answered, {} turned away",
            limit.limit(),
            limit.in_flight(),
            ok.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        ));
    }
    for c in callers {
        c.await?;
    }
    Ok(())
}
