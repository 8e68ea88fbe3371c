//! gRPC through real tonic on 127.0.0.1: a server with a rate limit, a
//! bulkhead and `RejectionStatusLayer`; a client with retry, a breaker and
//! a fallback through `GrpcClassifier` and `GrpcRetryPolicy`, over
//! `ReplayBodyLayer` and tonic `Channel`s.
#![cfg(all(
    feature = "grpc",
    feature = "retry",
    feature = "circuit-breaker",
    feature = "fallback",
    feature = "rate-limit",
    feature = "bulkhead"
))]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tower::{service_fn, BoxError, Service, ServiceBuilder};
use tower_bulwark::circuit_breaker::CircuitState;
use tower_bulwark::grpc::{
    self, GrpcClassifier, GrpcRetryPolicy, RejectionStatusLayer, TonicBodyLayer,
};
use tower_bulwark::http::ReplayBodyLayer;
use tower_bulwark::retry::Backoff;
use tower_bulwark::{
    BulkheadLayer, CircuitBreakerLayer, FallbackLayer, RateLimitLayer, RetryLayer,
};

// ---- a hand-written service: one unary method, UTF-8 strings on the wire

#[path = "support/utf8_codec.rs"]
mod utf8_codec;
use utf8_codec::Utf8;

const SAY_HELLO: &str = "/demo.Greeter/SayHello";
const COUNT: &str = "/demo.Greeter/Count";

/// What a server did: the names it was sent, and the codes it will answer
/// next (`Ok` once the script runs out).
#[derive(Debug, Default)]
struct Script {
    seen: Vec<String>,
    answers: VecDeque<Code>,
    /// Holds every call until the test lets it go.
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[derive(Clone)]
struct Greeter {
    who: &'static str,
    script: Arc<Mutex<Script>>,
}

impl tonic::server::NamedService for Greeter {
    const NAME: &'static str = "demo.Greeter";
}

impl Service<http::Request<tonic::body::Body>> for Greeter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            if req.uri().path() == COUNT {
                let me = me.clone();
                let count = service_fn(move |req: tonic::Request<String>| {
                    let me = me.clone();
                    async move {
                        let name = req.into_inner();
                        let answer = {
                            let mut s = me.script.lock().unwrap();
                            s.seen.push(name);
                            s.answers.pop_front().unwrap_or(Code::Ok)
                        };
                        // Two messages, then the status: in the trailers.
                        let mut items = vec![Ok("1".to_owned()), Ok("2".to_owned())];
                        if answer != Code::Ok {
                            items.push(Err(Status::new(answer, "gave up half-way")));
                        }
                        Ok::<_, Status>(tonic::Response::new(futures::stream::iter(items)))
                    }
                });
                return Ok(tonic::server::Grpc::new(Utf8)
                    .server_streaming(count, req)
                    .await);
            }
            if req.uri().path() != SAY_HELLO {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let hello = service_fn(move |req: tonic::Request<String>| {
                let me = me.clone();
                async move {
                    let name = req.into_inner();
                    let (answer, gate) = {
                        let mut s = me.script.lock().unwrap();
                        s.seen.push(name.clone());
                        (s.answers.pop_front().unwrap_or(Code::Ok), s.gate.clone())
                    };
                    if let Some(gate) = gate {
                        let _ = gate.acquire().await;
                    }
                    match answer {
                        Code::Ok => Ok(tonic::Response::new(format!(
                            "{} says hello to {name}",
                            me.who
                        ))),
                        code => Err(Status::new(code, format!("{} is not well", me.who))),
                    }
                }
            });
            Ok(tonic::server::Grpc::new(Utf8).unary(hello, req).await)
        })
    }
}

