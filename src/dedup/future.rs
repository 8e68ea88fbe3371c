//! The dedup layer's response future.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::flight::{Flight, Table};
use crate::error::BoxError;

type Leave<K, F, T> = fn(&Table<K, F, T>, &Arc<Flight<K, F, T>>, Option<usize>);

/// One caller's place on a shared call. Dropping it before the answer
/// arrived leaves the call; the last to leave cancels it.
pub(crate) struct Waiter<K, F, T> {
    table: Arc<Table<K, F, T>>,
    flight: Arc<Flight<K, F, T>>,
    slot: Option<usize>,
    answered: bool,
    leave: Leave<K, F, T>,
}

impl<K, F, T> Waiter<K, F, T>
where
    K: Hash + Eq + Clone,
    T: Clone,
{
    pub(crate) fn new(table: Arc<Table<K, F, T>>, flight: Arc<Flight<K, F, T>>) -> Self {
        Self {
            table,
            flight,
            slot: None,
            answered: false,
            leave: Table::leave,
        }
    }
}

impl<K, F, T> Drop for Waiter<K, F, T> {
    fn drop(&mut self) {
        if !self.answered {
            (self.leave)(&self.table, &self.flight, self.slot);
        }
    }
}

pin_project! {
    /// The response future of [`Dedup`](super::Dedup).
    pub struct ResponseFuture<F, K, T> {
        #[pin]
        kind: Kind<F, K, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, K, T> {
        // Not deduplicated: the inner call itself.
        Direct { #[pin] fut: F },
        // A place on a shared call.
        Waiting { waiter: Waiter<K, F, T> },
        // A cached answer.
        Ready { res: Option<Result<T, BoxError>> },
    }
}

impl<F, K, T> ResponseFuture<F, K, T> {
    pub(crate) fn direct(fut: F) -> Self {
        Self {
            kind: Kind::Direct { fut },
        }
    }

    pub(crate) fn waiting(waiter: Waiter<K, F, T>) -> Self {
        Self {
            kind: Kind::Waiting { waiter },
        }
    }

    pub(crate) fn ready(res: Result<T, BoxError>) -> Self {
        Self {
            kind: Kind::Ready { res: Some(res) },
        }
    }
}

impl<F, K, T, E> Future for ResponseFuture<F, K, T>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    E: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Direct { fut } => fut.poll(cx).map_err(Into::into),
            KindProj::Waiting { waiter } => {
                let w = &mut *waiter;
                let res = ready!(w.flight.poll_waiter(&w.table, &mut w.slot, cx));
                w.answered = true;
                Poll::Ready(res.map_err(Into::into))
            }
            KindProj::Ready { res } => {
                Poll::Ready(res.take().expect("dedup future polled after completion"))
            }
        }
    }
}

impl<F, K, T> fmt::Debug for ResponseFuture<F, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Direct { .. } => "direct",
            Kind::Waiting { .. } => "waiting",
            Kind::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
