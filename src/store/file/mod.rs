//! State shared across processes through a JSON file (feature
//! `file-store`): a CLI whose every invocation is a new process still has
//! one breaker, one token bucket and one bulkhead.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_bulwark::store::file::FileStore;
//!
//! // ~/.cache/mycli/resilience/state.json on Linux
//! let store = FileStore::builder().app("mycli").build()?;
//! let bucket = store.rate_limiter(50.0, 10.0)?;
//! match bucket.try_acquire(1.0) {
//!     Ok(()) => { /* call the API */ }
//!     Err(wait) => eprintln!("rate limited, retry in {wait:?}"),
//! }
//! let bulkhead = store.bulkhead(10)?;
//! if let Some(_slot) = bulkhead.try_acquire() {
//!     // at most 10 of these run at once across every process
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Pass the store to `CircuitBreakerBuilder::backend` to share a breaker.
//!
//! # The file
//!
//! One file per scope: `<dir>/state.json`, or `<dir>/<scope>.json` with
//! [`scope`](FileStoreBuilder::scope). `dir` defaults to the user's cache
//! directory, `<cache>/<app>/resilience`. The file holds `"version": 1`
//! and the [`State`] fields (times in Unix milliseconds):
//!
//! ```json
//! {"version":1,
//!  "circuit_breaker":{"state":"open","failures":0,"successes":0,
//!    "half_open_attempts":0,"half_open_pids":[],"half_open_last_attempt_at":null,
//!    "last_failure_at":1732500000000,"opened_at":1732500000000,
//!    "open_until":1732500030000,"generation":3},
//!  "rate_limiter":{"tokens":41.5,"last_refill_at":1732500000000,"retry_after_until":null},
//!  "bulkhead":{"active_pids":[4242]},
//!  "updated_at":1732500000000}
//! ```
//!
//! # Concurrency and failure
//!
//! - Every change is a read-modify-write under an advisory lock on
//!   `<file>.lock`, held for that step only, never around the wrapped
//!   call. If the lock is not won within `lock_timeout` (100 ms) the
//!   update goes ahead without it (fail-open: a CLI must not hang on a
//!   stuck peer) and a [`StoreEvent::LockTimeout`] is emitted.
//! - Writes go to a temporary file in the same directory, then `rename`
//!   over the state file: a reader sees the old state or the new one,
//!   never half of one. Files are created with mode 0600, the directory
//!   with 0700, and a symbolic link at the state file's path is never
//!   followed.
//! - A corrupt, truncated or future-version file is moved aside to
//!   `<file>.corrupt-<ms>` and the state starts afresh, with a
//!   [`StoreEvent::Recovered`]: never a crash.
//! - Reads that need no change (a closed breaker's admission) take no lock
//!   and reuse the parsed file while its inode, size and modification time
//!   are unchanged.
//! - Bulkhead slots and half-open probes are owned by PIDs: those of dead
//!   processes are reclaimed on the next update. A probe reservation older
//!   than the breaker's `stale_attempt_timeout` (2 min) is reclaimed too,
//!   which covers a hung process or a reused PID.

mod state;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use state::{
    BreakerEntry, BreakerState, BucketState, BulkheadState, Phase, ProbeHolder, State,
    STATE_VERSION,
};

pub(crate) use state::BucketCfg;

use super::{unix_ms, Recovery, StoreEvent};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "file_store";

/// A scope's state file, shared by every clone.
///
/// Made with [`FileStore::builder`]. Cheap to clone.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    path: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
    listeners: Listeners<StoreEvent>,
    cache: Mutex<Option<Cached>>,
    tmp_seq: AtomicU64,
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

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("lock_timeout", &self.inner.lock_timeout)
            .finish_non_exhaustive()
    }
}

/// Configures a [`FileStore`].
pub struct FileStoreBuilder {
    dir: Option<PathBuf>,
    app: String,
    scope: Option<String>,
    lock_timeout: Duration,
    listeners: Listeners<StoreEvent>,
}

