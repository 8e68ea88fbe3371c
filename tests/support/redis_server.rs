//! A throwaway `redis-server` on a free loopback port, for the Redis tests.
//!
//! Without `redis-server` on the machine the tests say they were skipped,
//! unless `BULWARK_REQUIRE_REDIS=1` (set by CI), which makes that a failure.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

fn binary() -> Option<&'static str> {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some("redis-server")
}

impl RedisServer {
    /// Starts a server, or returns `None` (after saying so) when
    /// `redis-server` is not installed and not required.
    pub fn start(test: &str) -> Option<Self> {
        if binary().is_none() {
            if std::env::var("BULWARK_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("redis-server is required (BULWARK_REQUIRE_REDIS=1) but not installed");
            }
            eprintln!("skipped {test}: redis-server is not installed");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self { child: None, port };
        s.restart();
        Some(s)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open and requests
    /// queue up unanswered, as with a server stalled by a long command or
    /// a paused VM.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT): it answers everything queued.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// Kills the server (state is lost: it saves nothing).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and waits until it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns true; fails after 10 s. For waiting on the
/// background reconnection, never for asserting a duration.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The store events a test watches: "degraded", "restored" or "other".
pub type Events = std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>;

/// A store on `server` with short timeouts and the given degrade policy,
/// recording its degrade/restore events.
#[cfg(feature = "redis")]
pub fn degrading_store(
    server: &RedisServer,
    policy: tower_bulwark::store::Degrade,
) -> (tower_bulwark::store::redis::RedisStore, Events) {
    use tower_bulwark::store::StoreEvent;
    let events = Events::default();
    let sink = events.clone();
    // A killed server refuses connections at once, so the timeout only
    // bounds slow replies: well above what a loaded test machine needs.
    let store = tower_bulwark::store::redis::RedisStore::builder(server.url())
        .prefix("degrade")
        .timeout(Duration::from_secs(1))
        .retry_interval(Duration::from_millis(50))
        .degrade(policy)
        .on_event(move |e| {
            sink.lock().unwrap().push(match e {
                StoreEvent::Degraded { .. } => "degraded",
                StoreEvent::Restored { .. } => "restored",
                _ => "other",
            })
        })
        .build()
        .unwrap();
    (store, events)
}

/// A store on `server` for the sharing tests. A generous timeout: they
/// check sharing, not degrading (tested on its own with short timeouts),
/// and on a loaded machine a first connection plus script load can take
/// longer than a production budget.
#[cfg(feature = "redis")]
pub fn store(server: &RedisServer, prefix: &str) -> tower_bulwark::store::redis::RedisStore {
    tower_bulwark::store::redis::RedisStore::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}
