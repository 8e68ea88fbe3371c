//! The file store across real processes: this test binary re-executes
//! itself (the `child` test, selected with `BULWARK_CHILD`) so several
//! processes hammer one state file.
#![cfg(all(feature = "file-store", feature = "circuit-breaker"))]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "support/breaker_call.rs"]
mod breaker_call;
use breaker_call::call;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_bulwark::store::file::{BreakerEntry, FileRateLimiter, FileStore, State};
use tower_bulwark::store::{Recovery, StoreEvent};

#[path = "support/child.rs"]
mod child_process;
use child_process::{outputs, spawn_child, wait_ready, DIR, ROLE};

fn store(dir: &Path) -> FileStore {
    // A generous lock timeout: these tests check the locking, not the
    // fail-open path (tested on its own below).
    FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The body of every child process. A no-op in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let store = store(&dir);
    match role.as_str() {
        "bucket" => {
            // Effectively no refill while the test runs.
            let bucket = store.rate_limiter(25.0, 1e-6).unwrap();
            let admitted = (0..40).filter(|_| bucket.try_acquire(1.0).is_ok()).count();
            println!("OUT {admitted}");
        }
        "hold_slot" => {
            let _slot = store.bulkhead(1).unwrap().try_acquire().unwrap();
            println!("OUT ready");
            std::thread::sleep(Duration::from_secs(600));
        }
        "breaker_fail" | "breaker_call" | "hold_probe" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(breaker_child(&role, store));
        }
        other => panic!("unknown role {other}"),
    }
}

fn breaker(store: FileStore) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(3)
        .backend(store)
        .build()
        .unwrap()
}

async fn breaker_child(role: &str, store: FileStore) {
    let layer = breaker(store);
    match role {
        "breaker_fail" => {
            let r = call(&layer, true).await;
            println!("OUT {r:?}");
        }
        "breaker_call" => {
            let r = call(&layer, false).await;
            println!("OUT {r:?}");
        }
        "hold_probe" => {
            // A probe that never finishes: the process dies holding it.
            let svc = ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(|()| std::future::pending::<Result<(), &str>>()));
            let fut = svc.oneshot(());
            tokio::pin!(fut);
            assert!(futures::poll!(&mut fut).is_pending());
            println!("OUT ready");
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        _ => unreachable!(),
    }
}

#[test]
fn breaker_opened_by_some_processes_rejects_in_another() {
    let dir = tempfile::tempdir().unwrap();
    // Three processes fail once each: together they reach the threshold.
    for _ in 0..3 {
        let out = outputs(spawn_child("breaker_fail", dir.path()));
        assert_eq!(out, ["Some(false)"]);
    }
    let b = api(&store(dir.path()));
    assert_eq!(b.state, CircuitState::Open.code());
    // A fourth process is rejected without calling the upstream.
    assert_eq!(outputs(spawn_child("breaker_call", dir.path())), ["None"]);
    let handle = breaker(store(dir.path())).handle();
    assert_eq!(handle.state(), CircuitState::Open);
    // A reset in this process closes it for every process.
    handle.reset();
    assert_eq!(
        outputs(spawn_child("breaker_call", dir.path())),
        ["Some(true)"]
    );
}

#[tokio::test]
async fn killed_process_half_open_probe_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    // Open, with the open period already over: the next call probes.
    s.update(|st| {
        let b = st.breakers.entry("api".into()).or_default();
        b.state = CircuitState::Open.code();
        b.open_until = 0;
    });
    let mut child = spawn_child("hold_probe", dir.path());
    wait_ready(&mut child);
    let b = api(&s);
    assert_eq!(
        (b.state, b.probes.iter().map(|p| p.pid).collect::<Vec<_>>()),
        (CircuitState::HalfOpen.code(), vec![child.id()])
    );
    let layer = breaker(s.clone());
    assert_eq!(
        call(&layer, false).await,
        None,
        "the child holds the only probe"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The dead child's probe is reclaimed: this process probes (and one
    // more success closes the breaker).
    assert_eq!(call(&layer, false).await, Some(true));
    assert_eq!(call(&layer, false).await, Some(true));
    assert_eq!(layer.handle().state(), CircuitState::Closed);
}

#[test]
fn bucket_never_over_admits_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4).map(|_| spawn_child("bucket", dir.path())).collect();
    let total: usize = children
        .into_iter()
        .map(|c| outputs(c)[0].parse::<usize>().unwrap())
        .sum();
    assert_eq!(total, 25, "4 processes x 40 calls share one bucket of 25");
    let bucket = store(dir.path()).rate_limiter(25.0, 1e-6).unwrap();
    assert!(bucket.tokens() < 1.0);
    assert!(store(dir.path()).load().rate_limits[""].tat > 0);
}

