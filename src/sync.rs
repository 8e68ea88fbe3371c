//! Atomics for the lock-free cores, swapped for `loom`'s under `--cfg loom`
//! so the model checker can explore every interleaving of them.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize};
