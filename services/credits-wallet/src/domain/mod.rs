//! Pure business rules of the credits wallet (rules C1-C9): credit lots and
//! their consumption order, rated debits (C2), expiry (C7), the low-balance
//! reminder (C3), automatic top-up (C4, C5, C6), debt repayment and the
//! claw-back of a returned direct debit (C9).
//!
//! Nothing here does IO: every function takes the wallet state it needs and
//! returns a plan (which lots to touch, how many credits to buy, whether to
//! emit an event). The service applies the plan inside one transaction and
//! writes the matching ledger entries, keeping the invariant
//! `balance (sum of ledger deltas) = sum of lot remaining - debt`.
//!
//! Credits are whole `i64` numbers (rating rounds up, C2), so there are no
//! floats and no rounding here. Arithmetic never panics: sums saturate or are
//! checked, and differences are only taken where the operands are known to be
//! ordered.
//!
//! One file per part: [`validation`] (accepted credit amounts), [`lots`] (lots, FEFO, debit
//! and expiry plans), [`debt`] (C9), [`top_up`] (C4, C5, C6) and [`reminder`] (C3). Their
//! items are re-exported here, so the rest of the crate names them `domain::X`.

pub mod debt;
#[cfg(test)]
mod fixtures;
pub mod lots;
pub mod reminder;
pub mod top_up;
pub mod validation;

pub use debt::*;
pub use lots::*;
pub use reminder::*;
pub use top_up::*;
pub use validation::*;
