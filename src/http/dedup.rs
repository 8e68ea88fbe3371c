//! The dedup layer's key for HTTP requests (features `http` and `dedup`).

use http::header::{
    HeaderName, ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, COOKIE, HOST,
    PROXY_AUTHORIZATION,
};
use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Response, Uri};

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
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

/// Keys HTTP requests for the dedup layer: which requests may share one
/// answer.
///
/// Two requests get the same key, and so may share an answer, exactly when
/// all of these are equal:
///
/// - the method, which must be one of the keyed methods (`GET`, `HEAD`,
///   `OPTIONS` by default; add one with [`method`](HttpKey::method));
///   other requests get no key and go straight through;
/// - the URI as received, compared byte for byte: scheme and authority
///   when it has them (absolute form, as a client sends through a proxy
///   and as HTTP/2 carries them), path and query;
/// - the values of the `Host` header, always, so that on an HTTP/1 server,
///   where the URI is only a path, two virtual hosts never share;
/// - the values of each key header, in the order received (a header that
///   is absent differs from one that is empty). By default these are the
///   principal headers `Authorization`, `Proxy-Authorization`, `Cookie` and
///   `X-Api-Key`, so one caller's answer never reaches another, and the
///   variant headers `Accept`, `Accept-Encoding` and `Accept-Language`;
///   add more with [`header`](HttpKey::header);
/// - each principal part you add: a request extension of a type `T`
///   ([`extension`](HttpKey::extension), for example a tenant id inserted
///   by auth middleware that runs before the dedup layer) or a value
///   computed from the headers and extensions
///   ([`principal`](HttpKey::principal)). A part that is absent (no such
///   extension, or `None` from the closure) is a value of its own: such
///   requests share with each other, never with a request that has one.
///
/// Nothing else counts: other headers, the HTTP version and the body do
/// not (safe methods carry no body). A request carrying the [`NoDedup`]
/// extension is never keyed.
///
/// ```
/// use tower_bulwark::dedup::{DedupKey, DedupLayer};
/// use tower_bulwark::http::dedup::HttpKey;
///
/// /// Inserted by the auth middleware, which runs before the dedup layer.
/// #[derive(Clone, PartialEq, Eq, Hash)]
/// struct TenantId(u64);
///
/// let key = HttpKey::new().header("x-api-version").extension::<TenantId>();
/// let req = |user: &'static str, tenant: u64| {
///     let mut req = http::Request::get("/me")
///         .header("host", "api.example.com")
///         .header("authorization", user)
///         .body(())
///         .unwrap();
///     req.extensions_mut().insert(TenantId(tenant));
///     req
/// };
/// assert_eq!(key.key(&req("Bearer alice", 1)), key.key(&req("Bearer alice", 1)));
/// assert_ne!(key.key(&req("Bearer alice", 1)), key.key(&req("Bearer bob", 1)));
/// assert_ne!(key.key(&req("Bearer alice", 1)), key.key(&req("Bearer alice", 2)));
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
#[derive(Clone)]
pub struct HttpKey {
    headers: Vec<HeaderName>,
    methods: Vec<Method>,
    parts: Vec<Arc<dyn PartFn>>,
}

impl fmt::Debug for HttpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self.parts.iter().map(|p| p.name()).collect();
        f.debug_struct("HttpKey")
            .field("headers", &self.headers)
            .field("methods", &self.methods)
            .field("parts", &parts)
            .finish()
    }
}

impl Default for HttpKey {
    fn default() -> Self {
        Self::new()
    }
}

