//! A limiter whose buckets live outside this process: in a state file or
//! in Redis. The memory path never comes here (one `Option` check).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

#[cfg(feature = "file-store")]
use crate::store::file::FileRateLimiter;
#[cfg(feature = "redis")]
use crate::store::redis::RedisRateLimiter;

/// An admission in flight: `Err` is the rejection. A span that comes
/// with it is kept open until the call below is made.
pub(crate) type Admit =
    Pin<Box<dyn Future<Output = (Result<(), crate::BoxError>, Option<Span>)> + Send>>;

/// An admission in flight before it knows how to reject.
pub(crate) type Pending =
    Pin<Box<dyn Future<Output = (Result<(), Duration>, Option<Span>)> + Send>>;

/// A state file's span (see `FileStore::span`); nothing without one.
#[cfg(feature = "file-store")]
pub(crate) type Span = crate::store::file::Span;
#[cfg(not(feature = "file-store"))]
pub(crate) type Span = ();

/// The shared bucket(s) of a limiter built with a shared backend.
pub(crate) enum StoreBuckets {
    /// The limiter's entry in a state file, shared by every process using
    /// it.
    #[cfg(feature = "file-store")]
    File(FileRateLimiter),
    /// GCRA words in Redis, one per key.
    #[cfg(feature = "redis")]
    Redis(std::sync::Arc<RedisRateLimiter>),
}

impl fmt::Debug for StoreBuckets {
    #[allow(unused_variables)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            #[cfg(feature = "file-store")]
            StoreBuckets::File(ref r) => f.debug_tuple("File").field(r).finish(),
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(ref r) => f.debug_tuple("Redis").field(r).finish(),
        }
    }
}

/// How a shared backend answers a request.
#[allow(dead_code)]
pub(crate) enum StoreAnswer {
    /// Decided now (the file): admitted, or rejected with a retry time.
    Now(Result<(), Duration>),
    /// To be decided in the response future (Redis).
    Later(Pending),
}

impl StoreBuckets {
    /// Takes `tokens` for `key` (`None`: the limiter's one bucket);
    /// `span` is the one [`span`](Self::span) opened for this call.
    #[allow(unused_variables)]
    pub(crate) fn admit(
        &self,
        key: Option<String>,
        tokens: f64,
        span: &Option<Span>,
    ) -> StoreAnswer {
        match *self {
            #[cfg(feature = "file-store")]
            // Decided now when the lock is free; else the wait for it
            // happens in the response future, on tokio's timers, and the
            // round it then makes stays open for the layers below. A lock
            // found busy for the span is waited for even if it was freed
            // since: deciding now, outside a span, would leave the layers
            // below a round each.
            StoreBuckets::File(ref f) => {
                let busy = span.as_ref().is_some_and(Span::lock_busy);
                match (!busy).then(|| f.try_acquire_now(tokens)).flatten() {
                    Some(r) => StoreAnswer::Now(r),
                    None => {
                        let f = f.clone();
                        StoreAnswer::Later(Box::pin(async move { f.acquire_spanned(tokens).await }))
                    }
                }
            }
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(ref r) => {
                let r = r.clone();
                StoreAnswer::Later(Box::pin(async move {
                    (r.acquire(key.as_deref().unwrap_or(""), tokens).await, None)
                }))
            }
        }
    }

    /// Joins the admissions made until the guard drops into one round of
    /// the state file (see `FileStore::span`); `None` for Redis.
    pub(crate) fn span(&self) -> Option<Span> {
        match *self {
            #[cfg(feature = "file-store")]
            StoreBuckets::File(ref f) => Some(f.span()),
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(_) => None,
        }
    }

    /// Tokens left, as far as this process can tell without waiting.
    pub(crate) fn tokens(&self) -> Option<f64> {
        match *self {
            #[cfg(feature = "file-store")]
            StoreBuckets::File(ref f) => Some(f.tokens()),
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(_) => None,
        }
    }

    /// An upstream asked for a pause: applies it where the bucket lives.
    /// `false` when only this process can keep it (Redis).
    #[allow(unused_variables)]
    pub(crate) fn block_for(&self, d: Duration) -> bool {
        match *self {
            #[cfg(feature = "file-store")]
            StoreBuckets::File(ref f) => {
                f.set_retry_after_detached(d);
                true
            }
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(_) => false,
        }
    }

    pub(crate) fn reset(&self) {
        match *self {
            #[cfg(feature = "file-store")]
            StoreBuckets::File(ref f) => f.reset(),
            #[cfg(feature = "redis")]
            StoreBuckets::Redis(_) => {}
        }
    }
}