/// A tonic server on 127.0.0.1 with a bucket of `tokens` (refilled once a
/// minute: never, within a test) and `slots` bulkhead slots, on its own
/// thread and runtime.
fn start_server(who: &'static str, tokens: u32, slots: usize) -> (SocketAddr, Arc<Mutex<Script>>) {
    let script = Arc::new(Mutex::new(Script::default()));
    let greeter = Greeter {
        who,
        script: script.clone(),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let layers = ServiceBuilder::new()
                .layer(RejectionStatusLayer::new())
                .layer(
                    RateLimitLayer::builder()
                        .name("greeter")
                        .max_tokens(f64::from(tokens))
                        .refill_rate(1.0 / 60.0)
                        .build()
                        .unwrap(),
                )
                .layer(BulkheadLayer::new(slots))
                .into_inner();
            let incoming = tonic::transport::server::TcpIncoming::from(
                tokio::net::TcpListener::from_std(listener).unwrap(),
            );
            tonic::transport::Server::builder()
                .layer(layers)
                .add_service(greeter)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
    (addr, script)
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

async fn say_hello<S>(client: &mut tonic::client::Grpc<S>, name: &str) -> Result<String, Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    client
        .ready()
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    client
        .unary(
            tonic::Request::new(name.to_owned()),
            PathAndQuery::from_static(SAY_HELLO),
            Utf8,
        )
        .await
        .map(tonic::Response::into_inner)
}

fn retry() -> RetryLayer<GrpcRetryPolicy> {
    RetryLayer::builder()
        .policy(GrpcRetryPolicy::new())
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .build()
        .unwrap()
}

fn pushback_ms(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

// ---- the server side

#[tokio::test]
async fn server_rejections_are_statuses_not_stream_resets() {
    let (addr, script) = start_server("primary", 2, 8);
    let mut client = tonic::client::Grpc::new(channel(addr));
    assert_eq!(
        say_hello(&mut client, "a").await.unwrap(),
        "primary says hello to a"
    );
    assert_eq!(
        say_hello(&mut client, "b").await.unwrap(),
        "primary says hello to b"
    );

    // The bucket is empty: a status the client can act on, with when to
    // come back, instead of `INTERNAL: h2 protocol error`.
    let status = say_hello(&mut client, "c").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("greeter"), "{status:?}");
    let ms = pushback_ms(&status).expect("grpc-retry-pushback-ms");
    assert!(ms > 0 && ms <= 60_000, "{ms}");
    assert_eq!(script.lock().unwrap().seen, ["a", "b"]);
}

#[tokio::test]
async fn a_full_bulkhead_is_unavailable() {
    let (addr, script) = start_server("primary", 100, 1);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    script.lock().unwrap().gate = Some(gate.clone());
    let mut first = tonic::client::Grpc::new(channel(addr));
    let held = tokio::spawn(async move { say_hello(&mut first, "held").await });
    // Wait until the first call holds the only slot.
    while script.lock().unwrap().seen.is_empty() {
        tokio::task::yield_now().await;
    }
    let mut second = tonic::client::Grpc::new(channel(addr));
    let status = say_hello(&mut second, "turned away").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap(), "primary says hello to held");
}

// ---- the client side: on tokio's paused clock, so back-off waits are
// virtual (the servers run on their own threads, on the real clock)

