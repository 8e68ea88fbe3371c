//! The breaker's hot state packed into one `u64`, and the pure transition
//! functions over it.
//!
//! ```text
//!  63        48 47        32 31                 3 2   0
//! +------------+------------+--------------------+-----+
//! |  count b   |  count a   |     generation     |state|
//! +------------+------------+--------------------+-----+
//! ```
//!
//! - closed: `a` = consecutive failures;
//! - half-open: `a` = probes in flight, `b` = probe successes.
//!
//! The generation changes on every transition, so a call that started in
//! one generation can never change the state of a later one.

use super::CircuitState;

const STATE_MASK: u64 = 0b111;
const GEN_SHIFT: u32 = 3;
const GEN_MASK: u64 = (1 << 29) - 1;
const A_SHIFT: u32 = 32;
const B_SHIFT: u32 = 48;
const COUNT_MASK: u64 = 0xFFFF;

/// The largest value of a threshold stored in a count field.
pub(crate) const MAX_COUNT: u64 = COUNT_MASK;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word(pub(crate) u64);

impl std::fmt::Debug for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Word")
            .field("state", &self.state())
            .field("gen", &self.gen())
            .field("a", &self.a())
            .field("b", &self.b())
            .finish()
    }
}

fn state_code(s: CircuitState) -> u64 {
    match s {
        CircuitState::Closed => 0,
        CircuitState::Open => 1,
        CircuitState::HalfOpen => 2,
        CircuitState::ForcedOpen => 3,
        CircuitState::Disabled => 4,
    }
}

impl Word {
    pub(crate) fn new(state: CircuitState, gen: u32, a: u16, b: u16) -> Self {
        Word(
            state_code(state)
                | ((u64::from(gen) & GEN_MASK) << GEN_SHIFT)
                | (u64::from(a) << A_SHIFT)
                | (u64::from(b) << B_SHIFT),
        )
    }

    #[inline]
    pub(crate) fn state(self) -> CircuitState {
        match self.0 & STATE_MASK {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            3 => CircuitState::ForcedOpen,
            _ => CircuitState::Disabled,
        }
    }

    #[inline]
    pub(crate) fn is_closed(self) -> bool {
        self.0 & STATE_MASK == 0
    }

    #[inline]
    pub(crate) fn gen(self) -> u32 {
        ((self.0 >> GEN_SHIFT) & GEN_MASK) as u32
    }

    #[inline]
    pub(crate) fn a(self) -> u16 {
        ((self.0 >> A_SHIFT) & COUNT_MASK) as u16
    }

    #[inline]
    pub(crate) fn b(self) -> u16 {
        ((self.0 >> B_SHIFT) & COUNT_MASK) as u16
    }

    pub(crate) fn with_a(self, a: u16) -> Self {
        Word((self.0 & !(COUNT_MASK << A_SHIFT)) | (u64::from(a) << A_SHIFT))
    }

    pub(crate) fn with_b(self, b: u16) -> Self {
        Word((self.0 & !(COUNT_MASK << B_SHIFT)) | (u64::from(b) << B_SHIFT))
    }

    /// The first word of the next generation in `state`, counts cleared.
    pub(crate) fn next(self, state: CircuitState) -> Self {
        Word::new(state, self.gen().wrapping_add(1), 0, 0)
    }
}

const TAG_BITS: u32 = 16;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const UNTIL_MAX: u64 = (1 << (64 - TAG_BITS)) - 1;

/// The open deadline, tagged with the generation it belongs to so that a
/// reader never pairs an `Open` word with an older deadline.
///
/// Microseconds since the clock's origin (48 bits: 8.9 years, then it
/// saturates) and the low 16 bits of the generation.
pub(crate) fn pack_deadline(gen: u32, until_us: u64) -> u64 {
    (until_us.min(UNTIL_MAX) << TAG_BITS) | (u64::from(gen) & TAG_MASK)
}

/// The deadline in microseconds if it belongs to `gen`.
pub(crate) fn unpack_deadline(packed: u64, gen: u32) -> Option<u64> {
    (packed & TAG_MASK == u64::from(gen) & TAG_MASK).then_some(packed >> TAG_BITS)
}

/// Whether the deadline `packed` belongs to a generation after `gen`, so
/// that a late writer for `gen` must not overwrite it.
pub(crate) fn deadline_is_newer(packed: u64, gen: u32) -> bool {
    let tag = packed & TAG_MASK;
    let ours = u64::from(gen) & TAG_MASK;
    tag != ours && (tag.wrapping_sub(ours) & TAG_MASK) < (1 << (TAG_BITS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let w = Word::new(CircuitState::HalfOpen, 12345, 7, 65535);
        assert_eq!(w.state(), CircuitState::HalfOpen);
        assert_eq!((w.gen(), w.a(), w.b()), (12345, 7, 65535));
        let w2 = w.with_a(9).with_b(1);
        assert_eq!(
            (w2.state(), w2.gen(), w2.a(), w2.b()),
            (CircuitState::HalfOpen, 12345, 9, 1)
        );
        let n = w2.next(CircuitState::Open);
        assert_eq!(
            (n.state(), n.gen(), n.a(), n.b()),
            (CircuitState::Open, 12346, 0, 0)
        );
        for s in [
            CircuitState::Closed,
            CircuitState::Open,
            CircuitState::HalfOpen,
            CircuitState::ForcedOpen,
            CircuitState::Disabled,
        ] {
            assert_eq!(Word::new(s, 0, 0, 0).state(), s);
        }
    }

    #[test]
    fn generation_wraps() {
        let w = Word::new(CircuitState::Closed, (1 << 29) - 1, 3, 0);
        assert_eq!(w.next(CircuitState::Open).gen(), 0);
    }

    #[test]
    fn deadline_is_tagged() {
        let p = pack_deadline(5, 30_000);
        assert_eq!(unpack_deadline(p, 5), Some(30_000));
        assert_eq!(unpack_deadline(p, 6), None);
        assert!(deadline_is_newer(p, 4));
        assert!(!deadline_is_newer(p, 5));
        assert!(!deadline_is_newer(p, 6));
        // Tags wrap.
        assert!(deadline_is_newer(pack_deadline(1, 0), 65535));
    }
}
