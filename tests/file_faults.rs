//! The file store under faults, with real child processes sharing a state
//! path that the test breaks: a FIFO, a link to `/dev/zero`, an over-size
//! file, a read-only file or directory, a directory at the path, a parent
//! that is a file; holders that died, turned zombie or whose PID was
//! reused; a peer that holds the lock.
//!
//! This test binary re-executes itself (the `child` test, selected with
//! `BULWARK_CHILD`), as tests/file_store.rs does.
#![cfg(all(
    unix,
    feature = "file-store",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "bulkhead"
))]

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::bulkhead::BulkheadFull;
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, CircuitState};
use tower_bulwark::rate_limit::RateLimited;
use tower_bulwark::store::file::{FileStore, Holder};
use tower_bulwark::store::{Degrade, Recovery, StoreEvent};

#[path = "support/file_layers.rs"]
mod file_layers;
use file_layers::{breaker, bulkhead, limiter, ok_service};

#[path = "support/child.rs"]
mod child_process;
use child_process::{outputs, spawn_child, wait_ready, DIR, ROLE};

type Events = Arc<Mutex<Vec<StoreEvent>>>;

fn store_with(dir: &Path, policy: Degrade) -> (FileStore, Events) {
    let events = Events::default();
    let sink = events.clone();
    let store = FileStore::builder()
        .dir(dir)
        .lock_timeout(Duration::from_secs(10))
        .degrade(policy)
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    (store, events)
}

fn store(dir: &Path) -> FileStore {
    store_with(dir, Degrade::FailOpenToLocal).0
}

