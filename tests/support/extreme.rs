//! Strategies and helpers for the extreme-configuration property tests:
//! settings at their edges (0, tiny, huge, NaN, ±inf, `Duration::MAX`,
//! `u32::MAX`) mixed with ordinary values.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tower_bulwark::ConfigError;

pub fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(-1.0),
        1 => Just(1e-300),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(1e-11),
        1 => Just(1e300),
        1 => Just(f64::MAX),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        4 => 1e-3f64..1e3,
        8 => 0.5f64..20.0,
    ]
}

/// A ratio-like setting: mostly in `(0, 1]`, sometimes at an edge.
pub fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![3 => 0.01f64..=1.0, 1 => Just(1.0), 2 => float()]
}

pub fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::from_nanos(u64::MAX)),
        (1u64..5_000).prop_map(Duration::from_millis),
    ]
}

pub fn count_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 2u32..20]
}

pub fn count_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(u32::MAX as usize),
        Just(usize::MAX),
        Just(usize::MAX >> 3),
        2usize..20,
    ]
}

/// Runs `f` on a fresh current-thread runtime with tokio's clock paused.
pub fn paused<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

/// [`paused`], with tokio's IO driver too (for clients that connect).
pub fn paused_io<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

/// The error names one of `fields` and gives a reason.
pub fn named(e: &ConfigError, fields: &[&str]) -> Result<(), TestCaseError> {
    prop_assert!(fields.contains(&e.field()), "unexpected field in {e}");
    prop_assert!(!e.reason().is_empty());
    Ok(())
}

/// Polls once with a no-op waker.
pub fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

/// Whether `d` can be waited out on tokio's paused clock in a test: paused
/// time cannot be advanced past what an `Instant` holds.
pub fn waitable(d: Duration) -> bool {
    d <= Duration::from_secs(86_400 * 365)
}
