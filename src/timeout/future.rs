//! The timeout's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::layer::Core;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Timeout`](super::Timeout): the inner call
    /// and its timer, both inline (nothing is boxed). Dropping it cancels
    /// the inner call.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Made on the first poll that finds the call pending: a call that
        // answers at once never builds a timer.
        #[pin]
        sleep: Option<Sleep>,
        // `None` when it lies beyond what the clock can represent: such a
        // timeout never fires.
        deadline: Option<Instant>,
        timeout: Duration,
        core: Arc<Core>,
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn new(inner: F, timeout: Duration, core: Arc<Core>) -> Self {
        // The deadline counts from the call, as the caller sees it, even
        // when the future is first polled later.
        Self {
            inner,
            sleep: None,
            deadline: Instant::now().checked_add(timeout),
            timeout,
            core,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The call first: an answer and the deadline in the same poll go
        // to the answer.
        if let Poll::Ready(res) = this.inner.poll(cx) {
            return Poll::Ready(res.map_err(Into::into));
        }
        if this.sleep.is_none() {
            if let Some(deadline) = *this.deadline {
                this.sleep.set(Some(tokio::time::sleep_until(deadline)));
            }
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(this.core.timed_out(*this.timeout).into())),
            _ => Poll::Pending,
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("never_fires", &self.deadline.is_none())
            .finish_non_exhaustive()
    }
}
