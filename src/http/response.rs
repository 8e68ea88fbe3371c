use std::error::Error;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use std::time::Duration;

use crate::error::{find, rejection, Rejection};

/// The status a rejection maps to: `429 Too Many Requests` for the rate
/// limiter, `504 Gateway Timeout` for a timeout, `503 Service
/// Unavailable` for every other layer.
pub fn rejection_status(r: &dyn Rejection) -> StatusCode {
    match r.layer() {
        "rate_limit" => StatusCode::TOO_MANY_REQUESTS,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Turns an error out of a stack into a response.
///
/// - The crate's rejections become 503 (or 429 for the rate limiter) with
///   a `Retry-After` header in whole seconds, rounded up, when the
///   rejection knows when to come back (and the `RateLimit-*` headers for
///   the rate limiter).
/// - tower's `Elapsed` (a `TimeoutLayer` gave up) becomes `504 Gateway
///   Timeout`; tower's `Overloaded` (a `LoadShedLayer` refused)
///   `503 Service Unavailable`.
/// - Any other error becomes `500 Internal Server Error`, without its
///   text: it may say more than a client should see.
///
/// The body is a short plain-text message; [`ErrorHandler`] lets you
/// write your own.
///
/// ```
/// use tower_bulwark::http::error_response;
///
/// let err = std::io::Error::other("boom");
/// let res: http::Response<String> = error_response(&err);
/// assert_eq!(res.status(), 500);
/// let res: http::Response<String> = error_response(&tower::timeout::error::Elapsed::new());
/// assert_eq!(res.status(), 504);
/// ```
pub fn error_response<B: From<String>>(err: &(dyn Error + 'static)) -> Response<B> {
    ErrorHandler::new().response(err)
}

/// What an error out of a stack becomes: the status, the default message
/// and the back-off hint. Given to an [`ErrorHandler`]'s body hook.
#[derive(Debug)]
pub struct ErrorInfo<'a> {
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
    error: &'a (dyn Error + 'static),
}

impl<'a> ErrorInfo<'a> {
    /// Classifies `err` as [`error_response`] does.
    pub fn new(err: &'a (dyn Error + 'static)) -> Self {
        let (status, message, retry_after) = if let Some(r) = rejection(err) {
            (rejection_status(r), r.to_string(), r.retry_after())
        } else if find::<tower::timeout::error::Elapsed>(err).is_some() {
            (
                StatusCode::GATEWAY_TIMEOUT,
                "request timed out".to_owned(),
                None,
            )
        } else if find::<tower::load_shed::error::Overloaded>(err).is_some() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "service overloaded".to_owned(),
                None,
            )
        } else {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error".to_owned(),
                None,
            )
        };
        Self {
            status,
            message,
            retry_after,
            error: err,
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The default message: the rejection's text ("circuit `api` is
    /// open"), or a generic one for timeouts, overload and other errors.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When to come back, when a rejection knows (it is also sent as
    /// `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The error itself, to look into (`err.is::<..>()`, the crate's
    /// `error::rejection`).
    pub fn error(&self) -> &'a (dyn Error + 'static) {
        self.error
    }

    /// Whether the error is one of the crate's rejections, a timeout or
    /// load shedding, rather than an error of the wrapped service.
    pub fn is_known(&self) -> bool {
        self.status != StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// The default body: the plain-text message.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainText;

/// Turns errors into responses as [`error_response`] does, with a body
/// and content type of your choice; with the `axum` feature,
/// [`into_handler`](ErrorHandler::into_handler) makes the handler for
/// axum's `HandleErrorLayer`.
///
/// ```
/// use tower_bulwark::http::ErrorHandler;
///
/// let errors = ErrorHandler::new()
///     .content_type("application/json")
///     .body(|e| format!(r#"{{"error":{:?},"status":{}}}"#, e.message(), e.status().as_u16()));
/// let res: http::Response<String> = errors.response(&tower::timeout::error::Elapsed::new());
/// assert_eq!(res.status(), 504);
/// assert_eq!(res.headers()["content-type"], "application/json");
/// assert_eq!(res.body(), r#"{"error":"request timed out","status":504}"#);
/// ```
#[derive(Clone)]
pub struct ErrorHandler<F = PlainText> {
    body: F,
    content_type: HeaderValue,
}

impl Default for ErrorHandler {
    fn default() -> Self {
        Self {
            body: PlainText,
            content_type: HeaderValue::from_static("text/plain; charset=utf-8"),
        }
    }
}

impl ErrorHandler {
    /// Plain-text bodies, as [`error_response`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F> ErrorHandler<F> {
    /// Writes the body from the error's [`ErrorInfo`].
    pub fn body<G>(self, f: G) -> ErrorHandler<G>
    where
        G: Fn(&ErrorInfo<'_>) -> String,
    {
        ErrorHandler {
            body: f,
            content_type: self.content_type,
        }
    }

    /// The `Content-Type` of the body (default `text/plain;
    /// charset=utf-8`).
    pub fn content_type(mut self, value: &'static str) -> Self {
        self.content_type = HeaderValue::from_static(value);
        self
    }

    /// The response for `err`.
    pub fn response<B: From<String>>(&self, err: &(dyn Error + 'static)) -> Response<B>
    where
        F: ErrorBody,
    {
        let info = ErrorInfo::new(err);
        let mut res = Response::new(B::from(self.body.body(&info)));
        *res.status_mut() = info.status;
        res.headers_mut()
            .insert(CONTENT_TYPE, self.content_type.clone());
        if let Some(after) = info.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if rejection(err).is_some() {
            layer_headers(err, &mut res);
        }
        res
    }

    /// An error handler for axum's `HandleErrorLayer` (feature `axum`).
    ///
    /// ```no_run
    /// use axum::{error_handling::HandleErrorLayer, routing::get, Router};
    /// use std::time::Duration;
    /// use tower::ServiceBuilder;
    /// use tower_bulwark::http::ErrorHandler;
    ///
    /// let errors = ErrorHandler::new().body(|e| format!("sorry: {}", e.message()));
    /// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(
    ///     ServiceBuilder::new()
    ///         .layer(HandleErrorLayer::new(errors.into_handler()))
    ///         .timeout(Duration::from_secs(10)), // gives 504 when it fires
    /// );
    /// ```
    #[cfg(feature = "axum")]
    pub fn into_handler(
        self,
    ) -> impl FnOnce(tower::BoxError) -> std::future::Ready<axum::response::Response>
           + Clone
           + Send
           + Sync
           + 'static
    where
        F: ErrorBody + Clone + Send + Sync + 'static,
    {
        move |err: tower::BoxError| std::future::ready(self.response(err.as_ref()))
    }
}

impl<F> std::fmt::Debug for ErrorHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorHandler")
            .field("body", &std::any::type_name::<F>())
            .field("content_type", &self.content_type)
            .finish()
    }
}

/// Writes an error response's body: [`PlainText`], or a closure
/// `Fn(&ErrorInfo<'_>) -> String` given to [`ErrorHandler::body`].
pub trait ErrorBody {
    /// The body for `info`.
    fn body(&self, info: &ErrorInfo<'_>) -> String;
}

impl ErrorBody for PlainText {
    fn body(&self, info: &ErrorInfo<'_>) -> String {
        info.message.clone()
    }
}

impl<F> ErrorBody for F
where
    F: Fn(&ErrorInfo<'_>) -> String,
{
    fn body(&self, info: &ErrorInfo<'_>) -> String {
        self(info)
    }
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

/// An error handler for axum's `HandleErrorLayer` (feature `axum`): the
/// crate's rejections become 503/429 with `Retry-After`, tower's timeout
/// 504 and its load shedding 503; see [`error_response`], and
/// [`ErrorHandler`] for your own body.
///
/// An axum handler never returns `Err`: a failing route answers `Ok` with
/// a 5xx. So a breaker on a `Router` needs [`StatusClassifier`] to see
/// those failures; with the default classifier it would stay closed
/// forever. With `route_layer`, each route gets its own breaker (and a
/// request for an unknown path never reaches one):
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{error_handling::HandleErrorLayer, routing::get, Router};
/// use tower::ServiceBuilder;
/// use tower_bulwark::http::{handle_error, StatusClassifier};
/// use tower_bulwark::CircuitBreakerLayer;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = |name: &str| {
///     CircuitBreakerLayer::builder().name(name).classify(StatusClassifier::new()).build()
/// };
/// let app: Router = Router::new()
///     .route("/search", get(|| async { "results" }))
///     .route_layer(
///         ServiceBuilder::new()
///             .layer(HandleErrorLayer::new(handle_error)) // open circuit: 503
///             .timeout(Duration::from_secs(5))            // too slow: 504
///             .layer(breaker("search")?),
///     )
///     .route(
///         "/checkout",
///         get(|| async { "paid" }).route_layer(
///             ServiceBuilder::new()
///                 .layer(HandleErrorLayer::new(handle_error))
///                 .layer(breaker("checkout")?),
///         ),
///     );
/// # let _ = app;
/// # Ok(()) }
/// ```
///
/// [`StatusClassifier`]: super::StatusClassifier
#[cfg(feature = "axum")]
pub async fn handle_error(err: tower::BoxError) -> axum::response::Response {
    error_response::<axum::body::Body>(err.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tower_errors_map_to_gateway_statuses() {
        let res: Response<String> = error_response(&tower::timeout::error::Elapsed::new());
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        let res: Response<String> = error_response(&tower::load_shed::error::Overloaded::new());
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.body(), "service overloaded");
        // Boxed and wrapped, as a stack returns them.
        let boxed: tower::BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        let res: Response<String> = error_response(boxed.as_ref());
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Other errors keep their text to themselves.
        let res: Response<String> = error_response(&std::io::Error::other("db password wrong"));
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.body(), "internal error");
        let other = std::io::Error::other("x");
        let info = ErrorInfo::new(&other);
        assert!(!info.is_known());
        assert!(format!("{:?}", ErrorHandler::new()).contains("PlainText"));
    }
}
