//! HTTP response sharing through a real axum server on 127.0.0.1 and a
//! hyper client: one upstream hit for a burst of identical GETs, a body
//! over the limit not shared (everyone still gets all of it), and two users
//! kept apart.
#![cfg(all(feature = "dedup", feature = "http"))]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body as AxumBody;
use axum::http::HeaderMap;
use axum::{routing::get, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};
use tower_bulwark::dedup::{DedupEvent, DedupLayer};
use tower_bulwark::http::dedup::{HttpDedupLayer, HttpKey};

const CHUNK: usize = 4096;
const CHUNKS: usize = 16;

fn big() -> Vec<u8> {
    (0..CHUNK * CHUNKS).map(|i| (i % 251) as u8).collect()
}

struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

/// Every route counts its hit, then waits for the gate to open.
async fn upstream() -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let (gate, rx) = watch::channel(false);
    let wait = move |hits: Arc<AtomicUsize>, mut rx: watch::Receiver<bool>| async move {
        hits.fetch_add(1, Ordering::SeqCst);
        rx.wait_for(|open| *open).await.unwrap();
    };
    let (h1, r1) = (hits.clone(), rx.clone());
    let (h2, r2) = (hits.clone(), rx.clone());
    let (h3, r3) = (hits.clone(), rx);
    let app = Router::new()
        .route(
            "/small",
            get(move || {
                let (h, r) = (h1.clone(), r1.clone());
                async move {
                    wait(h, r).await;
                    "hello"
                }
            }),
        )
        .route(
            "/big",
            get(move || {
                let (h, r) = (h2.clone(), r2.clone());
                async move {
                    wait(h, r).await;
                    // Streamed in chunks, with no length: the limit is only
                    // found while reading.
                    let body = big();
                    let chunks: Vec<Result<Bytes, std::io::Error>> = body
                        .chunks(CHUNK)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    AxumBody::from_stream(futures::stream::iter(chunks))
                }
            }),
        )
        .route(
            "/me",
            get(move |headers: HeaderMap| {
                let (h, r) = (h3.clone(), r3.clone());
                async move {
                    wait(h, r).await;
                    format!("{:?}", headers.get("authorization"))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream { addr, hits, gate }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get_req(addr: SocketAddr, path: &str, auth: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(format!("http://{addr}{path}"));
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Empty::new()).unwrap()
}

/// A dedup layer that counts the callers who joined a shared call.
fn layer() -> (HttpDedupLayer<HttpKey>, Arc<AtomicUsize>) {
    let joined = Arc::new(AtomicUsize::new(0));
    let j = joined.clone();
    let dedup = DedupLayer::builder()
        .key_by(HttpKey::new())
        .on_event(move |e| {
            if matches!(e, DedupEvent::Joined { .. }) {
                j.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    (HttpDedupLayer::new(dedup).body_limit(CHUNK * 4), joined)
}

async fn until(n: usize, counter: &AtomicUsize) {
    while counter.load(Ordering::SeqCst) < n {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_gets_share_one_upstream_call() {
    let up = upstream().await;
    let (layer, joined) = layer();
    let svc = layer.layer(client());
    let n = 8;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/small", None);
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                assert!(res.body().is_shared());
                res.into_body().collect().await.unwrap().to_bytes()
            })
        })
        .collect();
    until(n - 1, &joined).await;
    up.gate.send(true).unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "hello");
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_not_shared_but_reaches_everyone() {
    let up = upstream().await;
    let (layer, joined) = layer();
    let svc = layer.layer(client());
    let n = 4;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/big", None);
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                assert!(!res.body().is_shared());
                res.into_body().collect().await.unwrap().to_bytes()
            })
        })
        .collect();
    until(n - 1, &joined).await;
    up.gate.send(true).unwrap();
    let expected = big();
    for t in tasks {
        assert_eq!(t.await.unwrap(), expected);
    }
    // The shared call, then one call of its own for each other waiter.
    assert_eq!(up.hits.load(Ordering::SeqCst), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_make_two_calls() {
    let up = upstream().await;
    let (layer, _) = layer();
    let svc = layer.layer(client());
    let tasks: Vec<_> = ["Bearer alice", "Bearer bob", "Bearer alice"]
        .into_iter()
        .map(|user| {
            let svc = svc.clone();
            let req = get_req(up.addr, "/me", Some(user));
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (user, body)
            })
        })
        .collect();
    until(2, &up.hits).await;
    up.gate.send(true).unwrap();
    for t in tasks {
        let (user, body) = t.await.unwrap();
        assert_eq!(body, format!("Some({user:?})"));
    }
    // Alice's two calls may or may not overlap; Bob never shares hers.
    let hits = up.hits.load(Ordering::SeqCst);
    assert!((2..=3).contains(&hits), "{hits} hits");
}

