//! Observability shared by every layer.
//!
//! Each layer reports what it does as a typed event (for example
//! `circuit_breaker::CircuitEvent`). Every event goes to three places:
//!
//! - a `tracing` event (feature `tracing`, on by default) with the same
//!   fields in every layer: `layer`, `name` and `event`, plus the event's
//!   own `detail`; warnings (a circuit opening, a bucket running dry) are
//!   logged at `WARN`, the rest at `DEBUG`;
//! - the `metrics` facade (feature `metrics`): a counter
//!   `bulwark_events_total{layer, name, event}`, and gauges that layers keep
//!   current (such as `bulwark_circuit_state{name}`);
//! - the builder's `on_event` listener, if one was given: a plain closure,
//!   called synchronously, that must not block. A listener that panics
//!   does not disturb the layer: the panic is caught, reported, and the
//!   call goes on.
//!
//! Events are only raised off the hot path: a successful call through a
//! healthy layer raises none.

use std::fmt;
use std::sync::Arc;

/// What every layer's events have in common.
pub trait Event: fmt::Debug {
    /// The reporting layer, e.g. `"circuit_breaker"`.
    fn layer(&self) -> &'static str;
    /// The layer's configured name.
    fn name(&self) -> &str;
    /// A short, stable, snake_case label for the event, e.g. `"opened"`.
    fn kind(&self) -> &'static str;
    /// Whether the event deserves attention (logged at `WARN`).
    fn is_warning(&self) -> bool {
        false
    }
}

type ListenerFn<E> = dyn Fn(&E) + Send + Sync;

/// The `on_event` listeners of one layer. Cheap to clone.
pub(crate) struct Listeners<E> {
    listeners: Vec<Arc<ListenerFn<E>>>,
}

impl<E> Clone for Listeners<E> {
    fn clone(&self) -> Self {
        Self {
            listeners: self.listeners.clone(),
        }
    }
}

impl<E> Default for Listeners<E> {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
        }
    }
}

impl<E> fmt::Debug for Listeners<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("count", &self.listeners.len())
            .finish()
    }
}

impl<E> Listeners<E> {
    /// Whether no listener was added.
    #[allow(dead_code)]
    pub(crate) fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }
}

impl<E: Event> Listeners<E> {
    pub(crate) fn push(&mut self, f: impl Fn(&E) + Send + Sync + 'static) {
        self.listeners.push(Arc::new(f));
    }

    /// Whether an event would reach anything: a listener, `metrics`, or
    /// `tracing` at `DEBUG`. Lets a hot path skip building the event.
    #[allow(dead_code)]
    #[inline]
    pub(crate) fn active(&self) -> bool {
        !self.listeners.is_empty() || cfg!(feature = "metrics") || tracing_on()
    }

    /// Sends `event` to tracing, metrics and the listeners.
    ///
    /// A listener that panics is contained here: the panic is reported
    /// (by the panic hook, and as a `tracing` error) and the other
    /// listeners and the layer carry on. Events are raised while a layer
    /// is in the middle of its work, often with capacity taken on the
    /// caller's behalf or inside a background task; unwinding out of
    /// there would take down the caller's request, or a store's sync
    /// task, for a fault in observation code.
    pub(crate) fn emit(&self, event: &E) {
        emit_unlistened(event);
        for l in &self.listeners {
            let call = std::panic::AssertUnwindSafe(|| l(event));
            if std::panic::catch_unwind(call).is_err() {
                listener_panicked(event);
            }
        }
    }
}

#[cold]
#[allow(unused_variables)]
fn listener_panicked<E: Event>(event: &E) {
    #[cfg(feature = "tracing")]
    tracing::error!(
        layer = event.layer(),
        name = event.name(),
        event = event.kind(),
        "an on_event listener panicked; the panic was contained"
    );
}

/// Sends `event` to tracing and metrics, for a layer without listeners.
#[allow(dead_code)]
pub(crate) fn emit_unlistened<E: Event>(event: &E) {
    trace_event(event);
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "bulwark_events_total",
        "layer" => event.layer(),
        "name" => event.name().to_owned(),
        "event" => event.kind(),
    )
    .increment(1);
}

#[cfg(feature = "tracing")]
fn trace_event<E: Event>(event: &E) {
    if event.is_warning() {
        tracing::warn!(
            layer = event.layer(),
            name = event.name(),
            event = event.kind(),
            detail = ?event,
            "bulwark {} {}",
            event.layer(),
            event.kind()
        );
    } else {
        tracing::debug!(
            layer = event.layer(),
            name = event.name(),
            event = event.kind(),
            detail = ?event,
            "bulwark {} {}",
            event.layer(),
            event.kind()
        );
    }
}

#[cfg(feature = "tracing")]
#[inline]
fn tracing_on() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    tracing::Level::DEBUG <= STATIC_MAX_LEVEL && tracing::Level::DEBUG <= LevelFilter::current()
}

#[cfg(not(feature = "tracing"))]
#[inline]
fn tracing_on() -> bool {
    false
}

#[cfg(not(feature = "tracing"))]
fn trace_event<E: Event>(_event: &E) {}

/// Sets a gauge through the `metrics` facade (a no-op without the feature).
#[allow(unused_variables)]
pub(crate) fn gauge(metric: &'static str, name: &str, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(metric, "name" => name.to_owned()).set(value);
}