/// The body of every child process. A no-op in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match role.as_str() {
            "limits:open" => limits(&dir, Degrade::FailOpenToLocal).await,
            "limits:closed" => limits(&dir, Degrade::FailClosed).await,
            "one_slot" => {
                let (s, events) = store_with(&dir, Degrade::FailClosed);
                let slot = s.bulkhead(1).unwrap().try_acquire();
                println!("OUT slot={}", slot.is_some());
                for e in events.lock().unwrap().iter() {
                    if let StoreEvent::Recovered {
                        reason, kept_at, ..
                    } = e
                    {
                        println!("OUT recovered={reason:?} kept={}", kept_at.is_some());
                    }
                }
                println!("OUT rss_kb={}", peak_rss_kb());
            }
            "hold_slot_and_exit" => {
                // Exits without giving the slot back, and is never reaped
                // by the test: a zombie holding a slot.
                let slot = store(&dir).bulkhead(1).unwrap().try_acquire();
                assert!(slot.is_some());
                println!("OUT ready");
                std::mem::forget(slot);
                std::process::exit(0);
            }
            "sleep" => {
                println!("OUT ready");
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            "hold_lock" => {
                let s = store(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let lock = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(format!("{}.lock", s.path().display()))
                    .unwrap();
                fs4::FileExt::try_lock(&lock).unwrap();
                println!("OUT ready");
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// The child's peak resident memory, in KiB.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs a rate limit of 5 (30 calls), a bulkhead of 1 (two calls at once)
/// and a breaker of threshold 2 (two failures, then a call) over the store
/// at `dir`, and reports what each let through.
async fn limits(dir: &Path, policy: Degrade) {
    let (s, events) = store_with(dir, policy);
    let limiter = limiter(&s, 5.0);
    let mut svc = ServiceBuilder::new().layer(limiter).service(ok_service());
    let mut admitted = 0;
    for i in 0..30 {
        match svc.ready().await.unwrap().call(i).await {
            Ok(_) => admitted += 1,
            Err(e) => assert!(e.is::<RateLimited>(), "{e}"),
        }
    }
    println!("OUT rate={admitted}");

    let bulkhead = bulkhead(&s, 1);
    let pending = ServiceBuilder::new()
        .layer(bulkhead.clone())
        .service(service_fn(|_: u32| {
            std::future::pending::<Result<u32, BoxError>>()
        }));
    let first = pending.clone().oneshot(1);
    tokio::pin!(first);
    let mut slots = 0;
    if futures::poll!(&mut first).is_pending() {
        slots += 1; // it holds its slot, waiting forever
    }
    let second = ServiceBuilder::new()
        .layer(bulkhead.clone())
        .service(ok_service())
        .oneshot(2)
        .await;
    match second {
        Ok(_) => slots += 1,
        Err(e) => assert!(e.is::<BulkheadFull>(), "{e}"),
    }
    println!("OUT slots={slots}");

    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .failure_threshold(2)
        .backend(s.clone())
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let upstream = service_fn(move |_: u32| {
        *seen.lock().unwrap() += 1;
        async { Err::<u32, BoxError>("down".into()) }
    });
    let breaker_svc = ServiceBuilder::new().layer(breaker).service(upstream);
    let mut rejected = 0;
    for i in 0..3 {
        if let Err(e) = breaker_svc.clone().oneshot(i).await {
            if e.is::<CircuitOpen>() {
                rejected += 1;
            }
        }
    }
    println!(
        "OUT breaker_calls={} rejected={rejected}",
        calls.lock().unwrap()
    );
    let degraded = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, StoreEvent::Degraded { .. }))
        .count();
    println!("OUT degraded={degraded} now={}", s.is_degraded());
}

/// What a `limits` child reported, one entry per line.
fn run_limits(dir: &Path, policy: &str) -> Vec<String> {
    outputs(spawn_child(&format!("limits:{policy}"), dir))
}

/// Each way a state path can be unwritable, made by `break_it` in a fresh
/// directory (returning the store directory): two processes in turn each
/// keep their own limits when failing open, and reject when failing
/// closed. Never "no limit".
fn unwritable_case(break_it: impl Fn(&Path) -> PathBuf) {
    for (policy, want) in [
        (
            "open",
            [
                "rate=5",
                "slots=1",
                "breaker_calls=2 rejected=1",
                "degraded=1 now=true",
            ],
        ),
        (
            "closed",
            [
                "rate=0",
                "slots=0",
                "breaker_calls=0 rejected=3",
                "degraded=1 now=true",
            ],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = break_it(tmp.path());
        for _ in 0..2 {
            assert_eq!(run_limits(&dir, policy), want, "{policy}");
        }
        // Let the temporary directory be cleaned up.
        set_mode(tmp.path(), 0o700);
        if dir.is_dir() {
            set_mode(&dir, 0o700);
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_read_only_state_file_keeps_limits() {
    unwritable_case(|tmp| {
        let s = store(tmp);
        s.update(|st| st.updated_at = Some(1)); // a valid file
        set_mode(s.path(), 0o400);
        tmp.to_owned()
    });
}

#[test]
fn a_read_only_directory_keeps_limits() {
    unwritable_case(|tmp| {
        let dir = tmp.join("ro");
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, 0o500);
        dir
    });
}

#[test]
fn a_directory_at_the_state_path_keeps_limits() {
    unwritable_case(|tmp| {
        std::fs::create_dir(tmp.join("state.json")).unwrap();
        tmp.to_owned()
    });
}

#[test]
fn a_parent_that_is_a_file_keeps_limits() {
    unwritable_case(|tmp| {
        let parent = tmp.join("not-a-dir");
        std::fs::write(&parent, b"a file").unwrap();
        parent.join("nested")
    });
}

#[test]
fn a_fifo_at_the_state_path_neither_hangs_nor_disarms() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = store(tmp.path()).path().to_owned();
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Nothing ever writes to the FIFO: a blocking open would never return.
    assert_eq!(
        run_limits(tmp.path(), "open"),
        [
            "rate=5",
            "slots=1",
            "breaker_calls=2 rejected=1",
            "degraded=1 now=true"
        ]
    );
    // Refused, not moved: the FIFO is the user's.
    let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo());
}

#[test]
fn a_link_to_dev_zero_is_replaced_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = store(tmp.path()).path().to_owned();
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let out = outputs(spawn_child("one_slot", tmp.path()));
    assert_eq!(out[0], "slot=true");
    let rss: u64 = out.last().unwrap()["rss_kb=".len()..].parse().unwrap();
    assert!(rss < 200 * 1024, "the child read from /dev/zero: {rss} KiB");
    // The link itself was replaced by the state file.
    assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
}

#[test]
fn an_over_size_file_is_set_aside_like_a_corrupt_one() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    // 10 MB of valid JSON: a bulkhead of one held by a million holders.
    let holder = r#"{"pid":1,"since":99999999999999,"id":1},"#;
    let mut text = String::from(r#"{"version":2,"bulkheads":{"":{"holders":["#);
    while text.len() < 10_000_000 {
        text.push_str(holder);
    }
    text.pop();
    text.push_str("]}}}");
    std::fs::write(s.path(), &text).unwrap();
    let out = outputs(spawn_child("one_slot", tmp.path()));
    assert_eq!(out[..2], ["slot=true", "recovered=TooLarge kept=true"]);
    let kept: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::metadata(tmp.path().join(&kept[0])).unwrap().len(),
        text.len() as u64
    );
    assert!(std::fs::metadata(s.path()).unwrap().len() < 1024);
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time.
#[cfg(target_os = "linux")]
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Puts a holder record for `pid` (started at `start`) in the unnamed
/// bulkhead's entry.
fn plant_holder(s: &FileStore, pid: u32, start: Option<u64>, since: u64) {
    let mut text = format!(r#"{{"pid":{pid},"since":{since},"id":7"#);
    if let Some(start) = start {
        text.push_str(&format!(r#","start":{start}"#));
    }
    text.push('}');
    let holder: Holder = serde_json::from_str(&text).unwrap();
    s.update(|st| st.bulkheads.entry(String::new()).or_default().holders = vec![holder]);
}

#[cfg(target_os = "linux")]
#[test]
fn a_holder_whose_pid_now_names_another_process_is_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut child = spawn_child("sleep", tmp.path());
    wait_ready(&mut child);
    let pid = child.id();
    let bulkhead = s.bulkhead(1).unwrap();
    // The record names the live child with its own start time: held.
    plant_holder(&s, pid, Some(start_time(pid)), now_ms());
    assert!(bulkhead.try_acquire().is_none(), "the child holds it");
    // The same PID with another start time: an earlier process that held
    // the slot died and the PID went to this child. Reclaimed.
    plant_holder(&s, pid, Some(start_time(pid) + 1), now_ms());
    let slot = bulkhead
        .try_acquire()
        .expect("the reused PID's slot is reclaimed");
    drop(slot);
    assert_eq!(bulkhead.available(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[cfg(target_os = "linux")]
#[test]
fn a_zombie_holders_slot_is_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut child = spawn_child("hold_slot_and_exit", tmp.path());
    wait_ready(&mut child);
    // The child exits and stays unreaped: a zombie. (Wait for the exit
    // without reaping it.)
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::waitid(
        rustix::process::WaitId::Pid(pid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )
    .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let state = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .next();
    assert_eq!(state, Some("Z"), "{stat}");
    let holders = s.load().bulkheads[""].holders.clone();
    assert_eq!(
        holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [child.id()]
    );
    let slot = s.bulkhead(1).unwrap().try_acquire();
    assert!(slot.is_some(), "the zombie's slot is reclaimed");
    child.wait().unwrap();
}

#[test]
fn a_slot_held_past_the_staleness_bound_is_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = FileStore::builder()
        .dir(tmp.path())
        .slot_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut child = spawn_child("sleep", tmp.path());
    wait_ready(&mut child);
    let bulkhead = s.bulkhead(1).unwrap();
    // A live process's slot, taken a minute and a second ago: it hung.
    plant_holder(&s, child.id(), None, now_ms() - 61_000);
    assert!(
        bulkhead.try_acquire().is_some(),
        "a stale slot is reclaimed"
    );
    plant_holder(&s, child.id(), None, now_ms() - 30_000);
    assert!(bulkhead.try_acquire().is_none(), "a recent one is not");
    child.kill().unwrap();
    child.wait().unwrap();
    let err = FileStore::builder()
        .slot_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "slot_timeout");
}

#[test]
fn temp_files_of_killed_writers_are_removed_by_the_next_write() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let left = tmp.path().join(format!(".state.json.{pid}.0.tmp"));
    std::fs::write(&left, b"{\"version\":2,").unwrap();
    // A live writer's file is left alone.
    let live = tmp
        .path()
        .join(format!(".state.json.{}.99.tmp", std::process::id()));
    std::fs::write(&live, b"{").unwrap();
    s.update(|st| st.updated_at = Some(1));
    assert!(!left.exists(), "the dead writer's temp file is removed");
    assert!(live.exists());
}

#[test]
fn failing_closed_the_store_recovers_when_the_file_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o500);
    let (s, events) = store_with(&dir, Degrade::FailClosed);
    let bucket = s.rate_limiter(5.0, 1e-6).unwrap();
    assert_eq!(bucket.try_acquire(1.0), Err(Duration::from_secs(1)));
    assert!(s.is_degraded());
    set_mode(&dir, 0o700);
    assert_eq!(bucket.try_acquire(1.0), Ok(()));
    assert!(!s.is_degraded());
    let kinds: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            StoreEvent::Degraded { policy, .. } => format!("degraded {policy:?}"),
            StoreEvent::Restored { .. } => "restored".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["degraded FailClosed", "restored"]);
    // Another process sees the call admitted after the recovery.
    let other = store(&dir).rate_limiter(5.0, 1e-6).unwrap();
    assert!((other.tokens() - 4.0).abs() < 0.01);
}

