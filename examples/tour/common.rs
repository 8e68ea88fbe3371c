//! Shared bits of the tour: a timeline printer.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Prints a section heading.
pub(crate) fn banner(title: &str) {
    START.get_or_init(Instant::now);
    println!("\n== {title} ==");
}

/// Prints one timeline line, stamped with the time since the tour began.
pub(crate) fn say(line: impl std::fmt::Display) {
    let t = START.get_or_init(Instant::now).elapsed();
    println!("[{:>7.3}s] {line}", t.as_secs_f64());
}
