//! The subscription rules (S1-S19) as plain types and pure functions: no IO, no tonic, prost or
//! sqlx. Prices come from `shared` (tier tables, proration); every invoice line is rounded once
//! with `Money::round_to_minor_unit`, the suite's only rounding place.

use std::fmt;

use shared::limits::{self, LimitError};

mod calendar;
mod change;
mod contacts;
mod plan;
mod pricing;
mod sending;
mod status;
#[cfg(test)]
mod tests;

pub use calendar::*;
pub use change::*;
pub use contacts::*;
pub use plan::*;
pub use pricing::*;
pub use sending::*;
pub use status::*;

/// A rule refused the request; the service maps these to status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A field of the request is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// S9: a contact tier below the active contacts held now.
    #[error(
        "{active} contacts are active: the lowest tier on offer is {lowest}; archive contacts first to go lower"
    )]
    BelowActiveContacts {
        /// Active contacts now.
        active: u64,
        /// The lowest slider position that holds them.
        lowest: u64,
    },
    /// The state does not allow the change.
    #[error("{0}")]
    Precondition(String),
    /// Money arithmetic failed (overflow, currency).
    #[error("price computation failed: {0}")]
    Arithmetic(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field,
        message: message.into(),
    }
}

impl From<LimitError> for DomainError {
    fn from(e: LimitError) -> Self {
        invalid(e.field, e.message)
    }
}

/// A seat count of a request (S4): `1..=MAX_SEATS` (`shared::limits`).
pub fn check_seats(field: &'static str, seats: u32) -> Result<u32, DomainError> {
    limits::check_count(field, u64::from(seats), u64::from(limits::MAX_SEATS))?;
    Ok(seats)
}

/// A contact count of a request (S1, S3): `1..=MAX_CONTACTS` (`shared::limits`).
pub fn check_contacts(field: &'static str, contacts: u64) -> Result<u64, DomainError> {
    Ok(limits::check_count(field, contacts, limits::MAX_CONTACTS)?)
}

fn arith(e: impl fmt::Display) -> DomainError {
    DomainError::Arithmetic(e.to_string())
}
