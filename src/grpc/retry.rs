//! The gRPC retry policy.

use std::time::Duration;

use http::{Request, Response};
use tonic::Code;

use super::classify::error_code;
use super::codes::{self, CodeSet, Pushback};
use crate::http::Replayable;
use crate::retry::policy::is_crate_rejection;
use crate::retry::RetryPolicy;

/// Retries gRPC calls as gRPC's own retry design does (gRFC A6):
///
/// - A call is retried when it fails with a **retryable code**, by
///   default only `UNAVAILABLE`: the one code that promises the call did
///   not run. Add codes with [`retryable_codes`](Self::retryable_codes)
///   only for methods that are safe to repeat.
/// - The server's `grpc-retry-pushback-ms` is honoured: the next attempt
///   waits at least that long, and a negative or unreadable value means
///   *do not retry*.
/// - A call whose request body went over its replay limit (see
///   [`ReplayBodyLayer`](crate::http::ReplayBodyLayer)) is never sent
///   again: its bytes are gone.
/// - An error from the channel (the server could not be reached) counts as
///   `UNAVAILABLE`; an `Err(tonic::Status)` counts as its code; the
///   crate's own rejections (an open circuit) are not retried.
/// - An attempt cut off by the retry layer's per-attempt timeout is
///   retried only when `DEADLINE_EXCEEDED` is retryable.
/// - Only a status the answer carries at its headers (a trailers-only
///   response, or an error) can cause a retry. A status in the trailers
///   at the end of the body comes after the response was handed to the
///   caller; a breaker with [`GrpcClassifier`](super::GrpcClassifier)
///   counts it, the retry layer cannot act on it.
///
/// Unlike [`HttpRetryPolicy`](crate::http::HttpRetryPolicy), it does not
/// look at the method: every gRPC call is a `POST`, and whether it may be
/// repeated is said by its status code.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::grpc::GrpcRetryPolicy;
/// use tower_bulwark::retry::{Backoff, RetryLayer};
///
/// let retry = RetryLayer::builder()
///     .policy(GrpcRetryPolicy::new())
///     .max_attempts(3)
///     .backoff(Backoff::exponential(Duration::from_millis(50)))
///     .build()?;
/// # Ok::<(), tower_bulwark::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcRetryPolicy {
    retryable: CodeSet,
}

impl Default for GrpcRetryPolicy {
    fn default() -> Self {
        Self {
            retryable: CodeSet::of([Code::Unavailable]),
        }
    }
}

impl GrpcRetryPolicy {
    /// Retries `UNAVAILABLE`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exactly these codes are retried.
    pub fn retryable_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.retryable = CodeSet::of(codes);
        self
    }

    /// Whether a call that ended with `code` is retried.
    pub fn retries_code(&self, code: Code) -> bool {
        self.retryable.contains(code)
    }
}

impl<B, R, E> RetryPolicy<Request<B>, Response<R>, E> for GrpcRetryPolicy
where
    B: Replayable,
    E: 'static,
{
    fn may_retry(&self, req: &Request<B>) -> bool {
        req.body().can_replay()
    }

    fn should_retry(&self, req: &Request<B>, result: &Result<Response<R>, E>) -> bool {
        let wants = match result {
            Ok(res) => {
                codes::response_code(res.status(), res.headers())
                    .is_some_and(|code| self.retries_code(code))
                    && codes::pushback(res.headers()) != Pushback::Stop
            }
            Err(e) if is_crate_rejection(e) => false,
            Err(e) => self.retries_code(error_code(e).unwrap_or(Code::Unavailable)),
        };
        // The body may have gone over its replay limit while it streamed.
        wants && req.body().can_replay()
    }

    fn retry_timeout(&self, req: &Request<B>) -> bool {
        self.retries_code(Code::DeadlineExceeded) && req.body().can_replay()
    }

    fn retry_after(&self, result: &Result<Response<R>, E>) -> Option<Duration> {
        match codes::pushback(result.as_ref().ok()?.headers()) {
            Pushback::Wait(d) => Some(d),
            Pushback::None | Pushback::Stop => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    type Res = Result<Response<()>, BoxError>;

    fn answer(code: Code, pushback: Option<&'static str>) -> Res {
        let mut res = tonic::Status::new(code, "x").into_http::<()>();
        if let Some(p) = pushback {
            res.headers_mut()
                .insert(codes::PUSHBACK, p.parse().unwrap());
        }
        Ok(res)
    }

    fn req() -> Request<()> {
        Request::post("/pkg.Svc/Method").body(()).unwrap()
    }

    #[test]
    fn retries_unavailable_only_by_default() {
        let p = GrpcRetryPolicy::new();
        assert!(p.should_retry(&req(), &answer(Code::Unavailable, None)));
        assert!(!p.should_retry(&req(), &answer(Code::Internal, None)));
        assert!(!p.should_retry(&req(), &answer(Code::Ok, None)));
        let streaming: Res = Ok(Response::new(()));
        assert!(!p.should_retry(&req(), &streaming));
        let refused: Res = Err("connection refused".into());
        assert!(p.should_retry(&req(), &refused));
        let internal: Res = Err(Box::new(tonic::Status::internal("bug")));
        assert!(!p.should_retry(&req(), &internal));
        assert!(!RetryPolicy::<_, Response<()>, BoxError>::retry_timeout(
            &p,
            &req()
        ));
        let wider = p.retryable_codes([Code::Unavailable, Code::DeadlineExceeded]);
        assert!(RetryPolicy::<_, Response<()>, BoxError>::retry_timeout(
            &wider,
            &req()
        ));
    }

    #[test]
    fn honours_pushback() {
        let p = GrpcRetryPolicy::new();
        let wait = answer(Code::Unavailable, Some("300"));
        assert!(p.should_retry(&req(), &wait));
        assert_eq!(
            RetryPolicy::<Request<()>, _, _>::retry_after(&p, &wait),
            Some(Duration::from_millis(300))
        );
        assert!(!p.should_retry(&req(), &answer(Code::Unavailable, Some("-1"))));
        assert!(!p.should_retry(&req(), &answer(Code::Unavailable, Some("later"))));
    }
}
