//! A keyed limiter under 1,000,000 distinct keys keeps its memory bounded.
//! Its own test binary, so its resident memory is its own.
#![cfg(feature = "rate-limit")]

use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::rate_limit::RateLimitLayer;

/// Resident memory in bytes (Linux), the crate forbidding the `unsafe` a
/// counting allocator would need.
fn rss() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test(start_paused = true)]
async fn a_million_keys_stay_within_the_cap() {
    const CAP: usize = 50_000;
    let layer = RateLimitLayer::builder()
        .clock(tower_bulwark::ClockSource::Tokio) // the paused clock
        .max_tokens(5.0)
        .refill_rate(1.0)
        .max_keys(CAP)
        .key(|ip: &u64| *ip)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    let before = rss();
    let mut admitted = 0;
    for ip in 0..1_000_000u64 {
        // Every key is new; every bucket is still refilling, so nothing is
        // idle: only the cap can keep memory down. Once live buckets are
        // forgotten, new keys start no fuller than the emptiest of them, so
        // while the flood lasts some are turned away.
        match svc.ready().await.unwrap().call(ip).await {
            Ok(_) => admitted += 1,
            Err(e) => assert!(e.is::<tower_bulwark::rate_limit::RateLimited>(), "{e}"),
        }
        if ip % 10_000 == 0 {
            assert!(handle.keys() <= CAP);
        }
    }
    assert!(handle.keys() <= CAP, "{} keys", handle.keys());
    assert!(admitted >= CAP, "only {admitted} admitted");
    // 50,000 keys of 16 bytes plus the maps' slack: a few MB, where a
    // million remembered keys would take 30 or more. RSS never shrinks,
    // so this is the peak.
    if let (Some(before), Some(after)) = (before, rss()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 16 << 20, "grew by {grown} bytes");
    }

    // Once every bucket is full again, they are all forgettable.
    tokio::time::advance(std::time::Duration::from_secs(10)).await;
    for ip in 2_000_000..2_100_000u64 {
        svc.ready().await.unwrap().call(ip).await.unwrap();
    }
    assert!(handle.keys() <= CAP);
}
