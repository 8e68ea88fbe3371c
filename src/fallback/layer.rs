//! The fallback layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;
use tower_service::Service;

use super::entry::{BoxService, Entry, Group, OrElse, Resend};
use super::{AllFailed, Fallback, FallbackEvent};
use crate::circuit_breaker::{CircuitBreakerBuilder, CircuitBreakerLayer, CircuitHandle};
use crate::classify::DefaultClassifier;
use crate::error::{BoxError, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "fallback";

/// Wraps a primary service with ordered fallbacks, each behind its own
/// circuit breaker. See the [module docs](super).
///
/// `Req` and `Res` are the request and response types every entry shares.
/// Cloning the layer, and every service it makes, shares the fallbacks and
/// the breakers.
pub struct FallbackLayer<Req, Res, C = DefaultClassifier> {
    pub(crate) group: Arc<Group<Req, Res, C>>,
    pub(crate) handle: FallbackHandle,
}

impl<Req, Res> FallbackLayer<Req, Res> {
    /// A builder: no fallbacks yet, a primary called `"primary"`, breakers
    /// with the circuit breaker's defaults, and every `Err` failing over.
    ///
    /// **For HTTP requests, use `FallbackLayer::http_builder()`** (feature
    /// `http`) instead. This builder works for any request type and so
    /// knows nothing of methods or bodies: it sends every failed request on
    /// to the next entry, a `POST` that may already have taken effect
    /// included, and it fails over on errors only, not on 5xx answers.
    /// `http_builder()` fails over on 5xx too, and only requests that may
    /// be sent again (idempotent, body still replayable).
    pub fn builder() -> FallbackBuilder<Req, Res> {
        FallbackBuilder {
            primary_name: None,
            fallbacks: Vec::new(),
            breaker: None,
            classifier: DefaultClassifier,
            skip_not_ready: false,
            or_else: None,
            listeners: Listeners::default(),
            resend: None,
        }
    }
}

impl<Req, Res, C> FallbackLayer<Req, Res, C> {
    /// A handle on every entry's breaker.
    pub fn handle(&self) -> FallbackHandle {
        self.handle.clone()
    }
}

impl<Req, Res, C> Clone for FallbackLayer<Req, Res, C> {
    fn clone(&self) -> Self {
        Self {
            group: self.group.clone(),
            handle: self.handle.clone(),
        }
    }
}

impl<Req, Res, C> fmt::Debug for FallbackLayer<Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("group", &self.group)
            .finish()
    }
}

impl<S, Req, Res, C> Layer<S> for FallbackLayer<Req, Res, C> {
    type Service = Fallback<S, Req, Res, C>;

    fn layer(&self, primary: S) -> Self::Service {
        Fallback::new(primary, self)
    }
}

/// Configures a [`FallbackLayer`]. See the [module docs](super).
pub struct FallbackBuilder<Req, Res, C = DefaultClassifier> {
    primary_name: Option<String>,
    fallbacks: Vec<(String, BoxService<Req, Res>)>,
    breaker: Option<CircuitBreakerBuilder>,
    classifier: C,
    skip_not_ready: bool,
    or_else: Option<Arc<OrElse<Res>>>,
    listeners: Listeners<FallbackEvent>,
    resend: Option<Arc<Resend<Req>>>,
}

impl<Req, Res, C> FallbackBuilder<Req, Res, C> {
    /// The primary's name (default `"primary"`), used in errors, events and
    /// as its breaker's name. It also names the group.
    pub fn primary_name(mut self, name: impl Into<String>) -> Self {
        self.primary_name = Some(name.into());
        self
    }

