//! The service's one error type and its mapping to gRPC status codes.

use runtime::{db::DbError, idempotency::IdempotencyError};
use shared::limits::{LimitError, quoted};
use tonic::Status;

use crate::domain::DomainError;

/// Everything a subscription operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum SubError {
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// S5: the caller may not see or change billing.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such plan (version).
    #[error("plan {0} does not exist")]
    PlanNotFound(String),
    /// The account has no subscription.
    #[error("account {} has no subscription", quoted(.0))]
    SubscriptionNotFound(String),
    /// No such invoice.
    #[error("invoice {} does not exist", quoted(.0))]
    InvoiceNotFound(String),
    /// No such change request.
    #[error("change request {} does not exist", quoted(.0))]
    ChangeRequestNotFound(String),
    /// The account already has a subscription.
    #[error("account {} already has a subscription", quoted(.0))]
    AlreadySubscribed(String),
    /// S9: below the active contacts.
    #[error(
        "{active} contacts are active: the lowest tier on offer is {lowest}; archive contacts first to go lower"
    )]
    BelowActiveContacts {
        /// Active contacts.
        active: u64,
        /// Lowest tier that holds them.
        lowest: u64,
    },
    /// S6: the preview no longer matches the subscription.
    #[error("the preview is stale: {0}; preview the change again")]
    StalePreview(String),
    /// The gateway declined the payment; nothing changed.
    #[error("payment declined: {0}; nothing was changed")]
    PaymentDeclined(String),
    /// The gateway did not answer for sure; retry with the same idempotency key.
    #[error("the payment's outcome is not known yet; retry with the same idempotency key")]
    PaymentOutcomeUnknown,
    /// The state does not allow this.
    #[error("{0}")]
    Precondition(String),
    /// The first outcome of a retried request, replayed.
    #[error("{}", .0.message())]
    Replayed(Status),
    /// Idempotency key reuse, or storage failure behind it.
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] DbError),
    /// A price computation failed (a bug or an absurd plan).
    #[error("price computation failed: {0}")]
    Arithmetic(String),
}

impl SubError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// Whether this refusal changed nothing and is replayed to a retry with the same key.
    pub fn is_recorded_refusal(&self) -> bool {
        matches!(self, Self::PaymentDeclined(_))
    }
}

impl From<sqlx::Error> for SubError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(DbError::Sqlx(e))
    }
}

impl From<runtime::convert::InvalidField> for SubError {
    fn from(e: runtime::convert::InvalidField) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<LimitError> for SubError {
    fn from(e: LimitError) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<DomainError> for SubError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Invalid { field, message } => Self::InvalidArgument { field, message },
            DomainError::BelowActiveContacts { active, lowest } => {
                Self::BelowActiveContacts { active, lowest }
            }
            DomainError::Precondition(m) => Self::Precondition(m),
            DomainError::Arithmetic(m) => Self::Arithmetic(m),
        }
    }
}

impl From<SubError> for Status {
    fn from(e: SubError) -> Self {
        match e {
            SubError::InvalidArgument { field, message } => {
                runtime::status::invalid_argument(field, &message)
            }
            SubError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            SubError::PlanNotFound(_)
            | SubError::SubscriptionNotFound(_)
            | SubError::InvoiceNotFound(_)
            | SubError::ChangeRequestNotFound(_) => Status::not_found(e.to_string()),
            SubError::AlreadySubscribed(_) => Status::already_exists(e.to_string()),
            SubError::BelowActiveContacts { .. }
            | SubError::StalePreview(_)
            | SubError::PaymentDeclined(_)
            | SubError::Precondition(_) => Status::failed_precondition(e.to_string()),
            SubError::PaymentOutcomeUnknown => Status::unavailable(e.to_string()),
            SubError::Replayed(status) => status,
            SubError::Idempotency(inner) => inner.into(),
            SubError::Storage(inner) => runtime::status::storage("subscription", &inner),
            SubError::Arithmetic(m) => runtime::status::internal("price computation failed", &m),
        }
    }
}
