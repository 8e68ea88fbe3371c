//! The layers of the documented file stack, named `api`, over one
//! `FileStore`, and a service that answers at once: what the file-store
//! tests build again and again.
#![allow(dead_code, unreachable_pub)]

use tower::{service_fn, BoxError, Service};
use tower_bulwark::bulkhead::BulkheadLayer;
use tower_bulwark::circuit_breaker::CircuitBreakerLayer;
use tower_bulwark::rate_limit::RateLimitLayer;
use tower_bulwark::store::file::FileStore;

/// Slots the state file in `dir` lists for the bulkhead `api`: what
/// another process sees (a store built apart has no give-backs queued).
pub fn holders_in_file(dir: &std::path::Path) -> usize {
    FileStore::builder()
        .dir(dir)
        .build()
        .unwrap()
        .load()
        .bulkheads
        .get("api")
        .map_or(0, |b| b.holders.len())
}

/// A bucket of `tokens` that does not refill while a test runs.
pub fn limiter(store: &FileStore, tokens: f64) -> RateLimitLayer {
    RateLimitLayer::builder()
        .name("api")
        .max_tokens(tokens)
        .refill_rate(1e-6)
        .backend(store.clone())
        .build()
        .unwrap()
}

/// A bulkhead of `slots`.
pub fn bulkhead(store: &FileStore, slots: usize) -> BulkheadLayer {
    BulkheadLayer::builder()
        .name("api")
        .max_concurrent(slots)
        .backend(store.clone())
        .build()
        .unwrap()
}

/// A breaker with the default settings.
pub fn breaker(store: &FileStore) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .name("api")
        .backend(store.clone())
        .build()
        .unwrap()
}

/// Answers its request at once.
pub fn ok_service() -> impl Service<u32, Response = u32, Error = BoxError> + Clone {
    service_fn(|x: u32| async move { Ok::<_, BoxError>(x) })
}
