//! The gRPC status classifier.

use std::any::Any;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use super::codes::{self, CodeSet, Pushback};
use crate::classify::{Classify, Outcome, Verdict};
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
/// An answer whose status only comes in the trailers (every answer that
/// carries messages: a unary success, a stream that fails half-way) is
/// judged when its body ends. A [`CircuitBreakerLayer`] built with this
/// classifier keeps the call's place (its generation, a half-open probe
/// slot) until then: the response body of a tonic `Channel`
/// (`tonic::body::Body`) is wrapped so that its trailers, or its end
/// without them, report the outcome ([`Classify::defer`]). A body dropped
/// before its end counts as neither success nor failure. The breakers of
/// a [`FallbackLayer`](crate::fallback::FallbackLayer)'s entries book it
/// the same way; the fallback itself decides at the headers whether to
/// fail over (a late failure is the caller's, and counted by the entry's
/// breaker). Other body types, and the retry layer, judge such an answer
/// at its headers: a success, for the upstream answered.
/// [`classify_trailers`](Self::classify_trailers) reads trailers you hold
/// yourself.
///
/// [`CircuitBreakerLayer`]: crate::circuit_breaker::CircuitBreakerLayer
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
    /// Trailers at the end of a response: without a `grpc-status` the
    /// call ended without its status, which gRPC reads as `UNKNOWN`.
    fn classify_trailers_or_missing(&self, trailers: &HeaderMap) -> Outcome {
        self.classify_code(codes::status_code(trailers).unwrap_or(Code::Unknown))
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

impl<B: 'static, E: 'static> Classify<Response<B>, E> for GrpcClassifier {
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

    fn defers(&self) -> bool {
        true
    }

    fn defer(&self, result: &mut Result<Response<B>, E>, verdict: Verdict) -> Option<Verdict> {
        let Ok(res) = result else {
            return Some(verdict);
        };
        if codes::response_code(res.status(), res.headers()).is_some() {
            return Some(verdict); // trailers-only: the status is here
        }
        let any: &mut dyn Any = res.body_mut();
        let Some(body) = any.downcast_mut::<tonic::body::Body>() else {
            return Some(verdict);
        };
        if http_body::Body::is_end_stream(body) {
            // Neither a status in the headers nor a body to bring one.
            verdict.report(self.classify_code(Code::Unknown));
            return None;
        }
        let inner = std::mem::take(body);
        *body = tonic::body::Body::new(VerdictBody {
            inner,
            verdict: Some(verdict),
            classifier: *self,
        });
        None
    }
}

pin_project! {
    /// A response body that reports its call's outcome from its trailers.
    struct VerdictBody {
        #[pin]
        inner: tonic::body::Body,
        verdict: Option<Verdict>,
        classifier: GrpcClassifier,
    }
}

impl http_body::Body for VerdictBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let outcome = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|t| this.classifier.classify_trailers_or_missing(t)),
            // The stream broke: the call did not get its answer.
            Some(Err(status)) => Some(this.classifier.classify_code(status.code())),
            // An end without trailers: gRPC calls a missing status an error.
            None => Some(this.classifier.classify_code(Code::Unknown)),
        };
        if let Some(outcome) = outcome {
            if let Some(verdict) = this.verdict.take() {
                verdict.report(outcome);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    #[tokio::test]
    async fn a_status_in_the_trailers_is_reported_at_the_end() {
        use http_body_util::BodyExt;
        use std::sync::{Arc, Mutex};

        fn streamed(trailer_code: Option<&'static str>) -> Res2 {
            let mut frames = vec![Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(
                b"msg",
            )))];
            if let Some(code) = trailer_code {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", code.parse().unwrap());
                frames.push(Ok(Frame::trailers(t)));
            }
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            Ok(Response::new(tonic::body::Body::new(body)))
        }
        type Res2 = Result<Response<tonic::body::Body>, BoxError>;

        let c = GrpcClassifier::new();
        for (trailers, want) in [
            (Some("14"), Some(Outcome::Failure)),
            (Some("0"), Some(Outcome::Success)),
            (Some("5"), Some(Outcome::Success)),
            (None, Some(Outcome::Failure)),
        ] {
            let seen = Arc::new(Mutex::new(None));
            let s2 = seen.clone();
            let mut res = streamed(trailers);
            assert_eq!(c.classify(&res, Duration::ZERO), Outcome::Success);
            let verdict = Verdict::new(move |o| *s2.lock().unwrap() = Some(o));
            assert!(c.defer(&mut res, verdict).is_none());
            // Nothing is known until the body ends.
            assert_eq!(*seen.lock().unwrap(), None);
            let body = res.unwrap().into_body().collect().await.unwrap();
            assert_eq!(*seen.lock().unwrap(), want, "{trailers:?}");
            assert_eq!(body.to_bytes(), "msg");
        }

        // Dropped before its end: no verdict.
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let mut res = streamed(Some("14"));
        assert!(c
            .defer(
                &mut res,
                Verdict::new(move |o| *s2.lock().unwrap() = Some(o))
            )
            .is_none());
        drop(res);
        assert_eq!(*seen.lock().unwrap(), None);

        // Trailers-only: judged now, by the caller of `defer`.
        let mut only = trailers_only(Code::Unavailable);
        let only_verdict = Verdict::new(|_| {});
        let mut only2: Result<Response<tonic::body::Body>, BoxError> =
            Ok(tonic::Status::unavailable("x").into_http());
        assert!(c.defer(&mut only2, only_verdict).is_some());
        assert!(
            Classify::<Response<()>, BoxError>::defer(&c, &mut only, Verdict::new(|_| {}))
                .is_some()
        );
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
