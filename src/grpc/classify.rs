//! The gRPC status classifier.

use std::any::Any;
use std::time::Duration;

use http::{HeaderMap, Response};
use tonic::Code;

use super::codes::{self, CodeSet, Pushback};
use crate::classify::{Classify, Outcome};
use crate::error::BoxError;

/// Classifies gRPC answers by their `grpc-status`.
///
/// A gRPC call that fails still comes back as HTTP `200 OK`: the failure
/// is in the `grpc-status` field, sent in the response headers when the
/// server answers with nothing but a status (a *trailers-only* answer:
/// how tonic, grpc-go and grpc-java send an error before any message) or
/// in the trailers after the messages. [`StatusClassifier`] and the
/// default classifier both see a success there; this one reads the code.
///
/// - Failures by default: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`,
///   `RESOURCE_EXHAUSTED` and `UNKNOWN`, the codes that say the upstream
///   is unwell. `NOT_FOUND`, `INVALID_ARGUMENT` and the other codes about
///   the request itself are successes for the upstream's health. Change
///   the set with [`failure_codes`](Self::failure_codes) or
///   [`failure_on`](Self::failure_on).
/// - An answer with an HTTP status other than 200 (from a proxy) takes the
///   code gRPC maps it to: 502, 503, 504 and 429 are `UNAVAILABLE`.
/// - An `Err` is a failure (the channel could not reach the server),
///   unless it is a [`tonic::Status`], which is classified by its code.
/// - A `grpc-retry-pushback-ms` header is the answer's back-off hint
///   ([`retry_after`](Classify::retry_after)), so a breaker built with
///   `honor_retry_after(true)` stays open that long.
///
/// # Status in the trailers
///
/// A layer classifies an answer when its headers arrive. An answer whose
/// status only comes in the trailers (a unary success, a stream) is a
/// success then: the upstream answered. A stream that fails after it
/// sent messages reports that in its trailers, which
/// [`classify_trailers`](Self::classify_trailers) reads; use it where the
/// body is consumed (the client sees such a failure as the stream's
/// final `Err(Status)`).
///
/// ```
/// use std::time::Duration;
/// use tonic::Code;
/// use tower_bulwark::classify::{Classify, Outcome};
/// use tower_bulwark::grpc::GrpcClassifier;
///
/// let c = GrpcClassifier::new();
/// let answer = |code: Code| -> Result<http::Response<()>, tower_bulwark::BoxError> {
///     Ok(tonic::Status::new(code, "").into_http())
/// };
/// assert_eq!(c.classify(&answer(Code::Unavailable), Duration::ZERO), Outcome::Failure);
/// assert_eq!(c.classify(&answer(Code::NotFound), Duration::ZERO), Outcome::Success);
/// let strict = c.failure_on(Code::NotFound, true);
/// assert_eq!(strict.classify(&answer(Code::NotFound), Duration::ZERO), Outcome::Failure);
/// ```
///
/// [`StatusClassifier`]: crate::http::StatusClassifier
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    failures: CodeSet,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        Self {
            failures: CodeSet::of([
                Code::Unavailable,
                Code::DeadlineExceeded,
                Code::Internal,
                Code::ResourceExhausted,
                Code::Unknown,
            ]),
        }
    }
}

impl GrpcClassifier {
    /// The default failure codes: `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
    /// `INTERNAL`, `RESOURCE_EXHAUSTED` and `UNKNOWN`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exactly these codes are failures; every other code is a success.
    pub fn failure_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.failures = CodeSet::of(codes);
        self
    }

    /// Adds `code` to the failures (`true`) or removes it (`false`).
    pub fn failure_on(mut self, code: Code, yes: bool) -> Self {
        self.failures = self.failures.with(code, yes);
        self
    }

    /// The outcome of a gRPC code alone.
    pub fn classify_code(&self, code: Code) -> Outcome {
        if self.failures.contains(code) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// The outcome a call's trailers report; a success when they carry no
    /// `grpc-status`.
    pub fn classify_trailers(&self, trailers: &HeaderMap) -> Outcome {
        codes::status_code(trailers).map_or(Outcome::Success, |c| self.classify_code(c))
    }
}

/// The code of a `tonic::Status` error, boxed or not.
pub(crate) fn error_code<E: 'static>(err: &E) -> Option<Code> {
    let any: &dyn Any = err;
    if let Some(status) = any.downcast_ref::<tonic::Status>() {
        return Some(status.code());
    }
    let boxed = any.downcast_ref::<BoxError>()?;
    crate::error::find::<tonic::Status>(&**boxed).map(tonic::Status::code)
}

impl<B, E: 'static> Classify<Response<B>, E> for GrpcClassifier {
    fn classify(&self, result: &Result<Response<B>, E>, _elapsed: Duration) -> Outcome {
        match result {
            Ok(res) => match codes::response_code(res.status(), res.headers()) {
                Some(code) => self.classify_code(code),
                None => Outcome::Success,
            },
            Err(e) => error_code(e).map_or(Outcome::Failure, |c| self.classify_code(c)),
        }
    }

    fn retry_after(&self, result: &Result<Response<B>, E>) -> Option<Duration> {
        match codes::pushback(result.as_ref().ok()?.headers()) {
            Pushback::Wait(d) => Some(d),
            Pushback::None | Pushback::Stop => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Res = Result<Response<()>, BoxError>;

    fn trailers_only(code: Code) -> Res {
        Ok(tonic::Status::new(code, "x").into_http())
    }

    #[test]
    fn default_failures() {
        let c = GrpcClassifier::new();
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
            Code::Unknown,
        ] {
            assert_eq!(
                c.classify(&trailers_only(code), Duration::ZERO),
                Outcome::Failure
            );
        }
        for code in [
            Code::Ok,
            Code::NotFound,
            Code::InvalidArgument,
            Code::PermissionDenied,
        ] {
            assert_eq!(
                c.classify(&trailers_only(code), Duration::ZERO),
                Outcome::Success
            );
        }
        // Headers only: the status is still to come.
        let streaming: Res = Ok(Response::new(()));
        assert_eq!(c.classify(&streaming, Duration::ZERO), Outcome::Success);
        let proxy: Res = Ok(Response::builder().status(503).body(()).unwrap());
        assert_eq!(c.classify(&proxy, Duration::ZERO), Outcome::Failure);
    }

    #[test]
    fn errors_and_trailers() {
        let c = GrpcClassifier::new();
        let transport: Res = Err("connection refused".into());
        assert_eq!(c.classify(&transport, Duration::ZERO), Outcome::Failure);
        let not_found: Res = Err(Box::new(tonic::Status::not_found("no")));
        assert_eq!(c.classify(&not_found, Duration::ZERO), Outcome::Success);
        let mut t = HeaderMap::new();
        assert_eq!(c.classify_trailers(&t), Outcome::Success);
        t.insert("grpc-status", "13".parse().unwrap());
        assert_eq!(c.classify_trailers(&t), Outcome::Failure);
        let only = c.failure_codes([Code::NotFound]);
        assert_eq!(only.classify_trailers(&t), Outcome::Success);
    }

    #[test]
    fn pushback_is_the_hint() {
        let c = GrpcClassifier::new();
        let mut res = tonic::Status::unavailable("busy").into_http::<()>();
        res.headers_mut()
            .insert(codes::PUSHBACK, "1500".parse().unwrap());
        let res: Res = Ok(res);
        assert_eq!(c.retry_after(&res), Some(Duration::from_millis(1500)));
    }
}
