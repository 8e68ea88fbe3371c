//! The dedup layer's errors.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::error::BoxError;

/// The error of a shared call, handed to every caller that waited on it.
///
/// The inner service's error need not be `Clone`: it is kept once behind an
/// `Arc`, and each waiter gets a `SharedError` pointing at it. `Display` is
/// the inner error's, and [`source`](Error::source) returns the inner error
/// itself, so the crate's [`rejection`](crate::error::rejection) and any
/// other walk of the chain see it. [`get_ref`](SharedError::get_ref)
/// downcasts it:
///
/// ```
/// use tower_bulwark::dedup::SharedError;
/// # fn check(err: tower::BoxError) {
/// if let Some(shared) = err.downcast_ref::<SharedError>() {
///     if let Some(io) = shared.get_ref().downcast_ref::<std::io::Error>() {
///         eprintln!("io error: {io}");
///     }
/// }
/// # }
/// ```
///
/// A panic in the inner future reaches the waiter that polled it as a
/// panic, and every other waiter as a `SharedError` around [`Panicked`].
#[derive(Clone)]
pub struct SharedError {
    inner: Arc<dyn Error + Send + Sync>,
}

impl SharedError {
    pub(crate) fn new(err: BoxError) -> Self {
        Self {
            inner: Arc::from(err),
        }
    }

    /// The inner service's error.
    pub fn get_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.inner
    }

    /// The inner error, shared.
    pub fn into_inner(self) -> Arc<dyn Error + Send + Sync> {
        self.inner
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Error for SharedError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.inner)
    }
}

/// The inner future of a shared call panicked. The waiter whose poll ran
/// into the panic panics too; every other waiter gets this error (inside a
/// [`SharedError`]) instead of a hang.
#[derive(Debug, Clone)]
pub struct Panicked {
    message: Option<String>,
}

impl Panicked {
    pub(crate) fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned());
        Self { message }
    }

    /// The panic's message, when it was a string.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the shared call panicked")?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

impl Error for Panicked {}