    /// Adds a fallback, tried after the primary and the fallbacks added
    /// before it. Any service with the same request and response types
    /// will do; its errors are boxed.
    ///
    /// Each service made by the layer calls a clone of `service`, so it is
    /// cloned once per attempt that reaches it: cheap for the usual
    /// `Arc`-backed clients.
    pub fn fallback<S>(mut self, name: impl Into<String>, service: S) -> Self
    where
        S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.fallbacks.push((name.into(), Box::new(service)));
        self
    }

    /// The configuration of every entry's breaker (default:
    /// `CircuitBreakerLayer::builder()`). Each entry, the primary included,
    /// gets its own breaker built from it and named after the entry.
    ///
    /// The fallback's [`classify`](Self::classify) decides what the breakers
    /// count as failures; the breaker builder's own classifier is not used.
    pub fn breaker(mut self, breaker: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Decides which results fail over, and what the breakers count as
    /// failures (default: every `Err`; with the `http` feature,
    /// `http::StatusClassifier` also fails over on 5xx). An `Ignore`
    /// outcome is returned to the caller without failing over.
    pub fn classify<C2>(self, classifier: C2) -> FallbackBuilder<Req, Res, C2> {
        FallbackBuilder {
            primary_name: self.primary_name,
            fallbacks: self.fallbacks,
            breaker: self.breaker,
            classifier,
            skip_not_ready: self.skip_not_ready,
            or_else: self.or_else,
            listeners: self.listeners,
            resend: self.resend,
        }
    }

    /// Fails over a request that an entry was sent only when `f` says it
    /// may be sent again (default: always). When `f` says no, the failed
    /// entry's answer or error is the call's. An entry skipped without a
    /// call (open breaker, not ready, or readiness that failed) never saw
    /// the request, so the next one gets it regardless.
    ///
    /// For HTTP, `http::may_resend` allows idempotent requests whose body
    /// can still be replayed, the rule retry follows; the builder from
    /// `FallbackLayer::http_builder()` (feature `http`) sets it.
    pub fn fail_over_if(mut self, f: impl Fn(&Req) -> bool + Send + Sync + 'static) -> Self {
        self.resend = Some(Arc::new(f));
        self
    }

    /// Treats an entry that is not ready as unavailable and moves on to the
    /// next, instead of waiting for it (default: wait). For the primary,
    /// the service then reports ready even while the primary is not, and
    /// the call starts with the first fallback.
    pub fn skip_not_ready(mut self, yes: bool) -> Self {
        self.skip_not_ready = yes;
        self
    }

    /// The last resort: when every entry has failed, `f` gets the
    /// [`AllFailed`] error and its result is the answer.
    pub fn or_else(
        mut self,
        f: impl Fn(AllFailed) -> Result<Res, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.or_else = Some(Arc::new(f));
        self
    }

    /// A fixed answer when every entry has failed; see
    /// [`or_else`](Self::or_else).
    pub fn or_value(self, value: Res) -> Self
    where
        Res: Clone + Send + Sync + 'static,
    {
        self.or_else(move |_| Ok(value.clone()))
    }

    /// Calls `f` on every event (an entry failed or was skipped, a
    /// fallback answered, all failed). Listeners add up; each must be quick
    /// and must not block.
    pub fn on_event(mut self, f: impl Fn(&FallbackEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer: one breaker per
    /// entry. Entry names must be unique and not empty.
    pub fn build(self) -> Result<FallbackLayer<Req, Res, C>, ConfigError>
    where
        Req: 'static,
        Res: 'static,
        C: Send + Sync + 'static,
    {
        let primary_name = self.primary_name.unwrap_or_else(|| "primary".to_owned());
        let breaker = self.breaker.unwrap_or_else(CircuitBreakerLayer::builder);
        let mut entries = Vec::with_capacity(self.fallbacks.len() + 1);
        let names = std::iter::once((primary_name, None))
            .chain(self.fallbacks.into_iter().map(|(n, s)| (n, Some(s))));
        for (name, service) in names {
            let field = if service.is_none() {
                "primary_name"
            } else {
                "fallback"
            };
            if name.is_empty() {
                return Err(ConfigError::new(LAYER, field, "names must not be empty"));
            }
            if entries.iter().any(|e: &Entry<Req, Res>| *e.name == *name) {
                return Err(ConfigError::new(
                    LAYER,
                    field,
                    format!("names must be unique (`{name}` is used twice)"),
                ));
            }
            entries.push(Entry {
                breaker: breaker.clone().name(name.as_str()).build()?,
                name: Arc::from(name),
                service,
            });
        }
        let handle = FallbackHandle {
            breakers: entries
                .iter()
                .map(|e| (e.name.clone(), e.breaker.handle()))
                .collect(),
        };
        Ok(FallbackLayer {
            group: Arc::new(Group {
                primary: entries[0].breaker.core.clone(),
                entries: entries.into_boxed_slice(),
                classifier: self.classifier,
                skip_not_ready: self.skip_not_ready,
                or_else: self.or_else,
                listeners: self.listeners,
                resend: self.resend,
            }),
            handle,
        })
    }
}

impl<Req, Res, C> fmt::Debug for FallbackBuilder<Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBuilder")
            .field("primary_name", &self.primary_name)
            .field(
                "fallbacks",
                &self.fallbacks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("breaker", &self.breaker)
            .field("classifier", &std::any::type_name::<C>())
            .field("skip_not_ready", &self.skip_not_ready)
            .field("or_else", &self.or_else.is_some())
            .finish()
    }
}

/// Reads and steers the breakers of a fallback group, primary first.
///
/// Cheap to clone; every clone and every service of the layer see the same
/// breakers.
#[derive(Clone)]
pub struct FallbackHandle {
    breakers: Arc<[(Arc<str>, CircuitHandle)]>,
}

impl FallbackHandle {
    /// The breaker of the entry called `name`.
    pub fn breaker(&self, name: &str) -> Option<&CircuitHandle> {
        self.breakers
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, h)| h)
    }

    /// Every entry's name and breaker, primary first.
    pub fn breakers(&self) -> impl Iterator<Item = (&str, &CircuitHandle)> + '_ {
        self.breakers.iter().map(|(n, h)| (&**n, h))
    }

    /// The entries' names, primary first.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.breakers.iter().map(|(n, _)| &**n)
    }
}

impl fmt::Debug for FallbackHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.breakers.iter().map(|(n, h)| (&**n, h.state())))
            .finish()
    }
}
