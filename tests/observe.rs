//! Every event reaches tracing (with the shared `layer`, `name`, `event`
//! fields), the `metrics` facade, and the `on_event` listeners.
#![cfg(all(feature = "tracing", feature = "metrics", feature = "circuit-breaker"))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{service_fn, Layer, ServiceExt};
use tower_bulwark::circuit_breaker::{CircuitBreakerLayer, CircuitEvent};
use tower_bulwark::BoxError;
use tracing::field::{Field, Visit};
use tracing::span;

/// A minimal subscriber that keeps each event's fields as strings.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = BTreeMap::new();
        fields.insert("level".to_owned(), event.metadata().level().to_string());
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[test]
fn breaker_events_reach_tracing_metrics_and_listeners() {
    let capture = Capture::default();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h2 = heard.clone();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let _tracing = tracing::subscriber::set_default(capture.clone());
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let layer = CircuitBreakerLayer::builder()
                .name("obs")
                .failure_threshold(1)
                .open_timeout(Duration::from_secs(1))
                .on_event(move |e: &CircuitEvent| h2.lock().unwrap().push(format!("{e:?}")))
                .build()
                .unwrap();
            let svc = layer.layer(service_fn(|_: ()| async {
                Err::<(), BoxError>("down".into())
            }));
            let _ = svc.clone().oneshot(()).await; // opens
            let _ = svc.clone().oneshot(()).await; // rejected
        })
    });

    let events = capture.0.lock().unwrap();
    let opened = events
        .iter()
        .find(|e| e.get("event").map(String::as_str) == Some("opened"))
        .expect("an `opened` tracing event");
    assert_eq!(opened["layer"], "circuit_breaker");
    assert_eq!(opened["name"], "obs");
    assert_eq!(opened["level"], "WARN");
    let rejected = events
        .iter()
        .find(|e| e.get("event").map(String::as_str) == Some("rejected"))
        .expect("a `rejected` tracing event");
    assert_eq!(rejected["level"], "DEBUG");

    let heard = heard.lock().unwrap();
    assert_eq!(heard.len(), 2, "{heard:?}");
    assert!(heard[0].starts_with("StateChanged"));
    assert!(heard[1].starts_with("Rejected"));

    let metrics: Vec<_> = snapshotter.snapshot().into_vec();
    let find = |name: &str, label: (&str, &str)| {
        metrics.iter().find_map(|(key, _, _, value)| {
            let k = key.key();
            (k.name() == name
                && k.labels()
                    .any(|l| l.key() == label.0 && l.value() == label.1))
            .then_some(value)
        })
    };
    assert_eq!(
        find("bulwark_events_total", ("event", "opened")),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        find("bulwark_events_total", ("event", "rejected")),
        Some(&DebugValue::Counter(1))
    );
    match find("bulwark_circuit_state", ("name", "obs")) {
        Some(DebugValue::Gauge(v)) => assert_eq!(v.into_inner(), 1.0), // open
        other => panic!("no state gauge: {other:?}"),
    }
}
