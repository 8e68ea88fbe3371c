//! Per-call cost of each backend (memory, state file, Redis on loopback)
//! for the breaker, the rate limiter and the bulkhead, against the bare
//! service, in one run, plus the store engines' own round trips (a file
//! token bucket, a Redis GCRA) and the README's file stack. The Redis figures
//! need `redis-server` on the machine (started here on a free port);
//! without it they are skipped.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tower::{Layer, Service, ServiceExt};
use tower_bulwark::bulkhead::BulkheadLayer;
use tower_bulwark::circuit_breaker::CircuitBreakerLayer;
use tower_bulwark::rate_limit::RateLimitLayer;
use tower_bulwark::store::file::FileStore;
use tower_bulwark::store::redis::RedisStore;

mod support;
use support::{drive, Bare};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> Option<(Server, String)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((Server(child), format!("redis://127.0.0.1:{port}/")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let file = FileStore::builder().dir(dir.path()).build().unwrap();
    let server = redis_server();
    if server.is_none() {
        eprintln!("redis-server not found: Redis figures skipped");
    }
    let redis = server.as_ref().map(|(_, url)| {
        RedisStore::builder(url.as_str())
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap()
    });

    let mut g = c.benchmark_group("store/breaker closed");
    macro_rules! one {
        ($g:expr, $name:expr, $svc:expr) => {{
            let mut svc = $svc;
            $g.bench_function($name, |b| {
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    black_box(drive(&mut svc, black_box(i)).ok())
                })
            });
        }};
    }
    one!(g, "bare", Bare);
    one!(
        g,
        "memory",
        CircuitBreakerLayer::builder().build().unwrap().layer(Bare)
    );
    one!(
        g,
        "file",
        CircuitBreakerLayer::builder()
            .backend(file.clone())
            .build()
            .unwrap()
            .layer(Bare)
    );
    if let Some(redis) = &redis {
        one!(
            g,
            "redis",
            CircuitBreakerLayer::builder()
                .name("bench")
                .backend(redis.clone())
                .build()
                .unwrap()
                .layer(Bare)
        );
    }
    g.finish();

    // The rate limiter and the bulkhead: memory and file decide in `call`;
    // Redis answers in the response future, so it is driven to completion
    // on the runtime.
    macro_rules! remote {
        ($g:expr, $name:expr, $svc:expr) => {{
            let mut svc = $svc;
            $g.bench_function($name, |b| {
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    let r = rt.block_on(async {
                        let s = svc.ready().await.unwrap();
                        s.call(black_box(i)).await
                    });
                    black_box(r.ok())
                })
            });
        }};
    }
    let limiter = || {
        RateLimitLayer::builder()
            .name("bench")
            .max_tokens(1e9)
            .refill_rate(1e9)
    };
    let mut g = c.benchmark_group("store/rate limit admitted");
    one!(g, "bare", Bare);
    one!(g, "memory", limiter().build().unwrap().layer(Bare));
    one!(
        g,
        "file",
        limiter().backend(file.clone()).build().unwrap().layer(Bare)
    );
    if let Some(redis) = &redis {
        remote!(
            g,
            "redis",
            limiter()
                .backend(redis.clone())
                .build()
                .unwrap()
                .layer(Bare)
        );
    }
    g.finish();

    let bulkhead = || BulkheadLayer::builder().name("bench").max_concurrent(64);
    let mut g = c.benchmark_group("store/bulkhead admitted");
    one!(g, "bare", Bare);
    one!(g, "memory", bulkhead().build().unwrap().layer(Bare));
    one!(
        g,
        "file",
        bulkhead()
            .backend(file.clone())
            .build()
            .unwrap()
            .layer(Bare)
    );
    if let Some(redis) = &redis {
        remote!(
            g,
            "redis",
            bulkhead()
                .backend(redis.clone())
                .build()
                .unwrap()
                .layer(Bare)
        );
    }
    g.finish();

    // The README's stack on one state file (rate limit, bulkhead,
    // breaker): one lock round a call when the slot goes back with the
    // next call's round, two when it goes back at once.
    let mut g = c.benchmark_group("store/file stack");
    for (name, delay) in [
        ("slot back with the next round", None),
        ("slot back at once", Some(Duration::ZERO)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = FileStore::builder().dir(dir.path());
        if let Some(d) = delay {
            builder = builder.release_delay(d);
        }
        let store = builder.build().unwrap();
        let stack = tower::ServiceBuilder::new()
            .layer(limiter().backend(store.clone()).build().unwrap())
            .layer(bulkhead().backend(store.clone()).build().unwrap())
            .layer(
                CircuitBreakerLayer::builder()
                    .name("bench")
                    .backend(store.clone())
                    .build()
                    .unwrap(),
            )
            .service(Bare);
        one!(g, name, stack);
    }
    g.finish();

    let mut g = c.benchmark_group("store/engine");
    let bucket = file.rate_limiter(1e12, 1e12).unwrap();
    g.bench_function("file GCRA (locked read-modify-write)", |b| {
        b.iter(|| black_box(bucket.try_acquire(1.0)))
    });
    if let Some(redis) = &redis {
        let limiter = redis.rate_limiter("bench", 1e9, 1e9).unwrap();
        g.bench_function("redis GCRA (one EVALSHA round trip)", |b| {
            b.iter(|| black_box(rt.block_on(limiter.try_acquire("", 1))))
        });
    }
    g.finish();

    // The degraded fallback of a keyed Redis limiter, with Redis down:
    // new keys beyond the 10 000 it keeps cost what the first ones did.
    // Buckets that never refill during the run: past the cap, each new key
    // is refused after looking at a few others. Buckets that refill at once:
    // each new key takes the place of a spent one.
    let down = RedisStore::builder("redis://127.0.0.1:1/")
        .timeout(Duration::from_millis(50))
        .retry_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut g = c.benchmark_group("store/redis local fallback, new key each call");
    for (name, rate) in [("buckets still limited", 1e-3), ("buckets spent", 1e9)] {
        let limiter = down.rate_limiter(name, 1.0, rate).unwrap();
        // Degraded, then well past the cap.
        for i in 0..30_000u64 {
            let _ = rt.block_on(limiter.try_acquire(&i.to_string(), 1));
        }
        let mut i = 30_000u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                black_box(rt.block_on(limiter.try_acquire(&i.to_string(), 1)))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
