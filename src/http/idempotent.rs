//! Which HTTP requests may be sent more than once.

use http::{Method, Request};

use super::Replayable;

/// Marks a request as safe to repeat although its method is not
/// idempotent (a `POST` with an idempotency key, say). Insert it into the
/// request's extensions.
///
/// ```
/// use tower_bulwark::http::Idempotent;
///
/// let mut req = http::Request::post("http://example.com/orders").body(()).unwrap();
/// req.extensions_mut().insert(Idempotent);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Idempotent;

/// `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and `DELETE` (RFC 9110,
/// 9.2.2), or a request marked [`Idempotent`] or carrying an
/// `Idempotency-Key` header.
pub(crate) fn is_idempotent_request<B>(req: &Request<B>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || req.extensions().get::<Idempotent>().is_some()
        || req.headers().contains_key("idempotency-key")
}

/// Whether an HTTP request that was already sent may be sent again: it is
/// idempotent (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`, or
/// marked [`Idempotent`], or carrying an `Idempotency-Key` header) and its
/// body can still be replayed (a [`ReplayBody`](super::ReplayBody) under
/// its limit, or an in-memory body).
///
/// The rule [`HttpRetryPolicy`](super::HttpRetryPolicy) retries by; the
/// fallback layer fails over by it with
/// `FallbackBuilder::fail_over_if(http::may_resend)`, which
/// `FallbackLayer::http_builder()` sets.
///
/// ```
/// use tower_bulwark::http::may_resend;
///
/// let get = http::Request::get("/items").body(()).unwrap();
/// let post = http::Request::post("/orders").body(()).unwrap();
/// let keyed = http::Request::post("/orders").header("idempotency-key", "k1").body(()).unwrap();
/// assert!(may_resend(&get));
/// assert!(!may_resend(&post));
/// assert!(may_resend(&keyed));
/// ```
pub fn may_resend<B: Replayable>(req: &Request<B>) -> bool {
    is_idempotent_request(req) && req.body().can_replay()
}
