//! The limiter's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::layer::LayerState;
use super::remote::Admit;
use crate::classify::Classify;
use crate::error::BoxError;

/// A waiting request's reservation: dropping it before its turn came gives
/// the tokens back (see "Giving reservations back" in `gcra`). Boxed, as
/// only waiting requests carry one.
pub(crate) struct Refund(Option<Box<dyn FnOnce() + Send>>);

impl Refund {
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    /// The turn came: the tokens are spent.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Refund {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, Req, K, C, H>
    where
        S: Service<Req>,
    {
        #[pin]
        stage: Stage<S, Req, K, C, H>,
    }
}

pin_project! {
    /// A request waiting for its turn (memory, `max_wait`) or for a shared
    /// backend's answer (Redis). One variant of the future for both keeps
    /// the admitted path's future as it was.
    struct Wait<S, Req> {
        #[pin]
        sleep: Option<Sleep>,
        admit: Option<Admit>,
        svc: Option<S>,
        req: Option<Req>,
        refund: Refund,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<S, Req, K, C, H>
    where
        S: Service<Req>,
    {
        Called {
            #[pin]
            fut: S::Future,
            hint: Option<Arc<LayerState<K, C, H>>>,
        },
        // Boxed: only waiting requests pay for the timer's size.
        Waiting {
            wait: Pin<Box<Wait<S, Req>>>,
            hint: Option<Arc<LayerState<K, C, H>>>,
        },
        Rejected {
            err: Option<BoxError>,
        },
    }
}

impl<S: Service<Req>, Req, K, C, H> ResponseFuture<S, Req, K, C, H> {
    pub(crate) fn called(fut: S::Future, hint: Option<Arc<LayerState<K, C, H>>>) -> Self {
        Self {
            stage: Stage::Called { fut, hint },
        }
    }

    pub(crate) fn waiting(
        at: Instant,
        svc: S,
        req: Req,
        refund: Refund,
        hint: Option<Arc<LayerState<K, C, H>>>,
    ) -> Self {
        Self {
            stage: Stage::Waiting {
                wait: Box::pin(Wait {
                    sleep: Some(tokio::time::sleep_until(at)),
                    admit: None,
                    svc: Some(svc),
                    req: Some(req),
                    refund,
                }),
                hint,
            },
        }
    }

    /// Waits for a shared backend's admission, then calls.
    pub(crate) fn admitting(
        admit: Admit,
        svc: S,
        req: Req,
        hint: Option<Arc<LayerState<K, C, H>>>,
    ) -> Self {
        Self {
            stage: Stage::Waiting {
                wait: Box::pin(Wait {
                    sleep: None,
                    admit: Some(admit),
                    svc: Some(svc),
                    req: Some(req),
                    refund: Refund(None),
                }),
                hint,
            },
        }
    }

    pub(crate) fn rejected(err: BoxError) -> Self {
        Self {
            stage: Stage::Rejected { err: Some(err) },
        }
    }
}

/// The waiting arm, out of line so the admitted path's `poll` stays small:
/// the next state once the turn came (or the backend answered).
#[inline(never)]
fn poll_wait<S, Req, K, C, H>(
    wait: Pin<&mut Wait<S, Req>>,
    hint: &mut Option<Arc<LayerState<K, C, H>>>,
    cx: &mut Context<'_>,
) -> Poll<Stage<S, Req, K, C, H>>
where
    S: Service<Req>,
{
    let w = wait.project();
    // Open until the call below is made: the layers under this one join
    // the round the admission made (a state file's).
    let mut _span = None;
    if let Some(admit) = w.admit {
        let (admitted, span) = ready!(admit.as_mut().poll(cx));
        if let Err(err) = admitted {
            return Poll::Ready(Stage::Rejected { err: Some(err) });
        }
        _span = span;
    } else if let Some(sleep) = w.sleep.as_pin_mut() {
        ready!(sleep.poll(cx));
    }
    w.refund.disarm();
    let mut svc = w.svc.take().expect("polled after completion");
    let req = w.req.take().expect("polled after completion");
    let hint = hint.take();
    let fut = svc.call(req);
    Poll::Ready(Stage::Called { fut, hint })
}

impl<S, Req, K, C, H> Future for ResponseFuture<S, Req, K, C, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    H: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut stage = self.project().stage;
        loop {
            match stage.as_mut().project() {
                StageProj::Called { fut, hint } => {
                    let res = ready!(fut.poll(cx));
                    if let Some(shared) = hint.take() {
                        let after = shared.hint.as_ref().and_then(|h| h.retry_after(&res));
                        if let Some(d) = after {
                            shared.core.block_for_hint(d);
                        }
                    }
                    return Poll::Ready(res.map_err(Into::into));
                }
                StageProj::Waiting { wait, hint } => {
                    let next = ready!(poll_wait(wait.as_mut(), hint, cx));
                    stage.set(next);
                }
                StageProj::Rejected { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, K, C, H> fmt::Debug for ResponseFuture<S, Req, K, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.stage {
            Stage::Called { .. } => "called",
            Stage::Waiting { .. } => "waiting",
            Stage::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
