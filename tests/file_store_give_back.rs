//! A bulkhead slot given back on a state file is never lost while the
//! process lives, and a peer sees it free within `release_delay` once the
//! file can be written: whether it was given back outside a runtime or
//! with no delay, while its runtime shut down, while a round that then
//! failed to write held it, or inside the span of another store built on
//! the same file. Time is tokio's paused clock throughout.
#![cfg(all(
    unix,
    feature = "file-store",
    feature = "bulkhead",
    feature = "rate-limit"
))]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::store::file::FileStore;
use tower_bulwark::store::StoreEvent;

#[path = "support/file_layers.rs"]
mod file_layers;
use file_layers::{bulkhead, holders_in_file as in_file, limiter};

#[path = "support/torture.rs"]
mod torture;
use torture::paused_runtime;

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Makes the store's next writes fail while the file still reads and
/// locks: every temporary name it will try is taken. Dropping the guard
/// frees them.
struct FailWrites(Vec<PathBuf>);

impl FailWrites {
    fn new(dir: &Path) -> Self {
        let names: Vec<_> = (0..64)
            .map(|n| dir.join(format!(".state.json.{}.{n}.tmp", std::process::id())))
            .collect();
        for p in &names {
            std::fs::write(p, b"").unwrap();
        }
        Self(names)
    }
}

impl Drop for FailWrites {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn a_slot_given_back_outside_a_runtime_survives_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::builder().dir(dir.path()).build().unwrap();
    let b = s.bulkhead(1).unwrap().named("api");
    let slot = b.try_acquire().unwrap();
    assert_eq!(in_file(dir.path()), 1);
    mode(s.path(), 0o400);
    drop(slot);
    mode(s.path(), 0o600);
    let again = b.try_acquire();
    assert!(
        again.is_some(),
        "the slot given back is free in this process"
    );
    drop(again);
    s.flush();
    assert_eq!(in_file(dir.path()), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slot_given_back_at_once_survives_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::builder()
        .dir(dir.path())
        .release_delay(Duration::ZERO)
        .build()
        .unwrap();
    let b = s.bulkhead(1).unwrap().named("api");
    let slot = b.try_acquire().unwrap();
    mode(s.path(), 0o400);
    drop(slot);
    mode(s.path(), 0o600);
    s.flush();
    assert_eq!(in_file(dir.path()), 0);
}

#[test]
fn a_slot_given_back_while_its_runtime_shuts_down_does_not_stop_later_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::builder()
        .dir(dir.path())
        .release_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let b = s.bulkhead(2).unwrap().named("api");

    let rt1 = paused_runtime();
    let slot = b.try_acquire().unwrap();
    rt1.spawn(async move {
        let _slot = slot;
        std::future::pending::<()>().await
    });
    // The task and its slot are dropped while the runtime shuts down: the
    // flush task the give-back spawns is never polled.
    drop(rt1);

    paused_runtime().block_on(async {
        let slot = b.try_acquire().unwrap();
        assert_eq!(in_file(dir.path()), 1);
        drop(slot);
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(in_file(dir.path()), 0, "flushed after the delay");
    });
}

#[test]
fn a_slot_put_back_by_a_round_that_could_not_write_is_flushed_later() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(paused_runtime());
    // The failing round still holds the slot it took from the queue: the
    // runtime runs meanwhile, so the flush task finds the queue empty and
    // ends.
    let (stall, runtime) = (Arc::new(AtomicBool::new(true)), rt.clone());
    let stalled = stall.clone();
    let s = FileStore::builder()
        .dir(dir.path())
        .release_delay(Duration::from_millis(10))
        .on_event(move |e| {
            if matches!(e, StoreEvent::Degraded { .. }) && stalled.swap(false, SeqCst) {
                runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
            }
        })
        .build()
        .unwrap();
    let b = s.bulkhead(1).unwrap().named("api");
    let slot = b.try_acquire().unwrap();
    rt.block_on(async { drop(slot) });
    {
        let _fail = FailWrites::new(dir.path());
        s.update(|st| st.updated_at = Some(1));
    }
    assert!(!stall.load(SeqCst), "the failing round ran the runtime");
    assert_eq!(in_file(dir.path()), 1, "still queued");
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
    assert_eq!(in_file(dir.path()), 0, "written once the file could be");
}

#[tokio::test(start_paused = true)]
async fn a_slot_given_back_inside_another_stores_span_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // Two stores built on one file: the limiter's span is `a`'s, the
    // bulkhead's slot `b`'s.
    let a = FileStore::builder().dir(dir.path()).build().unwrap();
    let b = FileStore::builder()
        .dir(dir.path())
        .release_delay(Duration::ZERO)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(limiter(&a, 100.0))
        .layer(bulkhead(&b, 1))
        .service(service_fn(
            |n: u32| -> std::future::Ready<Result<u32, BoxError>> {
                assert!(n != 0, "the upstream panics in call");
                std::future::ready(Ok(n))
            },
        ));
    let mut s = svc.clone();
    s.ready().await.unwrap();
    // The slot is given back while the call unwinds, inside the span.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(s.call(0))));
    std::panic::set_hook(quiet);
    assert!(r.is_err());
    assert_eq!(in_file(dir.path()), 0, "the span wrote it");
    assert_eq!(svc.oneshot(1).await.unwrap(), 1, "and the slot is free");
}
