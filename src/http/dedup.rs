//! The dedup layer's key for HTTP requests (features `http` and `dedup`).

use http::header::{
    HeaderName, ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, COOKIE,
    PROXY_AUTHORIZATION,
};
use http::{HeaderValue, Method, Request, Uri};

use crate::dedup::{DedupKey, DefaultKey};

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
/// must be `Clone` (for example `http_body_util::Full<Bytes>`): buffer a
/// streaming body below the dedup layer.
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
        if !self.methods.contains(req.method()) {
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
