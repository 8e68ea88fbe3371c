use std::error::Error;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::error::{rejection, Rejection};

/// The status a rejection maps to: `429 Too Many Requests` for the rate
/// limiter, `503 Service Unavailable` for every other layer.
pub fn rejection_status(r: &dyn Rejection) -> StatusCode {
    if r.layer() == "rate_limit" {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Turns an error out of a stack into a response.
///
/// The crate's rejections become 503 (or 429 for the rate limiter) with a
/// `Retry-After` header in whole seconds, rounded up, when the rejection
/// knows when to come back. Any other error becomes `500 Internal Server
/// Error`. The body is a short plain-text message.
///
/// ```
/// use tower_bulwark::http::error_response;
///
/// let err = std::io::Error::other("boom");
/// let res: http::Response<String> = error_response(&err);
/// assert_eq!(res.status(), 500);
/// ```
pub fn error_response<B: From<String>>(err: &(dyn Error + 'static)) -> Response<B> {
    let Some(r) = rejection(err) else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".to_owned(),
        );
    };
    let mut res = plain(rejection_status(r), r.to_string());
    if let Some(after) = r.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    layer_headers(err, &mut res);
    res
}

/// Headers only one layer's rejection can fill in.
#[allow(unused_variables)]
fn layer_headers<B>(err: &(dyn Error + 'static), res: &mut Response<B>) {
    #[cfg(feature = "rate-limit")]
    if let Some(l) = crate::error::find::<crate::rate_limit::RateLimited>(err) {
        // draft-ietf-httpapi-ratelimit-headers: the bucket's size, what is
        // left, and seconds until the request would be admitted.
        let reset = l.retry_after().as_secs() + u64::from(l.retry_after().subsec_nanos() > 0);
        let h = res.headers_mut();
        h.insert(
            "ratelimit-limit",
            HeaderValue::from(l.limit().floor() as u64),
        );
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from(l.remaining().floor() as u64),
        );
        h.insert("ratelimit-reset", HeaderValue::from(reset));
    }
    #[cfg(feature = "bulkhead")]
    if crate::error::find::<crate::bulkhead::BulkheadFull>(err).is_some() {
        // A bulkhead cannot know when a slot frees up: suggest a short pause.
        res.headers_mut()
            .entry(RETRY_AFTER)
            .or_insert(HeaderValue::from_static("1"));
    }
}

fn plain<B: From<String>>(status: StatusCode, msg: String) -> Response<B> {
    let mut res = Response::new(B::from(msg));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// An error handler for axum's `HandleErrorLayer` (feature `axum`): the
/// crate's rejections become 503/429 with `Retry-After`, see
/// [`error_response`].
///
/// ```no_run
/// use axum::{error_handling::HandleErrorLayer, routing::get, Router};
/// use tower::ServiceBuilder;
/// use tower_bulwark::{http::handle_error, CircuitBreakerLayer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(
///     ServiceBuilder::new()
///         .layer(HandleErrorLayer::new(handle_error))
///         .layer(CircuitBreakerLayer::builder().name("api").build()?),
/// );
/// # Ok(()) }
/// ```
#[cfg(feature = "axum")]
pub async fn handle_error(err: tower::BoxError) -> axum::response::Response {
    error_response::<axum::body::Body>(err.as_ref())
}