/// What the dedup layer did on the server: calls that led (and so reached
/// a handler) and calls that joined another.
#[derive(Clone, Default)]
struct Seen {
    led: Arc<AtomicUsize>,
    joined: Arc<AtomicUsize>,
}

impl Seen {
    fn listener(&self) -> impl Fn(&DedupEvent) + Send + Sync + 'static {
        let s = self.clone();
        move |e| match e {
            DedupEvent::Leader { .. } => {
                s.led.fetch_add(1, Ordering::SeqCst);
            }
            DedupEvent::Joined { .. } => {
                s.joined.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    /// Until `n` requests reached the dedup layer and every leader's
    /// handler started (it then waits for the gate).
    async fn settled(&self, n: usize, hits: &AtomicUsize) {
        loop {
            let led = self.led.load(Ordering::SeqCst);
            if led + self.joined.load(Ordering::SeqCst) >= n && hits.load(Ordering::SeqCst) >= led {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Who the auth middleware says is asking: inserted before the dedup layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Tenant(String);

async fn auth(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(session) = req.headers().get("x-session").and_then(|v| v.to_str().ok()) {
        // A real one would look the session up; the tenant is its prefix.
        let tenant = session.split(':').next().unwrap_or_default().to_owned();
        req.extensions_mut().insert(Tenant(tenant));
    }
    next.run(req).await
}

/// A server with two routes behind one dedup layer (`Router::layer` makes
/// one service per route), and auth middleware in front of it. Each
/// handler counts its hit, waits for the gate and says who and what it
/// answered.
async fn server<K>(dedup: DedupLayer<K>) -> Upstream
where
    K: tower_bulwark::dedup::DedupKey<axum::extract::Request> + Send + Sync + 'static,
{
    let hits = Arc::new(AtomicUsize::new(0));
    let (gate, rx) = watch::channel(false);
    let handler = |route: &'static str| {
        let (hits, rx) = (hits.clone(), rx.clone());
        move |headers: HeaderMap, tenant: Option<axum::Extension<Tenant>>| {
            let (hits, mut rx) = (hits.clone(), rx.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                rx.wait_for(|open| *open).await.unwrap();
                let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                format!(
                    "{route} host={:?} key={:?} tenant={:?}",
                    h("host"),
                    h("x-api-key"),
                    tenant.map(|t| t.0 .0)
                )
            }
        }
    };
    let app = Router::new()
        .route("/a", get(handler("a")))
        .route("/b", get(handler("b")))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |e: tower::BoxError| async move {
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                    },
                ))
                .layer(HttpDedupLayer::new(dedup)),
        )
        .layer(axum::middleware::from_fn(auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream { addr, hits, gate }
}

/// Sends the requests at once over HTTP/1 (origin-form URIs, as a browser
/// or a proxy's upstream connection sends them) and, once the server has
/// seen them all, opens the gate. Returns the bodies, in order.
async fn burst(up: &Upstream, seen: &Seen, reqs: Vec<Request<Empty<Bytes>>>) -> Vec<String> {
    let n = reqs.len();
    let client = client();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let client = client.clone();
            tokio::spawn(async move {
                let res = client.request(req).await.unwrap();
                assert_eq!(res.status(), 200);
                let body = res.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8(body.to_vec()).unwrap()
            })
        })
        .collect();
    seen.settled(n, &up.hits).await;
    up.gate.send(true).unwrap();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn req(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new()).unwrap()
}

/// One layer on every route of a Router, keyed by an idempotency header
/// only: the same key sent to `/a` and `/b` reaches both handlers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_layer_on_two_routes_never_shares_between_them() {
    let seen = Seen::default();
    let dedup = DedupLayer::builder()
        .key(|r: &axum::extract::Request| r.headers().get("x-request-id").cloned())
        .on_event(seen.listener())
        .build()
        .unwrap();
    let up = server(dedup).await;
    let id = [("x-request-id", "42")];
    let bodies = burst(
        &up,
        &seen,
        vec![req(up.addr, "/a", &id), req(up.addr, "/b", &id)],
    )
    .await;
    assert!(bodies[0].starts_with("a "), "{bodies:?}");
    assert!(bodies[1].starts_with("b "), "{bodies:?}");
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
    assert_eq!(seen.joined.load(Ordering::SeqCst), 0);
}

/// With one table for all the services the layer makes (axum wraps each
/// route anew per connection), the HTTP key keeps routes apart by URI, and
/// identical requests on different connections share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_table_keeps_routes_apart_by_uri() {
    let seen = Seen::default();
    let dedup = DedupLayer::builder()
        .key_by(HttpKey::new())
        .share_between_services()
        .on_event(seen.listener())
        .build()
        .unwrap();
    let up = server(dedup).await;
    let bodies = burst(
        &up,
        &seen,
        vec![
            req(up.addr, "/a", &[]),
            req(up.addr, "/b", &[]),
            req(up.addr, "/a", &[]),
        ],
    )
    .await;
    assert!(bodies[0].starts_with("a "), "{bodies:?}");
    assert!(bodies[1].starts_with("b "), "{bodies:?}");
    assert_eq!(bodies[2], bodies[0]);
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
    assert_eq!(seen.joined.load(Ordering::SeqCst), 1);
}

