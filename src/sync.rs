//! Atomics (and the odd lock beside them), swapped for loom's under
//! `--cfg bulwark_loom` so the lock-free cores can be model-checked.

#[cfg(bulwark_loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
#[cfg(bulwark_loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::Mutex;
#[cfg(not(bulwark_loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
#[cfg(not(bulwark_loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::Mutex;
