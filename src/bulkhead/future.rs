//! The bulkhead's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
#[cfg(any(feature = "redis", feature = "file-store"))]
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::state::{Core, HeldSlot};
use crate::clock::instant_after;
use crate::error::BoxError;

#[cfg(feature = "http")]
pub use super::hold::HttpResponseFuture;

/// A response with the slot it still holds.
pub(crate) type Kept<T> = Result<(T, Option<HeldSlot>), BoxError>;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// The response future of [`Bulkhead`](super::Bulkhead). It owns the
    /// call's slot and gives it back when it completes or is dropped.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        stage: Stage<S, Req>,
    }
}

pin_project! {
    struct Wait<S, Req> {
        acquire: Acquire,
        #[pin]
        deadline: Sleep,
        start: Instant,
        core: Arc<Core>,
        svc: Option<S>,
        req: Option<Req>,
    }
}

/// A lease being asked of Redis.
#[cfg(feature = "redis")]
pub(crate) type Lease =
    Pin<Box<dyn Future<Output = Option<crate::store::redis::RedisLease>> + Send>>;

/// A call waiting for a Redis lease.
#[cfg(feature = "redis")]
struct Leasing<S, Req> {
    lease: Lease,
    core: Arc<Core>,
    svc: Option<S>,
    req: Option<Req>,
}

/// A slot being taken in a state file whose lock a peer holds.
#[cfg(feature = "file-store")]
pub(crate) type ClaimFut =
    Pin<Box<dyn Future<Output = Option<crate::store::file::FileSlot>> + Send>>;

/// A call waiting for the state file's lock to take its slot.
#[cfg(feature = "file-store")]
struct Claim<S, Req> {
    claim: ClaimFut,
    core: Arc<Core>,
    svc: Option<S>,
    req: Option<Req>,
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
            slot: Option<HeldSlot>,
        },
        // Boxed: only waiting calls pay for the timer's size.
        Waiting {
            wait: Pin<Box<Wait<S, Req>>>,
        },
        // Boxed: only calls to a Redis bulkhead take this path.
        Leasing {
            leasing: Box<RedisLeasing<S, Req>>,
        },
        // Boxed: only calls to a file bulkhead whose lock is busy.
        Claiming {
            claim: Box<FileClaim<S, Req>>,
        },
        Rejected {
            err: Option<BoxError>,
        },
    }
}

/// `Leasing` with the `redis` feature, uninhabited without it.
#[cfg(feature = "redis")]
type RedisLeasing<S, Req> = Leasing<S, Req>;
#[cfg(not(feature = "redis"))]
type RedisLeasing<S, Req> = (std::convert::Infallible, std::marker::PhantomData<(S, Req)>);

