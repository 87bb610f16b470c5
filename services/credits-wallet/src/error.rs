//! The wallet's one error type and its mapping to gRPC status codes.

use runtime::{db::DbError, idempotency::IdempotencyError};
use shared::limits::{LimitError, quoted};
use tonic::Status;

use crate::domain::{DomainError, Shortfall, TopUpRefusal};

/// Everything a wallet operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// No such wallet.
    #[error("wallet {} does not exist", quoted(.0))]
    WalletNotFound(String),
    /// No such reservation in this wallet.
    #[error("reservation {} does not exist in this wallet", quoted(.0))]
    ReservationNotFound(String),
    /// OpenWallet for an id that is taken (with another idempotency key).
    #[error("wallet {} already exists", quoted(.0))]
    WalletExists(String),
    /// The wallet cannot pay and no auto top-up covers it (C5, C6).
    #[error("{shortfall}{}", top_up.map(|r| format!("; auto top-up: {r}")).unwrap_or_default())]
    Insufficient {
        /// How much is missing.
        shortfall: Shortfall,
        /// Why auto top-up did not cover it, when configured.
        top_up: Option<TopUpRefusal>,
    },
    /// The gateway declined the payment a send needed (nothing was bought or debited).
    #[error("payment declined: {0}; nothing was bought or debited")]
    PaymentDeclined(String),
    /// The gateway did not answer for sure; the purchase is reconciled and a retry with the same
    /// idempotency key completes the call.
    #[error("the payment's outcome is not known yet; retry with the same idempotency key")]
    PaymentOutcomeUnknown,
    /// A payment taken back (a returned direct debit, a whole refund or a dispute) left the
    /// wallet owing credits.
    #[error(
        "wallet owes {0} credits from a payment taken back (a returned direct debit, a refund or a dispute); sends are refused until a purchase pays it back"
    )]
    Debt(i64),
    /// The wallet's state does not allow this (e.g. capture of a released hold).
    #[error("{0}")]
    Precondition(String),
    /// The first outcome of a retried request, replayed as it was answered.
    #[error("{}", .0.message())]
    Replayed(Status),
    /// Idempotency key reuse, or storage failure behind it.
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl WalletError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// Whether this is a refusal that changed nothing and must be replayed to a retry with the
    /// same idempotency key (rather than re-evaluated).
    pub fn is_recorded_refusal(&self) -> bool {
        matches!(
            self,
            Self::Insufficient { .. } | Self::PaymentDeclined(_) | Self::Debt(_)
        )
    }
}

impl From<sqlx::Error> for WalletError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(DbError::Sqlx(e))
    }
}

impl From<runtime::convert::InvalidField> for WalletError {
    fn from(e: runtime::convert::InvalidField) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<LimitError> for WalletError {
    fn from(e: LimitError) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<DomainError> for WalletError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::NotPositive { field, .. } => Self::invalid(field, e.to_string()),
            DomainError::Invalid(message) => Self::Precondition(message),
        }
    }
}

impl From<WalletError> for Status {
    fn from(e: WalletError) -> Self {
        match e {
            WalletError::InvalidArgument { field, message } => {
                runtime::status::invalid_argument(field, &message)
            }
            WalletError::WalletNotFound(_) | WalletError::ReservationNotFound(_) => {
                Status::not_found(e.to_string())
            }
            WalletError::WalletExists(_) => Status::already_exists(e.to_string()),
            WalletError::Insufficient { .. }
            | WalletError::PaymentDeclined(_)
            | WalletError::Debt(_)
            | WalletError::Precondition(_) => Status::failed_precondition(e.to_string()),
            WalletError::PaymentOutcomeUnknown => Status::unavailable(e.to_string()),
            WalletError::Replayed(status) => status,
            WalletError::Idempotency(inner) => inner.into(),
            WalletError::Storage(inner) => runtime::status::storage("wallet", &inner),
        }
    }
}
