//! State shared across processes through a JSON file (feature
//! `file-store`): a CLI whose every invocation is a new process still has
//! one breaker, one rate limit and one bulkhead per name.
//!
//! ```no_run
//! # #[cfg(feature = "rate-limit")] {
//! use std::time::Duration;
//! use tower_bulwark::store::file::FileStore;
//!
//! // ~/.cache/mycli/resilience/state.json on Linux
//! let store = FileStore::builder().app("mycli").build()?;
//! let bucket = store.rate_limiter(50.0, 10.0)?.named("api");
//! match bucket.try_acquire(1.0) {
//!     Ok(()) => { /* call the API */ }
//!     Err(wait) => eprintln!("rate limited, retry in {wait:?}"),
//! }
//! let bulkhead = store.bulkhead(10)?.named("api");
//! if let Some(_slot) = bulkhead.try_acquire() {
//!     // at most 10 of these run at once across every process
//! }
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Pass the store to the `.backend(..)` of `CircuitBreakerLayer`,
//! `RateLimitLayer` or `BulkheadLayer` to share that layer.
//!
//! # The file
//!
//! One file per scope: `<dir>/state.json`, or `<dir>/<scope>.json` with
//! [`scope`](FileStoreBuilder::scope). `dir` defaults to the user's cache
//! directory, `<cache>/<app>/resilience`. The file holds `"version": 2`
//! and one entry per name for each primitive ([`State`]):
//!
//! ```json
//! {"version":2,
//!  "breakers":{"api":{"state":1,"generation":3,"failures":0,"successes":0,
//!    "open_until":1732500030000000000,"opens_in_row":1,"probes":[]}},
//!  "rate_limits":{"api":{"tat":1732500000400000000}},
//!  "bulkheads":{"api":{"holders":[{"pid":4242,"start":918273,"since":1732500000000,"id":77}]}},
//!  "updated_at":1732500000000}
//! ```
//!
//! - A breaker entry holds the same state machine the in-memory breaker
//!   runs (state, generation, counts, the end of the open period in Unix
//!   nanoseconds) plus who holds each half-open probe.
//! - A rate limit entry is one number, the GCRA *theoretical arrival
//!   time* in Unix nanoseconds, decided by the same functions as the
//!   in-memory limiter: the same configuration admits the same calls on
//!   every backend. An upstream's `Retry-After` is folded into it.
//! - A bulkhead entry lists its holders: process id, that process's start
//!   time, when the slot was taken, and an id naming the slot.
//!
//! A layer's entry is the one of its `name` (the unnamed entry `""` when it
//! has none). Version-1 files, one breaker, bucket and bulkhead per file,
//! are read and migrated into the unnamed entries; the next write is
//! version 2.
//!
//! # Concurrency
//!
//! - Every change is a read-modify-write under an advisory lock on
//!   `<file>.lock`, held for that step only (or, for the layers of one
//!   stack, one step for all of them across the synchronous part of the
//!   outermost one's `call`; see the `store` module), never across the
//!   wrapped call's await. If a peer holds the lock for longer than `lock_timeout`
//!   (100 ms) the update goes ahead without it (a CLI must not hang on a
//!   stuck peer) and a [`StoreEvent::LockTimeout`] is emitted.
//! - A call through a layer never stalls an async runtime waiting for a
//!   peer's lock: a rate limit's admission waits inside its response
//!   future with tokio timers (and once it has the lock, admits the layers
//!   below in the same round), as does a bulkhead's slot; a half-open
//!   breaker's probe is taken in `poll_ready`, waiting with tokio timers
//!   (a fallback entry's breaker, which has no readiness of its own, is
//!   refused its probe while a peer holds the lock and the call goes to
//!   the next entry); a call's result, a probe given back, and an
//!   upstream's `Retry-After` block are written on tokio's blocking pool
//!   when the lock is busy, a slot given back by a tokio task (see
//!   [below](#giving-slots-back)). The synchronous calls (`update`,
//!   `try_acquire`, `flush`, the breaker handle's `reset`, `force_open`
//!   and `disable`) wait on the calling thread, moved off an async worker
//!   with `block_in_place` on a multi-threaded runtime.
//! - Writes go to a temporary file in the same directory, then `rename`
//!   over the state file: a reader sees the old state or the new one,
//!   never half of one. Temporary files left by a process killed while
//!   writing are removed by a later write. Files are created with mode
//!   0600, the directory with 0700.
//! - Reads that need no change (a closed breaker's admission, an open
//!   one's rejection, a bulkhead's count) take no lock and reuse the
//!   parsed file while its inode, size and modification time are
//!   unchanged. A call through the documented three-layer stack takes
//!   one lock round, whether the lock was free or it waited for a peer:
//!   the rate limit's token, the bulkhead's slot and the slots given back
//!   since the last round are written together
//!   ([`FileStore::lock_rounds`] counts rounds).
//!
//! # Giving slots back
//!
//! A bulkhead slot given back (its call ended, was dropped or panicked)
//! is free at once for the calls of this process, and is written to the
//! file with this process's next round on it: the next call's admission,
//! which may take that very slot. If no round comes within
//! [`release_delay`](FileStoreBuilder::release_delay) (10 ms by default),
//! a task on the tokio runtime makes one. So a busy process takes one lock
//! round per call, not two, and other processes see a freed slot up to
//! `release_delay` later: they may turn a call away that they would have
//! let in, never the reverse. The file never lists fewer holders than
//! hold slots, so a bulkhead never gives out more than its capacity.
//!
//! - `Duration::ZERO` gives each slot back at once, in a round of its own
//!   (two rounds per call), as does a slot dropped outside a tokio
//!   runtime; if that round cannot write, the slot stays queued like any
//!   other.
//! - While the file cannot be written the slots stay queued and are
//!   written by the first round that can (retried from the delay up to
//!   once a second); a process failing closed admits nothing meanwhile,
//!   one failing open counts them free in its local state.
//! - [`FileStore::flush`] writes them now; dropping the last clone of a
//!   store writes them too. A process killed (or exiting without dropping
//!   its store) leaves them to the reclaim of holders that ended.
//! - A process that keeps calling keeps reusing the slots it gives back:
//!   a peer gets one once the process pauses for the delay (or frees more
//!   slots than it takes again). Where processes must compete for every
//!   freed slot, use `Duration::ZERO`.
//! - Stores built separately on one file queue separately: between them
//!   the delay applies as between processes.
//!
//! # What is refused, and what is recovered
//!
//! - The state file must be a regular file: it is opened without
//!   following a symbolic link (a link at its path is replaced by the next
//!   write, its target never read or written) and without blocking (a
//!   FIFO cannot hang the open), and the opened handle is checked. A FIFO,
//!   a device or a directory at the path makes the file unreachable (see
//!   below).
//! - A file larger than [`MAX_FILE_SIZE`] (1 MiB, far above what any
//!   real state needs) is not read: like a corrupt, truncated or
//!   future-version file it is moved aside to `<file>.corrupt-<ms>` and
//!   the state starts afresh, with a [`StoreEvent::Recovered`].
//! - Holders are processes identified by PID *and* start time (Linux;
//!   elsewhere by PID): the slots and probes of processes that ended,
//!   zombies included, or whose PID now names another process, are
//!   reclaimed on the next update. A bulkhead slot held longer than
//!   [`slot_timeout`](FileStoreBuilder::slot_timeout) (10 min) and a probe
//!   older than the breaker's `stale_attempt_timeout` (2 min) are
//!   reclaimed too, which covers a hung process.
//!
//! # When the file cannot be used
//!
//! When the state cannot be read, locked or written (a read-only file or
//! directory, a directory or FIFO at the path, a parent path that is a
//! file, an I/O error), the store follows its [`Degrade`] policy and
//! emits [`StoreEvent::Degraded`]; the first update that reaches the file
//! again emits [`StoreEvent::Restored`]. A file or directory without its
//! owner's write permission counts as read-only even for a user the
//! system would let write (root).
//!
//! - [`Degrade::FailOpenToLocal`] (default): this process keeps enforcing
//!   every limit on its own, with the same breaker, GCRA and bulkhead
//!   logic over a state in memory. Never "no limit".
//! - [`Degrade::FailClosed`]: calls that need the shared state are
//!   rejected (a breaker rejects as open, the rate limiter with a retry
//!   time of one second, the bulkhead as full).

