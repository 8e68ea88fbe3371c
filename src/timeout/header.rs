//! Per-request timeouts read from the headers callers use for them.

use std::time::Duration;

/// The timeout a gRPC caller set in its `grpc-timeout` header: up to eight
/// digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC over
/// HTTP/2 protocol defines it. `None` when the header is absent or
/// malformed.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::timeout::{grpc_timeout, TimeoutLayer};
///
/// let layer = TimeoutLayer::builder()
///     .timeout(Duration::from_secs(30))
///     .per_request(|req: &http::Request<()>| grpc_timeout(req.headers()))
///     .build()
///     .unwrap();
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("grpc-timeout", "250m".parse().unwrap());
/// assert_eq!(grpc_timeout(&headers), Some(Duration::from_millis(250)));
/// # let _ = layer;
/// ```
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Option<Duration> {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&h)
    }

    #[test]
    fn every_unit_and_every_malformed_value() {
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("4m"), Some(Duration::from_millis(4)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("6n"), Some(Duration::from_nanos(6)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["", "m", "123456789m", "1x", "-1m", "1.5S", "+1S", " 1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
