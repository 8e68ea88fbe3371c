//! The entries of a fallback group: type-erased fallback services and the
//! group every service of one layer shares.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::task::{Context, Poll};

use tower_service::Service;

use super::{AllFailed, FallbackEvent};
use crate::circuit_breaker::{CircuitBreakerLayer, Core};
use crate::error::BoxError;
use crate::observe::Listeners;

pub(crate) type BoxFuture<Res> = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

/// A fallback service with its type erased, so entries of different types
/// fit in one list. Only used once the primary has failed.
pub(crate) trait ErasedService<Req, Res>: Send + Sync {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(&mut self, req: Req) -> BoxFuture<Res>;
    fn clone_box(&self) -> BoxService<Req, Res>;
}

pub(crate) type BoxService<Req, Res> = Box<dyn ErasedService<Req, Res>>;

impl<S, Req, Res> ErasedService<Req, Res> for S
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::poll_ready(self, cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> BoxFuture<Res> {
        let fut = Service::call(self, req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }

    fn clone_box(&self) -> BoxService<Req, Res> {
        Box::new(self.clone())
    }
}

pub(crate) type OrElse<Res> = dyn Fn(AllFailed) -> Result<Res, BoxError> + Send + Sync;

/// Whether a request that reached an entry may be sent to the next one.
pub(crate) type Resend<Req> = dyn Fn(&Req) -> bool + Send + Sync;

/// One entry: its name, its own breaker, and (for fallbacks) its service.
pub(crate) struct Entry<Req, Res> {
    pub(crate) name: Arc<str>,
    pub(crate) breaker: CircuitBreakerLayer,
    pub(crate) service: Option<BoxService<Req, Res>>,
}

/// What every service of one layer shares: the entries (entry 0 is the
/// primary) and how their results are judged.
pub(crate) struct Group<Req, Res, C> {
    /// The primary's breaker (entry 0's), one load closer for the
    /// healthy path's admission.
    pub(crate) primary: Arc<Core>,
    pub(crate) entries: Box<[Entry<Req, Res>]>,
    pub(crate) classifier: C,
    pub(crate) skip_not_ready: bool,
    pub(crate) or_else: Option<Arc<OrElse<Res>>>,
    pub(crate) listeners: Listeners<FallbackEvent>,
    /// Asked before a request an entry was sent is failed over; `None`
    /// fails over every request.
    pub(crate) resend: Option<Arc<Resend<Req>>>,
}

impl<Req, Res, C> Group<Req, Res, C> {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.entries[0].name
    }

    /// Whether `req`, already sent to an entry that failed, may go to the
    /// next one.
    pub(crate) fn may_resend(&self, req: Option<&Req>) -> bool {
        match (&self.resend, req) {
            (Some(f), Some(req)) => f(req),
            _ => true,
        }
    }

    /// Whether a failed primary has anywhere to go: if not, the request
    /// need not be cloned.
    pub(crate) fn can_fail_over(&self) -> bool {
        self.entries.len() > 1 || self.or_else.is_some()
    }
}

impl<Req, Res, C> fmt::Debug for Group<Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field(
                "entries",
                &self.entries.iter().map(|e| &*e.name).collect::<Vec<_>>(),
            )
            .field("classifier", &std::any::type_name::<C>())
            .field("skip_not_ready", &self.skip_not_ready)
            .field("or_else", &self.or_else.is_some())
            .finish()
    }
}

/// One entry of a group, kept alive by the group: what an attempt's
/// breaker admission holds, so the attempt can book its result and the
/// call can go on to the next entry whatever became of the layer.
pub(crate) struct EntryRef<Req, Res, C> {
    pub(crate) group: Arc<Group<Req, Res, C>>,
    pub(crate) idx: usize,
}

impl<Req, Res, C> EntryRef<Req, Res, C> {
    pub(crate) fn entry(&self) -> &Entry<Req, Res> {
        &self.group.entries[self.idx]
    }
}

impl<Req, Res, C> AsRef<Core> for EntryRef<Req, Res, C> {
    #[inline]
    fn as_ref(&self) -> &Core {
        &self.group.entries[self.idx].breaker.core
    }
}

impl<Req, Res, C> fmt::Debug for EntryRef<Req, Res, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EntryRef").field(&self.entry().name).finish()
    }
}
