//! The timeout layer, its builder and its handle.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{TimedOut, Timeout, TimeoutEvent};
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "timeout";

/// What every service of one timeout layer shares.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) name: Arc<str>,
    pub(crate) timeout: Duration,
    pub(crate) listeners: Listeners<TimeoutEvent>,
    timed_out: AtomicU64,
}

impl Core {
    /// Books a call that ran out of time and makes its error.
    #[cold]
    pub(crate) fn timed_out(&self, timeout: Duration) -> TimedOut {
        self.timed_out.fetch_add(1, Relaxed);
        self.listeners.emit(&TimeoutEvent::TimedOut {
            name: self.name.clone(),
            timeout,
        });
        TimedOut::new(self.name.clone(), timeout)
    }
}

/// Picks a request's own timeout, e.g. from a `grpc-timeout` or
/// `X-Request-Timeout` header. The layer uses the shorter of it and the
/// configured timeout.
///
/// Closures `Fn(&Req) -> Option<Duration>` implement it through
/// [`TimeoutBuilder::per_request`].
pub trait RequestTimeout<Req> {
    /// The request's own timeout, or `None` to use the configured one.
    fn timeout(&self, req: &Req) -> Option<Duration>;
}

/// No per-request timeout: every call gets the configured one.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRequestTimeout;

impl<Req> RequestTimeout<Req> for NoRequestTimeout {
    #[inline]
    fn timeout(&self, _req: &Req) -> Option<Duration> {
        None
    }
}

/// A per-request timeout read by a closure. Made by
/// [`TimeoutBuilder::per_request`].
#[derive(Clone, Copy)]
pub struct RequestTimeoutFn<F> {
    f: F,
}

impl<F, Req> RequestTimeout<Req> for RequestTimeoutFn<F>
where
    F: Fn(&Req) -> Option<Duration>,
{
    #[inline]
    fn timeout(&self, req: &Req) -> Option<Duration> {
        (self.f)(req)
    }
}

impl<F> fmt::Debug for RequestTimeoutFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTimeoutFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// Builds [`Timeout`] services. Made with [`TimeoutLayer::builder`].
///
/// Every service the layer makes, and every clone, shares its name,
/// listeners and count of timed-out calls.
#[derive(Clone)]
pub struct TimeoutLayer<T = NoRequestTimeout> {
    pub(crate) core: Arc<Core>,
    pub(crate) per_request: T,
}

impl TimeoutLayer {
    /// A builder. [`timeout`](TimeoutBuilder::timeout) has no default and
    /// must be set.
    pub fn builder() -> TimeoutBuilder {
        TimeoutBuilder {
            name: None,
            timeout: None,
            per_request: NoRequestTimeout,
            listeners: Listeners::default(),
        }
    }
}

impl<T> TimeoutLayer<T> {
    /// A handle that reads the layer's settings and counts from outside the
    /// stack.
    pub fn handle(&self) -> TimeoutHandle {
        TimeoutHandle {
            core: self.core.clone(),
        }
    }
}

impl<T> fmt::Debug for TimeoutLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutLayer")
            .field("name", &self.core.name)
            .field("timeout", &self.core.timeout)
            .field("per_request", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T: Clone> Layer<S> for TimeoutLayer<T> {
    type Service = Timeout<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::from_parts(inner, self.core.clone(), self.per_request.clone())
    }
}

/// Configures a [`TimeoutLayer`]. See the [module docs](super).
pub struct TimeoutBuilder<T = NoRequestTimeout> {
    name: Option<String>,
    timeout: Option<Duration>,
    per_request: T,
    listeners: Listeners<TimeoutEvent>,
}

impl<T> TimeoutBuilder<T> {
    /// The layer's name, used in errors, events and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The longest a call may take (required, above zero). A call still
    /// running then is dropped, which cancels it, and fails with
    /// [`TimedOut`]. A timeout too long for the clock to represent (such
    /// as `Duration::MAX`) never fires.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Reads a request's own timeout, e.g. from a `grpc-timeout` or
    /// `X-Request-Timeout` header. The shorter of it and
    /// [`timeout`](Self::timeout) applies: a caller can ask for less time,
    /// never more. `None` means the configured timeout.
    pub fn per_request<F, Req>(self, f: F) -> TimeoutBuilder<RequestTimeoutFn<F>>
    where
        F: Fn(&Req) -> Option<Duration>,
    {
        TimeoutBuilder {
            name: self.name,
            timeout: self.timeout,
            per_request: RequestTimeoutFn { f },
            listeners: self.listeners,
        }
    }

    /// Calls `f` on every event (a call timed out). Listeners add up; each
    /// must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&TimeoutEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<TimeoutLayer<T>, ConfigError> {
        let check = Check { layer: LAYER };
        let Some(timeout) = self.timeout else {
            return Err(ConfigError::new(LAYER, "timeout", "must be set"));
        };
        check.non_zero_duration("timeout", timeout)?;
        Ok(TimeoutLayer {
            core: Arc::new(Core {
                name: Arc::from(self.name.unwrap_or_default()),
                timeout,
                listeners: self.listeners,
                timed_out: AtomicU64::new(0),
            }),
            per_request: self.per_request,
        })
    }
}

impl<T> fmt::Debug for TimeoutBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBuilder")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("per_request", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

/// Reads a timeout layer's settings and counts from outside the stack.
/// Cheap to clone.
#[derive(Clone)]
pub struct TimeoutHandle {
    pub(crate) core: Arc<Core>,
}

impl TimeoutHandle {
    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.core.timeout
    }

    /// Calls that timed out since the layer was built.
    pub fn timed_out(&self) -> u64 {
        self.core.timed_out.load(Relaxed)
    }
}

impl fmt::Debug for TimeoutHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutHandle")
            .field("name", &self.name())
            .field("timeout", &self.timeout())
            .field("timed_out", &self.timed_out())
            .finish()
    }
}
