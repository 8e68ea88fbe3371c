use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue};

/// Parses a `Retry-After` value as the time to wait from `now`.
///
/// Accepts delta-seconds (`"120"`) and an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`). A date in the past means "now"
/// ([`Duration::ZERO`]); anything else unparsable gives `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use tower_bulwark::http::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("2"), now), Some(Duration::from_secs(2)));
/// assert_eq!(
///     parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"), now),
///     Some(Duration::from_secs(10)),
/// );
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
/// ```
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long numbers saturate rather than fail.
        let secs = s.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a response with status `status` and headers
/// `headers`, honoured only on 429 and 503 answers (and on 3xx, where the
/// header means "follow later"). Uses the wall clock for HTTP-dates.
pub fn retry_after_of(status: http::StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let applies = status == http::StatusCode::TOO_MANY_REQUESTS
        || status == http::StatusCode::SERVICE_UNAVAILABLE
        || status.is_redirection();
    if !applies {
        return None;
    }
    parse_retry_after(headers.get(RETRY_AFTER)?, SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(parse_retry_after(&v("0"), now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(&v(" 30 "), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after(&v("99999999999999999999999"), now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after(&v("-1"), now), None);
        assert_eq!(parse_retry_after(&v("1.5"), now), None);
        assert_eq!(parse_retry_after(&v(""), now), None);
        // A date in the past is "now".
        assert_eq!(
            parse_retry_after(&v("Thu, 01 Jan 1970 00:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn only_on_backoff_statuses() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("5"));
        assert_eq!(
            retry_after_of(http::StatusCode::SERVICE_UNAVAILABLE, &h),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after_of(http::StatusCode::TOO_MANY_REQUESTS, &h),
            Some(Duration::from_secs(5))
        );
        assert_eq!(retry_after_of(http::StatusCode::OK, &h), None);
        assert_eq!(
            retry_after_of(http::StatusCode::INTERNAL_SERVER_ERROR, &h),
            None
        );
    }
}