mod process;
mod release;
mod state;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

pub use state::{
    BreakerEntry, BreakerState, BucketState, BulkheadEntry, BulkheadState, Holder, Phase,
    ProbeHolder, RateLimitEntry, State, STATE_VERSION,
};

pub(crate) use process::{alive, me};
use release::{Release, Releases};

use super::{unix_ms, Degrade, Recovery, StoreEvent};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "file_store";

/// The largest state file the store reads: 1 MiB. A real state of a few
/// hundred names is a few tens of kilobytes; anything larger is taken for
/// damage (or an attack) and set aside, as a corrupt file is.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// How long temporary files of a live writer are left alone.
const TMP_GRACE_MS: u64 = 60_000;

/// A scope's state file, shared by every clone.
///
/// Made with [`FileStore::builder`]. Cheap to clone.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<StoreShared>,
}

struct StoreShared {
    name: Arc<str>,
    path: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
    slot_timeout: Duration,
    degrade: Degrade,
    listeners: Listeners<StoreEvent>,
    cache: Mutex<Option<Cached>>,
    tmp_seq: AtomicU64,
    /// When temporary files were last swept (Unix ms; 0: never).
    swept_at: AtomicU64,
    /// Set from [`StoreEvent::Degraded`] to [`StoreEvent::Restored`].
    degraded: AtomicBool,
    /// This process's state while the file cannot be used
    /// ([`Degrade::FailOpenToLocal`]).
    local: Mutex<State>,
    /// Rounds made under the file's lock (see `FileStore::lock_rounds`).
    rounds: AtomicU64,
    /// Bulkhead slots given back and not yet written (see `release`).
    releases: Releases,
    /// How long a give-back may wait for a round (see
    /// `FileStoreBuilder::release_delay`).
    release_delay: Duration,
}