#[test]
fn bad_files_report_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, events) = store_with(tmp.path(), Degrade::FailOpenToLocal);
    std::fs::write(s.path(), vec![b' '; 2 << 20]).unwrap();
    assert!(s.bulkhead(1).unwrap().try_acquire().is_some());
    assert!(matches!(
        events.lock().unwrap().as_slice(),
        [StoreEvent::Recovered {
            reason: Recovery::TooLarge,
            ..
        }]
    ));
}

/// A 10 ms timer on the same current-thread runtime as a call through the
/// documented three-layer stack while a peer process holds the file lock:
/// the rate limit and the bulkhead wait for the lock inside their response
/// futures and the closed breaker only reads, so the timer fires first.
/// (The lateness is printed, not asserted: run with `--nocapture`.)
#[test]
fn waiting_for_a_peers_lock_does_not_stall_the_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peer = spawn_child("hold_lock", tmp.path());
    wait_ready(&mut peer);
    let (s, events) = {
        let events = Events::default();
        let sink = events.clone();
        let s = FileStore::builder()
            .dir(tmp.path())
            .lock_timeout(Duration::from_millis(300))
            .on_event(move |e| sink.lock().unwrap().push(e.clone()))
            .build()
            .unwrap();
        (s, events)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    rt.block_on(async {
        let limiter = limiter(&s, 5.0);
        let breaker = breaker(&s);
        let bulkhead = bulkhead(&s, 4);
        // The documented stack: rate limit, bulkhead, breaker.
        let svc = ServiceBuilder::new()
            .layer(limiter)
            .layer(bulkhead)
            .layer(breaker)
            .service(ok_service());
        let timer_order = order.clone();
        let start = std::time::Instant::now();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let late = start.elapsed().saturating_sub(Duration::from_millis(10));
            println!("10 ms timer fired {late:?} late while a peer held the lock");
            timer_order.lock().unwrap().push("timer");
        });
        let started = std::time::Instant::now();
        assert_eq!(svc.oneshot(1).await.unwrap(), 1);
        println!(
            "the call took {:?} (lock timeout 300 ms)",
            started.elapsed()
        );
        order.lock().unwrap().push("call");
        timer.await.unwrap();
    });
    assert_eq!(*order.lock().unwrap(), ["timer", "call"]);
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, StoreEvent::LockTimeout { .. })));
    peer.kill().unwrap();
    peer.wait().unwrap();
}