/// `X-Api-Key`: a principal header, keyed by default.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl HttpKey {
    /// The default key headers and safe methods, and no principal parts.
    pub fn new() -> Self {
        Self {
            headers: vec![
                AUTHORIZATION,
                PROXY_AUTHORIZATION,
                COOKIE,
                X_API_KEY,
                ACCEPT,
                ACCEPT_ENCODING,
                ACCEPT_LANGUAGE,
            ],
            methods: vec![Method::GET, Method::HEAD, Method::OPTIONS],
            parts: Vec::new(),
        }
    }

    /// Another header that changes the answer, or says who is asking (a
    /// tenant header, an API version). Panics on an invalid name, like
    /// `HeaderName::from_static`; see [`header_name`](HttpKey::header_name).
    pub fn header(self, name: &'static str) -> Self {
        self.header_name(HeaderName::from_static(name))
    }

    /// Another header that changes the answer, by its `HeaderName`.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        if !self.headers.contains(&name) {
            self.headers.push(name);
        }
        self
    }

    /// Also deduplicates `method` (for example a `POST` that only reads).
    pub fn method(mut self, method: Method) -> Self {
        self.methods.push(method);
        self
    }

    /// Makes the request extension of type `T` part of the key: requests
    /// share only when they carry equal values of it (or both lack it).
    /// Use it for who is asking when that is known to middleware rather
    /// than written in a header, such as a tenant or user id that an auth
    /// layer in front of the dedup layer inserts.
    pub fn extension<T>(mut self) -> Self
    where
        T: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.parts.push(Arc::new(FromExtension::<T>(PhantomData)));
        self
    }

    /// Makes a value computed from the request's headers and extensions
    /// part of the key: requests share only when `f` returns equal values
    /// for them (`None` is a value too).
    ///
    /// ```
    /// use tower_bulwark::http::dedup::HttpKey;
    ///
    /// // The tenant is the part of the API key before the first dot.
    /// let key = HttpKey::new().principal(|headers, _extensions| {
    ///     let v = headers.get("x-api-key")?.to_str().ok()?;
    ///     Some(v.split('.').next()?.to_owned())
    /// });
    /// # let _ = key;
    /// ```
    pub fn principal<F, P>(mut self, f: F) -> Self
    where
        F: Fn(&HeaderMap, &Extensions) -> Option<P> + Send + Sync + 'static,
        P: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.parts.push(Arc::new(FromFn(f, PhantomData)));
        self
    }
}

/// One principal part of a key: a value of some type, compared and hashed
/// through that type.
trait PartValue: Any + Send + Sync {
    fn eq_dyn(&self, other: &dyn PartValue) -> bool;
    fn hash_dyn(&self, state: &mut dyn Hasher);
    fn as_any(&self) -> &dyn Any;
    fn name(&self) -> &'static str;
}

struct Value<T>(T);

impl<T: Hash + Eq + Send + Sync + 'static> PartValue for Value<T> {
    fn eq_dyn(&self, other: &dyn PartValue) -> bool {
        other
            .as_any()
            .downcast_ref::<Value<T>>()
            .is_some_and(|o| o.0 == self.0)
    }

    fn hash_dyn(&self, mut state: &mut dyn Hasher) {
        self.0.hash(&mut state);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

/// Reads one principal part from a request.
trait PartFn: Send + Sync {
    fn part(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<Part>;
    fn name(&self) -> &'static str;
}

struct FromExtension<T>(PhantomData<fn() -> T>);

impl<T: Hash + Eq + Clone + Send + Sync + 'static> PartFn for FromExtension<T> {
    fn part(&self, _: &HeaderMap, extensions: &Extensions) -> Option<Part> {
        let v = extensions.get::<T>()?.clone();
        Some(Part(Arc::new(Value(v))))
    }

    fn name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

struct FromFn<F, P>(F, PhantomData<fn() -> P>);

impl<F, P> PartFn for FromFn<F, P>
where
    F: Fn(&HeaderMap, &Extensions) -> Option<P> + Send + Sync + 'static,
    P: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn part(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<Part> {
        let v = (self.0)(headers, extensions)?;
        Some(Part(Arc::new(Value(v))))
    }

    fn name(&self) -> &'static str {
        std::any::type_name::<F>()
    }
}

/// A principal part's value in a key.
#[derive(Clone)]
struct Part(Arc<dyn PartValue>);

impl PartialEq for Part {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_dyn(&*other.0)
    }
}

impl Eq for Part {}

impl Hash for Part {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash_dyn(state);
    }
}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(..)", self.0.name())
    }
}

/// The key of one HTTP request; see [`HttpKey`] for what makes two equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpRequestKey {
    method: Method,
    uri: Uri,
    /// `Host`, then each key header, with every value in order.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// One per principal part, in the order they were added.
    parts: Vec<Option<Part>>,
}

impl<B> DedupKey<Request<B>> for HttpKey {
    type Key = HttpRequestKey;

