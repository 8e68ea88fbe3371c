//! HTTP support (feature `http`): status classification, `Retry-After`,
//! and rejection errors turned into responses.
//!
//! - [`StatusClassifier`] makes 5xx responses failures for the breaker,
//!   retry and fallback, although they are `Ok` at the service level, and
//!   reads `Retry-After` from 429 and 503 answers as a back-off hint.
//! - [`parse_retry_after`] understands both forms of the header:
//!   delta-seconds and HTTP-date.
//! - [`error_response`] maps the crate's rejections to `503 Service
//!   Unavailable` or `429 Too Many Requests` with a `Retry-After` header;
//!   with the `axum` feature, [`handle_error`] plugs it into axum's
//!   `HandleErrorLayer`. tower's timeout becomes 504 and its load
//!   shedding 503; [`ErrorHandler`] writes your own body.
//! - [`may_resend`] says whether a request may be sent again, and
//!   `FallbackLayer::http_builder()` fails over only such requests.
//! - [`dedup::HttpKey`] (with `dedup`) keys requests for the dedup layer by
//!   method, URI and the headers that change the answer, and
//!   [`dedup::HttpDedupLayer`] shares streaming responses by buffering the
//!   body once, up to a limit.
//! - With `bulkhead`, `BulkheadLayer::hold_until_body_end` holds a
//!   bulkhead slot until the response body ends (see
//!   `tower_bulwark::bulkhead::HttpBulkheadLayer`).
//! - [`ReplayBody`] buffers a streaming request body as it is sent, up to a
//!   limit, so the request can be retried, and [`ReplayBodyLayer`] does
//!   that for every request of a stack; with the `retry` feature,
//!   [`HttpRetryPolicy`] retries idempotent requests on 5xx, 429 and
//!   connection errors, honouring `Retry-After`.

mod classify;
#[cfg(feature = "dedup")]
pub mod dedup;
#[cfg(feature = "fallback")]
mod failover;
#[cfg(feature = "hedge")]
mod hedge;
mod idempotent;
mod replay;
mod replay_layer;
mod response;
#[cfg(feature = "retry")]
mod retry;
mod retry_after;

pub use classify::StatusClassifier;
#[cfg(feature = "hedge")]
pub use hedge::HttpHedgeIf;
pub use idempotent::{may_resend, Idempotent};
pub use replay::{ReplayBody, ReplayError, Replayable};
pub use replay_layer::{ReplayBodyLayer, ReplayBodyService};
#[cfg(feature = "axum")]
pub use response::handle_error;
pub use response::{
    error_response, rejection_status, ErrorBody, ErrorHandler, ErrorInfo, PlainText,
};
#[cfg(feature = "retry")]
pub use retry::HttpRetryPolicy;
pub use retry_after::{parse_retry_after, retry_after_of};