/// A call waiting for a peer's lock is dropped at each point it can be:
/// before its first poll, and while it waits. It takes nothing with it: no
/// slot stays held and no token is charged.
#[test]
fn a_call_dropped_while_waiting_for_the_lock_takes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peer = spawn_child("hold_lock", tmp.path());
    wait_ready(&mut peer);
    let s = FileStore::builder()
        .dir(tmp.path())
        .lock_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let limiter = limiter(&s, 5.0);
    let bulkhead = bulkhead(&s, 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for polls in 0..3 {
            let limited = ServiceBuilder::new()
                .layer(limiter.clone())
                .service(ok_service())
                .oneshot(1);
            let bounded = ServiceBuilder::new()
                .layer(bulkhead.clone())
                .service(ok_service())
                .oneshot(2);
            tokio::pin!(limited, bounded);
            for _ in 0..polls {
                assert!(futures::poll!(&mut limited).is_pending());
                assert!(futures::poll!(&mut bounded).is_pending());
                tokio::task::yield_now().await;
            }
        }
    });
    peer.kill().unwrap();
    peer.wait().unwrap();
    let state = s.load();
    assert!(state.rate_limits.is_empty(), "{state:?}");
    assert!(state.bulkheads.is_empty(), "{state:?}");
    assert_eq!(bulkhead.handle().in_flight(), 0);
    assert!((limiter.handle().tokens() - 5.0).abs() < 0.01);
}