#[test]
fn killed_process_bulkhead_slot_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child("hold_slot", dir.path());
    wait_ready(&mut child);
    let bulkhead = store(dir.path()).bulkhead(1).unwrap();
    assert!(bulkhead.try_acquire().is_none(), "the child holds the slot");
    assert_eq!(holders(&store(dir.path())), vec![child.id()]);
    child.kill().unwrap();
    child.wait().unwrap();
    let slot = bulkhead
        .try_acquire()
        .expect("the dead child's slot is reclaimed");
    assert_eq!(holders(&store(dir.path())), vec![std::process::id()]);
    drop(slot);
    assert_eq!(bulkhead.available(), 1);
}

/// Whole tokens left (the refill while a test runs is far below one).
fn tokens(bucket: &FileRateLimiter) -> u32 {
    bucket.tokens().floor() as u32
}

/// The PIDs holding slots of the unnamed bulkhead.
fn holders(store: &FileStore) -> Vec<u32> {
    let state = store.load();
    state
        .bulkheads
        .get("")
        .map(|b| b.holders.iter().map(|h| h.pid).collect())
        .unwrap_or_default()
}

fn recording_store(dir: &Path) -> (FileStore, Arc<Mutex<Vec<StoreEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let store = FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_millis(20))
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    (store, events)
}

#[test]
fn bad_files_are_recovered_and_kept_aside() {
    let cases: [(&[u8], Recovery); 4] = [
        (b"{ this is not json", Recovery::Corrupt),
        (
            b"{\"version\":1,\"rate_limiter\":{\"tok",
            Recovery::Truncated,
        ),
        (b"", Recovery::Truncated),
        (
            b"{\"version\":9,\"rate_limiter\":[]}",
            Recovery::FutureVersion(9),
        ),
    ];
    for (content, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (store, events) = recording_store(dir.path());
        std::fs::write(store.path(), content).unwrap();
        // Reading never fails: a bad file reads as the initial state.
        assert_eq!(store.load(), State::default());
        let bucket = store.rate_limiter(2.0, 1e-6).unwrap();
        assert!(bucket.try_acquire(1.0).is_ok());
        let events = events.lock().unwrap();
        let [StoreEvent::Recovered {
            reason, kept_at, ..
        }] = events.as_slice()
        else {
            panic!("expected one recovery, got {events:?}");
        };
        assert_eq!(*reason, want);
        let kept = kept_at.as_ref().expect("the bad file is kept");
        assert_eq!(std::fs::read(kept).unwrap(), content);
        // The file is valid again, with the call recorded.
        assert_eq!(tokens(&bucket), 1);
        assert_eq!(store.load().version, 2);
    }
}

#[test]
fn lock_timeout_fails_open_with_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let (store, events) = recording_store(dir.path());
    let bucket = store.rate_limiter(5.0, 1e-6).unwrap();
    assert!(bucket.try_acquire(1.0).is_ok()); // creates the files
    let lock_path = format!("{}.lock", store.path().display());
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock_path)
        .unwrap();
    fs4::FileExt::try_lock(&held).unwrap();
    // The lock is held elsewhere: the update goes ahead after the timeout.
    assert!(bucket.try_acquire(1.0).is_ok());
    assert!(
        matches!(
            events.lock().unwrap().as_slice(),
            [StoreEvent::LockTimeout { .. }]
        ),
        "{events:?}"
    );
    assert_eq!(tokens(&bucket), 3);
    fs4::FileExt::unlock(&held).unwrap();
    assert!(bucket.try_acquire(1.0).is_ok());
    assert_eq!(events.lock().unwrap().len(), 1);
}

#[cfg(unix)]
#[test]
fn file_is_private_and_symlinks_are_not_followed() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir.path().join("nested"));
    let bucket = store.rate_limiter(5.0, 1e-6).unwrap();
    bucket.try_acquire(1.0).unwrap();
    let mode = std::fs::metadata(store.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(dir.path().join("nested"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    // A link planted at the state file's path: its target is never read
    // or written; the link itself is replaced.
    let target = dir.path().join("precious");
    std::fs::write(&target, b"do not touch").unwrap();
    std::fs::remove_file(store.path()).unwrap();
    std::os::unix::fs::symlink(&target, store.path()).unwrap();
    assert_eq!(store.load(), State::default());
    bucket.try_acquire(1.0).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"do not touch");
    assert!(std::fs::symlink_metadata(store.path())
        .unwrap()
        .file_type()
        .is_file());
}

#[test]
fn scopes_are_separate_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = FileStore::builder()
        .dir(dir.path())
        .scope("a")
        .build()
        .unwrap();
    let b = FileStore::builder()
        .dir(dir.path())
        .scope("b")
        .build()
        .unwrap();
    a.rate_limiter(1.0, 1e-6).unwrap().try_acquire(1.0).unwrap();
    b.rate_limiter(1.0, 1e-6).unwrap().try_acquire(1.0).unwrap();
    assert!(a.path().ends_with("a.json") && b.path().ends_with("b.json"));
    assert!(a.load().breakers.is_empty());
    let err = FileStore::builder().scope("../x").build().unwrap_err();
    assert_eq!(err.field(), "scope");
}

/// The entry of the breaker named `api`, as the file holds it.
fn api(s: &FileStore) -> BreakerEntry {
    s.load().breakers.get("api").cloned().unwrap_or_default()
}
