//! The dedup layer's response future.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::flight::{
    drop_quietly, poll_call, Boxed, Call, Group, Kind as Event, Shared, Table, Ticket,
};
use crate::error::BoxError;

type Leave<K, F, T> = fn(&Table<K, F, T>, Ticket, &Arc<Group<F, T>>, Option<usize>);
type LeaderLeave<K, F, T> = fn(&Table<K, F, T>, Ticket, Boxed<F>);

/// The first caller of a call, holding the inner future while nobody else
/// needs it. Dropping it before the answer hands the future to the others,
/// or cancels the call if there are none.
pub(crate) struct Leader<K, F, T> {
    table: Arc<Table<K, F, T>>,
    ticket: Ticket,
    fut: Option<Boxed<F>>,
    leave: LeaderLeave<K, F, T>,
}

impl<K, F, T> Leader<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(table: Arc<Table<K, F, T>>, ticket: Ticket, fut: Boxed<F>) -> Self {
        Self {
            table,
            ticket,
            fut: Some(fut),
            leave: Table::leader_leave,
        }
    }
}

impl<K, F, T> Leader<K, F, T> {
    /// Sends an event, through the table the leader already points at.
    #[inline]
    pub(crate) fn emit(&self, kind: Event) {
        self.table.cfg.emit(kind);
    }
}

impl<K, F, T> Drop for Leader<K, F, T> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            (self.leave)(&self.table, self.ticket, fut);
        }
    }
}

/// One caller's place in a call's group. Dropping it before the answer
/// arrived leaves the call; the last to leave cancels it.
pub(crate) struct Waiter<K, F, T> {
    table: Arc<Table<K, F, T>>,
    group: Arc<Group<F, T>>,
    ticket: Ticket,
    slot: Option<usize>,
    answered: bool,
    leave: Leave<K, F, T>,
}

impl<K, F, T> Waiter<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(table: Arc<Table<K, F, T>>, ticket: Ticket, group: Arc<Group<F, T>>) -> Self {
        Self {
            table,
            group,
            ticket,
            slot: None,
            answered: false,
            leave: Table::leave,
        }
    }
}

impl<K, F, T> Waiter<K, F, T> {
    /// Sends an event, through the table the waiter already points at.
    #[inline]
    pub(crate) fn emit(&self, kind: Event) {
        self.table.cfg.emit(kind);
    }
}

impl<K, F, T> Drop for Waiter<K, F, T> {
    fn drop(&mut self) {
        if !self.answered {
            (self.leave)(&self.table, self.ticket, &self.group, self.slot);
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
        // The first caller of a call, holding its future.
        Leading { leader: Leader<K, F, T> },
        // A place in a call's group.
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

    pub(crate) fn leading(leader: Leader<K, F, T>) -> Self {
        Self {
            kind: Kind::Leading { leader },
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
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let handed = match self.as_mut().project().kind.project() {
                KindProj::Direct { fut } => return fut.poll(cx).map_err(Into::into),
                KindProj::Leading { leader } => match poll_leader(leader, cx) {
                    Ok(res) => return res.map(|r| r.map_err(Into::into)),
                    Err(waiter) => waiter,
                },
                KindProj::Waiting { waiter } => {
                    let w = &mut *waiter;
                    let res = ready!(w.group.poll_waiter(&w.table, w.ticket, &mut w.slot, cx));
                    w.answered = true;
                    return Poll::Ready(res.map_err(Into::into));
                }
                KindProj::Ready { res } => {
                    return Poll::Ready(res.take().expect("dedup future polled after completion"))
                }
            };
            // The inner future was pending: from now on this caller is one
            // of the call's waiters (and polls it again, with the group's
            // waker, right away).
            self.as_mut()
                .project()
                .kind
                .set(Kind::Waiting { waiter: handed });
        }
    }
}

/// Polls the leader's own future inline. `Err` is the leader's place in
/// the group the future was handed to.
#[inline]
fn poll_leader<K, F, T>(
    leader: &mut Leader<K, F, T>,
    cx: &mut Context<'_>,
) -> Result<Poll<Shared<T>>, Waiter<K, F, T>>
where
    F: Call<Ok = T> + Send + 'static,
    F::Err: Into<BoxError>,
    K: Hash + Eq,
    T: Clone + Send + 'static,
{
    let Some(fut) = leader.fut.as_mut() else {
        panic!("dedup future polled after completion");
    };
    match poll_call(fut, cx) {
        Poll::Ready(outcome) => {
            let home = leader.fut.take().and_then(drop_quietly);
            Ok(Poll::Ready(leader.table.finish_leader(
                leader.ticket,
                outcome,
                home,
            )))
        }
        Poll::Pending => {
            let fut = leader.fut.take().expect("held above");
            let group = leader.table.hand_over(leader.ticket, fut);
            Err(Waiter::new(leader.table.clone(), leader.ticket, group))
        }
    }
}

impl<F, K, T> fmt::Debug for ResponseFuture<F, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Direct { .. } => "direct",
            Kind::Leading { .. } => "leading",
            Kind::Waiting { .. } => "waiting",
            Kind::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
