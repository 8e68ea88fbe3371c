//! The fallback layer's response future.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::entry::{BoxFuture, BoxService, EntryRef, Group};
use super::{AllFailed, FailedResponse, FallbackEvent, NotReady};
use crate::circuit_breaker::Admission;
use crate::classify::{Classify, Outcome};
use crate::error::BoxError;

/// Where a call stands among the group's entries.
enum Cursor<Req, Res, C> {
    /// An attempt admitted by its entry's breaker, not yet booked.
    Attempt(Admission<EntryRef<Req, Res, C>>),
    /// Between attempts, at the last entry tried.
    At(EntryRef<Req, Res, C>),
    /// Finished.
    Done,
}

impl<Req, Res, C> Cursor<Req, Res, C> {
    fn entry(&self) -> &EntryRef<Req, Res, C> {
        match self {
            Cursor::Attempt(a) => a.owner(),
            Cursor::At(e) => e,
            Cursor::Done => panic!("fallback future polled after completion"),
        }
    }

    /// Ends the attempt in progress, if any (dropping its admission gives
    /// a probe slot back), and stays at its entry.
    fn leave(&mut self) -> &EntryRef<Req, Res, C> {
        if let Cursor::Attempt(a) = self {
            let at = EntryRef {
                group: a.owner().group.clone(),
                idx: a.owner().idx,
            };
            *self = Cursor::At(at);
        }
        self.entry()
    }
}

pin_project! {
    /// The response future of [`Fallback`](super::Fallback).
    ///
    /// It holds the layer's group of entries until it has answered, so a
    /// failed primary always fails over, whatever became of the layer and
    /// services that made the call. Dropped before it finished, it gives
    /// back the half-open probe slot of the attempt in progress.
    pub struct ResponseFuture<F, Req, Res, C> {
        #[pin]
        stage: Stage<F, Req, Res, C>,
    }
}

pin_project! {
    #[project = StageProj]
    #[project_replace = StageTaken]
    enum Stage<F, Req, Res, C> {
        // The primary's call: on the healthy path, all the future holds.
        Primary {
            #[pin]
            fut: F,
            admission: Admission<EntryRef<Req, Res, C>>,
            classifier: C,
            // A copy for the next entry; `None` when there is none.
            backup: Option<Req>,
        },
        // The primary failed or was skipped: the rest of the call, boxed
        // so the healthy path's future stays small.
        FailingOver { rest: Rest<Req, Res, C> },
        Done,
    }
}

/// The boxed rest of a call that is failing over, dropped out of line:
/// inline, its drop would make the future's drop too large to inline, and
/// the healthy path would pay a call to drop its future.
struct Rest<Req, Res, C>(Option<Box<FailOver<Req, Res, C>>>);

impl<Req, Res, C> Rest<Req, Res, C> {
    fn new(rest: Box<FailOver<Req, Res, C>>) -> Self {
        Self(Some(rest))
    }
}

impl<Req, Res, C> Deref for Rest<Req, Res, C> {
    type Target = FailOver<Req, Res, C>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl<Req, Res, C> DerefMut for Rest<Req, Res, C> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("taken only on drop")
    }
}

impl<Req, Res, C> Drop for Rest<Req, Res, C> {
    #[inline]
    fn drop(&mut self) {
        drop_cold(self.0.take());
    }
}

#[cold]
#[inline(never)]
fn drop_cold<T>(value: T) {
    drop(value);
}

/// The call after its primary: the entries still to try, the request, the
/// errors so far.
struct FailOver<Req, Res, C> {
    step: Step<Req, Res>,
    cursor: Cursor<Req, Res, C>,
    classifier: C,
    // Kept for the next attempt; `None` once the last one has it.
    req: Option<Req>,
    errors: Vec<EntryError>,
}

enum Step<Req, Res> {
    // Find the next entry whose breaker admits a call.
    Next,
    // Drive the chosen entry's readiness.
    Ready { svc: BoxService<Req, Res> },
    // The chosen entry's call.
    Calling { fut: BoxFuture<Res> },
    Done,
}

impl<F, Req, Res, C> ResponseFuture<F, Req, Res, C> {
    /// The primary was admitted and called.
    #[inline]
    pub(crate) fn primary(
        fut: F,
        admission: Admission<EntryRef<Req, Res, C>>,
        classifier: C,
        backup: Option<Req>,
    ) -> Self {
        Self {
            stage: Stage::Primary {
                fut,
                admission,
                classifier,
                backup,
            },
        }
    }

    /// The primary was skipped (open breaker, or not ready) with `err`.
    ///
    /// Inlined, with its work out of line in [`FailOver::after_skip`]:
    /// `call`'s cold branch then makes one pointer, and no branch returns
    /// a whole future through memory, which would make every branch,
    /// the healthy one too, build its future in a temporary and copy it.
    #[inline]
    pub(crate) fn skipped<E: Into<BoxError>>(
        at: EntryRef<Req, Res, C>,
        err: E,
        classifier: C,
        req: Req,
    ) -> Self {
        Self {
            stage: Stage::FailingOver {
                rest: Rest::new(FailOver::after_skip(at, err, classifier, req)),
            },
        }
    }
}

