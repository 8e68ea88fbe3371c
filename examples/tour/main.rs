//! The tower-bulwark tour: one flaky upstream, called through each layer,
//! with a timeline of what every layer did.
//!
//! Run with `cargo run --example tour`. Nothing else is needed: the
//! upstream is an axum server on 127.0.0.1 started by the tour itself.

mod admission;
mod breaker;
mod common;
mod failover;
mod retry;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    common::banner("tower-bulwark tour");
    breaker::run().await?;
    breaker::run_keyed().await?;
    failover::run().await?;
    retry::run().await?;
    admission::run().await?;
    Ok(())
}
