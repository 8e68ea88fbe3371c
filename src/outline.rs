//! Values dropped out of line.
//!
//! A response future's drop glue is inlined into its caller only when it
//! is small. A variant holding an `Arc`, a permit with its own `Drop`, or
//! a boxed state machine makes the glue large, and then every call pays
//! for a function call and for keeping the whole future in memory, even on
//! the path where that variant never exists. Wrapping such a field in
//! [`OutOfLine`] leaves the glue one test and one call.

use std::fmt;

/// `Some` value, dropped by a function of its own; `None` once taken.
pub(crate) struct OutOfLine<T>(Option<T>);

impl<T> OutOfLine<T> {
    #[inline]
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }

    /// The value, unless taken.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }

    /// The value, mutably, unless taken.
    #[inline]
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        self.0.as_mut()
    }
}

impl<T> Drop for OutOfLine<T> {
    #[inline]
    fn drop(&mut self) {
        #[cold]
        #[inline(never)]
        fn drop_value<T>(value: T) {
            drop(value);
        }
        if let Some(value) = self.0.take() {
            drop_value(value);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for OutOfLine<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