thread_local! {
    /// The spans open on this thread, one per state file at most.
    static SPANS: std::cell::RefCell<Vec<OpenSpan>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A span's file and the state its joined updates change.
struct OpenSpan {
    owner: Arc<StoreShared>,
    path: PathBuf,
    state: State,
}

/// An open span (see `FileStore::span`); dropping it writes and unlocks.
pub(crate) struct Span {
    /// The store, its lock, the state read, and the give-backs applied.
    open: Option<(FileStore, Held, State, Vec<Release>)>,
    /// None was opened because a peer held the lock.
    busy: bool,
    /// Tied to the thread whose thread-local holds the span.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Span {
    fn new(open: Option<(FileStore, Held, State, Vec<Release>)>, busy: bool) -> Self {
        Self {
            open,
            busy,
            _not_send: std::marker::PhantomData,
        }
    }

    fn none() -> Self {
        Self::new(None, false)
    }

    /// No span was opened because a peer held the lock: an update made
    /// now would likely wait, and one made later could not be joined.
    pub(crate) fn lock_busy(&self) -> bool {
        self.busy
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((store, held, before, gave)) = self.open.take() {
            store.close_span(held, before, gave);
        }
    }
}

impl Drop for StoreShared {
    /// Writes the slots still queued (best effort: now if the lock is
    /// free, else on tokio's blocking pool or this thread, as a slot given
    /// back with no delay is). A process that ends without this is covered
    /// by the reclaim of holders that ended.
    fn drop(&mut self) {
        let queued = self.releases.take_all();
        if queued.is_empty() {
            return;
        }
        // A store of the same file for that last round; its own queue is
        // empty, so its drop ends there.
        let last = FileStore {
            inner: Arc::new(StoreShared {
                name: self.name.clone(),
                path: std::mem::take(&mut self.path),
                lock_path: std::mem::take(&mut self.lock_path),
                lock_timeout: self.lock_timeout,
                slot_timeout: self.slot_timeout,
                degrade: self.degrade,
                listeners: std::mem::take(&mut self.listeners),
                cache: Mutex::new(None),
                tmp_seq: AtomicU64::new(self.tmp_seq.load(Relaxed)),
                swept_at: AtomicU64::new(self.swept_at.load(Relaxed)),
                degraded: AtomicBool::new(self.degraded.load(Relaxed)),
                local: Mutex::new(State::default()),
                rounds: AtomicU64::new(0),
                releases: Releases::default(),
                release_delay: Duration::ZERO,
            }),
        };
        last.round_detached(move |s| release::apply(s, &queued));
    }
}

struct Cached {
    key: FileKey,
    state: State,
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct FileKey {
    ino: u64,
    len: u64,
    mtime: Option<std::time::SystemTime>,
}

/// The shared state cannot be used and the store fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable;

/// One attempt at the lock.
enum Locking {
    Locked(Held),
    Busy,
    Broken(io::Error),
}

/// A wait for the file lock in progress, kept between polls by
/// [`FileStore::poll_round`]: when it began (the `lock_timeout` counts
/// from there), the next pause, and the timer of the current one.
#[derive(Debug)]
pub(crate) struct LockWait {
    start: Instant,
    pause: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

/// The lock for one update: held, or given up after `lock_timeout`
/// (`None`: go ahead without it); `Err` when it cannot be taken at all.
type Lock = io::Result<Option<Held>>;

/// The advisory lock on the lock file, given up when dropped.
///
/// Unlocked explicitly, not by closing the file: `flock` belongs to the
/// open file description, and a child this process forks (by any thread,
/// for any reason) shares that description until it calls `exec`. Closing
/// only our descriptor would leave the lock held for that window, and our
/// own next update would find it busy.
#[derive(Debug)]
struct Held(File);

impl Drop for Held {
    fn drop(&mut self) {
        // Closing the file gives the lock up anyway once every copy is
        // closed; an error here leaves nothing else to do.
        let _ = fs4::FileExt::unlock(&self.0);
    }
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("lock_timeout", &self.inner.lock_timeout)
            .field("slot_timeout", &self.inner.slot_timeout)
            .field("release_delay", &self.inner.release_delay)
            .field("degrade", &self.inner.degrade)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

/// Configures a [`FileStore`].
pub struct FileStoreBuilder {
    dir: Option<PathBuf>,
    app: String,
    scope: Option<String>,
    lock_timeout: Duration,
    slot_timeout: Duration,
    /// `None`: the default, kept below a short `slot_timeout`.
    release_delay: Option<Duration>,
    degrade: Degrade,
    listeners: Listeners<StoreEvent>,
}

impl fmt::Debug for FileStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStoreBuilder")
            .field("dir", &self.dir)
            .field("app", &self.app)
            .field("scope", &self.scope)
            .field("lock_timeout", &self.lock_timeout)
            .field("slot_timeout", &self.slot_timeout)
            .field("release_delay", &self.release_delay)
            .field("degrade", &self.degrade)
            .finish_non_exhaustive()
    }
}

/// The default [`release_delay`](FileStoreBuilder::release_delay).
pub const DEFAULT_RELEASE_DELAY: Duration = Duration::from_millis(10);

impl FileStore {
    /// A builder: the state file `<cache>/bulwark/resilience/state.json`,
    /// a 100 ms lock timeout, bulkhead slots reclaimed after 10 minutes
    /// and given back within 10 ms, failing open to local limits.
    pub fn builder() -> FileStoreBuilder {
        FileStoreBuilder {
            dir: None,
            app: "bulwark".to_owned(),
            scope: None,
            lock_timeout: Duration::from_millis(100),
            slot_timeout: Duration::from_secs(600),
            release_delay: None,
            degrade: Degrade::default(),
            listeners: Listeners::default(),
        }
    }
}

impl FileStoreBuilder {
    /// The directory that holds the state files (default
    /// `<user cache dir>/<app>/resilience`).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The application's name, used for the default directory (default
    /// `bulwark`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// The scope: the file is `<dir>/<scope>.json` instead of
    /// `<dir>/state.json`. Processes that share a scope share state.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// How long to wait for the file lock before going ahead without it
    /// (default 100 ms).
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d;
        self
    }

    /// How long a bulkhead slot may be held before it is taken to belong
    /// to a hung process and reclaimed (default 10 minutes, at least 1 ms:
    /// slots are timed in milliseconds). A call that runs longer than this
    /// loses its slot to the count, so set it above your longest call.
    pub fn slot_timeout(mut self, d: Duration) -> Self {
        self.slot_timeout = d;
        self
    }

    /// How long a bulkhead slot given back may wait to be written to the
    /// file (default 10 ms; `Duration::ZERO`: written at once, in a lock
    /// round of its own). Must be below `slot_timeout` (the default is
    /// kept below a `slot_timeout` shorter than 20 ms).
    ///
    /// A slot given back joins this process's next round on the file (the
    /// next call's admission, which may take that very slot), so a call
    /// through the documented stack takes one lock round instead of two.
    /// If no round comes within the delay, one is made to write it (on the
    /// tokio runtime the slot was given back on; outside a runtime the
    /// slot is written at once). The trade: calls in this process see the
    /// slot free at once, but other processes see it up to this much later
    /// (longer while the file cannot be written, or if the runtime is
    /// stalled), and a process that keeps calling keeps reusing its
    /// slots; slots never count fewer than are held, so a bulkhead never
    /// gives out more than its capacity. See the
    /// [module docs](self#giving-slots-back).
    pub fn release_delay(mut self, d: Duration) -> Self {
        self.release_delay = Some(d);
        self
    }

    /// What to do while the state file cannot be read, locked or written
    /// (default [`Degrade::FailOpenToLocal`]: enforce the limits in this
    /// process alone). See the [module docs](self#when-the-file-cannot-be-used).
    pub fn degrade(mut self, policy: Degrade) -> Self {
        self.degrade = policy;
        self
    }

    /// Calls `f` on every [`StoreEvent`] (lock timeouts, recoveries,
    /// switches to and from degraded).
    pub fn on_event(mut self, f: impl Fn(&StoreEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the store. Nothing is
    /// written until the first update.
    pub fn build(self) -> Result<FileStore, ConfigError> {
        let check = Check { layer: LAYER };
        check.non_zero_duration("lock_timeout", self.lock_timeout)?;
        if self.slot_timeout < Duration::from_millis(1) {
            // Slots are timed in whole milliseconds: a shorter timeout
            // would count every slot as stale at once, and bound nothing.
            return Err(ConfigError::new(
                LAYER,
                "slot_timeout",
                format!("must be at least 1 ms (got {:?})", self.slot_timeout),
            ));
        }
        let release_delay = match self.release_delay {
            // A freed slot would be reclaimed as stale before it is written.
            Some(d) if d >= self.slot_timeout => {
                return Err(ConfigError::new(
                    LAYER,
                    "release_delay",
                    format!(
                        "must be below slot_timeout ({d:?} >= {:?})",
                        self.slot_timeout
                    ),
                ))
            }
            Some(d) => d,
            None => DEFAULT_RELEASE_DELAY.min(self.slot_timeout / 2),
        };
        let plain = |field, s: &str| -> Result<(), ConfigError> {
            if s.is_empty() || s.contains(['/', '\\']) || s == "." || s == ".." {
                return Err(ConfigError::new(
                    LAYER,
                    field,
                    "must be a non-empty name without path separators",
                ));
            }
            Ok(())
        };
        let dir = match self.dir {
            Some(d) => d,
            None => {
                plain("app", &self.app)?;
                dirs::cache_dir()
                    .ok_or_else(|| {
                        ConfigError::new(LAYER, "dir", "no user cache directory: set one")
                    })?
                    .join(&self.app)
                    .join("resilience")
            }
        };
        let file = match &self.scope {
            Some(s) => {
                plain("scope", s)?;
                format!("{s}.json")
            }
            None => "state.json".to_owned(),
        };
        let path = dir.join(&file);
        Ok(FileStore {
            inner: Arc::new_cyclic(|me| StoreShared {
                name: Arc::from(self.scope.as_deref().unwrap_or("state")),
                lock_path: dir.join(format!("{file}.lock")),
                path,
                lock_timeout: self.lock_timeout,
                slot_timeout: self.slot_timeout,
                degrade: self.degrade,
                listeners: self.listeners,
                cache: Mutex::new(None),
                tmp_seq: AtomicU64::new(0),
                swept_at: AtomicU64::new(0),
                degraded: AtomicBool::new(false),
                local: Mutex::new(State::default()),
                rounds: AtomicU64::new(0),
                releases: Releases::new(me.clone(), release_delay),
                release_delay,
            }),
        })
    }
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded states are plain data changed by functions that do not
    // panic midway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FileStore {
    /// The state file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The scope's name (`state` when none was set).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The policy followed while the file cannot be used.
    pub fn degrade_policy(&self) -> Degrade {
        self.inner.degrade
    }

    /// Whether the file could not be used at the last attempt (between a
    /// [`StoreEvent::Degraded`] and the next [`StoreEvent::Restored`]).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Relaxed)
    }

    /// The state as this process sees it now, without taking the lock:
    /// the file's, with the bulkhead slots this process gave back and has
    /// not written yet (see [`flush`](Self::flush)) free. A missing or
    /// unreadable file reads as the initial state (it is recovered by the
    /// next [`update`](Self::update)); while the store is degraded this is
    /// the process's local state.
    pub fn load(&self) -> State {
        let mut state = self.view(Clone::clone).unwrap_or_default();
        self.inner.releases.apply_queued(&mut state);
        state
    }

    /// Reads the state without the lock, through the cache: the file is
    /// parsed again only when its inode, size or modification time
    /// changed. `Err` when the file cannot be read and the caller should
    /// take the update path (which follows the degrade policy).
    pub(crate) fn view<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, Unavailable> {
        if self.is_degraded() {
            return match self.inner.degrade {
                Degrade::FailOpenToLocal => Ok(f(&lock_mutex(&self.inner.local))),
                Degrade::FailClosed => Err(Unavailable),
            };
        }
        let key = match fs::symlink_metadata(&self.inner.path) {
            Ok(m) if m.file_type().is_file() => file_key(&m),
            Ok(m) if m.file_type().is_symlink() => return Ok(f(&State::default())),
            Ok(_) => return Err(Unavailable),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(f(&State::default())),
            Err(_) => return Err(Unavailable),
        };
        let mut cache = lock_mutex(&self.inner.cache);
        if let Some(c) = cache.as_ref().filter(|c| c.key == key) {
            return Ok(f(&c.state));
        }
        let state = match read_file(&self.inner.path) {
            Ok(Some(Contents {
                bytes: Ok(bytes),
                key,
                ..
            })) => match parse(&bytes) {
                Ok(s) => {
                    *cache = Some(Cached {
                        key,
                        state: s.clone(),
                    });
                    s
                }
                Err(_) => State::default(),
            },
            Ok(_) => State::default(),
            Err(_) => return Err(Unavailable),
        };
        Ok(f(&state))
    }

    /// Reads, changes and writes the state under the file lock. `f` sees
    /// the current state (recovered if the file was bad, and with the
    /// bulkhead slots this process gave back written free) and may change
    /// it; the file is written only if it changed. While the file cannot be
    /// used, `f` runs on this process's local state, whatever the
    /// store's policy (the policy applies to the layers' admissions).
    ///
    /// This waits for the lock (up to `lock_timeout`) on the calling
    /// thread.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let f = match self.try_joined(f) {
            Ok(r) => return r,
            Err(f) => f,
        };
        let lock = self.lock_blocking();
        match self.round(lock, Degrade::FailOpenToLocal, f) {
            Ok(r) => r,
            Err(Unavailable) => unreachable!("a fail-open round always runs"),
        }
    }

    /// Writes the bulkhead slots this process gave back and has not
    /// written yet (see [`release_delay`](FileStoreBuilder::release_delay))
    /// now, waiting for the lock on this thread; other processes then see
    /// them free. Nothing to do (no lock round) when none wait.
    pub fn flush(&self) {
        if self.inner.releases.is_empty() {
            return;
        }
        let _ = self.round_blocking(|_| ());
    }

    /// Removes the state file: every primitive of the scope starts afresh.
    pub fn clear(&self) -> io::Result<()> {
        let _lock = self.lock_blocking();
        *lock_mutex(&self.inner.cache) = None;
        *lock_mutex(&self.inner.local) = State::default();
        self.inner.releases.clear();
        match fs::remove_file(&self.inner.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A token bucket of `max_tokens` refilled at `refill_rate` tokens per
    /// second, kept in this file: the unnamed entry, or the one
    /// [`named`](FileRateLimiter::named) picks (feature `rate-limit`).
    /// Both must be finite and above zero, and the bucket must refill
    /// from empty within about 73 years, as for the in-memory limiter.
    #[cfg(feature = "rate-limit")]
    pub fn rate_limiter(
        &self,
        max_tokens: f64,
        refill_rate: f64,
    ) -> Result<FileRateLimiter, ConfigError> {
        use crate::rate_limit::gcra::Params;
        let check = Check { layer: LAYER };
        check.positive("max_tokens", max_tokens)?;
        check.positive("refill_rate", refill_rate)?;
        check.refill_time(max_tokens, refill_rate)?;
        let params = Params::new(max_tokens, refill_rate, 0);
        if params.increment(1.0_f64.min(max_tokens)).is_none() {
            return Err(ConfigError::new(
                LAYER,
                "max_tokens",
                "is too large for this refill_rate",
            ));
        }
        Ok(FileRateLimiter {
            store: self.clone(),
            name: Arc::from(""),
            params,
        })
    }

    /// A bulkhead of `max_concurrent` slots shared by every process, kept
    /// in this file: the unnamed entry, or the one
    /// [`named`](FileBulkhead::named) picks.
    pub fn bulkhead(&self, max_concurrent: u32) -> Result<FileBulkhead, ConfigError> {
        Check { layer: LAYER }.at_least_one("max_concurrent", u64::from(max_concurrent))?;
        Ok(FileBulkhead {
            store: self.clone(),
            name: Arc::from(""),
            max: max_concurrent,
        })
    }

    /// How long a bulkhead slot may be held.
    pub(crate) fn slot_timeout(&self) -> Duration {
        self.inner.slot_timeout
    }

    pub(crate) fn emit(&self, event: StoreEvent) {
        self.inner.listeners.emit(&event);
    }

    // --- Rounds: one read-modify-write each ------------------------------

    /// One update if the lock is free right now; `Err(f)` (not run) if a
    /// peer holds it.
    pub(crate) fn try_round<R, F>(&self, f: F) -> Result<Result<R, Unavailable>, F>
    where
        F: FnOnce(&mut State) -> R,
    {
        let f = match self.try_joined(f) {
            Ok(r) => return Ok(Ok(r)),
            Err(f) => f,
        };
        let lock = match self.try_lock() {
            Locking::Busy => return Err(f),
            Locking::Locked(file) => Ok(Some(file)),
            Locking::Broken(e) => Err(e),
        };
        Ok(self.round(lock, self.inner.degrade, f))
    }

    /// One update, waiting for the lock on this thread if a peer holds
    /// it (moved off the async worker with `block_in_place` where the
    /// runtime allows it).
    pub(crate) fn round_blocking<R>(
        &self,
        f: impl FnOnce(&mut State) -> R,
    ) -> Result<R, Unavailable> {
        match self.try_round(f) {
            Ok(r) => r,
            Err(f) => {
                let lock = off_runtime(|| self.lock_blocking());
                self.round(lock, self.inner.degrade, f)
            }
        }
    }

    /// One update, waiting for the lock with tokio timers if a peer holds
    /// it: other tasks run meanwhile.
    pub(crate) async fn round_async<R>(
        &self,
        f: impl FnOnce(&mut State) -> R,
    ) -> Result<R, Unavailable> {
        match self.try_round(f) {
            Ok(r) => r,
            Err(f) => {
                let lock = self.lock_async().await;
                self.round(lock, self.inner.degrade, f)
            }
        }
    }

    /// One update, polled: the lock is tried now and, while a peer holds
    /// it, again after a tokio timer (`wait` keeps the wait's progress
    /// between polls). `f` runs only once the lock is taken or given up;
    /// on `Pending` it is dropped unrun, and the caller passes it again.
    /// The lock is never held across polls.
    pub(crate) fn poll_round<R>(
        &self,
        wait: &mut Option<LockWait>,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut State) -> R,
    ) -> Poll<Result<R, Unavailable>> {
        let f = match self.try_joined(f) {
            Ok(r) => return Poll::Ready(Ok(r)),
            Err(f) => f,
        };
        let lock = ready!(self.poll_lock(wait, cx));
        Poll::Ready(self.round(lock, self.inner.degrade, f))
    }

    /// One update from a destructor: now if the lock is free, else on
    /// tokio's blocking pool when there is a runtime (the caller must not
    /// wait), else on this thread.
    pub(crate) fn round_detached(&self, f: impl FnOnce(&mut State) + Send + 'static) {
        self.round_then(f, |_| {});
    }

    /// One update whose result the caller need not wait for: `then` gets
    /// it, now if the lock is free, else from tokio's blocking pool when
    /// there is a runtime, else on this thread after waiting.
    pub(crate) fn round_then<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> R + Send + 'static,
        then: impl FnOnce(Result<R, Unavailable>) + Send + 'static,
    ) {
        let f = match self.try_round(f) {
            Ok(r) => return then(r),
            Err(f) => f,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            drop(rt.spawn_blocking(move || then(store.round_blocking(f))));
        } else {
            then(self.round_blocking(f));
        }
    }

    /// Gives a bulkhead slot back: queued for this process's next round
    /// on the file (the span open on this thread, if any, writes it when
    /// it closes), and flushed by a task after `release_delay` if no
    /// round comes; at once, in a round of its own, when the delay is
    /// zero or there is no runtime to run that task.
    fn give_back(&self, r: Release) {
        match self.span_owner() {
            // This store's span writes the queue when it closes.
            Some(true) => self.inner.releases.push(r),
            // Another store's span on this file (two stores built on one
            // file): it writes the give-back when it closes, and this
            // store's queue keeps it until one of this store's rounds has
            // written it too, in case that span's write fails (applying
            // it twice does nothing).
            Some(false) => {
                self.inner.releases.push(r.clone());
                let _ = self.try_joined(move |s| release::apply(s, &[r]));
            }
            None => {
                let now = !self.inner.releases.can_flush();
                self.inner.releases.push(r);
                if now {
                    // A round of its own, which drains the queue and keeps
                    // it queued if the file cannot be written.
                    self.round_detached(|_| ());
                }
            }
        }
    }

    /// Opens a span: until the returned guard drops, every update of this
    /// state file on this thread joins one round (one lock, one read, one
    /// write) instead of taking its own. A layer opens one around its
    /// synchronous `call`, so the admissions of the file-backed layers
    /// below it (their `call`s run inside it) share its round.
    ///
    /// Invariant: a joined update sees exactly the state its own round
    /// would have read, because the span holds the lock from its read to
    /// its write and every update of this file made meanwhile, on any
    /// thread of any process, either joins the span (this thread) or waits
    /// for the lock (every other one); so the joined updates run in the
    /// order they are made, on one state, and are written once. A span
    /// never outlives one synchronous call (it is not `Send` and is never
    /// held across an await), and dropping it writes whatever was joined,
    /// panics included. The slots this process gave back are applied when
    /// it opens (so the calls inside may take them) and again when it
    /// closes (those given back meanwhile, on any thread, a slot taken and
    /// given back during an unwind among them); a close that cannot write
    /// puts them back in the queue.
    ///
    /// No span is opened (the guard does nothing) when one is open for
    /// this file already, when the lock is busy, when the file cannot be
    /// read, or when the store fails closed: a fail-closed store must have
    /// each admission on disk before its call goes through, and a span
    /// writes only after the calls inside it were made.
    pub(crate) fn span(&self) -> Span {
        if self.inner.degrade == Degrade::FailClosed || self.in_span() {
            return Span::none();
        }
        let held = match self.try_lock() {
            Locking::Locked(held) => held,
            Locking::Busy => return Span::new(None, true),
            Locking::Broken(_) => return Span::none(),
        };
        match self.open_span(held, |_| ()) {
            Ok(((), span)) => span,
            Err(_) => Span::none(),
        }
    }

    /// One update under `lock` (waited for by the caller), made in a span
    /// that stays open, so that the updates made until the span drops
    /// join the same round; an update of its own (and no span) where
    /// `span` would open none.
    fn round_spanned<R>(
        &self,
        lock: Lock,
        f: impl FnOnce(&mut State) -> R,
    ) -> (Result<R, Unavailable>, Span) {
        match lock {
            Ok(Some(held)) if self.inner.degrade == Degrade::FailOpenToLocal && !self.in_span() => {
                match self.open_span(held, f) {
                    Ok((r, span)) => (Ok(r), span),
                    // The file could not be read: a round of its own
                    // follows the policy.
                    Err((held, f)) => (
                        self.round(Ok(Some(held)), self.inner.degrade, f),
                        Span::none(),
                    ),
                }
            }
            lock => (self.round(lock, self.inner.degrade, f), Span::none()),
        }
    }

    /// Opens a span with the lock already held, its first update `f`;
    /// the lock and `f` back if the file cannot be read.
    #[allow(clippy::type_complexity)]
    fn open_span<R, F: FnOnce(&mut State) -> R>(
        &self,
        held: Held,
        f: F,
    ) -> Result<(R, Span), (Held, F)> {
        let before = match self.read_for_update() {
            Ok(s) => s,
            Err(_) => return Err((held, f)),
        };
        // Slots given back before the span are free for the calls in it.
        let gave = self.inner.releases.take();
        let mut state = before.clone();
        gave.apply(&mut state);
        let r = f(&mut state);
        let gave = gave.into_slots();
        let mut state = Some(state);
        let pushed = SPANS.try_with(|spans| {
            spans.borrow_mut().push(OpenSpan {
                owner: self.inner.clone(),
                path: self.inner.lock_path.clone(),
                state: state.take().expect("pushed once"),
            })
        });
        if pushed.is_err() {
            // No thread-local to keep the span in (the thread is ending):
            // this is a round of its own.
            self.rounds_add();
            let mut batch = self.inner.releases.take();
            if let Some(mut state) = state {
                batch.apply(&mut state);
                batch.extend(gave);
                if self.commit(&before, state, Degrade::FailOpenToLocal) == Ok(true) {
                    batch.written();
                } else {
                    batch.keep_listed(&before);
                }
            }
            drop(held);
            return Ok((r, Span::none()));
        }
        Ok((
            r,
            Span::new(Some((self.clone(), held, before, gave)), false),
        ))
    }

    fn in_span(&self) -> bool {
        self.span_owner().is_some()
    }

    /// Whether a span is open on this thread for this file: `Some(true)`
    /// when this store opened it, `Some(false)` when another store of the
    /// same file did.
    fn span_owner(&self) -> Option<bool> {
        SPANS
            .try_with(|spans| {
                spans
                    .borrow()
                    .iter()
                    .find(|s| s.path == self.inner.lock_path)
                    .map(|s| Arc::ptr_eq(&s.owner, &self.inner))
            })
            .ok()
            .flatten()
    }

    /// Runs `f` in the span open on this thread for this file, if any
    /// (`Err(f)`, not run, if none).
    fn try_joined<R, F: FnOnce(&mut State) -> R>(&self, f: F) -> Result<R, F> {
        let mut f = Some(f);
        let joined = SPANS.try_with(|spans| {
            // `f` is a plain change of the state: it never takes a round
            // itself, so the borrow is never taken twice.
            let mut spans = spans.borrow_mut();
            let span = spans.iter_mut().find(|s| s.path == self.inner.lock_path)?;
            Some((f.take().expect("run once"))(&mut span.state))
        });
        match joined {
            Ok(Some(r)) => Ok(r),
            _ => Err(f.take().expect("not run")),
        }
    }

    /// Writes what a span's updates changed, with the slots given back
    /// meanwhile, and gives its lock up.
    fn close_span(&self, held: Held, before: State, gave: Vec<Release>) {
        // Back in the queue unless written, whatever happens below.
        let mut batch = self.inner.releases.take();
        batch.extend(gave);
        let Some(mut state) = SPANS
            .try_with(|spans| {
                let mut spans = spans.borrow_mut();
                let i = spans.iter().rposition(|s| s.path == self.inner.lock_path)?;
                Some(spans.swap_remove(i).state)
            })
            .ok()
            .flatten()
        else {
            return;
        };
        self.rounds_add();
        batch.apply(&mut state);
        // Spans are fail-open only (see `span`): a failed write keeps the
        // changes in this process.
        if self.commit(&before, state, Degrade::FailOpenToLocal) == Ok(true) {
            batch.written();
        } else {
            batch.keep_listed(&before);
        }
        drop(held);
    }

    fn rounds_add(&self) {
        self.inner.rounds.fetch_add(1, Relaxed);
    }

    /// How many read-modify-write rounds this store (and its clones) has
    /// made on the state file: each takes the file's lock once. A call
    /// through file-backed layers that share the store takes one round to
    /// be admitted, whatever the number of layers, and its bulkhead slot
    /// goes back with a later round (see
    /// [`release_delay`](FileStoreBuilder::release_delay)). For tests and
    /// diagnostics.
    pub fn lock_rounds(&self) -> u64 {
        self.inner.rounds.load(Relaxed)
    }

    /// Runs `f` on the file's state under `lock` and writes the result;
    /// when the file cannot be used, follows `policy`.
    fn round<R>(
        &self,
        lock: Lock,
        policy: Degrade,
        f: impl FnOnce(&mut State) -> R,
    ) -> Result<R, Unavailable> {
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("locking {}: {e}", self.inner.lock_path.display());
                return self.fallback(policy, msg, f);
            }
        };
        if lock.is_some() {
            self.rounds_add();
        }
        let before = match self.read_for_update() {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("reading {}: {e}", self.inner.path.display());
                return self.fallback(policy, msg, f);
            }
        };
        let mut state = before.clone();
        // This process's slots given back since its last round go first,
        // so `f` sees them free.
        let mut gave = self.inner.releases.take();
        gave.apply(&mut state);
        let r = f(&mut state);
        match self.commit(&before, state, policy) {
            Ok(true) => gave.written(),
            written => {
                gave.keep_listed(&before);
                written?;
            }
        }
        drop(lock);
        Ok(r)
    }

    /// Writes `state` if it differs from `before`, the state read under
    /// the lock still held; when the write fails, follows `policy`.
    /// `Ok(true)` when the file holds `state`, `Ok(false)` when only this
    /// process does (failing open).
    fn commit(
        &self,
        before: &State,
        mut state: State,
        policy: Degrade,
    ) -> Result<bool, Unavailable> {
        if state != *before {
            state.version = STATE_VERSION;
            state.updated_at = Some(unix_ms());
            if let Err(e) = self.write(&state) {
                let msg = format!("writing {}: {e}", self.inner.path.display());
                self.degraded(msg);
                return match policy {
                    // The change stands, in this process: the file's
                    // state with it becomes the local state.
                    Degrade::FailOpenToLocal => {
                        *lock_mutex(&self.inner.local) = state;
                        Ok(false)
                    }
                    Degrade::FailClosed => Err(Unavailable),
                };
            }
        }
        self.restored();
        Ok(true)
    }

    /// The file cannot be used: `f` runs on the local state, or not at all.
    fn fallback<R>(
        &self,
        policy: Degrade,
        error: String,
        f: impl FnOnce(&mut State) -> R,
    ) -> Result<R, Unavailable> {
        self.degraded(error);
        match policy {
            Degrade::FailOpenToLocal => Ok(f(&mut lock_mutex(&self.inner.local))),
            Degrade::FailClosed => Err(Unavailable),
        }
    }

    fn degraded(&self, error: String) {
        if !self.inner.degraded.swap(true, Relaxed) {
            self.emit(StoreEvent::Degraded {
                name: self.inner.name.clone(),
                policy: self.inner.degrade,
                error,
            });
        }
    }

    fn restored(&self) {
        if self.inner.degraded.load(Relaxed) && self.inner.degraded.swap(false, Relaxed) {
            self.emit(StoreEvent::Restored {
                name: self.inner.name.clone(),
            });
        }
    }

    // --- The lock --------------------------------------------------------

    fn ensure_dir(&self) -> io::Result<()> {
        let dir = self.inner.path.parent().unwrap_or(Path::new("."));
        if dir.as_os_str().is_empty() {
            return Ok(());
        }
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => return writable(&m, "directory"),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "the state directory's path is not a directory",
                ))
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)
    }

    /// One attempt at the advisory lock, never waiting.
    fn try_lock(&self) -> Locking {
        let file = match self
            .ensure_dir()
            .and_then(|()| open_private(&self.inner.lock_path, false))
        {
            Ok(f) => f,
            Err(e) => return Locking::Broken(e),
        };
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Locking::Locked(Held(file)),
            Err(fs4::TryLockError::WouldBlock) => Locking::Busy,
            Err(fs4::TryLockError::Error(e)) => Locking::Broken(e),
        }
    }

    fn lock_timed_out(&self) -> Lock {
        self.emit(StoreEvent::LockTimeout {
            name: self.inner.name.clone(),
            path: self.inner.path.clone(),
        });
        Ok(None)
    }

    /// One attempt at the lock while waiting for it: the outcome, or how
    /// long to wait before the next attempt (growing from 200 us to 5 ms,
    /// never past `lock_timeout` counted from `start`).
    fn lock_attempt(&self, start: Instant, pause: &mut Duration) -> Result<Lock, Duration> {
        match self.try_lock() {
            Locking::Locked(f) => return Ok(Ok(Some(f))),
            Locking::Broken(e) => return Ok(Err(e)),
            Locking::Busy => {}
        }
        // Wall-clock time: a peer's lock is held in real time, even when
        // the caller's tokio clock is paused.
        let left = self.inner.lock_timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(self.lock_timed_out());
        }
        let wait = (*pause).min(left);
        *pause = (*pause * 2).min(Duration::from_millis(5));
        Err(wait)
    }

    /// Takes the lock, sleeping this thread between attempts, or gives up
    /// after `lock_timeout` (`Ok(None)`: go ahead without it).
    fn lock_blocking(&self) -> Lock {
        let (start, mut pause) = (Instant::now(), Duration::from_micros(200));
        loop {
            match self.lock_attempt(start, &mut pause) {
                Ok(lock) => return lock,
                Err(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// [`lock_blocking`](Self::lock_blocking), waiting with tokio timers.
    async fn lock_async(&self) -> Lock {
        let mut wait = None;
        std::future::poll_fn(|cx| self.poll_lock(&mut wait, cx)).await
    }

    /// [`lock_async`](Self::lock_async) as a poll: `wait` is `None` before
    /// the first attempt and again once the lock is taken or given up.
    fn poll_lock(&self, wait: &mut Option<LockWait>, cx: &mut Context<'_>) -> Poll<Lock> {
        loop {
            let (start, mut pause) = match wait {
                Some(w) => {
                    ready!(w.sleep.as_mut().poll(cx));
                    (w.start, w.pause)
                }
                None => (Instant::now(), Duration::from_micros(200)),
            };
            match self.lock_attempt(start, &mut pause) {
                Ok(lock) => {
                    *wait = None;
                    return Poll::Ready(lock);
                }
                Err(d) => {
                    let at = tokio::time::Instant::now() + d;
                    match wait {
                        Some(w) => {
                            w.pause = pause;
                            w.sleep.as_mut().reset(at);
                        }
                        None => {
                            *wait = Some(LockWait {
                                start,
                                pause,
                                sleep: Box::pin(tokio::time::sleep_until(at)),
                            })
                        }
                    }
                }
            }
        }
    }

    // --- The file --------------------------------------------------------

    /// Reads the state for an update, setting a bad file aside.
    fn read_for_update(&self) -> io::Result<State> {
        let path = &self.inner.path;
        let reason = match read_file(path)? {
            None => return Ok(State::default()),
            Some(c) if c.read_only => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the state file is read-only",
                ))
            }
            Some(Contents { bytes: Err(r), .. }) => r,
            Some(Contents { bytes: Ok(b), .. }) => match parse(&b) {
                Ok(s) => return Ok(s),
                Err(r) => r,
            },
        };
        let kept = path.with_file_name(format!(
            "{}.corrupt-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
            unix_ms()
        ));
        let kept_at = fs::rename(path, &kept).ok().map(|()| kept);
        self.emit(StoreEvent::Recovered {
            name: self.inner.name.clone(),
            path: path.clone(),
            reason,
            kept_at,
        });
        Ok(State::default())
    }

    fn write(&self, state: &State) -> io::Result<()> {
        self.ensure_dir()?;
        let path = &self.inner.path;
        let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
        let tmp = path.with_file_name(format!(
            "{}{}.{}.tmp",
            self.tmp_prefix(),
            std::process::id(),
            self.inner.tmp_seq.fetch_add(1, Relaxed)
        ));
        let res = (|| {
            let mut f = open_private(&tmp, true)?;
            f.write_all(&bytes)?;
            // rename replaces a symbolic link at `path`, never its target.
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        self.sweep_tmp();
        res
    }

    fn tmp_prefix(&self) -> String {
        let file = self.inner.path.file_name().and_then(|n| n.to_str());
        format!(".{}.", file.unwrap_or("state"))
    }

    /// Removes temporary files that writers killed mid-write left behind:
    /// those of processes that ended, and any older than a minute. Done
    /// under the lock, by the first write of a store and then at most
    /// every few seconds.
    fn sweep_tmp(&self) {
        let now = unix_ms();
        let last = self.inner.swept_at.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < 5_000 {
            return;
        }
        self.inner.swept_at.store(now.max(1), Relaxed);
        let Some(dir) = self.inner.path.parent() else {
            return;
        };
        let Ok(entries) = fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) else {
            return;
        };
        let prefix = self.tmp_prefix();
        let me = std::process::id();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".tmp"))
            else {
                continue;
            };
            let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
            let old = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_millis() as u64 > TMP_GRACE_MS);
            let orphan = pid.is_some_and(|p| p != me && !alive(p, None));
            if old || orphan {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Runs a blocking wait off the async worker where tokio allows it (a
/// multi-threaded runtime), else right here.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `Err` if the owner may not write `m` (read as read-only whoever we
/// are, root included).
fn writable(m: &fs::Metadata, what: &str) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if m.permissions().mode() & 0o200 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the state {what} is read-only"),
            ));
        }
    }
    // Elsewhere a directory's read-only attribute says nothing about
    // writing in it: only a file's is taken at its word.
    #[cfg(not(unix))]
    if m.is_file() && m.permissions().readonly() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the state {what} is read-only"),
        ));
    }
    Ok(())
}

