//! The fallback layer's HTTP preset.

use http::{Request, Response};

use super::{may_resend, Replayable, StatusClassifier};
use crate::fallback::{FallbackBuilder, FallbackLayer};

impl<B, R> FallbackLayer<Request<B>, Response<R>> {
    /// A fallback builder for HTTP clients, with safe defaults:
    ///
    /// - [`StatusClassifier`]: a 5xx answer fails over and counts against
    ///   the entry's breaker, as a connection error does;
    /// - [`may_resend`]: a request that reached an entry goes on to the
    ///   next only when it is idempotent and its body can still be
    ///   replayed. A `POST` without an idempotency key, or a body that
    ///   went over its [`ReplayBody`](super::ReplayBody) limit, gets the
    ///   failed entry's answer instead of being sent twice.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_bulwark::FallbackLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_bulwark::BoxError> {
    /// type Req = http::Request<Full<Bytes>>;
    /// let primary = service_fn(|_: Req| async {
    ///     Ok::<_, tower_bulwark::BoxError>(http::Response::builder().status(503).body("primary").unwrap())
    /// });
    /// let secondary = service_fn(|_: Req| async {
    ///     Ok::<_, tower_bulwark::BoxError>(http::Response::new("secondary"))
    /// });
    /// let svc = FallbackLayer::http_builder().fallback("secondary", secondary).build()?.layer(primary);
    ///
    /// let get = http::Request::get("/").body(Full::default())?;
    /// assert_eq!(*svc.clone().oneshot(get).await?.body(), "secondary");
    /// // A POST may have taken effect: it is not sent again.
    /// let post = http::Request::post("/orders").body(Full::default())?;
    /// let res = svc.oneshot(post).await?;
    /// assert_eq!((res.status().as_u16(), *res.body()), (503, "primary"));
    /// # Ok(()) }
    /// ```
    pub fn http_builder() -> FallbackBuilder<Request<B>, Response<R>, StatusClassifier>
    where
        B: Replayable + 'static,
    {
        FallbackLayer::builder()
            .classify(StatusClassifier::new())
            .fail_over_if(may_resend::<B>)
    }
}
