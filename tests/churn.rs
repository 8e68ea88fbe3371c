//! Layers built and dropped by the hundred thousand leave no memory behind:
//! a service that builds a layer of any kind per tenant or per host must
//! not grow for the life of the process.
//!
//! One test in its own binary, so that no other test's allocations move
//! the resident set meanwhile. `BULWARK_CHURN_LAYERS` sets how many layers
//! of each kind are built (default 100,000).
#![cfg(all(
    feature = "rate-limit",
    feature = "retry",
    feature = "bulkhead",
    feature = "circuit-breaker",
    feature = "fallback",
    feature = "timeout",
    feature = "hedge",
    feature = "adaptive"
))]

use std::time::Duration;

use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_bulwark::adaptive::AdaptiveLimitLayer;
use tower_bulwark::bulkhead::BulkheadLayer;
use tower_bulwark::circuit_breaker::CircuitBreakerLayer;
use tower_bulwark::fallback::FallbackLayer;
use tower_bulwark::hedge::HedgeLayer;
use tower_bulwark::rate_limit::RateLimitLayer;
use tower_bulwark::retry::{Backoff, RetryLayer};
use tower_bulwark::timeout::TimeoutLayer;
use tower_bulwark::ClockSource;

/// Resident set size in bytes, from `/proc/self/statm`.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("a resident page count");
    // The page size is 4 KiB on every platform CI runs on.
    pages * 4096
}

async fn churn(kind: &str, i: u64) {
    let echo = service_fn(|n: u64| async move { Ok::<_, BoxError>(n) });
    // A distinct name and distinct settings for every layer.
    let name = format!("{kind}-tenant-{i}");
    let r = match kind {
        "rate_limit" => {
            let layer = RateLimitLayer::builder()
                .name(name)
                .clock(ClockSource::Tokio)
                .max_tokens(10.0 + (i % 100_000) as f64)
                .refill_rate(1.0 + (i % 1000) as f64)
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "retry" => {
            let layer = RetryLayer::builder()
                .name(name)
                .max_attempts(2 + (i % 7) as u32)
                .backoff(Backoff::constant(Duration::from_nanos(1 + i % 1_000_000)))
                .max_retry_after(Duration::from_millis(i % 1_000_000))
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "circuit_breaker" => {
            let layer = CircuitBreakerLayer::builder()
                .name(name)
                .failure_threshold(1 + (i % 50) as u32)
                .open_timeout(Duration::from_millis(1 + i % 100_000))
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "keyed_breaker" => {
            let layer = CircuitBreakerLayer::builder()
                .name(name)
                .key(|n: &u64| n % 4)
                .max_keys(1 + (i % 16) as usize)
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "fallback" => {
            let layer = FallbackLayer::builder()
                .primary_name(name)
                .fallback("secondary", echo)
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "timeout" => {
            let layer = TimeoutLayer::builder()
                .name(name)
                .timeout(Duration::from_millis(1 + i % 100_000))
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "hedge" => {
            let layer = HedgeLayer::builder()
                .name(name)
                .delay(Duration::from_millis(1 + i % 1000))
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        "adaptive" => {
            let layer = AdaptiveLimitLayer::builder()
                .initial_limit(1 + (i % 100) as usize)
                .max_limit(1000)
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
        _ => {
            let layer = BulkheadLayer::builder()
                .name(name)
                .max_concurrent(1 + (i % 100) as usize)
                .build()
                .unwrap();
            layer.layer(echo).oneshot(i).await
        }
    };
    assert_eq!(r.unwrap(), i);
}

#[tokio::test(flavor = "current_thread")]
async fn building_and_dropping_layers_leaves_memory_bounded() {
    let n: u64 = std::env::var("BULWARK_CHURN_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    for kind in [
        "rate_limit",
        "retry",
        "bulkhead",
        "circuit_breaker",
        "keyed_breaker",
        "fallback",
        "timeout",
        "hedge",
        "adaptive",
    ] {
        // Warm up: the allocator's arenas and the runtime reach their
        // working size.
        for i in 0..10_000 {
            churn(kind, u64::MAX / 2 - i).await;
        }
        let before = rss();
        for i in 0..n {
            churn(kind, i).await;
        }
        let grown = rss().saturating_sub(before);
        println!(
            "{kind}: {n} layers built and dropped, resident set grew by {} KiB",
            grown / 1024
        );
        // A leak of even 64 bytes a layer would be 6 MiB here.
        assert!(
            grown < 4 << 20,
            "{kind}: {n} layers grew the resident set by {grown} bytes"
        );
    }
}
