//! The dedup layer's response future.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::flight::{
    drop_quietly, panicked, poll_call, Boxed, Call, Claim, Group, Kind as Event, Polled, Table,
    Ticket,
};
use crate::error::BoxError;

type Leave<K, F, T> = fn(&Table<K, F, T>, Ticket, &Arc<Group<F, T>>, Option<usize>);
type LeaderLeave<K, F, T> = fn(&Table<K, F, T>, Ticket, Option<Boxed<F>>);

/// The first caller of a call, until its first poll: the inner future waits
/// in the table (or with the callers that joined) and the first poll takes
/// it, to poll it inline while nobody else needs it. Dropping it before the
/// answer leaves the call to the others, or cancels it if there are none.
pub(crate) struct Leader<K, F, T> {
    table: Arc<Table<K, F, T>>,
    ticket: Ticket,
    /// The inner future, during the first poll.
    fut: Option<Boxed<F>>,
    /// The first poll took the call: the leader has nothing more to leave.
    claimed: bool,
    leave: LeaderLeave<K, F, T>,
}

impl<K, F, T> Leader<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(table: Arc<Table<K, F, T>>, ticket: Ticket) -> Self {
        Self {
            table,
            ticket,
            fut: None,
            claimed: false,
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
    #[inline]
    fn drop(&mut self) {
        if !self.claimed || self.fut.is_some() {
            (self.leave)(&self.table, self.ticket, self.fut.take());
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
                    Ok(res) => return res.map(answer),
                    Err(waiter) => waiter,
                },
                KindProj::Waiting { waiter } => {
                    let w = &mut *waiter;
                    let res = ready!(w.group.poll_waiter(&w.table, w.ticket, &mut w.slot, cx));
                    w.answered = true;
                    return Poll::Ready(answer(res));
                }
                KindProj::Ready { res } => {
                    return Poll::Ready(res.take().expect("dedup future polled after completion"))
                }
            };
            // The inner future was pending, or others joined before the
            // first poll: from now on this caller is one of the call's
            // waiters (and polls again, with the group's waker, right away).
            self.as_mut()
                .project()
                .kind
                .set(Kind::Waiting { waiter: handed });
        }
    }
}

/// This waiter's answer, or the panic of the inner future it polled.
#[inline]
fn answer<T>(res: Polled<T>) -> Result<T, BoxError> {
    match res {
        Ok(res) => res.map_err(Into::into),
        Err(payload) => resume_unwind(payload),
    }
}

/// The leader's first poll: takes the inner future and polls it inline.
/// `Err` is the leader's place in the call's group: the group others made
/// when they joined before this poll, or the one the future was handed to
/// when it was pending.
#[inline]
fn poll_leader<K, F, T>(
    leader: &mut Leader<K, F, T>,
    cx: &mut Context<'_>,
) -> Result<Poll<Polled<T>>, Waiter<K, F, T>>
where
    F: Call<Ok = T> + Send + 'static,
    F::Err: Into<BoxError>,
    K: Hash + Eq,
    T: Clone + Send + 'static,
{
    assert!(!leader.claimed, "dedup future polled after completion");
    let claim = leader.table.claim(leader.ticket);
    leader.claimed = true;
    let fut = match claim {
        Claim::Mine(fut) => leader.fut.insert(fut),
        Claim::Joined(group) => {
            return Err(Waiter::new(leader.table.clone(), leader.ticket, group));
        }
    };
    match poll_call(fut, cx) {
        Poll::Ready(polled) => {
            let home = leader.fut.take().and_then(drop_quietly);
            let t = &leader.table;
            Ok(Poll::Ready(match polled {
                Ok(outcome) => Ok(t.finish_leader(leader.ticket, outcome, false, home)),
                Err(payload) => {
                    // The leader's own answer is the panic.
                    let _ = t.finish_leader(leader.ticket, panicked(&payload), true, home);
                    Err(payload)
                }
            }))
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