fn file_key(m: &fs::Metadata) -> FileKey {
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(m);
    #[cfg(not(unix))]
    let ino = 0;
    FileKey {
        ino,
        len: m.len(),
        mtime: m.modified().ok(),
    }
}

/// Opens (or creates) a file with mode 0600 without following a symbolic
/// link. `new` insists on creating it.
fn open_private(path: &Path, new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600).custom_flags(
            (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
        );
    }
    let f = o.open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// What [`read_file`] found.
struct Contents {
    /// The bytes, or why they were not read.
    bytes: Result<Vec<u8>, Recovery>,
    key: FileKey,
    /// The owner may not write the file.
    read_only: bool,
}

/// The file's bytes and identity, `None` if there is no file (or only a
/// symbolic link, which the next write replaces). Refuses anything but a
/// regular file, checked on the opened handle; the open never blocks, so
/// a FIFO cannot hang it. A file above [`MAX_FILE_SIZE`] is not read.
fn read_file(path: &Path) -> io::Result<Option<Contents>> {
    let mut o = OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut o,
        (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
    );
    let f = match o.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return if link { Ok(None) } else { Err(e) };
        }
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the state file's path is not a regular file",
        ));
    }
    let key = file_key(&meta);
    let read_only = writable(&meta, "file").is_err();
    if meta.len() > MAX_FILE_SIZE {
        return Ok(Some(Contents {
            bytes: Err(Recovery::TooLarge),
            key,
            read_only,
        }));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    let bytes = if bytes.len() as u64 > MAX_FILE_SIZE {
        Err(Recovery::TooLarge)
    } else {
        Ok(bytes)
    };
    Ok(Some(Contents {
        bytes,
        key,
        read_only,
    }))
}

