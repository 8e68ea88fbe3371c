//! Retry: an upstream that fails a few times (once asking for a pause with
//! `Retry-After`), called through the retry layer.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::get, Router};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client, Error as ClientError};
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_bulwark::classify::{Classify, Outcome};
use tower_bulwark::retry::{Backoff, GiveUpReason, Jitter, RetryEvent, RetryLayer};

use crate::common::{banner, say};

/// Answers, per request number: 1 -> 503, 2 -> 503 with `Retry-After: 1`,
/// 3 -> 200, 4 -> 500, 5 -> 500, 6 -> 500, then 200.
async fn flaky_upstream() -> std::io::Result<std::net::SocketAddr> {
    async fn handler(
        State(n): State<Arc<AtomicU32>>,
    ) -> (StatusCode, [(&'static str, &'static str); 1], String) {
        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
        let (status, retry_after) = match k {
            1 => (StatusCode::SERVICE_UNAVAILABLE, "0"),
            2 => (StatusCode::SERVICE_UNAVAILABLE, "1"),
            4..=6 => (StatusCode::INTERNAL_SERVER_ERROR, "0"),
            _ => (StatusCode::OK, "0"),
        };
        say(format!("  upstream: request #{k} -> {}", status.as_u16()));
        (
            status,
            [("retry-after", retry_after)],
            format!("answer #{k}"),
        )
    }
    let app = Router::new()
        .route("/", get(handler))
        .with_state(Arc::new(AtomicU32::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// 5xx answers and connection errors are failures; a 503's `Retry-After`
/// (in seconds) is the upstream's back-off hint. (With the `http` feature,
/// `tower_bulwark::http::HttpRetryPolicy` does all of this for you.)
#[derive(Clone, Copy)]
struct Http;

impl Classify<Response<Incoming>, ClientError> for Http {
    fn classify(&self, res: &Result<Response<Incoming>, ClientError>, _: Duration) -> Outcome {
        match res {
            Ok(r) if r.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }

    fn retry_after(&self, res: &Result<Response<Incoming>, ClientError>) -> Option<Duration> {
        let r = res.as_ref().ok()?;
        let secs = r
            .headers()
            .get("retry-after")?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        (r.status() == StatusCode::SERVICE_UNAVAILABLE).then(|| Duration::from_secs(secs))
    }
}

pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    banner("retry: back-off with jitter, Retry-After, and giving up");
    let addr = flaky_upstream().await?;
    say(format!("upstream listening on http://{addr}"));

    let retry = RetryLayer::builder()
        .name("upstream")
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(100))
                .max_delay(Duration::from_secs(2))
                .jitter(Jitter::Equal),
        )
        .classify(Http)
        .on_event(|e| match e {
            RetryEvent::Retry {
                attempt,
                delay,
                reason,
                ..
            } => say(format!(
                "  retry: attempt {attempt} in {} ms ({})",
                delay.as_millis(),
                reason.as_str()
            )),
            RetryEvent::GaveUp {
                attempts, reason, ..
            } => {
                let why = match reason {
                    GiveUpReason::Exhausted => "attempts used up".to_string(),
                    other => format!("{other:?}"),
                };
                say(format!(
                    "  retry: giving up after {attempts} attempts ({why})"
                ))
            }
            other => say(format!("  retry: {other:?}")),
        })
        .build()?;

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(retry).service(client);

    for i in 1..=3 {
        say(format!("call {i}: GET /"));
        let req = Request::get(format!("http://{addr}/")).body(Empty::new())?;
        match svc.ready().await?.call(req).await {
            Ok(r) => say(format!("call {i}: answered {}", r.status())),
            Err(e) => say(format!("call {i}: failed: {e}")),
        }
    }
    Ok(())
}
