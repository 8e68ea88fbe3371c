//! A CLI whose every invocation is a new process, yet all invocations share
//! one circuit breaker and one token bucket through a state file.
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
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen};
use tower_bulwark::store::file::FileStore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cmd = std::env::args().nth(1).unwrap_or_else(|| "ok".into());
    let mut store = FileStore::builder().app("bulwark-example");
    if let Ok(dir) = std::env::var("BULWARK_STATE_DIR") {
        store = store.dir(dir);
    }
    let store = store.on_event(|e| eprintln!("store: {e:?}")).build()?;
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(3)
        .open_timeout(Duration::from_secs(20))
        .backend(store.clone())
        .build()?;
    let handle = breaker.handle();
    let bucket = store.rate_limiter(5.0, 0.5)?;

    match cmd.as_str() {
        "status" => {
            let s = store.load();
            println!(
                "breaker {} ({} failures), {:.1} tokens, file {}",
                handle.state(),
                s.circuit_breaker.failures,
                bucket.tokens(),
                store.path().display()
            );
            return Ok(());
        }
        "reset" => {
            handle.reset();
            bucket.reset();
            println!("breaker and bucket reset");
            return Ok(());
        }
        _ => {}
    }

    // The seed's gate order: the bucket first, then the breaker, so a
    // rejected call never holds a half-open probe.
    if let Err(wait) = bucket.try_acquire(1.0) {
        println!("rate limited: try again in {wait:.1?}");
        return Ok(());
    }
    let fail = cmd == "fail";
    let upstream = service_fn(move |()| async move {
        if fail {
            Err("upstream answered 503")
        } else {
            Ok("200 OK")
        }
    });
    let svc = ServiceBuilder::new().layer(breaker).service(upstream);
    match svc.oneshot(()).await {
        Ok(body) => println!("upstream: {body} (breaker {})", handle.state()),
        Err(e) => match e.downcast_ref::<CircuitOpen>() {
            Some(open) => println!("rejected by another process's breaker: {open}"),
            None => println!("upstream failed: {e} (breaker {})", handle.state()),
        },
    }
    Ok(())
}
