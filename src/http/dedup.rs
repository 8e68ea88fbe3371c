//! The dedup layer's key for HTTP requests (features `http` and `dedup`).

use http::header::{
    HeaderName, ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, COOKIE,
    PROXY_AUTHORIZATION,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::dedup::{Dedup, DedupHandle, DedupKey, DedupLayer, DefaultKey};
use crate::error::BoxError;

/// Keys HTTP requests for the dedup layer: method, URI, and the headers
/// that change the answer.
///
/// By default the headers are `Authorization`, `Proxy-Authorization`,
/// `Cookie`, `Accept`, `Accept-Encoding` and `Accept-Language`, so one
/// user's answer is never served to another; add more with
/// [`header`](HttpKey::header) (a tenant id, an API version). Only safe
/// methods (`GET`, `HEAD`, `OPTIONS`) are keyed; other requests go straight
/// through.
///
/// ```
/// use tower_bulwark::dedup::{DedupKey, DedupLayer};
/// use tower_bulwark::http::dedup::HttpKey;
///
/// let key = HttpKey::new().header("x-tenant");
/// let req = |user: &'static str| {
///     http::Request::get("/me").header("authorization", user).body(()).unwrap()
/// };
/// assert_ne!(key.key(&req("Bearer alice")), key.key(&req("Bearer bob")));
/// assert_eq!(key.key(&req("Bearer alice")), key.key(&req("Bearer alice")));
/// assert_eq!(key.key(&http::Request::post("/me").body(()).unwrap()), None);
///
/// let layer = DedupLayer::builder().key_by(key).build().unwrap();
/// # let _ = layer;
/// ```
///
/// The dedup layer shares answers by cloning them, so the response body
/// must be `Clone` (for example `http_body_util::Full<Bytes>`); for a
/// streaming body, wrap the stack with [`HttpDedupLayer`], which buffers it
/// once.
///
/// A request carrying the [`NoDedup`] extension is never keyed.
#[derive(Debug, Clone)]
pub struct HttpKey {
    headers: Vec<HeaderName>,
    methods: Vec<Method>,
}

impl Default for HttpKey {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpKey {
    /// The default headers and safe methods.
    pub fn new() -> Self {
        Self {
            headers: vec![
                AUTHORIZATION,
                PROXY_AUTHORIZATION,
                COOKIE,
                ACCEPT,
                ACCEPT_ENCODING,
                ACCEPT_LANGUAGE,
            ],
            methods: vec![Method::GET, Method::HEAD, Method::OPTIONS],
        }
    }

    /// Another header that changes the answer (panics on an invalid name,
    /// like `HeaderName::from_static`).
    pub fn header(mut self, name: &'static str) -> Self {
        self.headers.push(HeaderName::from_static(name));
        self
    }

    /// Also deduplicates `method` (for example a `POST` that only reads).
    pub fn method(mut self, method: Method) -> Self {
        self.methods.push(method);
        self
    }
}

/// The key of one HTTP request; see [`HttpKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpRequestKey {
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl<B> DedupKey<Request<B>> for HttpKey {
    type Key = HttpRequestKey;

    fn key(&self, req: &Request<B>) -> Option<HttpRequestKey> {
        if !self.methods.contains(req.method()) || req.extensions().get::<NoDedup>().is_some() {
            return None;
        }
        let mut headers = Vec::new();
        for name in &self.headers {
            // Every value of a repeated header counts, in order.
            for v in req.headers().get_all(name) {
                headers.push((name.clone(), v.clone()));
            }
        }
        Some(HttpRequestKey {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers,
        })
    }
}

impl<B> DedupKey<Request<B>> for DefaultKey {
    type Key = HttpRequestKey;

    fn key(&self, req: &Request<B>) -> Option<HttpRequestKey> {
        static KEY: std::sync::OnceLock<HttpKey> = std::sync::OnceLock::new();
        KEY.get_or_init(HttpKey::new).key(req)
    }
}

/// Marks a request the dedup layer must not key: it goes straight through.
/// [`HttpDedup`] puts it on the calls it re-issues.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDedup;

/// The default limit of a body buffered to be shared: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Deduplicates HTTP requests whose responses have a streaming body, by
/// buffering the body once and handing every waiter a copy.
///
/// ```
/// use tower::Layer;
/// use tower_bulwark::dedup::DedupLayer;
/// use tower_bulwark::http::dedup::{HttpDedupLayer, HttpKey};
///
/// # fn wrap<S: Clone>(client: S) -> tower_bulwark::http::dedup::HttpDedup<S, HttpKey> {
/// let dedup = DedupLayer::builder().key_by(HttpKey::new()).build().unwrap();
/// let svc = HttpDedupLayer::new(dedup)
///     .body_limit(256 * 1024)
///     .layer(client);
/// # svc }
/// ```
///
/// What happens to one shared call:
///
/// 1. The inner service answers a `Response<B>`. Unless its size hint
///    already says it is over the limit, its body is read to the end into
///    one `Bytes` (trailers kept).
/// 2. If it fits, every waiter gets the same status, version, headers,
///    extensions (cloned) and body, as a [`DedupBody`] that is already
///    full; a cached answer (`cache_ttl`) is the buffered one.
/// 3. If it does not fit (by its size hint, or once more than the limit
///    has been read), reading stops. The first waiter to take the answer
///    (normally the first caller) gets the whole response: the bytes
///    already read, then the rest of the stream. Every other waiter
///    re-issues its own request straight to the inner service, with
///    [`NoDedup`] on it, and gets that call's own answer; it is not
///    shared, and not cached. A too-big answer is cached (with `cache_ttl`)
///    only as "too big", so later callers re-issue too.
/// 4. An error while reading the body is the shared call's error, given
///    to every waiter.
///
/// Re-issuing needs the request again: the method, URI, version, headers
/// and extensions are kept from the original request, and the body is
/// `B::default()` (safe methods carry none). Requests the key leaves
/// alone go straight through, unbuffered.
#[derive(Debug, Clone)]
pub struct HttpDedupLayer<K> {
    dedup: DedupLayer<K>,
    limit: usize,
}

impl<K> HttpDedupLayer<K> {
    /// Wraps a dedup layer (usually keyed by [`HttpKey`]), with the default
    /// body limit.
    pub fn new(dedup: DedupLayer<K>) -> Self {
        Self {
            dedup,
            limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// The largest body buffered to be shared, in bytes (default 1 MiB).
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl<S: Clone, K> Layer<S> for HttpDedupLayer<K> {
    type Service = HttpDedup<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        let buffered = Buffer {
            inner: inner.clone(),
            limit: self.limit,
        };
        HttpDedup {
            shared: self.dedup.layer(buffered),
            direct: inner,
            limit: self.limit,
        }
    }
}

/// The service made by [`HttpDedupLayer`].
#[derive(Debug, Clone)]
pub struct HttpDedup<S, K> {
    shared: Dedup<Buffer<S>, K>,
    direct: S,
    limit: usize,
}

impl<S, K> HttpDedup<S, K> {
    /// A handle on the dedup layer's table.
    pub fn handle(&self) -> DedupHandle {
        self.shared.handle()
    }
}

/// Reads a response body into one `Bytes`, up to a limit. Below the dedup
/// layer inside [`HttpDedup`].
#[derive(Debug, Clone)]
pub struct Buffer<S> {
    inner: S,
    limit: usize,
}

/// A response as shared by [`HttpDedup`]: buffered, or too big to buffer
/// (then only one waiter may take it).
pub struct Buffered<B> {
    parts: Arc<http::response::Parts>,
    body: BufferedBody<B>,
}

enum BufferedBody<B> {
    Full(Bytes, Option<HeaderMap>),
    TooBig(Arc<Mutex<Option<(Bytes, B)>>>),
}

impl<B> Clone for Buffered<B> {
    fn clone(&self) -> Self {
        Self {
            parts: self.parts.clone(),
            body: match &self.body {
                BufferedBody::Full(b, t) => BufferedBody::Full(b.clone(), t.clone()),
                BufferedBody::TooBig(s) => BufferedBody::TooBig(s.clone()),
            },
        }
    }
}

impl<B> fmt::Debug for Buffered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = match &self.body {
            BufferedBody::Full(b, _) => b.len().to_string(),
            BufferedBody::TooBig(_) => "too big".to_owned(),
        };
        f.debug_struct("Buffered")
            .field("status", &self.parts.status)
            .field("body", &body)
            .finish()
    }
}

fn rebuild<B>(parts: &http::response::Parts, body: B) -> Response<B> {
    let mut res = Response::new(body);
    *res.status_mut() = parts.status;
    *res.version_mut() = parts.version;
    *res.headers_mut() = parts.headers.clone();
    *res.extensions_mut() = parts.extensions.clone();
    res
}

async fn buffer<B>(res: Response<B>, limit: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = res.into_parts();
    let parts = Arc::new(parts);
    let too_big = |read: Bytes, body: B| Buffered {
        parts: parts.clone(),
        body: BufferedBody::TooBig(Arc::new(Mutex::new(Some((read, body))))),
    };
    if body.size_hint().lower() > limit as u64 {
        return Ok(too_big(Bytes::new(), body));
    }
    let mut read = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => {
                read.extend_from_slice(&data);
                if read.len() > limit {
                    return Ok(too_big(read.freeze(), body));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
            }
        }
    }
    Ok(Buffered {
        parts: parts.clone(),
        body: BufferedBody::Full(read.freeze(), trailers),
    })
}

impl<S, Req, B> Service<Req> for Buffer<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Buffered<B>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Buffered<B>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move { buffer(fut.await.map_err(Into::into)?, limit).await })
    }
}

