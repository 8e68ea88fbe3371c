//! Dedup layers built, used once and dropped by the hundred thousand leave
//! memory where it was: nothing is kept per layer, per service or per
//! setting for the life of the process. Its own test binary, so its
//! resident memory is its own.
#![cfg(feature = "dedup")]

use std::time::Duration;

use futures::executor::block_on;
use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_bulwark::dedup::DedupLayer;

/// Resident memory in bytes (Linux), the crate forbidding the `unsafe` a
/// counting allocator would need.
fn rss() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// How many layers (and services) to build: 100,000, or `BULWARK_LAYERS`
/// to measure more by hand (1,000,000: no growth either).
fn count() -> u64 {
    std::env::var("BULWARK_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// One layer with settings of its own (name, size, TTLs, a listener on
/// some), around a service, called once so its table holds an answer.
fn one_layer(i: u64) {
    let mut b = DedupLayer::builder()
        .key(move |k: &u64| Some((*k, i)))
        .name(format!("tenant-{i}"))
        .max_entries(1 + (i % 1000) as usize)
        .cache_ttl(Duration::from_millis(1 + i % 5000));
    if i.is_multiple_of(2) {
        b = b.error_ttl(Duration::from_millis(1 + i % 700));
    }
    if i.is_multiple_of(3) {
        b = b.on_event(move |_| {
            std::hint::black_box(i);
        });
    }
    if i.is_multiple_of(5) {
        b = b.share_between_services();
    }
    let layer = b.build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|k: u64| async move { Ok::<_, BoxError>(k) }));
    assert_eq!(block_on(svc.clone().oneshot(i)).unwrap(), i);
    assert_eq!(handle.cached(), 1);
    drop(svc);
}

// One test, so that the two measurements do not run at once in one
// process.
#[test]
fn layers_and_services_built_and_dropped_leave_memory_bounded() {
    layers_built_and_dropped();
    one_layer_making_services_by_the_hundred_thousand();
}

fn layers_built_and_dropped() {
    let n = count();
    // Warm the allocator up first: what it keeps for reuse is not growth.
    for i in 0..10_000 {
        one_layer(i);
    }
    let Some(before) = rss() else { return };
    for i in 10_000..10_000 + n {
        one_layer(i);
    }
    let grown = rss().unwrap().saturating_sub(before);
    eprintln!(
        "{n} dedup layers: resident memory grew {} KiB",
        grown / 1024
    );
    // A layer, its service and its table take about a kilobyte while they
    // live: kept per layer, 100,000 of them would be 50 MB or more.
    assert!(grown < 8 << 20, "grew {grown} bytes over {n} layers");
}

/// One long-lived layer that makes a service per connection (as a server
/// does): the layer's handle forgets services that are gone, so its own
/// memory stays bounded too.
fn one_layer_making_services_by_the_hundred_thousand() {
    let n = count();
    let layer = DedupLayer::builder()
        .key(|k: &u64| Some(*k))
        .cache_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = layer.handle();
    let make = |i: u64| {
        let svc = layer.layer(service_fn(|k: u64| async move { Ok::<_, BoxError>(k) }));
        assert_eq!(block_on(svc.oneshot(i)).unwrap(), i);
    };
    for i in 0..10_000 {
        make(i);
    }
    let Some(before) = rss() else { return };
    for i in 10_000..10_000 + n {
        make(i);
    }
    let grown = rss().unwrap().saturating_sub(before);
    eprintln!(
        "{n} services of one layer: resident memory grew {} KiB",
        grown / 1024
    );
    assert_eq!(handle.cached(), 0, "every service is gone, and its table");
    assert!(grown < 8 << 20, "grew {grown} bytes over {n} services");
}
