//! The reseller service's one error type and its mapping to gRPC status codes.

use runtime::{db::DbError, idempotency::IdempotencyError};
use shared::limits::{LimitError, quoted};
use tonic::{Code, Status};

use crate::domain::LimitReached;

/// Everything a reseller operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum ResellerError {
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such partner.
    #[error("partner {} does not exist", quoted(.0))]
    PartnerNotFound(String),
    /// No such customer of this partner (also for another partner's customer: nothing leaks).
    #[error("customer {} is not a customer of partner {}", quoted(.customer), quoted(.partner))]
    CustomerNotFound {
        /// The partner asked about.
        partner: String,
        /// The customer asked about.
        customer: String,
    },
    /// No such hold of this customer.
    #[error("reservation {} is not a hold of this customer", quoted(.0))]
    ReservationNotFound(String),
    /// The partner id is taken.
    #[error("partner {} already exists", quoted(.0))]
    PartnerExists(String),
    /// This partner has the customer id already (customer ids are each partner's own).
    #[error("customer {} already exists", quoted(.0))]
    CustomerExists(String),
    /// The caller's token is bound to another partner.
    #[error("this token acts for partner {}, not {}", quoted(.token_partner), quoted(.partner))]
    OtherPartner {
        /// The partner the token is bound to.
        token_partner: String,
        /// The partner asked about.
        partner: String,
    },
    /// The customer is suspended.
    #[error("customer {} is suspended; its sends are refused", quoted(.0))]
    Suspended(String),
    /// The partner's cap on this customer was reached.
    #[error(transparent)]
    Limit(#[from] LimitReached),
    /// A state that does not allow the request.
    #[error("{0}")]
    Precondition(String),
    /// The credits-wallet service refused or failed; its status is passed on (UNAVAILABLE when it
    /// cannot be reached: nothing was debited, retry with the same key).
    #[error("wallet service: {}", .0.message())]
    Wallet(Status),
    /// The first outcome of a retried request.
    #[error("{}", .0.message())]
    Replayed(Status),
    /// Idempotency key reuse, or storage failure behind it.
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl ResellerError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// Whether the wallet could not be reached (or did not answer in time): nothing is known
    /// to have happened, so the routing stays for a retry with the same key.
    pub fn is_wallet_unreachable(&self) -> bool {
        matches!(self, Self::Wallet(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal))
    }
}

impl From<sqlx::Error> for ResellerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(DbError::Sqlx(e))
    }
}

impl From<runtime::convert::InvalidField> for ResellerError {
    fn from(e: runtime::convert::InvalidField) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<LimitError> for ResellerError {
    fn from(e: LimitError) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<ResellerError> for Status {
    fn from(e: ResellerError) -> Self {
        match e {
            ResellerError::InvalidArgument { field, message } => {
                runtime::status::invalid_argument(field, &message)
            }
            ResellerError::PartnerNotFound(_)
            | ResellerError::CustomerNotFound { .. }
            | ResellerError::ReservationNotFound(_) => Status::not_found(e.to_string()),
            ResellerError::PartnerExists(_) | ResellerError::CustomerExists(_) => {
                Status::already_exists(e.to_string())
            }
            ResellerError::OtherPartner { .. } => Status::permission_denied(e.to_string()),
            ResellerError::Suspended(_)
            | ResellerError::Limit(_)
            | ResellerError::Precondition(_) => Status::failed_precondition(e.to_string()),
            ResellerError::Wallet(status) => {
                if matches!(
                    status.code(),
                    Code::Unknown | Code::Cancelled | Code::Internal
                ) {
                    tracing::warn!(code = ?status.code(), message = status.message(), "wallet call failed");
                    Status::unavailable(
                        "the credits-wallet service did not answer; retry with the same idempotency key (a retry never debits twice)",
                    )
                } else {
                    Status::new(status.code(), status.message())
                }
            }
            ResellerError::Replayed(status) => status,
            ResellerError::Idempotency(inner) => inner.into(),
            ResellerError::Storage(inner) => runtime::status::storage("reseller", &inner),
        }
    }
}
