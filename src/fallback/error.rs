//! The fallback layer's errors.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{rejection, BoxError, Rejection};

/// Every entry of a fallback group failed, or was skipped.
///
/// [`errors`](AllFailed::errors) holds one error per entry, primary first,
/// in the order they were tried: the entry's own error, a
/// [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) for an entry whose
/// breaker was open, [`NotReady`] for an entry skipped because it was not
/// ready, or [`FailedResponse`] for an answer the classifier called a
/// failure (a 5xx with `http::StatusClassifier`).
///
/// ```
/// use tower_bulwark::fallback::AllFailed;
/// # fn check(err: tower::BoxError) {
/// if let Some(all) = err.downcast_ref::<AllFailed>() {
///     for (name, err) in all.errors() {
///         eprintln!("{name}: {err}");
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct AllFailed {
    name: Arc<str>,
    errors: Vec<(Arc<str>, BoxError)>,
}

impl AllFailed {
    pub(crate) fn new(name: Arc<str>, errors: Vec<(Arc<str>, BoxError)>) -> Self {
        Self { name, errors }
    }

    /// The group's name: its primary's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each entry's name and error, primary first, in the order tried.
    pub fn errors(&self) -> &[(Arc<str>, BoxError)] {
        &self.errors
    }

    /// The error of the entry called `name`, if it was tried.
    pub fn error_of(&self, name: &str) -> Option<&BoxError> {
        self.errors
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, e)| e)
    }

    /// Takes the entries' errors out.
    pub fn into_errors(self) -> Vec<(Arc<str>, BoxError)> {
        self.errors
    }
}

impl fmt::Display for AllFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "every entry of fallback `{}` failed", self.name)?;
        for (i, (name, err)) in self.errors.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{name}: {err}")?;
        }
        Ok(())
    }
}

impl Error for AllFailed {
    /// The last entry's error.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.errors
            .last()
            .map(|(_, e)| &**e as &(dyn Error + 'static))
    }
}

impl Rejection for AllFailed {
    fn layer(&self) -> &'static str {
        "fallback"
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// When every entry was turned away by one of this crate's layers with
    /// a hint (an open breaker, an empty bucket), the soonest of those
    /// hints; otherwise `None`.
    fn retry_after(&self) -> Option<Duration> {
        let mut soonest: Option<Duration> = None;
        for (_, err) in &self.errors {
            let hint = rejection(err.as_ref())?.retry_after()?;
            soonest = Some(soonest.map_or(hint, |s| s.min(hint)));
        }
        soonest
    }
}

/// An entry was skipped because it was not ready (only with
/// [`skip_not_ready`](super::FallbackBuilder::skip_not_ready)).
#[derive(Debug, Clone)]
pub struct NotReady {
    name: Arc<str>,
}

impl NotReady {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self { name }
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` was not ready", self.name)
    }
}

impl Error for NotReady {}

/// An entry answered, but the classifier called the answer a failure (for
/// example a 5xx response with `http::StatusClassifier`). The answer itself
/// is dropped.
#[derive(Debug, Clone)]
pub struct FailedResponse {
    name: Arc<str>,
}

impl FailedResponse {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self { name }
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for FailedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` answered with a response classified as a failure",
            self.name
        )
    }
}

impl Error for FailedResponse {}
