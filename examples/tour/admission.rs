//! Rate limit and bulkhead: admission control in front of an upstream.

use std::time::Duration;

use axum::{routing::get, Router};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadEvent, BulkheadFull, BulkheadLayer};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};

use crate::common::{banner, say};

/// An upstream on 127.0.0.1 that takes 200 ms per call.
async fn slow_upstream() -> std::io::Result<std::net::SocketAddr> {
    let app = Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "done"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = slow_upstream().await?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let get = move || Request::get(format!("http://{addr}/")).body(Empty::new());

    banner("rate limit: 6 calls at once against a burst of 3, refilled at 2 a second");
    let limit = RateLimitLayer::builder()
        .name("api")
        .max_tokens(3.0)
        .refill_rate(2.0)
        .build()?;
    let handle = limit.handle();
    let mut svc = ServiceBuilder::new().layer(limit).service(client.clone());
    let calls = (1..=6).map(|i| {
        let svc = svc.clone();
        async move {
            match svc.oneshot(get().unwrap()).await {
                Ok(r) => say(format!("call {i}: {}", r.status())),
                Err(e) => match e.downcast_ref::<RateLimited>() {
                    Some(l) => say(format!("call {i}: {l}")),
                    None => say(format!("call {i}: failed: {e}")),
                },
            }
        }
    });
    futures::future::join_all(calls).await;
    say(format!("{:.1} tokens left", handle.tokens()));
    say("the upstream says 429, Retry-After: 1 -> handle.set_retry_after(1 s)");
    handle.set_retry_after(Duration::from_secs(1));
    let err = svc.ready().await?.call(get()?).await.unwrap_err();
    say(format!("next call: {err}"));

    banner("rate limit with max_wait: queue instead of failing");
    let limit = RateLimitLayer::builder()
        .max_tokens(1.0)
        .refill_rate(10.0)
        .max_wait(Duration::from_millis(250))
        .build()?;
    let svc = ServiceBuilder::new().layer(limit).service(client.clone());
    let calls = (1..=4).map(|i| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(get().unwrap()).await;
            match res {
                Ok(r) => say(format!("queued call {i}: {}", r.status())),
                Err(e) => say(format!("queued call {i}: {e}")),
            }
        }
    });
    futures::future::join_all(calls).await;

    banner("bulkhead: 2 calls at once, a warning at 1, the rest turned away");
    let bulkhead = BulkheadLayer::builder()
        .name("upstream")
        .max_concurrent(2)
        .soft_limit(1)
        .on_event(|e| {
            if let BulkheadEvent::SoftLimitReached {
                in_flight,
                capacity,
                ..
            } = e
            {
                say(format!(
                    "  bulkhead: soft limit reached ({in_flight}/{capacity} in flight)"
                ));
            }
        })
        .build()?;
    let slots = bulkhead.handle();
    let svc = ServiceBuilder::new().layer(bulkhead).service(client);
    let calls = (1..=4).map(|i| {
        let svc = svc.clone();
        async move {
            match svc.oneshot(get().unwrap()).await {
                Ok(r) => say(format!("parallel call {i}: {}", r.status())),
                Err(e) => match e.downcast_ref::<BulkheadFull>() {
                    Some(full) => say(format!("parallel call {i}: {full}")),
                    None => say(format!("parallel call {i}: failed: {e}")),
                },
            }
        }
    });
    futures::future::join_all(calls).await;
    say(format!(
        "all done: {} in flight, {} free",
        slots.in_flight(),
        slots.available()
    ));
    Ok(())
}