impl fmt::Debug for FileStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStoreBuilder")
            .field("dir", &self.dir)
            .field("app", &self.app)
            .field("scope", &self.scope)
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// A builder: the state file `<cache>/bulwark/resilience/state.json`,
    /// a 100 ms lock timeout.
    pub fn builder() -> FileStoreBuilder {
        FileStoreBuilder {
            dir: None,
            app: "bulwark".to_owned(),
            scope: None,
            lock_timeout: Duration::from_millis(100),
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

    /// Calls `f` on every [`StoreEvent`] (lock timeouts, recoveries).
    pub fn on_event(mut self, f: impl Fn(&StoreEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the store. Nothing is
    /// written until the first update.
    pub fn build(self) -> Result<FileStore, ConfigError> {
        let check = Check { layer: LAYER };
        check.non_zero_duration("lock_timeout", self.lock_timeout)?;
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
            inner: Arc::new(Inner {
                name: Arc::from(self.scope.as_deref().unwrap_or("state")),
                lock_path: dir.join(format!("{file}.lock")),
                path,
                lock_timeout: self.lock_timeout,
                listeners: self.listeners,
                cache: Mutex::new(None),
                tmp_seq: AtomicU64::new(0),
            }),
        })
    }
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

    /// The state as the file holds it now, without taking the lock. A
    /// missing or unreadable file reads as the initial state (it is
    /// recovered by the next [`update`](Self::update)).
    pub fn load(&self) -> State {
        self.view(Clone::clone)
    }

    /// Reads the file through the cache: parsed again only when its inode,
    /// size or modification time changed.
    pub(crate) fn view<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let key = match fs::symlink_metadata(&self.inner.path) {
            Ok(m) if m.file_type().is_file() => file_key(&m),
            _ => return f(&State::default()),
        };
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.key == key) {
            return f(&c.state);
        }
        let state = match read_file(&self.inner.path) {
            Ok(Some((bytes, key))) => match parse(&bytes) {
                Ok(s) => {
                    *cache = Some(Cached {
                        key,
                        state: s.clone(),
                    });
                    s
                }
                Err(_) => State::default(),
            },
            _ => State::default(),
        };
        f(&state)
    }

    /// Reads, changes and writes the state under the file lock. `f` sees
    /// the current state (recovered if the file was bad) and may change
    /// it; the file is written only if it did.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let _lock = self.lock();
        let before = self.read_for_update();
        let mut state = before.clone();
        let r = f(&mut state);
        if state != before {
            state.version = STATE_VERSION;
            state.updated_at = Some(unix_ms());
            if let Err(e) = self.write(&state) {
                self.io_error(format!("writing {}: {e}", self.inner.path.display()));
            }
        }
        r
    }

    /// Removes the state file: every primitive of the scope starts afresh.
    pub fn clear(&self) -> io::Result<()> {
        let _lock = self.lock();
        *self.inner.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match fs::remove_file(&self.inner.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A token bucket of `max_tokens` refilled at `refill_rate` tokens per
    /// second, kept in this file.
    pub fn rate_limiter(
        &self,
        max_tokens: f64,
        refill_rate: f64,
    ) -> Result<FileRateLimiter, ConfigError> {
        let check = Check { layer: LAYER };
        check.positive("max_tokens", max_tokens)?;
        check.positive("refill_rate", refill_rate)?;
        Ok(FileRateLimiter {
            store: self.clone(),
            cfg: BucketCfg {
                max_tokens,
                refill_rate,
            },
        })
    }

    /// A bulkhead of `max_concurrent` slots shared by every process, kept
    /// in this file.
    pub fn bulkhead(&self, max_concurrent: u32) -> Result<FileBulkhead, ConfigError> {
        Check { layer: LAYER }.at_least_one("max_concurrent", u64::from(max_concurrent))?;
        Ok(FileBulkhead {
            store: self.clone(),
            max: max_concurrent,
        })
    }

    /// Reads breaker `name`'s entry (a missing one reads as new).
    pub(crate) fn read_breaker<R>(&self, name: &str, f: impl FnOnce(&BreakerEntry) -> R) -> R {
        self.view(|s| match s.breakers.get(name) {
            Some(e) => f(e),
            None => f(&BreakerEntry::default()),
        })
    }

    /// Changes breaker `name`'s entry under the file lock.
    pub(crate) fn update_breaker<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut BreakerEntry) -> R,
    ) -> R {
        self.update(|s| f(s.breakers.entry(name.to_owned()).or_default()))
    }

    pub(crate) fn emit(&self, event: StoreEvent) {
        self.inner.listeners.emit(&event);
    }

    fn io_error(&self, error: String) {
        self.emit(StoreEvent::IoError {
            name: self.inner.name.clone(),
            error,
        });
    }

    fn ensure_dir(&self) -> io::Result<()> {
        let dir = self.inner.path.parent().unwrap_or(Path::new("."));
        if dir.as_os_str().is_empty() || dir.is_dir() {
            return Ok(());
        }
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)
    }

    /// Takes the advisory lock, or gives up after the timeout (fail-open).
    fn lock(&self) -> Option<File> {
        let file = match self
            .ensure_dir()
            .and_then(|()| open_private(&self.inner.lock_path, false))
        {
            Ok(f) => f,
            Err(e) => {
                self.io_error(format!("opening {}: {e}", self.inner.lock_path.display()));
                return None;
            }
        };
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => return Some(file),
                Err(fs4::TryLockError::WouldBlock) => {}
                Err(fs4::TryLockError::Error(e)) => {
                    self.io_error(format!("locking {}: {e}", self.inner.lock_path.display()));
                    return None;
                }
            }
            let left = self.inner.lock_timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                self.emit(StoreEvent::LockTimeout {
                    name: self.inner.name.clone(),
                    path: self.inner.path.clone(),
                });
                return None;
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Reads the state for an update, recovering a bad file.
    fn read_for_update(&self) -> State {
        let path = &self.inner.path;
        let bytes = match read_file(path) {
            Ok(Some((bytes, _))) => bytes,
            Ok(None) => return State::default(),
            Err(e) => {
                self.io_error(format!("reading {}: {e}", path.display()));
                return State::default();
            }
        };
        match parse(&bytes) {
            Ok(s) => s,
            Err(reason) => {
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
                State::default()
            }
        }
    }

    fn write(&self, state: &State) -> io::Result<()> {
        self.ensure_dir()?;
        let path = &self.inner.path;
        let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
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
        res
    }
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
        o.mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    o.open(path)
}

