//! The HTTP retry policy.

use std::time::Duration;

use http::{Request, Response, StatusCode};

use super::idempotent::is_idempotent_request;
use super::Replayable;
use crate::retry::policy::is_crate_rejection;
use crate::retry::RetryPolicy;

/// The default HTTP retry policy: retries **idempotent** requests whose
/// body can be replayed, when the answer is a 5xx (but not 501 or 505,
/// which will not change), a 429, or a connection error (`Err`, except the
/// crate's own rejections). A `Retry-After` on a 429 or 503 answer delays
/// the next attempt at least that long.
///
/// Idempotent means: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and `DELETE`
/// (RFC 9110, 9.2.2), or any request carrying the [`Idempotent`](super::Idempotent) extension
/// or an `Idempotency-Key` header. Everything else is sent once.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::http::HttpRetryPolicy;
/// use tower_bulwark::retry::{Backoff, RetryLayer};
///
/// let layer = RetryLayer::builder()
///     .policy(HttpRetryPolicy::new())
///     .max_attempts(3)
///     .backoff(Backoff::exponential(Duration::from_millis(50)))
///     .deadline(Duration::from_secs(10)) // a longer Retry-After gives up
///     .build()?;
/// # Ok::<(), tower_bulwark::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct HttpRetryPolicy {
    retry_429: bool,
    any_method: bool,
}

impl Default for HttpRetryPolicy {
    fn default() -> Self {
        Self {
            retry_429: true,
            any_method: false,
        }
    }
}

impl HttpRetryPolicy {
    /// Idempotent requests, on 5xx, 429 and connection errors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `429 Too Many Requests` is retried (default yes).
    pub fn retry_429(mut self, yes: bool) -> Self {
        self.retry_429 = yes;
        self
    }

    /// Retries every method, idempotent or not (default no). Only for
    /// upstreams known to tolerate repeats.
    pub fn any_method(mut self, yes: bool) -> Self {
        self.any_method = yes;
        self
    }

    /// Whether `req` may be sent more than once.
    pub fn is_idempotent<B>(&self, req: &Request<B>) -> bool {
        self.any_method || is_idempotent_request(req)
    }

    /// Whether an answer with `status` is retried.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
            || (self.retry_429 && status == StatusCode::TOO_MANY_REQUESTS)
    }
}

impl<B, R, E> RetryPolicy<Request<B>, Response<R>, E> for HttpRetryPolicy
where
    B: Replayable,
    E: 'static,
{
    fn may_retry(&self, req: &Request<B>) -> bool {
        self.is_idempotent(req) && req.body().can_replay()
    }

    fn should_retry(&self, req: &Request<B>, result: &Result<Response<R>, E>) -> bool {
        let wants = match result {
            Ok(res) => self.retries_status(res.status()),
            Err(e) => !is_crate_rejection(e),
        };
        // The body may have gone over its replay limit while it streamed.
        wants && self.is_idempotent(req) && req.body().can_replay()
    }

    fn retry_timeout(&self, req: &Request<B>) -> bool {
        self.is_idempotent(req) && req.body().can_replay()
    }

    fn retry_after(&self, result: &Result<Response<R>, E>) -> Option<Duration> {
        let res = result.as_ref().ok()?;
        super::retry_after_of(res.status(), res.headers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Idempotent;
    use http::Method;

    fn req(method: Method) -> Request<()> {
        Request::builder().method(method).uri("/").body(()).unwrap()
    }

    fn res(status: u16) -> Result<Response<()>, crate::BoxError> {
        Ok(Response::builder()
            .status(status)
            .header("retry-after", "2")
            .body(())
            .unwrap())
    }

    #[test]
    fn idempotent_requests_on_transient_answers() {
        let p = HttpRetryPolicy::new();
        let get = req(Method::GET);
        assert!(p.should_retry(&get, &res(503)));
        assert!(p.should_retry(&get, &res(502)));
        assert!(p.should_retry(&get, &res(429)));
        assert!(!p.should_retry(&get, &res(501)));
        assert!(!p.should_retry(&get, &res(404)));
        assert!(!p.should_retry(&get, &res(200)));
        let reset: Result<Response<()>, crate::BoxError> = Err("connection reset".into());
        assert!(p.should_retry(&get, &reset));
        assert!(!p.retry_429(false).should_retry(&get, &res(429)));
        assert_eq!(
            RetryPolicy::<Request<()>, _, _>::retry_after(&p, &res(503)),
            Some(Duration::from_secs(2))
        );

        let post = req(Method::POST);
        assert!(!RetryPolicy::<_, Response<()>, crate::BoxError>::may_retry(
            &p, &post
        ));
        assert!(!p.should_retry(&post, &res(503)));
        assert!(!RetryPolicy::<_, Response<()>, crate::BoxError>::retry_timeout(&p, &post));
        assert!(p.any_method(true).should_retry(&post, &res(503)));
        let mut marked = req(Method::POST);
        marked.extensions_mut().insert(Idempotent);
        assert!(p.should_retry(&marked, &res(503)));
        let keyed = Request::post("/")
            .header("idempotency-key", "k1")
            .body(())
            .unwrap();
        assert!(p.should_retry(&keyed, &res(503)));
    }
}