impl<Req, Res, C> FailOver<Req, Res, C> {
    /// The rest of a call whose primary was skipped with `err`.
    #[cold]
    #[inline(never)]
    fn after_skip<E: Into<BoxError>>(
        at: EntryRef<Req, Res, C>,
        err: E,
        classifier: C,
        req: Req,
    ) -> Box<Self> {
        let name = at.group.name().clone();
        entry_failed(&at.group, &name);
        Box::new(FailOver {
            step: Step::Next,
            cursor: Cursor::At(at),
            classifier,
            req: Some(req),
            errors: vec![(name, err.into())],
        })
    }
}

impl<F, Req, Res, C, E> Future for ResponseFuture<F, Req, Res, C>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    Req: Clone,
    C: Classify<Res, BoxError>,
{
    type Output = Result<Res, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut stage = self.project().stage;
        match stage.as_mut().project() {
            StageProj::Primary {
                fut,
                admission,
                classifier,
                backup,
            } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                let (failure, res) = book(admission, classifier, res);
                if !failure || !admission.owner().group.may_resend(backup.as_ref()) {
                    // The healthy path: the primary answered. Everything
                    // is dropped once, with the future (a future polled
                    // again after it answered may panic, as the primary's
                    // own would).
                    return Poll::Ready(res);
                }
                primary_failed(stage, res, cx)
            }
            StageProj::FailingOver { rest } => fail_over(rest, cx),
            StageProj::Done => panic!("fallback future polled after completion"),
        }
    }
}

/// The primary's attempt failed (its result is booked): on to the next
/// entry.
#[cold]
#[inline(never)]
fn primary_failed<F, Req, Res, C>(
    mut stage: Pin<&mut Stage<F, Req, Res, C>>,
    res: Result<Res, BoxError>,
    cx: &mut Context<'_>,
) -> Poll<Result<Res, BoxError>>
where
    Req: Clone,
    C: Classify<Res, BoxError>,
{
    let StageTaken::Primary {
        admission,
        classifier,
        backup,
        ..
    } = stage.as_mut().project_replace(Stage::Done)
    else {
        unreachable!("the primary's attempt just ended")
    };
    let mut cursor = Cursor::Attempt(admission);
    let err = failed(&mut cursor, res);
    stage.set(Stage::FailingOver {
        rest: Rest::new(Box::new(FailOver {
            step: Step::Next,
            cursor,
            classifier,
            req: backup,
            errors: vec![err],
        })),
    });
    match stage.project() {
        StageProj::FailingOver { rest } => fail_over(rest, cx),
        _ => unreachable!("failing over"),
    }
}

/// An entry's name and why its attempt failed.
type EntryError = (Arc<str>, BoxError);

/// Books an attempt's result in its entry's breaker and says whether it
/// failed; the result comes back out (see [`Admission::finish_owned`]). An
/// outcome the classifier can only tell at the end of the body (a gRPC
/// status in the trailers, [`Classify::defer`]) is booked then: the
/// entry's breaker counts it, but the answer is the caller's by that time,
/// so it is not failed over.
#[inline]
fn book<Req, Res, C>(
    a: &mut Admission<EntryRef<Req, Res, C>>,
    classifier: &C,
    res: Result<Res, BoxError>,
) -> (bool, Result<Res, BoxError>)
where
    C: Classify<Res, BoxError>,
{
    if classifier.defers() {
        return book_deferred(a, classifier, res);
    }
    let (outcome, res) = a.finish_owned(classifier, res);
    (outcome == Outcome::Failure, res)
}

#[cold]
#[inline(never)]
fn book_deferred<Req, Res, C>(
    a: &mut Admission<EntryRef<Req, Res, C>>,
    classifier: &C,
    mut res: Result<Res, BoxError>,
) -> (bool, Result<Res, BoxError>)
where
    C: Classify<Res, BoxError>,
{
    // The verdict travels with the response body, which must not keep
    // the whole group (its services, the request type) alive.
    let keep = a.owner().entry().breaker.core.clone();
    let outcome = a.finish_deferred_in(keep, classifier, &mut res);
    (outcome == Some(Outcome::Failure), res)
}

/// The failed attempt's error (a failed `Ok` answer becomes
/// [`FailedResponse`]), after telling the listeners.
fn failed<Req, Res, C>(
    cursor: &mut Cursor<Req, Res, C>,
    res: Result<Res, BoxError>,
) -> (Arc<str>, BoxError) {
    let at = cursor.leave();
    let name = at.entry().name.clone();
    entry_failed(&at.group, &name);
    let err = match res {
        Err(e) => e,
        Ok(_) => FailedResponse::new(name.clone()).into(),
    };
    (name, err)
}