fn parse(bytes: &[u8]) -> Result<State, Recovery> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Recovery::Truncated);
    }
    match serde_json::from_slice::<State>(bytes) {
        Ok(s) if s.version > STATE_VERSION => Err(Recovery::FutureVersion(s.version)),
        Ok(mut s) => {
            s.migrate();
            Ok(s)
        }
        Err(e) if e.is_eof() => Err(Recovery::Truncated),
        Err(_) => {
            // A newer schema may change field types: report its version if
            // one can be read.
            #[derive(serde::Deserialize)]
            struct V {
                version: u32,
            }
            match serde_json::from_slice::<V>(bytes) {
                Ok(v) if v.version > STATE_VERSION => Err(Recovery::FutureVersion(v.version)),
                _ => Err(Recovery::Corrupt),
            }
        }
    }
}

/// The current wall-clock time in Unix nanoseconds: shared state is
/// compared across processes.
#[cfg(feature = "rate-limit")]
fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The retry time a rate limiter answers while it fails closed.
#[cfg(feature = "rate-limit")]
const CLOSED_RETRY: Duration = Duration::from_secs(1);

/// A rate limit kept in a [`FileStore`]: made by
/// [`FileStore::rate_limiter`] (feature `rate-limit`).
///
/// It is the same GCRA as the in-memory limiter's, over the TAT the file
/// keeps for its name.
#[cfg(feature = "rate-limit")]
#[derive(Debug, Clone)]
pub struct FileRateLimiter {
    store: FileStore,
    name: Arc<str>,
    params: crate::rate_limit::gcra::Params,
}