/// Two tenants asking for `GET /me` over HTTP/1 never share an answer,
/// whether they differ by API key, by virtual host, or only by the tenant
/// that auth middleware put in the request's extensions; the same tenant
/// does share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_never_share_an_answer() {
    let cases: [(&str, [(&str, &str); 2]); 3] = [
        ("api key", [("x-api-key", "alpha"), ("x-api-key", "beta")]),
        (
            "host",
            [("host", "alpha.example"), ("host", "beta.example")],
        ),
        (
            "tenant",
            [("x-session", "alpha:1"), ("x-session", "beta:1")],
        ),
    ];
    for (what, [one, two]) in cases {
        let seen = Seen::default();
        let dedup = DedupLayer::builder()
            .key_by(HttpKey::new().extension::<Tenant>())
            .share_between_services()
            .on_event(seen.listener())
            .build()
            .unwrap();
        let up = server(dedup).await;
        let bodies = burst(
            &up,
            &seen,
            vec![
                req(up.addr, "/a", &[one]),
                req(up.addr, "/a", &[two]),
                req(up.addr, "/a", &[one]),
            ],
        )
        .await;
        assert_ne!(bodies[0], bodies[1], "{what}: {bodies:?}");
        assert!(bodies[0].contains("alpha"), "{what}: {bodies:?}");
        assert!(bodies[1].contains("beta"), "{what}: {bodies:?}");
        assert_eq!(bodies[2], bodies[0], "{what}");
        assert_eq!(up.hits.load(Ordering::SeqCst), 2, "{what}");
        assert_eq!(
            seen.joined.load(Ordering::SeqCst),
            1,
            "{what}: the same tenant shares"
        );
    }
}
