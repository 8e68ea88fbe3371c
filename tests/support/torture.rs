//! What the torture suites share: a paused runtime to play histories on,
//! and a panic hook that keeps their own injected panics off stderr.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;

/// Runs `f` on a fresh current-thread runtime with tokio's clock paused.
pub fn paused<F: Future>(f: F) -> F::Output {
    paused_runtime().block_on(f)
}

/// A fresh current-thread runtime with tokio's clock paused, for a test
/// that keeps it (to spawn on it, or to drive it from outside).
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Our own panics (messages starting with `torture: `) are expected by the
/// hundred: keep them off stderr. Any other panic is reported as usual.
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| p.downcast_ref::<String>().map(String::as_str));
            if !msg.is_some_and(|m| m.starts_with("torture: ")) {
                default(info);
            }
        }));
    });
}
