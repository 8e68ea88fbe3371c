//! The retry layer, its builder and its handle.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::future::{starts_light, Config, InlineName, LayerState, Light, Plan};
use super::{ClassifyPolicy, DefaultPolicy, Retry, RetryBudget, RetryEvent, RetryFn};
use crate::backoff::{Backoff, Jitter};
use crate::classify::DEFAULT_MAX_RETRY_AFTER;
use crate::error::{Check, ConfigError};
use crate::observe::Listeners;

const LAYER: &str = "retry";

/// Builds [`Retry`] services that share one configuration, budget and set
/// of counts.
///
/// Made with [`RetryLayer::builder`].
pub struct RetryLayer<P = DefaultPolicy> {
    pub(crate) shared: LayerState<P>,
}

impl RetryLayer {
    /// A builder with the defaults: 3 attempts in all, exponential back-off
    /// from 100 ms with full jitter, capped at 60 s; every error retried
    /// except the crate's own rejections; no budget, no timeouts.
    pub fn builder() -> RetryBuilder {
        RetryBuilder::new()
    }
}

impl<P> RetryLayer<P> {
    /// A handle on the layer's name and budget.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle::new(&self.shared)
    }
}

impl<P: Clone> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<P> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared.cfg;
        f.debug_struct("RetryLayer")
            .field("name", &s.name)
            .field("max_attempts", &s.plan.max_attempts)
            .field("backoff", &s.plan.backoff())
            .field("attempt_timeout", &s.attempt_timeout)
            .field("deadline", &s.deadline)
            .field("max_retry_after", &s.plan.max_retry_after())
            .field("budget", &s.budget)
            .field("policy", &std::any::type_name::<P>())
            .finish()
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, self.shared.clone())
    }
}

/// Configures a [`RetryLayer`]. See the [module docs](super).
pub struct RetryBuilder<P = DefaultPolicy> {
    name: Option<String>,
    max_attempts: u32,
    backoff: Backoff,
    attempt_timeout: Option<Duration>,
    deadline: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<RetryBudget>,
    seed: Option<u64>,
    listeners: Listeners<RetryEvent>,
    policy: P,
}

impl RetryBuilder {
    fn new() -> Self {
        Self {
            name: None,
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_millis(100)).jitter(Jitter::Full),
            attempt_timeout: None,
            deadline: None,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            budget: None,
            seed: None,
            listeners: Listeners::default(),
            policy: DefaultPolicy,
        }
    }
}

impl<P> RetryBuilder<P> {
    /// The layer's name, used in events, metrics and errors.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Attempts in all, the first included (default 3). 1 disables
    /// retries.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The delay before each retry (default: exponential from 100 ms, full
    /// jitter, capped at 60 s). The `n`th retry waits `backoff.delay(n)`,
    /// jittered.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Cuts off any attempt that takes longer than `d`; it is then retried
    /// if the policy's [`retry_timeout`](super::RetryPolicy::retry_timeout)
    /// allows, or fails with [`AttemptTimedOut`](super::AttemptTimedOut).
    /// Unset by default: no timer is armed.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// No retry starts (delay included) later than `d` after the call. The
    /// last attempt is not cut short: put a `TimeoutLayer` outside to bound
    /// the whole call. Unset by default.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Without a [`deadline`](Self::deadline), an upstream's `Retry-After`
    /// longer than this makes the layer give up rather than wait (default
    /// [`DEFAULT_MAX_RETRY_AFTER`], one minute, the cap every layer that
    /// reads such hints shares). With a deadline, the deadline decides.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// Limits retries with a budget; share one budget (it is cheap to
    /// clone) between layers to limit them together. None by default.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Seeds the jitter of every call, for reproducible delays in tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Calls `f` on every event (retries, give-ups, exhausted budget).
    /// Listeners add up; each must be quick and must not block.
    pub fn on_event(mut self, f: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(f);
        self
    }

