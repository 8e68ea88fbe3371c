//! A CLI whose every invocation is a new process, yet all invocations share
//! one token bucket, one bulkhead and one circuit breaker through a state
//! file: three layers with the file backend, stacked in the seed's gate
//! order (rate limit, bulkhead, then breaker). Each layer keeps its entry
//! under its name (`api`) in the file.
//!
//! If the state file cannot be written (a read-only directory, say), each
//! invocation falls back to limits of its own (`Degrade::FailOpenToLocal`);
//! pass `closed` as a second argument to reject instead
//! (`Degrade::FailClosed`).
//!
//! Try it from two shells at once:
//!
//! ```text
//! cargo run --example cross_process_cli --features file-store -- fail    # x3: opens the breaker
//! cargo run --example cross_process_cli --features file-store -- ok      # other shell: rejected
//! cargo run --example cross_process_cli --features file-store -- status
//! cargo run --example cross_process_cli --features file-store -- reset
//! ```
//!
//! The state lives in `$BULWARK_STATE_DIR` (default: the user's cache
//! directory, `bulwark-example/resilience/state.json`).

use std::time::Duration;

use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::{BulkheadFull, BulkheadLayer};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen};
use tower_bulwark::rate_limit::{RateLimitLayer, RateLimited};
use tower_bulwark::store::file::FileStore;
use tower_bulwark::store::Degrade;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cmd = std::env::args().nth(1).unwrap_or_else(|| "ok".into());
    let mut store = FileStore::builder().app("bulwark-example");
    if let Ok(dir) = std::env::var("BULWARK_STATE_DIR") {
        store = store.dir(dir);
    }
    if std::env::args().nth(2).as_deref() == Some("closed") {
        store = store.degrade(Degrade::FailClosed);
    }
    let store = store.on_event(|e| eprintln!("store: {e:?}")).build()?;
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(3)
        .open_timeout(Duration::from_secs(20))
        .backend(store.clone())
        .build()?;
    let handle = breaker.handle();
    // 5 calls in a burst, then one every 2 s, across every invocation.
    let bucket = RateLimitLayer::builder()
        .name("api")
        .max_tokens(5.0)
        .refill_rate(0.5)
        .backend(store.clone())
        .build()?;
    let tokens = bucket.handle();
    // At most 2 invocations talk to the upstream at once.
    let bulkhead = BulkheadLayer::builder()
        .name("api")
        .max_concurrent(2)
        .backend(store.clone())
        .build()?;

    match cmd.as_str() {
        "status" => {
            println!(
                "breaker {} ({} failures), {:.1} tokens, {} slots in use, file {}",
                handle.state(),
                handle.metrics().consecutive_failures,
                tokens.tokens(),
                bulkhead.handle().in_flight(),
                store.path().display()
            );
            return Ok(());
        }
        "reset" => {
            handle.reset();
            tokens.reset();
            println!("breaker and bucket reset");
            return Ok(());
        }
        _ => {}
    }

    let fail = cmd == "fail";
    let upstream = service_fn(move |()| async move {
        if fail {
            Err("upstream answered 503")
        } else {
            Ok("200 OK")
        }
    });
    // The seed's gate order, outermost first: the bucket and the bulkhead
    // before the breaker, so a call they reject never takes (or leaks) a
    // half-open probe.
    let svc = ServiceBuilder::new()
        .layer(bucket)
        .layer(bulkhead)
        .layer(breaker)
        .service(upstream);
    match svc.oneshot(()).await {
        Ok(body) => println!("upstream: {body} (breaker {})", handle.state()),
        Err(e) => {
            if let Some(limited) = e.downcast_ref::<RateLimited>() {
                println!("rate limited: try again in {:.1?}", limited.retry_after());
            } else if let Some(full) = e.downcast_ref::<BulkheadFull>() {
                println!("too many invocations at once: {full}");
            } else if let Some(open) = e.downcast_ref::<CircuitOpen>() {
                println!("rejected by the shared breaker: {open}");
            } else {
                println!("upstream failed: {e} (breaker {})", handle.state());
            }
        }
    }
    Ok(())
}