#[cfg(feature = "rate-limit")]
impl FileRateLimiter {
    /// A span on this limiter's state file (see `FileStore::span`).
    pub(crate) fn span(&self) -> Span {
        self.store.span()
    }

    /// The same limiter on the entry of `name` (by default the unnamed
    /// entry, `""`). Limiters of different names are independent.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Arc::from(name.into());
        self
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn decide(&self, s: &mut State, now: u64, inc: u64) -> Result<(), Duration> {
        let e = s.rate_limits.entry(self.name.to_string()).or_default();
        e.acquire(now, inc, &self.params)
            .map_err(Duration::from_nanos)
    }

    fn increment(&self, cost: f64) -> Result<u64, Duration> {
        self.params.increment(cost).ok_or(Duration::MAX)
    }

    /// Takes `cost` tokens, or says how long until they would be there (or
    /// until a `Retry-After` block ends). A cost that can never be met
    /// (above the bucket, negative, NaN) answers `Duration::MAX`. Waits
    /// for the file lock on this thread.
    pub fn try_acquire(&self, cost: f64) -> Result<(), Duration> {
        let inc = self.increment(cost)?;
        let r = self
            .store
            .round_blocking(|s| self.decide(s, unix_ns(), inc));
        r.unwrap_or(Err(CLOSED_RETRY))
    }