impl<S, K, ReqB, B> Service<Request<ReqB>> for HttpDedup<S, K>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    K: DedupKey<Request<ReqB>>,
    ReqB: Default + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<DedupBody<B>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<DedupBody<B>>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.shared.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Kept to re-issue the request if the shared answer is too big.
        let again = {
            let mut r = Request::new(ReqB::default());
            *r.method_mut() = req.method().clone();
            *r.uri_mut() = req.uri().clone();
            *r.version_mut() = req.version();
            *r.headers_mut() = req.headers().clone();
            *r.extensions_mut() = req.extensions().clone();
            r.extensions_mut().insert(NoDedup);
            r
        };
        let fut = self.shared.call(req);
        let direct = self.direct.clone();
        let limit = self.limit;
        Box::pin(async move {
            let shared = fut.await?;
            if let Some(res) = shared.take() {
                return Ok(res);
            }
            // Too big to share, and another waiter took it: our own call.
            let mut direct = Buffer {
                inner: direct,
                limit,
            };
            std::future::poll_fn(|cx| direct.poll_ready(cx)).await?;
            let own = direct.call(again).await?;
            own.take()
                .ok_or_else(|| "dedup: a response taken twice".into())
        })
    }
}

impl<B> Buffered<B> {
    /// This waiter's response: always for a buffered body; for one too big
    /// to buffer, only for the first to ask.
    fn take(&self) -> Option<Response<DedupBody<B>>> {
        let body = match &self.body {
            BufferedBody::Full(data, trailers) => DedupBody::full(data.clone(), trailers.clone()),
            BufferedBody::TooBig(slot) => {
                let (read, rest) = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
                DedupBody::stream(read, rest)
            }
        };
        Some(rebuild(&self.parts, body))
    }
}

