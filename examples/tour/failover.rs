//! Fallback and dedup: a primary upstream that goes down while a secondary
//! takes over, then a burst of identical requests sharing one call.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::classify::{classify_fn, Outcome};
use tower_bulwark::dedup::{DedupEvent, DedupLayer};
use tower_bulwark::fallback::{FallbackEvent, FallbackLayer};
use tower_bulwark::CircuitBreakerLayer;

use crate::breaker::flaky_upstream;
use crate::common::{banner, say};

type Answer = (u16, String);

/// GETs `/` on `addr`: (status, body).
fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: std::net::SocketAddr,
) -> impl Service<(), Response = Answer, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    let client = client.clone();
    service_fn(move |()| {
        let client = client.clone();
        async move {
            let res = client
                .request(Request::get(format!("http://{addr}/")).body(Empty::new())?)
                .await?;
            let status = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, String::from_utf8_lossy(&body).into_owned()))
        }
    })
}

pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    banner("fallback: the primary goes down, the secondary answers, the primary's breaker opens");
    let primary_up = Arc::new(AtomicBool::new(true));
    let primary = flaky_upstream(primary_up.clone()).await?;
    let secondary = flaky_upstream(Arc::new(AtomicBool::new(true))).await?;
    say(format!(
        "primary on http://{primary}, secondary on http://{secondary}"
    ));

    let client = Client::builder(TokioExecutor::new()).build_http();
    let layer = FallbackLayer::builder()
        .primary_name("primary")
        .fallback("secondary", get(&client, secondary))
        .breaker(
            CircuitBreakerLayer::builder()
                .failure_threshold(2)
                .open_timeout(Duration::from_millis(300))
                .success_threshold(1),
        )
        // A 5xx answer fails over, as a connection error would.
        .classify(classify_fn(|r: &Result<Answer, BoxError>| match r {
            Ok((s, _)) if *s >= 500 => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }))
        .on_event(|e| match e {
            FallbackEvent::EntryFailed { entry, .. } => {
                say(format!("  fallback: `{entry}` failed or was skipped"))
            }
            FallbackEvent::Answered { entry, .. } => say(format!("  fallback: `{entry}` answered")),
            _ => {}
        })
        .build()?;
    let handle = layer.handle();
    let mut svc = layer.layer(get(&client, primary));

    for i in 1..=8 {
        if i == 2 {
            primary_up.store(false, Ordering::SeqCst);
            say("primary starts answering 503");
        }
        if i == 6 {
            primary_up.store(true, Ordering::SeqCst);
            say("primary recovers; its breaker lets a probe through after 300 ms");
            tokio::time::sleep(Duration::from_millis(320)).await;
        }
        let (status, _) = svc.ready().await?.call(()).await?;
        let state = handle.breaker("primary").map(|b| b.state());
        say(format!(
            "call {i}: answered {status}, primary breaker {}",
            state.map(|s| s.to_string()).unwrap_or_default()
        ));
    }

    banner("dedup: 50 identical requests at once, one upstream call");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let slow_lookup = service_fn(move |user: String| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BoxError>(format!("profile of {user}"))
        }
    });
    let joined = Arc::new(AtomicUsize::new(0));
    let j = joined.clone();
    let dedup = DedupLayer::builder()
        .name("profiles")
        .key(|user: &String| Some(user.clone()))
        .cache_ttl(Duration::from_millis(500))
        .on_event(move |e| match e {
            DedupEvent::Leader { .. } => say("  dedup: leader starts the upstream call"),
            DedupEvent::Joined { .. } => {
                j.fetch_add(1, Ordering::SeqCst);
            }
            DedupEvent::CacheHit { .. } => say("  dedup: answered from the cache"),
            _ => {}
        })
        .build()?;
    let svc = dedup.layer(slow_lookup);
    let answers =
        futures::future::join_all((0..50).map(|_| svc.clone().oneshot("ada".to_owned()))).await;
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    say(format!(
        "{ok} callers answered, {} joined the leader, {} upstream call(s)",
        joined.load(Ordering::SeqCst),
        calls.load(Ordering::SeqCst)
    ));
    let again = svc.clone().oneshot("ada".to_owned()).await?;
    say(format!(
        "one more call within the cache TTL: {again:?}, still {} upstream call(s)",
        calls.load(Ordering::SeqCst)
    ));
    Ok(())
}
