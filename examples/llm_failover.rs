//! LLM provider failover, as seed 000's `LLMFallback` does it: a primary
//! provider and ordered fallbacks, each behind its own circuit breaker,
//! with failover on stream *set-up* only.
//!
//! A provider is a tower `Service` from a prompt to a stream of chunks.
//! Once a provider has handed out its stream, an error in the middle of it
//! is the caller's: the fallback layer cannot replay half an answer from
//! another provider.
//!
//! Run with `cargo run --example llm_failover`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, Stream, StreamExt};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::fallback::{AllFailed, FallbackEvent, FallbackLayer};
use tower_bulwark::CircuitBreakerLayer;

/// The chunks of one completion.
type ChunkStream = Pin<Box<dyn Stream<Item = Result<String, BoxError>> + Send>>;

/// A fake provider: fails to open a stream while `down`, otherwise streams
/// the words of its answer; with `break_mid_stream`, the stream fails
/// after its second chunk.
fn provider(
    name: &'static str,
    down: Arc<AtomicBool>,
    break_mid_stream: Arc<AtomicBool>,
) -> impl Service<String, Response = ChunkStream, Error = BoxError, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |prompt: String| {
        let down = down.load(Ordering::SeqCst);
        let broken = break_mid_stream.load(Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await; // connecting
            if down {
                return Err(BoxError::from(format!("{name}: connection refused")));
            }
            let words: Vec<Result<String, BoxError>> = format!("[{name}] you asked: {prompt}")
                .split(' ')
                .enumerate()
                .map(|(i, w)| {
                    if broken && i == 2 {
                        Err(BoxError::from(format!("{name}: stream reset")))
                    } else {
                        Ok(format!("{w} "))
                    }
                })
                .collect();
            let chunks: ChunkStream = Box::pin(stream::iter(words).then(|c| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                c
            }));
            Ok::<_, BoxError>(chunks)
        }
    })
}

fn flag(v: bool) -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(v))
}

/// Prints a completion as it streams; a mid-stream error ends it.
async fn complete(
    llm: &mut (impl Service<String, Response = ChunkStream, Error = BoxError> + Send),
    prompt: &str,
) {
    match llm.ready().await.unwrap().call(prompt.to_owned()).await {
        Ok(mut chunks) => {
            let mut text = String::new();
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(c) => text.push_str(&c),
                    Err(e) => {
                        println!(
                            "  streamed {text:?} then failed mid-stream: {e} (not failed over)"
                        );
                        return;
                    }
                }
            }
            println!("  streamed {text:?}");
        }
        Err(e) => match e.downcast_ref::<AllFailed>() {
            Some(all) => {
                println!("  every provider failed:");
                for (name, err) in all.errors() {
                    println!("    {name}: {err}");
                }
            }
            None => println!("  failed: {e}"),
        },
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (openai_down, anthropic_down, local_down) = (flag(true), flag(false), flag(false));
    let anthropic_breaks = flag(false);

    let layer = FallbackLayer::builder()
        .primary_name("openai")
        .fallback(
            "anthropic",
            provider(
                "anthropic",
                anthropic_down.clone(),
                anthropic_breaks.clone(),
            ),
        )
        .fallback("local", provider("local", local_down.clone(), flag(false)))
        .breaker(CircuitBreakerLayer::builder().failure_threshold(3))
        .on_event(|e| {
            if let FallbackEvent::EntryFailed { entry, .. } = e {
                println!("  ({entry} failed or skipped)");
            }
        })
        .build()?;
    let handle = layer.handle();
    let mut llm = layer.layer(provider("openai", openai_down.clone(), flag(false)));

    println!("openai is down: stream set-up fails over to anthropic");
    for _ in 0..3 {
        complete(&mut llm, "what is a circuit breaker?").await;
    }
    println!(
        "openai's breaker is now {}: it is skipped without a call",
        handle.breaker("openai").unwrap().state()
    );
    complete(&mut llm, "and a bulkhead?").await;

    println!("anthropic breaks mid-stream: the caller sees the error");
    anthropic_breaks.store(true, Ordering::SeqCst);
    complete(&mut llm, "tell me a long story").await;
    anthropic_breaks.store(false, Ordering::SeqCst);

    println!("anthropic goes down too: the local model answers");
    anthropic_down.store(true, Ordering::SeqCst);
    complete(&mut llm, "still there?").await;

    println!("everything is down:");
    local_down.store(true, Ordering::SeqCst);
    complete(&mut llm, "hello?").await;

    for (name, breaker) in handle.breakers() {
        println!("breaker {name}: {}", breaker.state());
    }
    Ok(())
}