/// The file's bytes and identity, `None` if it does not exist. A symbolic
/// link is refused.
fn read_file(path: &Path) -> io::Result<Option<(Vec<u8>, FileKey)>> {
    let mut o = OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut o,
        rustix::fs::OFlags::NOFOLLOW.bits() as i32,
    );
    let mut f = match o.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let key = file_key(&f.metadata()?);
    let mut bytes = Vec::with_capacity(key.len as usize);
    f.read_to_end(&mut bytes)?;
    Ok(Some((bytes, key)))
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

/// This process's id, as the file records slot owners.
pub(crate) fn pid() -> u32 {
    std::process::id()
}

/// Whether process `pid` is still running. A process we may not signal
/// is alive; on platforms without a check every process is.
pub(crate) fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// A token bucket kept in a [`FileStore`]: made by
/// [`FileStore::rate_limiter`].
#[derive(Debug, Clone)]
pub struct FileRateLimiter {
    store: FileStore,
    cfg: BucketCfg,
}

impl FileRateLimiter {
    /// Takes `cost` tokens, or says how long until they would be there (or
    /// until a `Retry-After` block ends).
    pub fn try_acquire(&self, cost: f64) -> Result<(), Duration> {
        let cfg = self.cfg;
        self.store
            .update(|s| s.rate_limiter.take(&cfg, cost, unix_ms()))
    }

    /// Tokens available now.
    pub fn tokens(&self) -> f64 {
        let cfg = self.cfg;
        self.store
            .view(|s| s.rate_limiter.available(&cfg, unix_ms()))
    }

    /// Admits nothing for `d` (an upstream's `Retry-After`) in every
    /// process. A longer block is kept.
    pub fn set_retry_after(&self, d: Duration) {
        let until = unix_ms().saturating_add(d.as_millis() as u64);
        self.store.update(|s| s.rate_limiter.block_until(until));
    }

    /// Refills the bucket and lifts any block.
    pub fn reset(&self) {
        self.store
            .update(|s| s.rate_limiter = BucketState::default());
    }
}

/// A bulkhead kept in a [`FileStore`]: made by [`FileStore::bulkhead`].
#[derive(Debug, Clone)]
pub struct FileBulkhead {
    store: FileStore,
    max: u32,
}

impl FileBulkhead {
    /// Takes a slot if one is free across all processes. The slot is
    /// given back when the returned guard drops; if the process dies
    /// first, the next process to look reclaims it.
    pub fn try_acquire(&self) -> Option<FileSlot> {
        let (max, pid) = (self.max, pid());
        self.store
            .update(|s| s.bulkhead.acquire(max, pid, alive))
            .then(|| FileSlot {
                store: self.store.clone(),
            })
    }

    /// Slots held by live processes (reclaiming those of dead ones).
    pub fn in_use(&self) -> u32 {
        self.store.update(|s| {
            s.bulkhead.reclaim(alive);
            s.bulkhead.active_pids.len() as u32
        })
    }

    /// Free slots, in `[0, max_concurrent]`.
    pub fn available(&self) -> u32 {
        self.max.saturating_sub(self.in_use())
    }
}

/// A bulkhead slot held in a state file; dropping it gives the slot back.
#[derive(Debug)]
pub struct FileSlot {
    store: FileStore,
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        let pid = pid();
        self.store.update(|s| s.bulkhead.release(pid));
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

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(pid()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = child.id();
        child.wait().unwrap();
        assert!(!alive(id));
    }
}
