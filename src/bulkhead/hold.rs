//! Holding a bulkhead slot until an HTTP response body ends (feature
//! `http`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::state::HeldSlot;
use super::{Bulkhead, BulkheadHandle, BulkheadLayer};
use crate::error::BoxError;

/// A [`BulkheadLayer`] whose slots stay taken until the response *body*
/// ends, not just until the response head is ready. Made by
/// [`BulkheadLayer::hold_until_body_end`].
///
/// A streaming body (a download, server-sent events, a proxied upstream)
/// is still work after the handler returns: with a plain bulkhead its slot
/// is free as soon as the head is ready, so a hundred slow downloads can
/// run under a cap of ten. This layer moves the slot into a
/// [`BulkheadBody`] around the response body, which gives it back when the
/// body yields its last frame, fails, or is dropped (the client went
/// away).
///
/// It shares its slots with the layer it was made from, and with every
/// service and clone of either.
///
/// ```
/// use axum::{error_handling::HandleErrorLayer, routing::get, Router};
/// use tower::ServiceBuilder;
/// use tower_bulwark::bulkhead::BulkheadLayer;
/// use tower_bulwark::http::handle_error;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let downloads = BulkheadLayer::builder()
///     .name("downloads")
///     .max_concurrent(10)
///     .build()?
///     .hold_until_body_end();
/// let handle = downloads.handle();
/// let app: Router = Router::new().route("/file", get(|| async { "a big file" })).layer(
///     ServiceBuilder::new()
///         .layer(HandleErrorLayer::new(handle_error)) // full: 503 + Retry-After
///         .layer(downloads),
/// );
/// # let _ = (app, handle);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpBulkheadLayer {
    layer: BulkheadLayer,
}

impl BulkheadLayer {
    /// Holds each call's slot until its HTTP response body ends, fails or
    /// is dropped, rather than until the response head is ready (feature
    /// `http`). See [`HttpBulkheadLayer`].
    pub fn hold_until_body_end(self) -> HttpBulkheadLayer {
        HttpBulkheadLayer { layer: self }
    }
}

impl HttpBulkheadLayer {
    /// A handle that reads the shared slots from outside the stack.
    pub fn handle(&self) -> BulkheadHandle {
        self.layer.handle()
    }
}

impl fmt::Debug for HttpBulkheadLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBulkheadLayer")
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S> Layer<S> for HttpBulkheadLayer {
    type Service = HttpBulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpBulkhead {
            inner: self.layer.layer(inner),
        }
    }
}

/// A [`Bulkhead`] around an HTTP service whose slots are held until the
/// response body ends. Made by [`HttpBulkheadLayer`].
///
/// Its responses carry a [`BulkheadBody`]; everything else (rejections,
/// waiting, `poll_ready`) is the plain bulkhead's.
pub struct HttpBulkhead<S> {
    inner: Bulkhead<S>,
}

impl<S> HttpBulkhead<S> {
    /// A handle on the shared slots.
    pub fn handle(&self) -> BulkheadHandle {
        self.inner.handle()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S: Clone> Clone for HttpBulkhead<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HttpBulkhead<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBulkhead")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, Req, B> Service<Req> for HttpBulkhead<S>
where
    S: Service<Req, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Response = http::Response<BulkheadBody<B>>;
    type Error = BoxError;
    type Future = HttpResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        HttpResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`HttpBulkhead`]: the plain bulkhead's, whose
    /// slot moves into the response's [`BulkheadBody`].
    pub struct HttpResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: ResponseFuture<S, Req>,
    }
}

impl<S, Req, B> Future for HttpResponseFuture<S, Req>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Output = Result<http::Response<BulkheadBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (resp, slot) = ready!(self.project().inner.poll_keep_slot(cx))?;
        Poll::Ready(Ok(resp.map(|body| BulkheadBody::new(body, slot))))
    }
}

impl<S: Service<Req>, Req> fmt::Debug for HttpResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

pin_project! {
    /// A response body that holds its call's bulkhead slot until the body
    /// ends: after its last frame (or as soon as it reports
    /// [`is_end_stream`](Body::is_end_stream)), on an error, or when it is
    /// dropped unfinished. Frames, errors and size hints pass through
    /// unchanged.
    pub struct BulkheadBody<B> {
        #[pin]
        inner: B,
        slot: Option<HeldSlot>,
    }
}

