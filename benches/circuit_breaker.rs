//! Circuit breaker benchmarks (placeholder until they land on main).
fn main() {}
