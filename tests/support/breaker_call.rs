//! One call through a breaker layer, for the shared-backend tests.
#![allow(dead_code, unreachable_pub)]

use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen};

/// Calls through `layer` to an upstream that fails when `fail` is set:
/// `Some(true)` succeeded, `Some(false)` failed, `None` rejected by the
/// breaker.
pub async fn call(layer: &CircuitBreakerLayer, fail: bool) -> Option<bool> {
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|fail: bool| async move {
            if fail {
                Err("upstream down")
            } else {
                Ok(())
            }
        }));
    match svc.oneshot(fail).await {
        Ok(()) => Some(true),
        Err(e) if e.is::<CircuitOpen>() => None,
        Err(_) => Some(false),
    }
}