    /// Retries what `classifier` calls a failure (except the crate's own
    /// rejections), waiting at least its `retry_after` hint.
    pub fn classify<C>(self, classifier: C) -> RetryBuilder<ClassifyPolicy<C>> {
        self.policy(ClassifyPolicy::new(classifier))
    }

    /// Retries when `f(&request, &result)` returns `true`.
    ///
    /// ```
    /// use tower_bulwark::RetryLayer;
    ///
    /// let layer = RetryLayer::builder()
    ///     .retry_if(|_req: &u32, res: &Result<u32, std::io::Error>| {
    ///         matches!(res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    ///     })
    ///     .build()?;
    /// # Ok::<(), tower_bulwark::ConfigError>(())
    /// ```
    pub fn retry_if<F>(self, f: F) -> RetryBuilder<RetryFn<F>> {
        self.policy(RetryFn::new(f))
    }

    /// Uses any [`RetryPolicy`](super::RetryPolicy).
    pub fn policy<P2>(self, policy: P2) -> RetryBuilder<P2> {
        RetryBuilder {
            name: self.name,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            attempt_timeout: self.attempt_timeout,
            deadline: self.deadline,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            seed: self.seed,
            listeners: self.listeners,
            policy,
        }
    }

    /// Validates the configuration and makes the layer.
    pub fn build(self) -> Result<RetryLayer<P>, ConfigError> {
        let check = Check { layer: LAYER };
        check.at_least_one("max_attempts", u64::from(self.max_attempts))?;
        self.backoff.validate(LAYER, "backoff")?;
        if let Some(d) = self.attempt_timeout {
            check.non_zero_duration("attempt_timeout", d)?;
        }
        if let Some(d) = self.deadline {
            check.non_zero_duration("deadline", d)?;
        }
        let name: Arc<str> = Arc::from(self.name.unwrap_or_default());
        let plan = Plan::new(
            self.max_attempts,
            self.backoff,
            self.max_retry_after,
            self.seed,
        );
        let light = (starts_light(self.attempt_timeout, self.deadline)
            && self.budget.is_none()
            && self.listeners.is_empty())
        .then(|| InlineName::new(&name))
        .flatten()
        .map(|name| Light { plan, name });
        let cfg = Arc::new(Config {
            name,
            plan,
            attempt_timeout: self.attempt_timeout,
            deadline: self.deadline,
            budget: self.budget,
            listeners: self.listeners,
            light,
        });
        Ok(RetryLayer {
            shared: LayerState {
                cfg,
                policy: self.policy,
            },
        })
    }
}

impl<P> fmt::Debug for RetryBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBuilder")
            .field("name", &self.name)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .field("budget", &self.budget)
            .field("policy", &std::any::type_name::<P>())
            .finish_non_exhaustive()
    }
}

/// Reads a retry layer's settings and budget from outside the stack.
#[derive(Clone)]
pub struct RetryHandle {
    name: Arc<str>,
    max_attempts: u32,
    budget: Option<RetryBudget>,
}

impl RetryHandle {
    pub(crate) fn new<P>(shared: &LayerState<P>) -> Self {
        Self {
            name: shared.cfg.name.clone(),
            max_attempts: shared.cfg.plan.max_attempts,
            budget: shared.cfg.budget.clone(),
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attempts per call, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The budget, if one was set: shared with the layer, so
    /// [`available`](RetryBudget::available) is live.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }
}

impl fmt::Debug for RetryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryHandle")
            .field("name", &self.name)
            .field("max_attempts", &self.max_attempts)
            .field("budget", &self.budget)
            .finish()
    }
}

impl Default for RetryLayer {
    /// A retry layer with the defaults (see [`RetryLayer::builder`]): 3
    /// attempts in all, exponential back-off from 100 ms with full jitter,
    /// every error retried except the crate's own rejections.
    fn default() -> Self {
        match Self::builder().build() {
            Ok(layer) => layer,
            Err(e) => unreachable!("the default retry config is valid: {e}"),
        }
    }
}
