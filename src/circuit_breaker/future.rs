//! The breaker's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::state::{Admission, Core};
use super::CircuitOpen;
use crate::classify::Classify;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// It holds the breaker's state until the call's result is booked, so
    /// the result counts even if every service and layer value of the
    /// breaker is gone by then. Dropped before the call finished (the
    /// caller went away, or the inner service panicked), it gives a
    /// half-open probe slot back and counts as neither success nor
    /// failure.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        stage: Stage<F, C>,
    }
}

pin_project! {
    #[project = StageProj]
    #[derive(Debug)]
    enum Stage<F, C> {
        Admitted {
            #[pin]
            fut: F,
            admission: Admission<Arc<Core>>,
            classifier: C,
        },
        // Boxed already: the caller gets a `BoxError` anyway, and the
        // future's drop stays small enough to inline.
        Rejected {
            err: Option<BoxError>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn admitted(fut: F, admission: Admission<Arc<Core>>, classifier: C) -> Self {
        Self {
            stage: Stage::Admitted {
                fut,
                admission,
                classifier,
            },
        }
    }

    pub(crate) fn rejected(err: CircuitOpen) -> Self {
        Self {
            stage: Stage::Rejected {
                err: Some(err.into()),
            },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().stage.project() {
            StageProj::Admitted {
                fut,
                admission,
                classifier,
            } => {
                let mut res = ready!(fut.poll(cx));
                if classifier.defers() {
                    admission.finish_deferred(classifier, &mut res);
                } else {
                    admission.finish(classifier, &res);
                }
                Poll::Ready(res.map_err(Into::into))
            }
            StageProj::Rejected { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
        }
    }
}
