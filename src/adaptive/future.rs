//! The adaptive limit's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::state::{Core, Permit};
use crate::classify::Classify;
use crate::error::BoxError;

type Acquire = Pin<Box<dyn Future<Output = Option<Permit>> + Send>>;

/// A call waiting for a slot, with what it needs to go on.
struct Waiting<S, Req> {
    acquire: Acquire,
    start: Instant,
    core: Arc<Core>,
    svc: Option<S>,
    req: Option<Req>,
}

pin_project! {
    /// The response future of [`AdaptiveLimit`](super::AdaptiveLimit). It
    /// owns the call's slot, feeds the finished call to the algorithm, and
    /// gives the slot back when it completes or is dropped.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        stage: Stage<S, Req>,
        classifier: C,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<S, Req>
    where
        S: Service<Req>,
    {
        Called {
            #[pin]
            fut: S::Future,
            permit: Option<Permit>,
        },
        // Boxed: only waiting calls pay for the service and request kept
        // aside.
        Waiting {
            wait: Box<Waiting<S, Req>>,
        },
        Rejected {
            err: Option<BoxError>,
        },
    }
}

impl<S: Service<Req>, Req, C> ResponseFuture<S, Req, C> {
    #[inline]
    pub(crate) fn called(fut: S::Future, permit: Permit, classifier: C) -> Self {
        Self {
            stage: Stage::Called {
                fut,
                permit: Some(permit),
            },
            classifier,
        }
    }

    pub(crate) fn rejected(err: BoxError, classifier: C) -> Self {
        Self {
            stage: Stage::Rejected { err: Some(err) },
            classifier,
        }
    }

    pub(crate) fn waiting(core: Arc<Core>, svc: S, req: Req, classifier: C) -> Self {
        let acquire = acquire(core.clone(), core.max_wait);
        Self {
            stage: Stage::Waiting {
                wait: Box::new(Waiting {
                    acquire,
                    start: Instant::now(),
                    core,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
            classifier,
        }
    }
}

/// Waits up to `max_wait` for a slot, woken as slots free up or the limit
/// grows. Waiters are woken in arrival order.
fn acquire(core: Arc<Core>, max_wait: Duration) -> Acquire {
    Box::pin(async move {
        let wait = async {
            let notify = core.notify.as_ref().expect("waiting needs a notifier");
            loop {
                // Registered before trying, so a slot freed in between
                // still wakes this waiter.
                let notified = notify.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if let Some(p) = core.try_acquire() {
                    return p;
                }
                notified.await;
            }
        };
        tokio::time::timeout(max_wait, wait).await.ok()
    })
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut stage = this.stage;
        loop {
            match stage.as_mut().project() {
                StageProj::Called { fut, permit } => {
                    let res = ready!(fut.poll(cx));
                    if let Some(p) = permit.take() {
                        let elapsed = if this.classifier.uses_elapsed() {
                            p.elapsed()
                        } else {
                            Duration::ZERO
                        };
                        p.finish(this.classifier.classify(&res, elapsed));
                    }
                    return Poll::Ready(res.map_err(Into::into));
                }
                StageProj::Waiting { wait } => {
                    let next = match ready!(wait.acquire.as_mut().poll(cx)) {
                        Some(permit) => {
                            let mut svc = wait.svc.take().expect("polled after completion");
                            let req = wait.req.take().expect("polled after completion");
                            Stage::Called {
                                fut: svc.call(req),
                                permit: Some(permit),
                            }
                        }
                        None => Stage::Rejected {
                            err: Some(wait.core.rejected(wait.start.elapsed()).into()),
                        },
                    };
                    stage.set(next);
                }
                StageProj::Rejected { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, C> fmt::Debug for ResponseFuture<S, Req, C> {
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