    fn key(&self, req: &Request<B>) -> Option<HttpRequestKey> {
        if !self.methods.contains(req.method()) || req.extensions().get::<NoDedup>().is_some() {
            return None;
        }
        let mut headers = Vec::new();
        for name in std::iter::once(&HOST).chain(&self.headers) {
            // Every value of a repeated header counts, in order.
            for v in req.headers().get_all(name) {
                headers.push((name.clone(), v.clone()));
            }
        }
        let parts = self
            .parts
            .iter()
            .map(|p| p.part(req.headers(), req.extensions()))
            .collect();
        Some(HttpRequestKey {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers,
            parts,
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
///
/// On an axum server, `Router::layer` wraps each handler route anew for
/// every connection: build the dedup layer with
/// [`share_between_services`](crate::dedup::DedupBuilder::share_between_services)
/// there, or requests on different connections never share (the
/// [`HttpKey`] keeps the routes apart by URI and `Host`):
///
/// ```
/// use axum::{routing::get, Router};
/// use tower::ServiceBuilder;
/// use tower_bulwark::dedup::DedupLayer;
/// use tower_bulwark::http::dedup::{HttpDedupLayer, HttpKey};
///
/// let dedup = DedupLayer::builder()
///     .key_by(HttpKey::new())
///     .share_between_services()
///     .build()
///     .unwrap();
/// let app: Router = Router::new().route("/report", get(|| async { "..." })).layer(
///     ServiceBuilder::new()
///         .layer(axum::error_handling::HandleErrorLayer::new(
///             |e: tower::BoxError| async move { e.to_string() },
///         ))
///         .layer(HttpDedupLayer::new(dedup)),
/// );
/// # let _ = app;
/// ```
#[derive(Debug)]
pub struct HttpDedupLayer<K> {
    dedup: DedupLayer<K>,
    limit: usize,
}

impl<K> Clone for HttpDedupLayer<K> {
    fn clone(&self) -> Self {
        Self {
            dedup: self.dedup.clone(),
            limit: self.limit,
        }
    }
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

/// The service made by [`HttpDedupLayer`]. Its clones share calls in
/// flight and the cache; another service made by the same layer has its
/// own.
#[derive(Debug)]
pub struct HttpDedup<S, K> {
    shared: Dedup<Buffer<S>, K>,
    direct: S,
    limit: usize,
}

impl<S: Clone, K> Clone for HttpDedup<S, K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            direct: self.direct.clone(),
            limit: self.limit,
        }
    }
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

    #[test]
    fn principals_and_authority_are_always_keyed() {
        let k = DefaultKey;
        // Origin-form URIs, as an HTTP/1 server sees them.
        assert_ne!(
            k.key(&get("/me", &[("host", "a.example")])),
            k.key(&get("/me", &[("host", "b.example")]))
        );
        assert_ne!(
            k.key(&get("/me", &[("x-api-key", "tenant-a")])),
            k.key(&get("/me", &[("x-api-key", "tenant-b")]))
        );
        assert_ne!(
            k.key(&get("/me", &[("proxy-authorization", "a")])),
            k.key(&get("/me", &[]))
        );
        assert_ne!(
            k.key(&get("http://a.example/me", &[])),
            k.key(&get("http://b.example/me", &[]))
        );

        #[derive(Clone, PartialEq, Eq, Hash)]
        struct Tenant(u32);
        #[derive(Clone, PartialEq, Eq, Hash)]
        struct Other(u32);
        let k = HttpKey::new()
            .extension::<Tenant>()
            .principal(|h, _| h.get("x-user").cloned());
        let with = |t: Option<u32>, o: Option<u32>, user: &'static str| {
            let mut r = get("/me", &[("x-user", user)]);
            if let Some(t) = t {
                r.extensions_mut().insert(Tenant(t));
            }
            if let Some(o) = o {
                r.extensions_mut().insert(Other(o));
            }
            k.key(&r)
        };
        assert_eq!(with(Some(1), None, "u"), with(Some(1), Some(5), "u"));
        assert_ne!(with(Some(1), None, "u"), with(Some(2), None, "u"));
        assert_ne!(with(Some(1), None, "u"), with(None, None, "u"));
        assert_eq!(with(None, None, "u"), with(None, None, "u"));
        assert_ne!(with(Some(1), None, "u"), with(Some(1), None, "v"));
    }
}
