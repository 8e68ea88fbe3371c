//! The hedge layer's HTTP preset.

use http::Request;

use super::{may_resend, Replayable, StatusClassifier};
use crate::hedge::{HedgeBuilder, HedgeIf, HedgeLayer};

/// The request rule [`HedgeLayer::http_builder`] hedges by: [`may_resend`]
/// for requests whose body is `B`.
pub type HttpHedgeIf<B> = HedgeIf<fn(&Request<B>) -> bool>;

impl HedgeLayer {
    /// A hedge builder for HTTP clients, with safe defaults:
    ///
    /// - [`may_resend`]: only a request that may be sent twice is hedged,
    ///   by the rule retries follow: an idempotent method (`GET`, `PUT`,
    ///   `DELETE`, ...), or any method with an `Idempotency-Key` header or
    ///   the [`Idempotent`](super::Idempotent) extension, and a body that
    ///   can be replayed. A `POST` without a key is sent once, however
    ///   slow.
    /// - [`StatusClassifier`]: a 5xx answer does not win while another
    ///   copy is still running, so a hedge's 200 beats a first copy's 503.
    ///
    /// Everything else is [`HedgeLayer::builder`]'s defaults, and can be
    /// changed as there (`hedge_if` and `classify` replace these two).
    /// The request body must be `Clone` (`Full`, `Empty`, or a
    /// [`ReplayBody`](super::ReplayBody) for a streaming one).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_bulwark::hedge::HedgeLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_bulwark::BoxError> {
    /// # tokio::time::pause();
    /// type Req = http::Request<Full<Bytes>>;
    /// let layer = HedgeLayer::http_builder()
    ///     .delay(Duration::from_millis(50))
    ///     .max_extra_load(1.0) // let this example's calls be hedged
    ///     .build()?;
    /// let handle = layer.handle();
    /// // Every call takes a second: hedging would send a copy of each.
    /// let svc = layer.layer(service_fn(|req: Req| async move {
    ///     tokio::time::sleep(Duration::from_secs(1)).await;
    ///     Ok::<_, std::io::Error>(http::Response::new(req.method().to_string()))
    /// }));
    ///
    /// let post = http::Request::post("/orders").body(Full::default())?;
    /// svc.clone().oneshot(post).await?;
    /// assert_eq!(handle.hedges(), 0);
    /// let get = http::Request::get("/orders/7").body(Full::default())?;
    /// svc.oneshot(get).await?;
    /// assert_eq!(handle.hedges(), 1);
    /// # Ok(()) }
    /// ```
    pub fn http_builder<B>() -> HedgeBuilder<HttpHedgeIf<B>, StatusClassifier>
    where
        B: Replayable + 'static,
    {
        let rule: fn(&Request<B>) -> bool = may_resend::<B>;
        HedgeLayer::builder()
            .classify(StatusClassifier::new())
            .hedge_if(rule)
    }
}
