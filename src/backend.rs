//! Where a primitive keeps its state: the one [`Backend`] type taken by
//! the `.backend(...)` of the breaker, rate limit and bulkhead builders.

use std::fmt;

#[cfg(feature = "file-store")]
use crate::store::file::FileStore;
#[cfg(feature = "redis")]
use crate::store::redis::RedisStore;

/// Where a breaker, a rate limiter or a bulkhead keeps its state, chosen
/// with `.backend(...)` on its builder (a store converts into one, so
/// `.backend(store)` reads well).
///
/// - [`Backend::Memory`] (default): this process only; lock-free and
///   allocation-free on the hot path.
/// - `Backend::File` (feature `file-store`): every process using the same
///   state file shares one breaker, one rate limit and one bulkhead per
///   name (see `store::file`). Admission is a short read-modify-write
///   under the file lock, done in `call` when the lock is free and in the
///   response future when a peer holds it; bulkhead slots are owned by
///   processes (PID and start time), and those of ended processes are
///   reclaimed. While the file cannot be used the store's
///   `store::Degrade` policy applies.
/// - `Backend::Redis` (feature `redis`): a fleet shares the state (see
///   `store::redis`). Rate limits are GCRA in Redis
///   (per key for a keyed limiter), bulkhead slots are leases that expire
///   if their process dies, and a breaker decides locally and syncs with
///   the fleet. Admission runs inside the response future, bounded by the
///   store's timeout; while Redis cannot be reached the store's
///   `store::Degrade` policy applies.
///
/// Per primitive:
///
/// - breaker: both shared backends count consecutive failures; a
///   `Window` needs the memory backend. Half-open probes are reserved in
///   the shared state, so `half_open_max_calls` holds across processes.
/// - rate limit: every backend runs the same GCRA. The file keeps one
///   word per limiter name, so a keyed limiter is refused (`ConfigError`
///   naming `backend`), and wall-clock time, so `clock` is refused; Redis
///   keeps one GCRA word per key. `max_wait` needs the memory backend.
/// - bulkhead: fail fast only (`max_wait` and `soft_limit` need the memory
///   backend).
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Backend {
    /// State in this process.
    #[default]
    Memory,
    /// State in a file shared by processes.
    #[cfg(feature = "file-store")]
    File(FileStore),
    /// State in Redis shared by a fleet.
    #[cfg(feature = "redis")]
    Redis(RedisStore),
}

impl Backend {
    /// Whether this is [`Backend::Memory`].
    pub fn is_memory(&self) -> bool {
        matches!(self, Backend::Memory)
    }

    /// Whether this is the Redis backend.
    pub(crate) fn is_redis(&self) -> bool {
        #[cfg(feature = "redis")]
        if let Backend::Redis(_) = self {
            return true;
        }
        false
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            #[cfg(feature = "file-store")]
            Backend::File(s) => f.debug_tuple("File").field(s).finish(),
            #[cfg(feature = "redis")]
            Backend::Redis(s) => f.debug_tuple("Redis").field(s).finish(),
        }
    }
}

#[cfg(feature = "file-store")]
impl From<FileStore> for Backend {
    fn from(s: FileStore) -> Self {
        Backend::File(s)
    }
}

#[cfg(feature = "redis")]
impl From<RedisStore> for Backend {
    fn from(s: RedisStore) -> Self {
        Backend::Redis(s)
    }
}
