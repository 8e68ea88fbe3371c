//! A request body that can be sent again.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;

/// Wraps a request body so the request can be retried: the body is
/// buffered as the first attempt streams it, up to `limit` bytes, and a
/// clone of the body replays what was buffered, then goes on reading the
/// original where the previous attempt stopped.
///
/// - Cloning a `ReplayBody` is cheap and does not copy data: clones share
///   one buffer and one underlying body. The retry layer keeps a clone of
///   the request (and so of the body) for the next attempt.
/// - Only one clone reads at a time. A clone takes the shared body on its
///   first poll and hands it back when dropped; polling a clone while
///   another still holds the body (the previous attempt was not dropped
///   yet) fails with [`ReplayError::InUse`].
/// - Past `limit` bytes the body is *capped*: the buffer is freed, the
///   attempt in flight goes on streaming, and
///   [`can_replay`](ReplayBody::can_replay) turns `false`, so
///   [`HttpRetryPolicy`](super::HttpRetryPolicy) sends the request once
///   and does not retry it. A capped clone that is polled anyway fails
///   with [`ReplayError::Capped`]. A body whose size hint already exceeds
///   the limit is capped from the start.
/// - Trailers are kept (they do not count against the limit) and replayed.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_bulwark::http::ReplayBody;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_bulwark::BoxError> {
/// let body = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), 64 * 1024);
/// let again = body.clone();
/// assert_eq!(body.collect().await?.to_bytes(), "hello");
/// assert!(again.can_replay());
/// assert_eq!(again.collect().await?.to_bytes(), "hello");
/// # Ok(()) }
/// ```
pub struct ReplayBody<B> {
    shared: Arc<SharedBody<B>>,
    /// The shared body while this clone holds it.
    state: Option<BodyState<B>>,
    /// Buffered chunks this clone has already yielded.
    replayed: usize,
    trailers_replayed: bool,
    /// Bytes this clone has yielded, for `size_hint`.
    yielded: u64,
    /// Whether this clone has been polled (it then holds or held the body).
    started: bool,
}

struct SharedBody<B> {
    body: Mutex<Option<BodyState<B>>>,
    capped: AtomicBool,
    limit: usize,
    size_hint: SizeHint,
}

struct BodyState<B> {
    buf: Vec<Bytes>,
    buffered: usize,
    /// The rest of the original body; `None` once it ended.
    rest: Option<Pin<Box<B>>>,
    trailers: Option<HeaderMap>,
}

/// Why a [`ReplayBody`] clone could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayError {
    /// The body went over its buffer limit, so it cannot be sent again.
    Capped,
    /// Another clone (an earlier attempt still alive) holds the body.
    InUse,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Capped => f.write_str("request body exceeded its replay limit"),
            ReplayError::InUse => f.write_str("request body is still held by an earlier attempt"),
        }
    }
}