#[tokio::test(start_paused = true)]
async fn unavailable_is_retried_with_the_same_body() {
    let (addr, script) = start_server("primary", 100, 8);
    script.lock().unwrap().answers = [Code::Unavailable].into();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(retry())
        .layer(TonicBodyLayer::new())
        .service(channel(addr));
    let mut client = tonic::client::Grpc::new(svc);
    assert_eq!(
        say_hello(&mut client, "ada").await.unwrap(),
        "primary says hello to ada"
    );
    // The second attempt carried the same message, replayed.
    assert_eq!(script.lock().unwrap().seen, ["ada", "ada"]);

    // A code that is not retryable is answered at once.
    script.lock().unwrap().answers = [Code::InvalidArgument].into();
    let status = say_hello(&mut client, "bob").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(script.lock().unwrap().seen.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_its_replay_limit_is_sent_once() {
    let (addr, script) = start_server("primary", 100, 8);
    script.lock().unwrap().answers = [Code::Unavailable].into();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(16))
        .layer(retry())
        .layer(TonicBodyLayer::new())
        .service(channel(addr));
    let mut client = tonic::client::Grpc::new(svc);
    let long = "a name far longer than sixteen bytes";
    let status = say_hello(&mut client, long).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(script.lock().unwrap().seen, [long]);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_pushback_is_honoured_by_not_retrying_too_soon() {
    // The server's bucket is empty after one call and refills in a minute:
    // its pushback is longer than the retry layer's deadline, so the
    // rejection comes back at once rather than after a minute.
    let (addr, script) = start_server("primary", 1, 8);
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(
            RetryLayer::builder()
                .policy(
                    GrpcRetryPolicy::new()
                        .retryable_codes([Code::Unavailable, Code::ResourceExhausted]),
                )
                .max_attempts(3)
                .deadline(Duration::from_secs(5))
                .build()
                .unwrap(),
        )
        .layer(TonicBodyLayer::new())
        .service(channel(addr));
    let mut client = tonic::client::Grpc::new(svc);
    say_hello(&mut client, "first").await.unwrap();
    let status = say_hello(&mut client, "second").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(script.lock().unwrap().seen, ["first"]);
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_on_grpc_failures_and_fallback_answers() {
    let (primary, primary_script) = start_server("primary", 100, 8);
    let (secondary, secondary_script) = start_server("secondary", 100, 8);
    primary_script.lock().unwrap().answers = [Code::Unavailable; 16].into();

    let breaker = CircuitBreakerLayer::builder()
        .name("primary")
        .failure_threshold(2)
        .classify(GrpcClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let secondary_svc = ServiceBuilder::new()
        .layer(TonicBodyLayer::new())
        .service(channel(secondary));
    let fallback = FallbackLayer::builder()
        .primary_name("primary-group")
        .fallback("secondary", secondary_svc)
        .classify(GrpcClassifier::new())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(fallback)
        .layer(retry())
        .layer(breaker)
        .layer(TonicBodyLayer::new())
        .service(channel(primary));
    let mut client = tonic::client::Grpc::new(svc);

    // Two UNAVAILABLE answers (one call, retried once) open the breaker;
    // the third attempt is refused by it, and the fallback answers.
    let answer = say_hello(&mut client, "ada").await.unwrap();
    assert_eq!(answer, "secondary says hello to ada");
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(primary_script.lock().unwrap().seen, ["ada", "ada"]);
    assert_eq!(secondary_script.lock().unwrap().seen, ["ada"]);

    // NOT_FOUND is the caller's problem, not the upstream's: no failover.
    handle.reset();
    primary_script.lock().unwrap().answers = [Code::NotFound].into();
    let status = say_hello(&mut client, "bob").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(secondary_script.lock().unwrap().seen, ["ada"]);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_reaches_the_caller_as_unavailable() {
    let (addr, script) = start_server("primary", 100, 8);
    script.lock().unwrap().answers = [Code::Unavailable].into();
    let breaker = CircuitBreakerLayer::builder()
        .name("greeter")
        .failure_threshold(1)
        .classify(GrpcClassifier::new())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(retry())
        .layer(breaker)
        .layer(TonicBodyLayer::new())
        .service(channel(addr));
    let mut client = tonic::client::Grpc::new(svc);
    // The server's UNAVAILABLE opens the breaker; the retry meets the open
    // circuit, which is not retried into, and the caller learns when the
    // breaker will let a call through again.
    let status = say_hello(&mut client, "ada").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("circuit `greeter` is open"),
        "{status:?}"
    );
    let ms = pushback_ms(&status).expect("grpc-retry-pushback-ms");
    assert!(ms > 0 && ms <= 30_000, "{ms}");
    assert_eq!(script.lock().unwrap().seen, ["ada"]);
}

/// Reads a whole server stream: its messages, then its status.
async fn count<S>(
    client: &mut tonic::client::Grpc<S>,
    name: &str,
) -> (Vec<String>, Result<(), Status>)
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    if let Err(e) = client.ready().await {
        return (Vec::new(), Err(Status::from_error(e.into())));
    }
    let req = tonic::Request::new(name.to_owned());
    let mut stream = match client
        .server_streaming(req, PathAndQuery::from_static(COUNT), Utf8)
        .await
    {
        Ok(res) => res.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, Ok(())),
            Err(status) => return (got, Err(status)),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_breaker_sees_a_stream_fail_in_its_trailers() {
    let (addr, script) = start_server("primary", 100, 8);
    script.lock().unwrap().answers = [Code::Ok, Code::Unavailable, Code::Internal].into();
    let breaker = CircuitBreakerLayer::builder()
        .name("counter")
        .failure_threshold(2)
        .classify(GrpcClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(breaker)
        .service(channel(addr));
    let mut client = tonic::client::Grpc::new(svc);

    // Each answer starts `200 OK` with messages; the status comes last.
    let (got, end) = count(&mut client, "ok").await;
    assert_eq!(
        (got, end.map_err(|s| s.code())),
        (vec!["1".into(), "2".into()], Ok(()))
    );
    let (got, end) = count(&mut client, "unavailable").await;
    assert_eq!(got, ["1", "2"]);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    assert_eq!(handle.metrics().consecutive_failures, 1);
    let (_, end) = count(&mut client, "internal").await;
    assert_eq!(end.unwrap_err().code(), Code::Internal);
    // Two streams that failed half-way opened the breaker.
    assert_eq!(handle.state(), CircuitState::Open);
    let (got, end) = count(&mut client, "refused").await;
    assert!(got.is_empty());
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        script.lock().unwrap().seen,
        ["ok", "unavailable", "internal"]
    );
}

/// The fallback's per-entry breakers judge a stream by its trailers too:
/// a stream that fails half-way is the caller's (its messages were
/// already read), but the primary's breaker counts it, and once open the
/// next call goes straight to the secondary.
#[tokio::test(start_paused = true)]
async fn a_fallback_entry_breaker_counts_streams_failing_in_their_trailers() {
    let (primary, primary_script) = start_server("primary", 100, 8);
    let (secondary, secondary_script) = start_server("secondary", 100, 8);
    primary_script.lock().unwrap().answers = [Code::Unavailable, Code::Unavailable].into();
    let fallback = FallbackLayer::builder()
        .primary_name("primary")
        .fallback(
            "secondary",
            ServiceBuilder::new()
                .layer(TonicBodyLayer::new())
                .service(channel(secondary)),
        )
        .breaker(CircuitBreakerLayer::builder().failure_threshold(2))
        .classify(GrpcClassifier::new())
        .build()
        .unwrap();
    let handle = fallback.handle();
    let breaker = handle.breaker("primary").unwrap().clone();
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(fallback)
        .layer(TonicBodyLayer::new())
        .service(channel(primary));
    let mut client = tonic::client::Grpc::new(svc);

    let (got, end) = count(&mut client, "one").await;
    assert_eq!(got, ["1", "2"]);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    assert_eq!(breaker.metrics().consecutive_failures, 1);
    let (got, end) = count(&mut client, "two").await;
    assert_eq!(got, ["1", "2"]);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    assert_eq!(breaker.state(), CircuitState::Open);

    let (got, end) = count(&mut client, "three").await;
    assert_eq!(
        (got, end.map_err(|s| s.code())),
        (vec!["1".into(), "2".into()], Ok(()))
    );
    assert_eq!(primary_script.lock().unwrap().seen, ["one", "two"]);
    assert_eq!(secondary_script.lock().unwrap().seen, ["three"]);
    // A stream that ends well counts as the secondary's success.
    let secondary_breaker = handle.breaker("secondary").unwrap();
    assert_eq!(secondary_breaker.metrics().consecutive_failures, 0);
    assert_eq!(secondary_breaker.state(), CircuitState::Closed);
}

#[test]
fn public_types_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<GrpcClassifier>();
    both::<GrpcRetryPolicy>();
    both::<RejectionStatusLayer>();
    both::<TonicBodyLayer>();
    both::<ReplayBodyLayer>();
    both::<tower_bulwark::http::ErrorHandler>();
    fn send<T: Send>() {}
    send::<tower_bulwark::classify::Verdict>();
}