    /// [`try_acquire`](Self::try_acquire) at the Unix time `now` (nanos).
    #[cfg(test)]
    fn try_acquire_at(&self, cost: f64, now: u64) -> Result<(), Duration> {
        let inc = self.increment(cost)?;
        let r = self.store.round_blocking(|s| self.decide(s, now, inc));
        r.unwrap_or(Err(CLOSED_RETRY))
    }

    /// [`try_acquire`](Self::try_acquire) if the lock is free now; `None`
    /// if a peer holds it.
    pub(crate) fn try_acquire_now(&self, cost: f64) -> Option<Result<(), Duration>> {
        let inc = match self.increment(cost) {
            Ok(inc) => inc,
            Err(d) => return Some(Err(d)),
        };
        match self.store.try_round(|s| self.decide(s, unix_ns(), inc)) {
            Ok(r) => Some(r.unwrap_or(Err(CLOSED_RETRY))),
            Err(_) => None,
        }
    }

    /// [`try_acquire`](Self::try_acquire), waiting for the lock with tokio
    /// timers; once taken, the round stays open (the returned span) so
    /// that the updates made until the span drops (the admissions of the
    /// layers below, called next) join it.
    pub(crate) async fn acquire_spanned(&self, cost: f64) -> (Result<(), Duration>, Option<Span>) {
        let inc = match self.increment(cost) {
            Ok(inc) => inc,
            Err(d) => return (Err(d), None),
        };
        let lock = self.store.lock_async().await;
        let (r, span) = self
            .store
            .round_spanned(lock, |s| self.decide(s, unix_ns(), inc));
        (r.unwrap_or(Err(CLOSED_RETRY)), Some(span))
    }

    /// Tokens available now.
    pub fn tokens(&self) -> f64 {
        let now = unix_ns();
        let r = self.store.view(|s| match s.rate_limits.get(&*self.name) {
            Some(e) => e.tokens(now, &self.params),
            None => RateLimitEntry::default().tokens(now, &self.params),
        });
        r.unwrap_or(0.0)
    }

    /// Admits nothing for `d` (an upstream's `Retry-After`) in every
    /// process; from then the bucket refills from one request's worth, as
    /// the in-memory limiter does. A longer block is kept.
    pub fn set_retry_after(&self, d: Duration) {
        let until = unix_ns().saturating_add(crate::clock::nanos(d));
        let inc = self.params.increment(1.0).unwrap_or(self.params.tau);
        let _ = self.store.round_blocking(|s| {
            let e = s.rate_limits.entry(self.name.to_string()).or_default();
            e.block_until(until, inc, &self.params);
        });
    }

    /// [`set_retry_after`](Self::set_retry_after) from a response future:
    /// applied now if the lock is free, else on tokio's blocking pool, so
    /// the caller's runtime never waits for a peer's lock.
    pub(crate) fn set_retry_after_detached(&self, d: Duration) {
        let until = unix_ns().saturating_add(crate::clock::nanos(d));
        let p = self.params;
        let inc = p.increment(1.0).unwrap_or(p.tau);
        let name = self.name.clone();
        self.store.round_detached(move |s| {
            let e = s.rate_limits.entry(name.to_string()).or_default();
            e.block_until(until, inc, &p);
        });
    }

    /// Refills the bucket and lifts any block.
    pub fn reset(&self) {
        let _ = self.store.round_blocking(|s| {
            s.rate_limits.remove(&*self.name);
        });
    }
}

/// A bulkhead kept in a [`FileStore`]: made by [`FileStore::bulkhead`].
#[derive(Debug, Clone)]
pub struct FileBulkhead {
    store: FileStore,
    name: Arc<str>,
    max: u32,
}

impl FileBulkhead {
    /// A span on this bulkhead's state file (see `FileStore::span`).
    pub(crate) fn span(&self) -> Span {
        self.store.span()
    }

