//! The operations of the breaker property tests: calls started, finished
//! with an outcome or dropped, and time passing.
#![allow(dead_code, unreachable_pub)]

use proptest::prelude::*;
use tower_bulwark::classify::Outcome;

#[derive(Debug, Clone)]
pub enum Op {
    Start,
    /// Finish the `i`th running call (mod the count) with an outcome, or
    /// drop it (`None`).
    Finish(usize, Option<Outcome>),
    Advance(u64),
}

pub fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        Just(Some(Outcome::Success)),
        Just(Some(Outcome::Failure)),
        Just(Some(Outcome::Ignore)),
        Just(None),
    ];
    prop_oneof![
        3 => Just(Op::Start),
        4 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::Finish(i, o)),
        1 => (1u64..1500).prop_map(Op::Advance),
    ]
}
