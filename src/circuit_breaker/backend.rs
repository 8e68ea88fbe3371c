//! Where a running breaker keeps its state: in memory (the default), in a
//! state file shared by processes (`file`), or in memory synced with a
//! Redis fleet (`fleet`).

use std::fmt;
use std::time::Duration;

pub use crate::backend::Backend;

/// Settings of the shared backends (unused when none is compiled in).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(any(feature = "file-store", feature = "redis")), allow(dead_code))]
pub(crate) struct SharedCfg {
    /// How long a half-open probe may stay unanswered before it is taken
    /// to be from a crashed or hung process and freed.
    pub(crate) stale_attempt_timeout: Duration,
    /// Redis: how often each process syncs with the fleet.
    pub(crate) sync_interval: Duration,
}

/// The backend a running breaker is attached to.
pub(crate) enum Attached {
    /// This process only.
    Memory,
    /// A state file: every call runs the transitions under the file lock.
    #[cfg(feature = "file-store")]
    File(super::file::FileBreaker),
    /// Memory, synced with a fleet through Redis by a background task.
    #[cfg(feature = "redis")]
    Redis(std::sync::Arc<super::fleet::FleetSync>),
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attached::Memory => f.write_str("Memory"),
            #[cfg(feature = "file-store")]
            Attached::File(b) => f.debug_tuple("File").field(b).finish(),
            #[cfg(feature = "redis")]
            Attached::Redis(_) => f.write_str("Redis"),
        }
    }
}