/// Everything after the primary has failed or been skipped.
#[cold]
#[inline(never)]
fn fail_over<Req, Res, C>(
    this: &mut FailOver<Req, Res, C>,
    cx: &mut Context<'_>,
) -> Poll<Result<Res, BoxError>>
where
    Req: Clone,
    C: Classify<Res, BoxError>,
{
    loop {
        // Whether the attempt's entry was sent the request: one whose
        // readiness failed never saw it, so it goes on to the next entry
        // whatever `fail_over_if` says.
        let sent = matches!(this.step, Step::Calling { .. });
        let res: Result<Res, BoxError> = match &mut this.step {
            Step::Done => panic!("fallback future polled after completion"),
            Step::Calling { fut } => ready!(fut.as_mut().poll(cx)),
            Step::Ready { svc } => match svc.poll_ready(cx) {
                Poll::Pending if !this.cursor.entry().group.skip_not_ready => return Poll::Pending,
                Poll::Pending => {
                    let at = this.cursor.leave();
                    let name = at.entry().name.clone();
                    entry_failed(&at.group, &name);
                    this.errors.push((name.clone(), NotReady::new(name).into()));
                    this.step = Step::Next;
                    continue;
                }
                // A broken entry is a failed attempt.
                Poll::Ready(Err(e)) => Err(e),
                Poll::Ready(Ok(())) => {
                    let at = this.cursor.entry();
                    let last = at.idx + 1 == at.group.entries.len();
                    let req = if last {
                        this.req.take()
                    } else {
                        this.req.clone()
                    }
                    .expect("request kept until the last attempt");
                    if let Cursor::Attempt(a) = &mut this.cursor {
                        a.start_clock(this.classifier.uses_elapsed());
                    }
                    let fut = svc.call(req);
                    this.step = Step::Calling { fut };
                    continue;
                }
            },
            Step::Next => {
                let Cursor::At(at) = std::mem::replace(&mut this.cursor, Cursor::Done) else {
                    unreachable!("between attempts")
                };
                let group = at.group;
                let mut next = None;
                for idx in at.idx + 1..group.entries.len() {
                    let timed = this.classifier.uses_elapsed();
                    let entry = EntryRef {
                        group: group.clone(),
                        idx,
                    };
                    match Admission::admit(entry, timed) {
                        Ok(a) => {
                            next = Some(a);
                            break;
                        }
                        Err((_, open)) => {
                            let name = group.entries[idx].name.clone();
                            entry_failed(&group, &name);
                            this.errors.push((name, open.into()));
                        }
                    }
                }
                let Some(a) = next else {
                    this.step = Step::Done;
                    this.req.take();
                    let all =
                        AllFailed::new(group.name().clone(), std::mem::take(&mut this.errors));
                    group.listeners.emit(&FallbackEvent::AllFailed {
                        name: group.name().clone(),
                        entries: all.errors().len(),
                    });
                    return Poll::Ready(match &group.or_else {
                        Some(f) => f(all),
                        None => Err(all.into()),
                    });
                };
                let svc = a
                    .owner()
                    .entry()
                    .service
                    .as_ref()
                    .expect("fallback entries have a service")
                    .clone_box();
                this.cursor = Cursor::Attempt(a);
                this.step = Step::Ready { svc };
                continue;
            }
        };

        // An attempt finished: book it, then answer or move on.
        let Cursor::Attempt(a) = &mut this.cursor else {
            unreachable!("an attempt holds an admission")
        };
        let (failure, res) = book(a, &this.classifier, res);
        if !failure || sent && !a.owner().group.may_resend(this.req.as_ref()) {
            let at = a.owner();
            if !failure {
                at.group.listeners.emit(&FallbackEvent::Answered {
                    name: at.group.name().clone(),
                    entry: at.entry().name.clone(),
                });
            }
            this.cursor = Cursor::Done;
            this.step = Step::Done;
            this.req.take();
            return Poll::Ready(res);
        }
        let err = failed(&mut this.cursor, res);
        this.errors.push(err);
        this.step = Step::Next;
    }
}

fn entry_failed<Req, Res, C>(group: &Group<Req, Res, C>, entry: &Arc<str>) {
    group.listeners.emit(&FallbackEvent::EntryFailed {
        name: group.name().clone(),
        entry: entry.clone(),
    });
}

impl<F, Req, Res, C> fmt::Debug for ResponseFuture<F, Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, entry, errors) = match &self.stage {
            Stage::Primary { admission, .. } => {
                ("primary", Some(&admission.owner().entry().name), 0)
            }
            Stage::FailingOver { rest } => {
                let state = match rest.step {
                    Step::Next => "next",
                    Step::Ready { .. } => "ready",
                    Step::Calling { .. } => "calling",
                    Step::Done => "done",
                };
                let entry = match &rest.cursor {
                    Cursor::Attempt(a) => Some(&a.owner().entry().name),
                    Cursor::At(e) => Some(&e.entry().name),
                    Cursor::Done => None,
                };
                (state, entry, rest.errors.len())
            }
            Stage::Done => ("done", None, 0),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("entry", &entry)
            .field("errors", &errors)
            .finish()
    }
}
