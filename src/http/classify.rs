use std::time::Duration;

use http::Response;

use crate::classify::{Classify, Outcome};

/// Classifies HTTP responses by status: 5xx is a failure, and so is any
/// `Err` from the service (a connection error). 429 is a success for the
/// upstream's health unless [`failure_on_429`](StatusClassifier::failure_on_429)
/// is set. 429 and 503 answers carry their `Retry-After` as a back-off hint.
///
/// ```
/// use std::time::Duration;
/// use http::{Response, StatusCode};
/// use tower_bulwark::classify::{Classify, Outcome};
/// use tower_bulwark::http::StatusClassifier;
///
/// let c = StatusClassifier::new();
/// let res = |s: u16| -> Result<Response<()>, std::io::Error> {
///     Ok(Response::builder().status(s).header("retry-after", "3").body(()).unwrap())
/// };
/// assert_eq!(c.classify(&res(200), Duration::ZERO), Outcome::Success);
/// assert_eq!(c.classify(&res(404), Duration::ZERO), Outcome::Success);
/// assert_eq!(c.classify(&res(503), Duration::ZERO), Outcome::Failure);
/// assert_eq!(c.classify(&res(429), Duration::ZERO), Outcome::Success);
/// assert_eq!(c.failure_on_429(true).classify(&res(429), Duration::ZERO), Outcome::Failure);
/// assert_eq!(c.retry_after(&res(503)), Some(Duration::from_secs(3)));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusClassifier {
    failure_on_429: bool,
}

impl StatusClassifier {
    /// 5xx and errors are failures; everything else succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `429 Too Many Requests` counts as a failure (default no).
    pub fn failure_on_429(mut self, yes: bool) -> Self {
        self.failure_on_429 = yes;
        self
    }

    /// The outcome of a status code alone.
    pub fn classify_status(&self, status: http::StatusCode) -> Outcome {
        if status.is_server_error()
            || (self.failure_on_429 && status == http::StatusCode::TOO_MANY_REQUESTS)
        {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

impl<B, E> Classify<Response<B>, E> for StatusClassifier {
    fn classify(&self, result: &Result<Response<B>, E>, _elapsed: Duration) -> Outcome {
        match result {
            Ok(res) => self.classify_status(res.status()),
            Err(_) => Outcome::Failure,
        }
    }

    fn retry_after(&self, result: &Result<Response<B>, E>) -> Option<Duration> {
        let res = result.as_ref().ok()?;
        super::retry_after_of(res.status(), res.headers())
    }
}
