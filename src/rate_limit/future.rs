//! The limiter's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::layer::Shared;
use super::remote::Admit;
use crate::classify::Classify;
use crate::clock::nanos;
use crate::error::BoxError;

/// A waiting request's reservation: dropping it before its turn came gives
/// the tokens back (see `gcra::refund`). Boxed, as only waiting requests
/// carry one.
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
        kind: Kind<S, Req, K, C, H>,
    }
}

pin_project! {
    struct Wait<S, Req> {
        #[pin]
        sleep: Sleep,
        svc: Option<S>,
        req: Option<Req>,
        refund: Refund,
    }
}

/// A request waiting for a shared backend's answer.
struct Admitting<S, Req, K, C, H> {
    admit: Admit,
    svc: Option<S>,
    req: Option<Req>,
    shared: Arc<Shared<K, C, H>>,
}

impl<S, Req, K, C, H> Admitting<S, Req, K, C, H> {
    /// Out of line, so the memory path's `poll` stays small.
    #[inline(never)]
    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Kind<S, Req, K, C, H>>
    where
        S: Service<Req>,
    {
        let res = ready!(self.admit.as_mut().poll(cx));
        let shared = self.shared.clone();
        Poll::Ready(match res {
            Ok(()) => {
                let mut svc = self.svc.take().expect("polled after completion");
                let req = self.req.take().expect("polled after completion");
                let hint = shared.hint.is_some().then_some(shared);
                Kind::Called {
                    fut: svc.call(req),
                    hint,
                }
            }
            Err(wait) => Kind::Rejected {
                err: Some(shared.core.rejected(nanos(wait), 0.0).into()),
            },
        })
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K, C, H>
    where
        S: Service<Req>,
    {
        Called {
            #[pin]
            fut: S::Future,
            hint: Option<Arc<Shared<K, C, H>>>,
        },
        // Boxed: only waiting requests pay for the timer's size.
        Waiting {
            wait: Pin<Box<Wait<S, Req>>>,
            hint: Option<Arc<Shared<K, C, H>>>,
        },
        // Boxed: only requests to a Redis backend take this path.
        Remote {
            admitting: Box<Admitting<S, Req, K, C, H>>,
        },
        Rejected {
            err: Option<BoxError>,
        },
    }
}

impl<S: Service<Req>, Req, K, C, H> ResponseFuture<S, Req, K, C, H> {
    pub(crate) fn called(fut: S::Future, hint: Option<Arc<Shared<K, C, H>>>) -> Self {
        Self {
            kind: Kind::Called { fut, hint },
        }
    }

    pub(crate) fn waiting(
        at: Instant,
        svc: S,
        req: Req,
        refund: Refund,
        hint: Option<Arc<Shared<K, C, H>>>,
    ) -> Self {
        Self {
            kind: Kind::Waiting {
                wait: Box::pin(Wait {
                    sleep: tokio::time::sleep_until(at),
                    svc: Some(svc),
                    req: Some(req),
                    refund,
                }),
                hint,
            },
        }
    }

    pub(crate) fn admitting(admit: Admit, svc: S, req: Req, shared: Arc<Shared<K, C, H>>) -> Self {
        Self {
            kind: Kind::Remote {
                admitting: Box::new(Admitting {
                    admit,
                    svc: Some(svc),
                    req: Some(req),
                    shared,
                }),
            },
        }
    }

    pub(crate) fn rejected(err: BoxError) -> Self {
        Self {
            kind: Kind::Rejected { err: Some(err) },
        }
    }
}

impl<S, Req, K, C, H> Future for ResponseFuture<S, Req, K, C, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    H: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Called { fut, hint } => {
                    let res = ready!(fut.poll(cx));
                    if let Some(shared) = hint.take() {
                        let after = shared.hint.as_ref().and_then(|h| h.retry_after(&res));
                        if let Some(d) = after {
                            shared.core.block_for(d);
                        }
                    }
                    return Poll::Ready(res.map_err(Into::into));
                }
                KindProj::Waiting { wait, hint } => {
                    let w = wait.as_mut().project();
                    ready!(w.sleep.poll(cx));
                    w.refund.disarm();
                    let (svc, req) = (w.svc, w.req);
                    let mut svc = svc.take().expect("polled after completion");
                    let req = req.take().expect("polled after completion");
                    let hint = hint.take();
                    let fut = svc.call(req);
                    kind.set(Kind::Called { fut, hint });
                }
                KindProj::Remote { admitting } => {
                    let next = ready!(admitting.poll_admit(cx));
                    kind.set(next);
                }
                KindProj::Rejected { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, K, C, H> fmt::Debug for ResponseFuture<S, Req, K, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Waiting { .. } => "waiting",
            Kind::Remote { .. } => "admitting",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