impl std::error::Error for ReplayError {}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body`, buffering up to `limit` bytes for replays.
    pub fn new(body: B, limit: usize) -> Self {
        let size_hint = body.size_hint();
        let capped = size_hint.lower() > limit as u64;
        let state = BodyState {
            buf: Vec::new(),
            buffered: 0,
            rest: Some(Box::pin(body)),
            trailers: None,
        };
        Self {
            shared: Arc::new(SharedBody {
                body: Mutex::new(None),
                capped: AtomicBool::new(capped),
                limit,
                size_hint,
            }),
            state: Some(state),
            replayed: 0,
            trailers_replayed: false,
            yielded: 0,
            started: true,
        }
    }
}

impl<B> ReplayBody<B> {
    /// Whether this body can still be sent again: `false` once it went
    /// over its limit.
    pub fn can_replay(&self) -> bool {
        !self.shared.capped.load(Ordering::Acquire)
    }

    /// The buffer limit, in bytes.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }
}

impl<B> Clone for ReplayBody<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            state: None,
            replayed: 0,
            trailers_replayed: false,
            yielded: 0,
            started: false,
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            // Hand the body to the next clone.
            *self.shared.body.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.state.is_none() {
            // A replay: needs the whole body back.
            if !this.can_replay() {
                return Poll::Ready(Some(Err(ReplayError::Capped.into())));
            }
            let taken = this
                .shared
                .body
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match taken {
                Some(state) => this.state = Some(state),
                None => return Poll::Ready(Some(Err(ReplayError::InUse.into()))),
            }
            this.started = true;
        }
        let capped = this.shared.capped.load(Ordering::Acquire);
        let state = this.state.as_mut().expect("state taken above");

        if !capped && this.replayed < state.buf.len() {
            let chunk = state.buf[this.replayed].clone();
            this.replayed += 1;
            this.yielded += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = state.rest.as_mut() {
            match rest.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(mut data) => {
                            let chunk = data.copy_to_bytes(data.remaining());
                            this.yielded += chunk.len() as u64;
                            if !capped {
                                if state.buffered + chunk.len() > this.shared.limit {
                                    this.shared.capped.store(true, Ordering::Release);
                                    state.buf = Vec::new();
                                } else {
                                    state.buffered += chunk.len();
                                    state.buf.push(chunk.clone());
                                    this.replayed = state.buf.len();
                                }
                            }
                            Frame::data(chunk)
                        }
                        Err(frame) => match frame.into_trailers() {
                            Ok(trailers) => {
                                state.trailers = Some(trailers.clone());
                                this.trailers_replayed = true;
                                Frame::trailers(trailers)
                            }
                            // Neither data nor trailers: an unknown frame kind
                            // of a future http-body; drop it.
                            Err(_) => return Poll::Ready(None),
                        },
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => state.rest = None,
            }
        }
        if !this.trailers_replayed {
            this.trailers_replayed = true;
            if let Some(t) = &state.trailers {
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Some(state) => {
                state.rest.is_none()
                    && self.replayed >= state.buf.len()
                    && (self.trailers_replayed || state.trailers.is_none())
            }
            None => !self.started && self.shared.size_hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let orig = &self.shared.size_hint;
        let mut hint = SizeHint::new();
        hint.set_lower(orig.lower().saturating_sub(self.yielded));
        if let Some(upper) = orig.upper() {
            hint.set_upper(upper.saturating_sub(self.yielded));
        }
        hint
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("limit", &self.shared.limit)
            .field("capped", &!self.can_replay())
            .field("holds_body", &self.state.is_some())
            .field("yielded", &self.yielded)
            .finish()
    }
}

/// A request body the retry layer can tell is safe to send again.
///
/// [`HttpRetryPolicy`](super::HttpRetryPolicy) retries a request only if
/// its body can be replayed: a [`ReplayBody`] until it goes over its limit,
/// and the in-memory bodies (`Full`, `Empty`, `String`, `Bytes`, ...)
/// always. Implement it for your own cloneable body types.
pub trait Replayable {
    /// Whether a clone of this body will carry the same bytes.
    fn can_replay(&self) -> bool;
}

impl<B> Replayable for ReplayBody<B> {
    fn can_replay(&self) -> bool {
        ReplayBody::can_replay(self)
    }
}

macro_rules! always_replayable {
    ($($t:ty),* $(,)?) => {
        $(impl Replayable for $t {
            fn can_replay(&self) -> bool {
                true
            }
        })*
    };
}

always_replayable!((), String, Bytes, Vec<u8>, &'static str, &'static [u8]);

impl<D> Replayable for http_body_util::Full<D> {
    fn can_replay(&self) -> bool {
        true
    }
}

impl<D> Replayable for http_body_util::Empty<D> {
    fn can_replay(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

    fn chunks(parts: &[&'static str], trailers: bool) -> Chunks {
        let mut frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "42".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn replays_data_and_trailers() {
        let body = ReplayBody::new(chunks(&["ab", "cd", "ef"], true), 100);
        let replay = body.clone();
        let first = body.collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["x-sum"], "42");
        assert_eq!(first.to_bytes(), "abcdef");
        assert!(replay.can_replay());
        let again = replay.clone();
        let second = replay.collect().await.unwrap();
        assert_eq!(second.trailers().unwrap()["x-sum"], "42");
        assert_eq!(second.to_bytes(), "abcdef");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_partly_read_body_is_finished_by_the_replay() {
        let mut body = ReplayBody::new(chunks(&["ab", "cd", "ef"], false), 100);
        let replay = body.clone();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(body);
        assert_eq!(replay.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn over_the_limit_is_capped() {
        let body = ReplayBody::new(chunks(&["abc", "def", "ghi"], false), 5);
        let replay = body.clone();
        // The first attempt still gets everything.
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefghi");
        assert!(!replay.can_replay());
        let err = replay.collect().await.unwrap_err();
        assert_eq!(
            err.downcast_ref::<ReplayError>(),
            Some(&ReplayError::Capped)
        );
        // A size hint over the limit caps at once.
        let full = ReplayBody::new(
            http_body_util::Full::new(Bytes::from_static(b"0123456789")),
            4,
        );
        assert!(!full.can_replay());
    }

    #[tokio::test]
    async fn a_held_body_is_in_use() {
        let mut body = ReplayBody::new(chunks(&["ab", "cd"], false), 100);
        let replay = body.clone();
        let _ = body.frame().await;
        let err = replay.collect().await.unwrap_err();
        assert_eq!(err.downcast_ref::<ReplayError>(), Some(&ReplayError::InUse));
        assert!(format!("{body:?}").contains("holds_body: true"));
    }

    #[test]
    fn size_hints_follow_the_original() {
        let body = ReplayBody::new(http_body_util::Full::new(Bytes::from_static(b"0123")), 10);
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.clone().size_hint().exact(), Some(4));
        let empty = ReplayBody::new(http_body_util::Empty::<Bytes>::new(), 10);
        assert!(empty.clone().is_end_stream());
    }
}
