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
    res
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