pin_project! {
    /// The body of a response from [`HttpDedup`]: a shared, buffered body,
    /// or (for a body over the limit) the part already read followed by
    /// the rest of the stream.
    pub struct DedupBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyProj]
    enum BodyKind<B> {
        // Buffered and shared: the data and trailers, until sent.
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        // Too big to share: what was read, then the rest.
        Stream { read: Option<Bytes>, #[pin] rest: B },
    }
}

impl<B> DedupBody<B> {
    fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: BodyKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    fn stream(read: Bytes, rest: B) -> Self {
        Self {
            kind: BodyKind::Stream {
                read: (!read.is_empty()).then_some(read),
                rest,
            },
        }
    }

    /// Whether this body was buffered and shared (`false`: it streams from
    /// the upstream, unshared).
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, BodyKind::Full { .. })
    }
}

impl<B> fmt::Debug for DedupBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BodyKind::Full { data, .. } => f
                .debug_struct("DedupBody")
                .field("shared", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            BodyKind::Stream { .. } => f.debug_struct("DedupBody").finish_non_exhaustive(),
        }
    }
}

impl<B> Body for DedupBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyProj::Full { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            BodyProj::Stream { read, rest } => {
                if let Some(d) = read.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                rest.poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            BodyKind::Stream { read, rest } => read.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyKind::Stream { read, rest } => {
                let extra = read.as_ref().map_or(0, |d| d.len() as u64);
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + extra);
                if let Some(u) = h.upper() {
                    out.set_upper(u + extra);
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str, headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn users_and_variants_are_separate() {
        let k = DefaultKey;
        let a = k.key(&get("/x", &[("cookie", "sid=a")]));
        assert_ne!(a, k.key(&get("/x", &[("cookie", "sid=b")])));
        assert_ne!(a, k.key(&get("/x", &[])));
        assert_ne!(a, k.key(&get("/y", &[("cookie", "sid=a")])));
        assert_ne!(
            k.key(&get("/x", &[("accept-language", "fr")])),
            k.key(&get("/x", &[("accept-language", "de")]))
        );
        // Headers that do not change the answer do not split the key.
        assert_eq!(
            a,
            k.key(&get("/x", &[("cookie", "sid=a"), ("x-trace", "1")]))
        );
        assert_eq!(k.key(&Request::delete("/x").body(()).unwrap()), None);
    }
}