#[test]
fn failing_open_the_store_is_restored_when_the_file_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o500);
    let (s, events) = store_with(&dir, Degrade::FailOpenToLocal);
    let bucket = s.rate_limiter(2.0, 1e-6).unwrap();
    // Local limits while the directory is read-only: 2, not unlimited.
    let admitted = (0..5).filter(|_| bucket.try_acquire(1.0).is_ok()).count();
    assert_eq!(admitted, 2);
    assert!(s.is_degraded());
    set_mode(&dir, 0o700);
    // The file is back: its (fresh) bucket decides again.
    assert_eq!(bucket.try_acquire(1.0), Ok(()));
    assert!(!s.is_degraded());
    assert!(std::fs::metadata(s.path()).is_ok());
    let events = events.lock().unwrap();
    assert!(
        matches!(
            events[..],
            [StoreEvent::Degraded { .. }, StoreEvent::Restored { .. }]
        ),
        "{events:?}"
    );
}

/// Puts breaker `name` in `s` at the end of its open period: its next
/// call is a half-open probe. (Written directly: the file's times are
/// wall-clock times, which a test cannot wait out without sleeping.)
fn open_period_over(s: &FileStore, name: &str) {
    let now_ns = now_ms() * 1_000_000;
    s.update(|st| {
        let e = st.breakers.entry(name.to_owned()).or_default();
        e.state = CircuitState::Open.code();
        e.generation += 1;
        e.open_until = now_ns - 1;
    });
}

/// A breaker on `s` that closes after one probe success.
fn one_probe_breaker(s: &FileStore) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .name("api")
        .half_open_max_calls(1)
        .success_threshold(1)
        .backend(s.clone())
        .build()
        .unwrap()
}

/// A half-open breaker's probe is taken in `poll_ready`, waiting for a
/// peer's lock with tokio timers: a 10 ms timer on the same
/// current-thread runtime fires on time while the lock is held, long
/// before the probe goes ahead (after `lock_timeout`, 1 s).
#[test]
fn a_half_open_probe_waits_for_a_peers_lock_without_stalling_the_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, events) = {
        let events = Events::default();
        let sink = events.clone();
        let s = FileStore::builder()
            .dir(tmp.path())
            .lock_timeout(Duration::from_secs(1))
            .on_event(move |e| sink.lock().unwrap().push(e.clone()))
            .build()
            .unwrap();
        (s, events)
    };
    open_period_over(&s, "api");
    let mut peer = spawn_child("hold_lock", tmp.path());
    wait_ready(&mut peer);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let breaker = one_probe_breaker(&s);
    let handle = breaker.handle();
    let late = rt.block_on(async {
        let svc = ServiceBuilder::new().layer(breaker).service(ok_service());
        let timer_order = order.clone();
        let start = std::time::Instant::now();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let late = start.elapsed().saturating_sub(Duration::from_millis(10));
            timer_order.lock().unwrap().push("timer");
            late
        });
        assert_eq!(svc.oneshot(1).await.unwrap(), 1);
        let took = start.elapsed();
        order.lock().unwrap().push("call");
        let late = timer.await.unwrap();
        println!("half-open probe: 10 ms timer fired {late:?} late; the probe took {took:?} (peer held the lock, lock timeout 1 s)");
        late
    });
    peer.kill().unwrap();
    peer.wait().unwrap();
    // The probe's success waited for the lock on the blocking pool; the
    // runtime waits for that as it shuts down.
    drop(rt);
    assert_eq!(*order.lock().unwrap(), ["timer", "call"]);
    assert!(late < Duration::from_millis(500), "{late:?}");
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, StoreEvent::LockTimeout { .. })));
    // The probe's success was booked: the breaker closed.
    assert_eq!(handle.state(), CircuitState::Closed);
    assert!(s.load().breakers["api"].probes.is_empty());
}

