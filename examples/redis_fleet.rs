//! Several workers, each with its own Redis connection (as separate
//! processes would have), share one rate limit exactly: each wraps its
//! upstream in a `RateLimitLayer` with the Redis backend.
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no &
//! cargo run --example redis_fleet --features redis
//! ```
//!
//! Set `REDIS_URL` to use another server.

use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::store::redis::RedisStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let run = format!("fleet-{}", std::process::id());
    let workers = 4;
    let secs = 2;
    println!("{workers} workers, one limit of 10/s (bursts of 10), for {secs} s, via {url}");

    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let store = RedisStore::builder(url.as_str())
                .prefix("bulwark-example")
                .on_event(move |e| eprintln!("worker {w}: {e:?}"))
                .build()
                .expect("valid config");
            // The limit's Redis key is `{bulwark-example:<run>}:gcra`.
            let limiter = RateLimitLayer::builder()
                .name(run.as_str())
                .max_tokens(10.0)
                .refill_rate(10.0)
                .backend(store.clone())
                .build()
                .expect("valid limit");
            let upstream = service_fn(|i: u32| async move { Ok::<_, std::convert::Infallible>(i) });
            let mut svc = ServiceBuilder::new().layer(limiter).service(upstream);
            tokio::spawn(async move {
                let mut admitted = 0u32;
                while start.elapsed() < Duration::from_secs(secs) {
                    let call = svc.ready().await.expect("always ready").call(admitted);
                    match call.await {
                        Ok(_) => admitted += 1,
                        Err(e) => {
                            let wait = e
                                .downcast_ref::<RateLimited>()
                                .map_or(Duration::from_millis(50), RateLimited::retry_after);
                            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
                        }
                    }
                }
                (w, admitted, store.is_degraded())
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        let (w, n, degraded) = t.await?;
        let note = if degraded {
            " (Redis unreachable: local limit)"
        } else {
            ""
        };
        println!("worker {w}: {n} calls admitted{note}");
        total += n;
    }
    println!(
        "total: {total} (a burst of 10 + 10/s x {secs} s = about {})",
        10 + 10 * secs
    );
    Ok(())
}