/// `Claim` with the `file-store` feature, uninhabited without it.
#[cfg(feature = "file-store")]
type FileClaim<S, Req> = Claim<S, Req>;
#[cfg(not(feature = "file-store"))]
type FileClaim<S, Req> = (std::convert::Infallible, std::marker::PhantomData<(S, Req)>);

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    #[cfg(feature = "file-store")]
    pub(crate) fn claiming(core: Arc<Core>, claim: ClaimFut, svc: S, req: Req) -> Self {
        Self {
            stage: Stage::Claiming {
                claim: Box::new(Claim {
                    claim,
                    core,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
        }
    }

    #[cfg(feature = "redis")]
    pub(crate) fn leasing(core: Arc<Core>, lease: Lease, svc: S, req: Req) -> Self {
        Self {
            stage: Stage::Leasing {
                leasing: Box::new(Leasing {
                    lease,
                    core,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
        }
    }

    #[inline]
    pub(crate) fn called(fut: S::Future, slot: HeldSlot) -> Self {
        Self {
            stage: Stage::Called {
                fut,
                slot: Some(slot),
            },
        }
    }

    pub(crate) fn waiting(core: Arc<Core>, acquire: Acquire, svc: S, req: Req) -> Self {
        let start = Instant::now();
        Self {
            stage: Stage::Waiting {
                wait: Box::pin(Wait {
                    acquire,
                    deadline: tokio::time::sleep_until(instant_after(start, core.cfg.max_wait)),
                    start,
                    core,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
        }
    }

    pub(crate) fn rejected(err: BoxError) -> Self {
        Self {
            stage: Stage::Rejected { err: Some(err) },
        }
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// Polls the call to its end and hands its slot over with a successful
    /// response instead of giving it back; a failed call gives it back.
    #[inline]
    pub(crate) fn poll_keep_slot(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Kept<S::Response>> {
        let mut stage = self.project().stage;
        loop {
            match stage.as_mut().project() {
                StageProj::Called { fut, slot } => {
                    let res = ready!(fut.poll(cx));
                    // The call is over: the slot leaves the future now
                    // rather than when it is dropped.
                    let slot = slot.take();
                    return Poll::Ready(match res {
                        Ok(resp) => Ok((resp, slot)),
                        Err(e) => Err(e.into()),
                    });
                }
                StageProj::Waiting { wait } => {
                    let w = wait.as_mut().project();
                    let (acquire, deadline, start, core, svc, req) =
                        (w.acquire, w.deadline, w.start, w.core, w.svc, w.req);
                    let permit = match acquire.as_mut().poll(cx) {
                        Poll::Ready(Ok(p)) => p,
                        // The semaphore is never closed.
                        Poll::Ready(Err(_)) | Poll::Pending => {
                            ready!(deadline.poll(cx));
                            let err = core.rejected(start.elapsed());
                            stage.set(Stage::Rejected {
                                err: Some(err.into()),
                            });
                            continue;
                        }
                    };
                    // Into its guard first: a listener that panics on the
                    // soft-limit event unwinds through it.
                    let slot = HeldSlot::Permit(permit);
                    core.acquired();
                    let mut svc = svc.take().expect("polled after completion");
                    let req = req.take().expect("polled after completion");
                    let fut = svc.call(req);
                    stage.set(Stage::Called {
                        fut,
                        slot: Some(slot),
                    });
                }
                #[cfg(feature = "redis")]
                StageProj::Leasing { leasing } => {
                    let l = &mut **leasing;
                    let kind_next = match ready!(l.lease.as_mut().poll(cx)) {
                        Some(lease) => {
                            if let super::state::Slots::Redis { here, .. } = &l.core.slots {
                                here.try_acquire(usize::MAX);
                            }
                            let slot = HeldSlot::Redis(Box::new(super::state::RedisSlot {
                                lease,
                                core: l.core.clone(),
                            }));
                            let mut svc = l.svc.take().expect("polled after completion");
                            let req = l.req.take().expect("polled after completion");
                            Stage::Called {
                                fut: svc.call(req),
                                slot: Some(slot),
                            }
                        }
                        None => Stage::Rejected {
                            err: Some(l.core.rejected(Duration::ZERO).into()),
                        },
                    };
                    stage.set(kind_next);
                }
                #[cfg(not(feature = "redis"))]
                StageProj::Leasing { leasing } => match leasing.0 {},
                #[cfg(feature = "file-store")]
                StageProj::Claiming { claim } => {
                    let c = &mut **claim;
                    let next = match ready!(c.claim.as_mut().poll(cx)) {
                        Some(slot) => {
                            let mut svc = c.svc.take().expect("polled after completion");
                            let req = c.req.take().expect("polled after completion");
                            Stage::Called {
                                fut: svc.call(req),
                                slot: Some(HeldSlot::File(slot)),
                            }
                        }
                        None => Stage::Rejected {
                            err: Some(c.core.rejected(Duration::ZERO).into()),
                        },
                    };
                    stage.set(next);
                }
                #[cfg(not(feature = "file-store"))]
                StageProj::Claiming { claim } => match claim.0 {},
                StageProj::Rejected { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The slot is dropped, so given back, as soon as the call is over.
        self.poll_keep_slot(cx)
            .map(|res| res.map(|(resp, _slot)| resp))
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.stage {
            Stage::Called { .. } => "called",
            Stage::Waiting { .. } => "waiting",
            Stage::Leasing { .. } => "leasing",
            Stage::Claiming { .. } => "claiming",
            Stage::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
