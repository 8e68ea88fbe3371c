//! Circuit breaker: an upstream that fails for a while, then recovers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::get, Router};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitEvent, CircuitOpen};
use tower_bulwark::classify::{classify_fn, Outcome};

use crate::common::{banner, say};

/// Starts an axum server on 127.0.0.1 that answers 503 while `healthy` is
/// false. Returns its address.
pub(crate) async fn flaky_upstream(
    healthy: Arc<AtomicBool>,
) -> std::io::Result<std::net::SocketAddr> {
    async fn handler(State(healthy): State<Arc<AtomicBool>>) -> (StatusCode, &'static str) {
        if healthy.load(Ordering::SeqCst) {
            (StatusCode::OK, "ok")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "down")
        }
    }
    let app = Router::new().route("/", get(handler)).with_state(healthy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    banner("circuit breaker: 3 failures open it, 2 good probes close it");
    let healthy = Arc::new(AtomicBool::new(false));
    let addr = flaky_upstream(healthy.clone()).await?;
    say(format!(
        "upstream listening on http://{addr}, answering 503 for now"
    ));

    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .failure_threshold(3)
        .open_timeout(Duration::from_millis(300))
        .success_threshold(2)
        // A 5xx answer is a failure although the HTTP call itself worked.
        .classify(classify_fn(
            |res: &Result<Response<Incoming>, hyper_util::client::legacy::Error>| match res {
                Ok(r) if r.status().is_server_error() => Outcome::Failure,
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            },
        ))
        .on_event(|e| {
            if let CircuitEvent::StateChanged {
                from, to, open_for, ..
            } = e
            {
                match open_for {
                    Some(d) => say(format!("  breaker: {from} -> {to} for {d:?}")),
                    None => say(format!("  breaker: {from} -> {to}")),
                }
            }
        })
        .build()?;
    let handle = breaker.handle();

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(breaker).service(client);

    for i in 1..=14 {
        if i == 6 {
            healthy.store(true, Ordering::SeqCst);
            say("upstream recovers");
        }
        let req = Request::get(format!("http://{addr}/")).body(Empty::new())?;
        let res = svc.ready().await?.call(req).await;
        match res {
            Ok(r) => say(format!("call {i:>2}: upstream answered {}", r.status())),
            Err(e) => match e.downcast_ref::<CircuitOpen>() {
                Some(open) => say(format!(
                    "call {i:>2}: rejected fast ({open}), next probe in {:?}",
                    open.retry_after().unwrap_or_default()
                )),
                None => say(format!("call {i:>2}: failed: {e}")),
            },
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let m = handle.metrics();
    say(format!(
        "breaker is {} after {} failures and {} fast rejections",
        m.state, m.failures_total, m.rejected_total
    ));
    Ok(())
}

/// A breaker per upstream host: one host fails, the other keeps serving.
pub(crate) async fn run_keyed() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    banner("keyed breakers: one breaker per upstream host");
    let down = flaky_upstream(Arc::new(AtomicBool::new(false))).await?;
    let up = flaky_upstream(Arc::new(AtomicBool::new(true))).await?;
    say(format!("host {down} answers 503, host {up} answers 200"));

    let breakers = CircuitBreakerLayer::builder()
        .name("hosts")
        .failure_threshold(2)
        .classify(classify_fn(
            |res: &Result<Response<Incoming>, hyper_util::client::legacy::Error>| match res {
                Ok(r) if r.status().is_server_error() => Outcome::Failure,
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            },
        ))
        // The key of a request: the host it goes to.
        .key(|req: &Request<Empty<Bytes>>| {
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
        })
        .max_keys(100)
        .build()?;
    let handle = breakers.handle();
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(breakers).service(client);
    for i in 1..=6 {
        for addr in [down, up] {
            let req = Request::get(format!("http://{addr}/")).body(Empty::new())?;
            let outcome = match svc.ready().await?.call(req).await {
                Ok(r) => format!("answered {}", r.status()),
                Err(e) if e.is::<CircuitOpen>() => "rejected fast".to_owned(),
                Err(e) => format!("failed: {e}"),
            };
            say(format!("round {i}: {addr} {outcome}"));
        }
    }
    for addr in [down, up] {
        let state = handle.state(&addr.to_string());
        say(format!(
            "breaker of {addr}: {}",
            state.map_or("-", |s| s.as_str())
        ));
    }
    Ok(())
}