    /// The same bulkhead on the entry of `name` (by default the unnamed
    /// entry, `""`). Bulkheads of different names are independent.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Arc::from(name.into());
        self
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn stale_ms(&self) -> u64 {
        u64::try_from(self.store.slot_timeout().as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes a slot if one is free across all processes. The slot is
    /// given back when the returned guard drops; if the process dies
    /// first, the next process to look reclaims it. Waits for the file
    /// lock on this thread. While the store fails closed, `None`.
    pub fn try_acquire(&self) -> Option<FileSlot> {
        let (holder, claim) = self.claim();
        let taken = self.store.round_blocking(claim);
        self.slot(holder, taken)
    }

    /// [`try_acquire`](Self::try_acquire) if the lock is free now;
    /// `Err(())` if a peer holds it.
    pub(crate) fn try_acquire_now(&self) -> Result<Option<FileSlot>, ()> {
        let (holder, claim) = self.claim();
        match self.store.try_round(claim) {
            Ok(taken) => Ok(self.slot(holder, taken)),
            Err(_) => Err(()),
        }
    }

    /// [`try_acquire`](Self::try_acquire), waiting for the lock with tokio
    /// timers.
    pub(crate) async fn acquire_async(&self) -> Option<FileSlot> {
        let (holder, claim) = self.claim();
        let taken = self.store.round_async(claim).await;
        self.slot(holder, taken)
    }

    /// A new holder record for this process, and the update that takes a
    /// slot for it (after reclaiming those of holders that ended or went
    /// stale).
    fn claim(&self) -> (Holder, impl FnOnce(&mut State) -> bool + '_) {
        let me = me();
        let now = unix_ms();
        let stale = self.stale_ms();
        let holder = Holder {
            pid: me.pid,
            start: me.start,
            since: now,
            id: fastrand::u64(..),
        };
        let claim = move |s: &mut State| {
            let e = s.bulkheads.entry(self.name.to_string()).or_default();
            e.reclaim(now, stale, |h| alive(h.pid, h.start));
            e.acquire(self.max, holder)
        };
        (holder, claim)
    }

    fn slot(&self, holder: Holder, taken: Result<bool, Unavailable>) -> Option<FileSlot> {
        if taken != Ok(true) {
            return None;
        }
        // Taken from this process's local state when the file could not
        // be written: only there is it given back.
        let local = lock_mutex(&self.store.inner.local)
            .bulkheads
            .get(&*self.name)
            .is_some_and(|e| e.holders.iter().any(|h| h.id == holder.id));
        Some(FileSlot {
            store: self.store.clone(),
            name: self.name.clone(),
            id: holder.id,
            in_file: !local,
        })
    }

    /// Slots held by live processes, read without the lock; the slots
    /// this process gave back and has not yet written count as free.
    pub fn in_use(&self) -> u32 {
        let now = unix_ms();
        let stale = self.stale_ms();
        let releases = &self.store.inner.releases;
        let n = self.store.view(|s| {
            s.bulkheads.get(&*self.name).map_or(0, |e| {
                e.holders
                    .iter()
                    .filter(|h| {
                        now.saturating_sub(h.since) < stale
                            && alive(h.pid, h.start)
                            && !releases.queued(&self.name, h.id)
                    })
                    .count()
            })
        });
        n.map_or(self.max, |n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Free slots, in `[0, max_concurrent]`.
    pub fn available(&self) -> u32 {
        self.max.saturating_sub(self.in_use())
    }
}

/// A bulkhead slot held in a state file; dropping it gives the slot back.
///
/// Calls in this process see the slot free at once; the file has it free
/// by this process's next round on it, or within the store's
/// [`release_delay`](FileStoreBuilder::release_delay).
#[derive(Debug)]
pub struct FileSlot {
    store: FileStore,
    name: Arc<str>,
    id: u64,
    /// Taken in the file (else in the local state only).
    in_file: bool,
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        // The local state may hold it too (copied there when a write
        // failed); releasing an id a state does not hold does nothing.
        if let Some(e) = lock_mutex(&self.store.inner.local)
            .bulkheads
            .get_mut(&*self.name)
        {
            e.release(self.id);
        }
        if self.in_file {
            self.store.give_back(Release {
                name: self.name.clone(),
                id: self.id,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_classifies_bad_files() {
        assert_eq!(parse(b""), Err(Recovery::Truncated));
        assert_eq!(
            parse(b"{\"version\":1,\"circuit_"),
            Err(Recovery::Truncated)
        );
        assert_eq!(parse(b"not json"), Err(Recovery::Corrupt));
        assert_eq!(parse(b"{\"version\":7}"), Err(Recovery::FutureVersion(7)));
        assert_eq!(
            parse(b"{\"version\":3,\"breakers\":\"new shape\"}"),
            Err(Recovery::FutureVersion(3))
        );
        assert!(parse(b"{\"version\":1}").is_ok());
        assert!(parse(b"{\"version\":2}").is_ok());
    }

    /// Slots taken in a span whose write then failed (the directory made
    /// read-only after the span read the file) are not in the file: their
    /// give-backs are dropped by the next failed write rather than queued
    /// again, so the queue stays bounded however long writes keep failing.
    #[cfg(unix)]
    #[test]
    fn give_backs_of_slots_the_file_never_had_do_not_pile_up() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::builder().dir(dir.path()).build().unwrap();
        store.update(|s| s.updated_at = Some(1));
        let mode = |m| fs::set_permissions(dir.path(), fs::Permissions::from_mode(m)).unwrap();
        let b = store.bulkhead(1).unwrap().named("api");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..50 {
                let slot = {
                    let span = b.span();
                    assert!(span.open.is_some());
                    mode(0o500);
                    b.try_acquire_now().unwrap().unwrap()
                };
                mode(0o700);
                drop(slot);
                assert!(store.inner.releases.len() <= 1);
            }
        });
        assert!(store.is_degraded());
        store.flush();
        assert_eq!(store.inner.releases.len(), 0);
        let file = FileStore::builder().dir(dir.path()).build().unwrap().load();
        assert!(file
            .bulkheads
            .get("api")
            .is_none_or(|e| e.holders.is_empty()));
    }

    #[cfg(feature = "rate-limit")]
    mod same_verdicts {
        use std::time::Duration;

        use proptest::prelude::*;
        use tower::{service_fn, Service, ServiceExt};

        use crate::rate_limit::{RateLimitLayer, RateLimited};
        use crate::ClockSource;

        use super::super::FileStore;

        /// A call `after` the previous one, costing `cost` tokens.
        #[derive(Debug, Clone)]
        struct Step {
            after: Duration,
            cost: f64,
        }

        fn steps() -> impl Strategy<Value = Vec<Step>> {
            let step =
                (0u64..3_000, prop_oneof![Just(1.0), 0.5f64..4.0]).prop_map(|(ms, cost)| Step {
                    after: Duration::from_millis(ms),
                    cost,
                });
            prop::collection::vec(step, 1..40)
        }

        /// The in-memory limiter, on tokio's paused clock.
        fn memory(max: f64, rate: f64, steps: &[Step]) -> Vec<Result<(), Duration>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let layer = RateLimitLayer::builder()
                    .max_tokens(max)
                    .refill_rate(rate)
                    .clock(ClockSource::Tokio)
                    .cost(|c: &f64| *c)
                    .build()
                    .unwrap();
                let mut svc = tower::Layer::layer(
                    &layer,
                    service_fn(|_: f64| async { Ok::<_, crate::BoxError>(()) }),
                );
                let mut out = Vec::new();
                for s in steps {
                    tokio::time::advance(s.after).await;
                    let r = svc.ready().await.unwrap().call(s.cost).await;
                    out.push(r.map_err(|e| e.downcast_ref::<RateLimited>().unwrap().retry_after()));
                }
                out
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// The file backend runs the memory backend's GCRA: the same
            /// calls at the same times get the same answers, retry times
            /// included.
            #[test]
            fn file_and_memory_admit_the_same_calls(
                max in 1.0f64..10.0,
                rate in 0.1f64..5.0,
                steps in steps(),
            ) {
                let max = max.max(4.0);
                let want = memory(max, rate, &steps);
                let dir = tempfile::tempdir().unwrap();
                let store = FileStore::builder().dir(dir.path()).build().unwrap();
                let file = store.rate_limiter(max, rate).unwrap().named("p");
                let mut now = 1_700_000_000_000_000_000u64;
                let got: Vec<_> = steps
                    .iter()
                    .map(|s| {
                        now += s.after.as_nanos() as u64;
                        file.try_acquire_at(s.cost, now)
                    })
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
