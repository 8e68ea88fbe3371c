//! gRPC with tonic: a server guarded by a rate limit and a bulkhead that
//! answers rejections with gRPC statuses, and a client with retry, a
//! circuit breaker and a fallback server, all on 127.0.0.1.
//!
//! ```text
//! cargo run --example grpc --features grpc
//! ```
//!
//! The service is written by hand (one unary method, UTF-8 text on the
//! wire), so the example needs neither `protoc` nor code generation; a
//! generated `FooClient::new(svc)` / `FooServer::new(..)` takes the same
//! stacks.

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

#[path = "../tests/support/utf8_codec.rs"]
mod utf8_codec;
use utf8_codec::Utf8;

const SAY_HELLO: &str = "/demo.Greeter/SayHello";

/// A greeter that answers the codes it is told to, then OK.
#[derive(Clone)]
struct Greeter {
    who: &'static str,
    failures: Arc<Mutex<VecDeque<Code>>>,
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
            if req.uri().path() != SAY_HELLO {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let hello = service_fn(move |req: tonic::Request<String>| {
                let me = me.clone();
                async move {
                    let name = req.into_inner();
                    let failure = me.failures.lock().unwrap().pop_front();
                    println!(
                        "  [{}] got {name:?}, answers {:?}",
                        me.who,
                        failure.unwrap_or(Code::Ok)
                    );
                    match failure {
                        None => Ok(tonic::Response::new(format!(
                            "{} says hello to {name}",
                            me.who
                        ))),
                        Some(code) => Err(Status::new(code, format!("{} is not well", me.who))),
                    }
                }
            });
            Ok(tonic::server::Grpc::new(Utf8).unary(hello, req).await)
        })
    }
}

/// Serves a greeter on 127.0.0.1 behind a bucket of `tokens` refilled at
/// one a minute, a 16-slot bulkhead, and `RejectionStatusLayer`.
async fn serve(who: &'static str, tokens: u32, failures: &[Code]) -> Result<SocketAddr, BoxError> {
    let greeter = Greeter {
        who,
        failures: Arc::new(Mutex::new(failures.iter().copied().collect())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let layers = ServiceBuilder::new()
        // The rejections below become UNAVAILABLE or RESOURCE_EXHAUSTED
        // answers with `grpc-retry-pushback-ms`, not stream resets.
        .layer(RejectionStatusLayer::new())
        .layer(
            RateLimitLayer::builder()
                .name(who)
                .max_tokens(f64::from(tokens))
                .refill_rate(1.0 / 60.0)
                .build()?,
        )
        .layer(BulkheadLayer::new(16))
        .into_inner();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layers)
            .add_service(greeter)
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

fn channel(addr: SocketAddr) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
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
    let req = tonic::Request::new(name.to_owned());
    let res = client
        .unary(req, PathAndQuery::from_static(SAY_HELLO), Utf8)
        .await?;
    Ok(res.into_inner())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The primary fails twice with UNAVAILABLE, then would recover; the
    // secondary is healthy but allows 3 calls, then one a minute.
    let primary = serve("primary", 100, &[Code::Unavailable, Code::Unavailable]).await?;
    let secondary = serve("secondary", 3, &[]).await?;

    // The client: retry UNAVAILABLE through a breaker on the primary, and
    // fail over to the secondary. `ReplayBodyLayer` keeps each request's
    // bytes so it can be sent again; `TonicBodyLayer` hands each channel
    // its own body type; `into_status` makes the crate's rejections the
    // right gRPC codes.
    let breaker = CircuitBreakerLayer::builder()
        .name("primary")
        .failure_threshold(2)
        .open_timeout(Duration::from_secs(30))
        .classify(GrpcClassifier::new())
        .build()?;
    let breaker_handle = breaker.handle();
    let fallback = FallbackLayer::builder()
        .primary_name("greeter")
        .fallback(
            "secondary",
            ServiceBuilder::new()
                .layer(TonicBodyLayer::new())
                .service(channel(secondary)?),
        )
        .classify(GrpcClassifier::new())
        .build()?;
    let svc = ServiceBuilder::new()
        .map_err(grpc::into_status)
        .layer(ReplayBodyLayer::new(64 * 1024))
        .layer(fallback)
        .layer(
            RetryLayer::builder()
                .policy(GrpcRetryPolicy::new())
                .max_attempts(3)
                .backoff(Backoff::exponential(Duration::from_millis(20)))
                .build()?,
        )
        .layer(breaker)
        .layer(TonicBodyLayer::new())
        .service(channel(primary)?);
    let mut client = tonic::client::Grpc::new(svc);

    println!("call 1: the primary fails twice; its breaker opens and the secondary answers");
    let answer = report(say_hello(&mut client, "ada").await);
    println!("  primary breaker: {:?}", breaker_handle.state());
    expect(
        answer == Ok("secondary says hello to ada".into()),
        "call 1 failed over",
    )?;
    expect(
        breaker_handle.state() == CircuitState::Open,
        "the primary's breaker opened",
    )?;

    println!("call 2: the breaker skips the primary without a call");
    let answer = report(say_hello(&mut client, "grace").await);
    expect(
        answer == Ok("secondary says hello to grace".into()),
        "call 2 failed over",
    )?;

    println!("call 3: the secondary's bucket (3 calls) runs out on this one");
    let answer = report(say_hello(&mut client, "alan").await);
    expect(answer.is_ok(), "call 3 was admitted")?;

    println!(
        "call 4, straight to the secondary: its rate limit answers with a status, not a reset"
    );
    let mut direct = tonic::client::Grpc::new(channel(secondary)?);
    let answer = report(say_hello(&mut direct, "edsger").await);
    expect(
        answer == Err(Code::ResourceExhausted),
        "call 4 was RESOURCE_EXHAUSTED",
    )?;

    println!("call 5, through the stack: both entries are out, the caller gets UNAVAILABLE");
    let answer = report(say_hello(&mut client, "barbara").await);
    expect(answer == Err(Code::Unavailable), "call 5 was UNAVAILABLE")?;
    Ok(())
}

/// Prints an answer; keeps its text or its code for the checks.
fn report(res: Result<String, Status>) -> Result<String, Code> {
    match res {
        Ok(answer) => {
            println!("  -> Ok({answer:?})");
            Ok(answer)
        }
        Err(status) => {
            println!(
                "  -> {:?}: {} (grpc-retry-pushback-ms: {:?})",
                status.code(),
                status.message(),
                status.metadata().get("grpc-retry-pushback-ms")
            );
            Err(status.code())
        }
    }
}

/// The example doubles as a CI check: it fails when a call went otherwise.
fn expect(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("expected: {what}").into())
    }
}