impl<B: Body> BulkheadBody<B> {
    fn new(inner: B, slot: Option<HeldSlot>) -> Self {
        // An empty body may never be polled: nothing is left to do.
        let slot = if inner.is_end_stream() { None } else { slot };
        Self { inner, slot }
    }
}

impl<B> BulkheadBody<B> {
    /// Whether the body still holds its slot.
    pub fn holds_slot(&self) -> bool {
        self.slot.is_some()
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Unwraps the body, giving the slot back.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for BulkheadBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            Some(Ok(_)) => this.inner.is_end_stream(),
            None | Some(Err(_)) => true,
        };
        if ended {
            drop(this.slot.take());
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

impl<B: fmt::Debug> fmt::Debug for BulkheadBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadBody")
            .field("inner", &self.inner)
            .field("holds_slot", &self.holds_slot())
            .finish()
    }
}

#[cfg(all(test, not(bulwark_loom)))]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use futures::stream::{self, StreamExt};
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::{service_fn, ServiceExt};

    use super::*;

    type Chunk = Result<Frame<Bytes>, std::io::Error>;

    fn layer() -> HttpBulkheadLayer {
        BulkheadLayer::builder()
            .max_concurrent(1)
            .build()
            .unwrap()
            .hold_until_body_end()
    }

    /// One chunk, then whatever `rest` does.
    fn streaming(
        rest: impl futures::Stream<Item = Chunk> + Send + 'static,
    ) -> StreamBody<Pin<Box<dyn futures::Stream<Item = Chunk> + Send>>> {
        let first = stream::iter([Ok(Frame::data(Bytes::from_static(b"a")))]);
        StreamBody::new(first.chain(rest).boxed())
    }

    #[tokio::test]
    async fn dropping_the_body_mid_stream_frees_the_slot() {
        let l = layer();
        let h = l.handle();
        let svc = l.layer(service_fn(|_: ()| async {
            Ok::<_, Infallible>(http::Response::new(streaming(stream::pending())))
        }));
        let resp = svc.clone().oneshot(()).await.unwrap();
        assert_eq!(h.in_flight(), 1, "the future is done, the body is not");
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        assert!(body.holds_slot());
        // A second call is turned away while the body streams.
        assert!(svc.clone().oneshot(()).await.is_err());
        drop(body);
        assert_eq!(h.in_flight(), 0);
        assert!(svc.oneshot(()).await.is_ok());
    }

    #[tokio::test]
    async fn the_slot_is_freed_at_the_end_or_on_an_error() {
        let l = layer();
        let h = l.handle();
        // Ends with a final `None`.
        let svc = l.layer(service_fn(|_: ()| async {
            Ok::<_, Infallible>(http::Response::new(streaming(stream::empty())))
        }));
        let mut body = svc.oneshot(()).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(h.in_flight(), 1);
        assert!(body.frame().await.is_none());
        assert_eq!(h.in_flight(), 0);
        assert!(!body.holds_slot());

        // Fails mid-stream.
        let svc = l.layer(service_fn(|_: ()| async {
            let err = stream::iter([Err(std::io::Error::other("reset"))]);
            Ok::<_, Infallible>(http::Response::new(streaming(err)))
        }));
        let mut body = svc.oneshot(()).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(h.in_flight(), 1);
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(h.in_flight(), 0);

        // Knows it is done after its only frame.
        let svc = l.layer(service_fn(|_: ()| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"x"))))
        }));
        let mut body = svc.oneshot(()).await.unwrap().into_body();
        assert_eq!(h.in_flight(), 1);
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(h.in_flight(), 0);
        drop(body);

        // Empty from the start: never held.
        let svc = l.layer(service_fn(|_: ()| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
        }));
        let body = svc.oneshot(()).await.unwrap().into_body();
        assert!(!body.holds_slot());
        assert_eq!(h.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_failed_call_gives_its_slot_back() {
        let l = layer();
        let h = l.handle();
        let svc = l.layer(service_fn(|_: ()| async {
            Err::<http::Response<Full<Bytes>>, _>(std::io::Error::other("boom"))
        }));
        assert!(svc.oneshot(()).await.is_err());
        assert_eq!(h.in_flight(), 0);
    }
}
