//! A set of gRPC status codes, and reading a status from HTTP headers.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tonic::Code;

/// The header that carries a server's retry pushback, in milliseconds.
pub(crate) const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// A set of [`Code`]s: one bit per code (gRPC defines 17, `0..=16`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CodeSet(u32);

impl CodeSet {
    pub(crate) fn of(codes: impl IntoIterator<Item = Code>) -> Self {
        Self(codes.into_iter().fold(0, |bits, c| bits | bit(c)))
    }

    pub(crate) fn contains(self, code: Code) -> bool {
        self.0 & bit(code) != 0
    }

    pub(crate) fn with(self, code: Code, yes: bool) -> Self {
        if yes {
            Self(self.0 | bit(code))
        } else {
            Self(self.0 & !bit(code))
        }
    }
}

fn bit(code: Code) -> u32 {
    // `Code` is a field-less enum numbered as on the wire, 0..=16.
    1 << (code as u32 & 31)
}

impl fmt::Debug for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries((0..=16).map(Code::from_i32).filter(|c| self.contains(*c)))
            .finish()
    }
}

/// The gRPC code an answer carries in `headers` (a trailers-only answer,
/// or the trailers themselves), if any. A `grpc-status` that is not a
/// number is `UNKNOWN`, as gRPC clients read it.
pub(crate) fn status_code(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    Some(
        match std::str::from_utf8(value.as_bytes()).ok().map(str::trim) {
            Some(s) => s.parse::<i32>().map_or(Code::Unknown, Code::from_i32),
            None => Code::Unknown,
        },
    )
}

/// The code of an answer at the time its headers arrive: the
/// `grpc-status` header of a trailers-only answer; for an HTTP status
/// other than 200, the code gRPC maps it to; `None` while the status is
/// still to come in the trailers.
pub(crate) fn response_code(status: StatusCode, headers: &HeaderMap) -> Option<Code> {
    if let Some(code) = status_code(headers) {
        return Some(code);
    }
    if status == StatusCode::OK {
        return None;
    }
    // gRPC's mapping of HTTP statuses from proxies and servers that are
    // not gRPC-aware (doc/http-grpc-status-mapping.md).
    Some(match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    })
}

/// What `grpc-retry-pushback-ms` says: no header, wait this long, or do
/// not retry (a negative or unreadable value, as gRPC's retry design asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushback {
    None,
    Wait(Duration),
    Stop,
}

pub(crate) fn pushback(headers: &HeaderMap) -> Pushback {
    let Some(value) = headers.get(PUSHBACK) else {
        return Pushback::None;
    };
    match std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    {
        Some(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms as u64)),
        _ => Pushback::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_codes() {
        assert_eq!(
            status_code(&headers(&[("grpc-status", "14")])),
            Some(Code::Unavailable)
        );
        assert_eq!(
            status_code(&headers(&[("grpc-status", "0")])),
            Some(Code::Ok)
        );
        assert_eq!(
            status_code(&headers(&[("grpc-status", "x")])),
            Some(Code::Unknown)
        );
        assert_eq!(
            status_code(&headers(&[("grpc-status", "99")])),
            Some(Code::Unknown)
        );
        assert_eq!(status_code(&HeaderMap::new()), None);
        assert_eq!(response_code(StatusCode::OK, &HeaderMap::new()), None);
        assert_eq!(
            response_code(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()),
            Some(Code::Unavailable)
        );
        assert_eq!(
            response_code(StatusCode::NOT_FOUND, &HeaderMap::new()),
            Some(Code::Unimplemented)
        );
    }

    #[test]
    fn reads_pushback() {
        assert_eq!(pushback(&HeaderMap::new()), Pushback::None);
        assert_eq!(
            pushback(&headers(&[(PUSHBACK, "250")])),
            Pushback::Wait(Duration::from_millis(250))
        );
        assert_eq!(pushback(&headers(&[(PUSHBACK, "-1")])), Pushback::Stop);
        assert_eq!(pushback(&headers(&[(PUSHBACK, "soon")])), Pushback::Stop);
    }

    #[test]
    fn code_sets() {
        let s = CodeSet::of([Code::Unavailable, Code::Internal]);
        assert!(s.contains(Code::Unavailable));
        assert!(!s.contains(Code::NotFound));
        assert!(!s.with(Code::Internal, false).contains(Code::Internal));
        assert_eq!(format!("{s:?}"), "{Internal, Unavailable}");
    }
}
