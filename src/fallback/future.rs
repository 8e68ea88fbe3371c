//! The fallback layer's response future.

use std::fmt;
use std::future::Future;
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
    #[project = ResponseFutureProj]
    pub struct ResponseFuture<F, Req, Res, C> {
        #[pin]
        state: Stage<F, Req, Res>,
        cursor: Cursor<Req, Res, C>,
        classifier: C,
        // Kept for the next attempt; `None` once the last one has it.
        req: Option<Req>,
        errors: Errors,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F, Req, Res> {
        // The primary's call.
        Primary { #[pin] fut: F },
        // Find the next entry whose breaker admits a call.
        Next,
        // Drive the chosen entry's readiness.
        Ready { svc: BoxService<Req, Res> },
        // The chosen entry's call.
        Calling { fut: BoxFuture<Res> },
        Done,
    }
}

impl<F, Req, Res, C> ResponseFuture<F, Req, Res, C> {
    /// The primary was admitted and called.
    #[inline]
    pub(crate) fn primary(
        fut: F,
        admission: Admission<EntryRef<Req, Res, C>>,
        classifier: C,
        req: Option<Req>,
    ) -> Self {
        Self {
            state: Stage::Primary { fut },
            cursor: Cursor::Attempt(admission),
            classifier,
            req,
            errors: Errors::default(),
        }
    }

    /// The primary was skipped (open breaker, or not ready) with `err`.
    ///
    /// Inlined, with its work out of line in [`Errors::skipped`]: built
    /// in place like the healthy path's future, so that `call` returns one
    /// shape of value and never copies it out of a temporary.
    #[inline]
    pub(crate) fn skipped(
        at: EntryRef<Req, Res, C>,
        err: BoxError,
        classifier: C,
        req: Req,
    ) -> Self {
        let errors = Errors::skipped(&at.group, err);
        Self {
            state: Stage::Next,
            cursor: Cursor::At(at),
            classifier,
            req: Some(req),
            errors,
        }
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
        let mut this = self.project();
        if let StageProj::Primary { fut } = this.state.as_mut().project() {
            let mut res = ready!(fut.poll(cx)).map_err(Into::into);
            if let Cursor::Attempt(a) = this.cursor {
                if !book(a, this.classifier, &mut res)
                    || !a.owner().group.may_resend(this.req.as_ref())
                {
                    // The healthy path: the primary answered. Everything
                    // is dropped once, with the future (a future polled
                    // again after it answered may panic, as the primary's
                    // own would).
                    return Poll::Ready(res);
                }
            }
            let err = failed(this.cursor, res);
            this.errors.push(err);
            this.state.set(Stage::Next);
        }
        fail_over(this, cx)
    }
}

/// The errors of the attempts that failed, in order.
///
/// Boxed, and empty until a first failure: the healthy path never touches
/// it, and its future stays a word smaller than with a `Vec` in place,
/// which is moved with the future on every call.
// One pointer where a `Vec` is three words: that is the point of the box.
#[allow(clippy::box_collection)]
#[derive(Default)]
struct Errors(Option<Box<Vec<EntryError>>>);

/// An entry's name and why its attempt failed.
type EntryError = (Arc<str>, BoxError);

impl Errors {
    /// The primary's error, after telling the listeners.
    #[cold]
    #[inline(never)]
    fn skipped<Req, Res, C>(group: &Group<Req, Res, C>, err: BoxError) -> Self {
        let name = group.name().clone();
        entry_failed(group, &name);
        Self(Some(Box::new(vec![(name, err)])))
    }

    fn push(&mut self, err: EntryError) {
        self.0.get_or_insert_with(Box::default).push(err);
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |e| e.len())
    }

    fn take(&mut self) -> Vec<EntryError> {
        self.0.take().map(|e| *e).unwrap_or_default()
    }
}

/// Books an attempt's result in its entry's breaker and says whether it
/// failed. An outcome the classifier can only tell at the end of the body
/// (a gRPC status in the trailers, [`Classify::defer`]) is booked then:
/// the entry's breaker counts it, but the answer is the caller's by that
/// time, so it is not failed over.
#[inline]
fn book<Req, Res, C>(
    a: &mut Admission<EntryRef<Req, Res, C>>,
    classifier: &C,
    res: &mut Result<Res, BoxError>,
) -> bool
where
    C: Classify<Res, BoxError>,
{
    if classifier.defers() {
        // The verdict travels with the response body, which must not keep
        // the whole group (its services, the request type) alive.
        let keep = a.owner().entry().breaker.core.clone();
        a.finish_deferred_in(keep, classifier, res) == Some(Outcome::Failure)
    } else {
        a.finish(classifier, res) == Outcome::Failure
    }
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
fn fail_over<F, Req, Res, C>(
    mut this: ResponseFutureProj<'_, F, Req, Res, C>,
    cx: &mut Context<'_>,
) -> Poll<Result<Res, BoxError>>
where
    Req: Clone,
    C: Classify<Res, BoxError>,
{
    loop {
        let mut res: Result<Res, BoxError> = match this.state.as_mut().project() {
            StageProj::Primary { .. } => unreachable!("the primary is polled inline"),
            StageProj::Done => panic!("fallback future polled after completion"),
            StageProj::Calling { fut } => ready!(fut.as_mut().poll(cx)),
            StageProj::Ready { svc } => match svc.poll_ready(cx) {
                Poll::Pending if !this.cursor.entry().group.skip_not_ready => return Poll::Pending,
                Poll::Pending => {
                    let at = this.cursor.leave();
                    let name = at.entry().name.clone();
                    entry_failed(&at.group, &name);
                    this.errors.push((name.clone(), NotReady::new(name).into()));
                    this.state.set(Stage::Next);
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
                    if let Cursor::Attempt(a) = this.cursor {
                        a.start_clock(this.classifier.uses_elapsed());
                    }
                    let fut = svc.call(req);
                    this.state.set(Stage::Calling { fut });
                    continue;
                }
            },
            StageProj::Next => {
                let Cursor::At(at) = std::mem::replace(this.cursor, Cursor::Done) else {
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
                    this.state.set(Stage::Done);
                    this.req.take();
                    let all = AllFailed::new(group.name().clone(), this.errors.take());
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
                *this.cursor = Cursor::Attempt(a);
                this.state.set(Stage::Ready { svc });
                continue;
            }
        };

        // An attempt finished: book it, then answer or move on.
        let Cursor::Attempt(a) = this.cursor else {
            unreachable!("an attempt holds an admission")
        };
        let failure = book(a, this.classifier, &mut res);
        if !failure || !a.owner().group.may_resend(this.req.as_ref()) {
            let at = a.owner();
            if !failure {
                at.group.listeners.emit(&FallbackEvent::Answered {
                    name: at.group.name().clone(),
                    entry: at.entry().name.clone(),
                });
            }
            *this.cursor = Cursor::Done;
            this.state.set(Stage::Done);
            this.req.take();
            return Poll::Ready(res);
        }
        let err = failed(this.cursor, res);
        this.errors.push(err);
        this.state.set(Stage::Next);
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
        let state = match &self.state {
            Stage::Primary { .. } => "primary",
            Stage::Next => "next",
            Stage::Ready { .. } => "ready",
            Stage::Calling { .. } => "calling",
            Stage::Done => "done",
        };
        let entry = match &self.cursor {
            Cursor::Attempt(a) => Some(&a.owner().entry().name),
            Cursor::At(e) => Some(&e.entry().name),
            Cursor::Done => None,
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("entry", &entry)
            .field("errors", &self.errors.len())
            .finish()
    }
}
