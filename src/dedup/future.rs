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
    drop_quietly, panicked, poll_call, Call, CallRef, Claim, EventKind, Flight, FlightTable,
    FutureBox, Polled,
};
use crate::error::BoxError;

/// The first caller of a call, until its first poll: the inner future waits
/// in the table (or with the callers that joined) and the first poll takes
/// it, to poll it inline while nobody else needs it. Dropping it before the
/// answer leaves the call to the others, or cancels it if there are none.
pub(crate) struct Leader<K, F, T> {
    table: Arc<FlightTable<K, F, T>>,
    call_ref: CallRef,
    /// The inner future, during the first poll.
    fut: Option<FutureBox<F>>,
    /// The first poll took the call: the leader has nothing more to leave.
    claimed: bool,
}

impl<K, F, T> Leader<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(table: Arc<FlightTable<K, F, T>>, call_ref: CallRef) -> Self {
        Self {
            table,
            call_ref,
            fut: None,
            claimed: false,
        }
    }
}

impl<K, F, T> Drop for Leader<K, F, T> {
    #[inline]
    fn drop(&mut self) {
        if !self.claimed || self.fut.is_some() {
            self.table.leader_leave(self.call_ref, self.fut.take());
        }
    }
}

/// One caller's place in a call's flight. Dropping it before the answer
/// arrived leaves the call; the last to leave cancels it.
pub(crate) struct Waiter<K, F, T> {
    table: Arc<FlightTable<K, F, T>>,
    flight: Arc<Flight<F, T>>,
    call_ref: CallRef,
    waker_slot: Option<usize>,
    answered: bool,
}

impl<K, F, T> Waiter<K, F, T>
where
    K: Hash + Eq,
    T: Clone,
{
    pub(crate) fn new(
        table: Arc<FlightTable<K, F, T>>,
        call_ref: CallRef,
        flight: Arc<Flight<F, T>>,
    ) -> Self {
        Self {
            table,
            flight,
            call_ref,
            waker_slot: None,
            answered: false,
        }
    }
}

impl<K, F, T> Drop for Waiter<K, F, T> {
    fn drop(&mut self) {
        if !self.answered {
            self.table
                .leave(self.call_ref, &self.flight, self.waker_slot);
        }
    }
}

pin_project! {
    /// The response future of [`Dedup`](super::Dedup).
    pub struct ResponseFuture<F, K, T> {
        #[pin]
        state: ResponseState<F, K, T>,
    }
}

pin_project! {
    #[project = ResponseStateProj]
    enum ResponseState<F, K, T> {
        // Not deduplicated: the inner call itself.
        Direct { #[pin] fut: F },
        // The first caller of a call, holding its future.
        Leading { leader: Leader<K, F, T> },
        // A place in a call's flight.
        Waiting { waiter: Waiter<K, F, T> },
        // A cached answer.
        Ready { res: Option<Result<T, BoxError>> },
    }
}

impl<F, K, T> ResponseFuture<F, K, T> {
    pub(crate) fn direct(fut: F) -> Self {
        Self {
            state: ResponseState::Direct { fut },
        }
    }

    pub(crate) fn leading(leader: Leader<K, F, T>) -> Self {
        Self {
            state: ResponseState::Leading { leader },
        }
    }

    pub(crate) fn waiting(waiter: Waiter<K, F, T>) -> Self {
        Self {
            state: ResponseState::Waiting { waiter },
        }
    }

    pub(crate) fn ready(res: Result<T, BoxError>) -> Self {
        Self {
            state: ResponseState::Ready { res: Some(res) },
        }
    }

    /// Sends an event through the guard's table, once the guard is in
    /// place: if a listener panics, dropping this future releases the
    /// call. Out of line, so that building the future never needs its
    /// address when no one listens.
    #[cold]
    #[inline(never)]
    pub(crate) fn emit(&self, kind: EventKind) {
        match &self.state {
            ResponseState::Leading { leader } => leader.table.cfg.send(kind),
            ResponseState::Waiting { waiter } => waiter.table.cfg.send(kind),
            _ => {}
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
            let handed = match self.as_mut().project().state.project() {
                ResponseStateProj::Direct { fut } => return fut.poll(cx).map_err(Into::into),
                ResponseStateProj::Leading { leader } => match poll_leader(leader, cx) {
                    Ok(res) => return res.map(answer),
                    Err(waiter) => waiter,
                },
                ResponseStateProj::Waiting { waiter } => {
                    let w = &mut *waiter;
                    let res =
                        ready!(w
                            .flight
                            .poll_waiter(&w.table, w.call_ref, &mut w.waker_slot, cx));
                    w.answered = true;
                    return Poll::Ready(answer(res));
                }
                ResponseStateProj::Ready { res } => {
                    return Poll::Ready(res.take().expect("dedup future polled after completion"))
                }
            };
            // The inner future was pending, or others joined before the
            // first poll: from now on this caller is one of the call's
            // waiters (and polls again, with the flight's waker, right away).
            self.as_mut()
                .project()
                .state
                .set(ResponseState::Waiting { waiter: handed });
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
/// `Err` is the leader's place in the call's flight: the flight others made
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
    let claim = leader.table.claim(leader.call_ref);
    leader.claimed = true;
    let fut = match claim {
        Claim::Mine(fut) => leader.fut.insert(fut),
        Claim::Joined(flight) => {
            return Err(Waiter::new(leader.table.clone(), leader.call_ref, flight));
        }
    };
    match poll_call(fut, cx) {
        Poll::Ready(polled) => {
            let home = leader.fut.take().and_then(drop_quietly);
            let t = &leader.table;
            Ok(Poll::Ready(match polled {
                Ok(outcome) => Ok(t.finish_leader(leader.call_ref, outcome, false, home)),
                Err(payload) => {
                    // The leader's own answer is the panic.
                    let _ = t.finish_leader(leader.call_ref, panicked(&payload), true, home);
                    Err(payload)
                }
            }))
        }
        Poll::Pending => {
            let fut = leader.fut.take().expect("held above");
            let flight = leader.table.hand_over(leader.call_ref, fut);
            Err(Waiter::new(leader.table.clone(), leader.call_ref, flight))
        }
    }
}

impl<F, K, T> fmt::Debug for ResponseFuture<F, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            ResponseState::Direct { .. } => "direct",
            ResponseState::Leading { .. } => "leading",
            ResponseState::Waiting { .. } => "waiting",
            ResponseState::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