/// The probe a service took in `poll_ready` is its next call's: another
/// caller is rejected meanwhile, and a service dropped before calling
/// gives it back.
#[tokio::test(flavor = "current_thread")]
async fn a_probe_reserved_and_never_used_is_given_back() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    open_period_over(&s, "api");
    let breaker = one_probe_breaker(&s);
    let svc = ServiceBuilder::new().layer(breaker).service(ok_service());

    let mut reserved = svc.clone();
    reserved.ready().await.unwrap();
    let probes = &s.load().breakers["api"].probes;
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].pid, std::process::id());
    let other = svc.clone().oneshot(2).await.unwrap_err();
    let open = other.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.state(), CircuitState::HalfOpen);

    // Readiness polled again keeps the one probe.
    reserved.ready().await.unwrap();
    assert_eq!(s.load().breakers["api"].probes.len(), 1);
    drop(reserved);
    assert!(s.load().breakers["api"].probes.is_empty());

    // The probe is free for the next caller, whose success closes it.
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
    assert_eq!(s.load().breakers["api"].state, CircuitState::Closed.code());
}

/// A call to a half-open breaker dropped while its readiness waits for a
/// peer's lock, after 0, 1 or 2 polls: it holds no probe, and once the
/// peer is gone the next call probes.
#[test]
fn a_probe_dropped_while_waiting_for_the_lock_takes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = FileStore::builder()
        .dir(tmp.path())
        .lock_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    open_period_over(&s, "api");
    let before = s.load();
    let mut peer = spawn_child("hold_lock", tmp.path());
    wait_ready(&mut peer);
    let breaker = one_probe_breaker(&s);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for polls in 0..3 {
            let call = ServiceBuilder::new()
                .layer(breaker.clone())
                .service(ok_service())
                .oneshot(1);
            tokio::pin!(call);
            for _ in 0..polls {
                assert!(futures::poll!(&mut call).is_pending());
                tokio::task::yield_now().await;
            }
        }
    });
    peer.kill().unwrap();
    peer.wait().unwrap();
    // Nothing was written while the peer held the lock: still open, no
    // probe out.
    assert_eq!(s.load(), before);
    rt.block_on(async {
        let svc = ServiceBuilder::new().layer(breaker).service(ok_service());
        assert_eq!(svc.oneshot(4).await.unwrap(), 4);
    });
    assert_eq!(s.load().breakers["api"].state, CircuitState::Closed.code());
}

/// A fallback entry's breaker has no readiness of its own to wait in: when
/// its half-open probe would need a peer's lock, the probe is refused and
/// the call goes to the next entry at once, without waiting on the
/// runtime's thread (before, it slept until the lock or `lock_timeout`).
#[cfg(feature = "fallback")]
#[test]
fn a_fallback_entry_never_waits_for_a_peers_lock() {
    use tower_bulwark::fallback::FallbackLayer;

    let tmp = tempfile::tempdir().unwrap();
    let s = FileStore::builder()
        .dir(tmp.path())
        .lock_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    open_period_over(&s, "primary");
    let mut peer = spawn_child("hold_lock", tmp.path());
    wait_ready(&mut peer);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answered = rt.block_on(async {
        let layer = FallbackLayer::<u32, u32>::builder()
            .breaker(
                CircuitBreakerLayer::builder()
                    .half_open_max_calls(1)
                    .backend(s.clone()),
            )
            .fallback(
                "backup",
                service_fn(|n: u32| async move { Ok::<_, BoxError>(n + 100) }),
            )
            .build()
            .unwrap();
        let handle = layer.handle();
        // Had the probe waited, it would have gone ahead after the lock
        // timeout and the primary would have answered.
        let answered = ServiceBuilder::new()
            .layer(layer)
            .service(ok_service())
            .oneshot(1)
            .await
            .unwrap();
        let primary = handle.breaker("primary").unwrap();
        assert_eq!(primary.metrics().half_open_in_flight, 0);
        answered
    });
    peer.kill().unwrap();
    peer.wait().unwrap();
    drop(rt);
    assert_eq!(answered, 101, "the backup answered");
    assert!(s.load().breakers["primary"].probes.is_empty());
}
