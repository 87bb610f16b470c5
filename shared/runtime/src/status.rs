//! The `Status` answers every service's `From<Error> for Status` builds the same way: a bad
//! field with its `BadRequest` violation, and a storage or internal failure that keeps its
//! cause in the log and out of the answer.

use std::fmt::Display;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::db::{DbError, STORAGE_UNAVAILABLE};

/// `INVALID_ARGUMENT` for `field`: the message `{field}: {message}` and a `BadRequest` detail
/// whose field violation names the field, for clients that read the details.
pub fn invalid_argument(field: &str, message: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(field, message);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        details,
    )
}

/// A storage failure of `service` (`wallet`, `subscription`, `reseller`): `UNAVAILABLE` when
/// it is transient (a retry with the same idempotency key may succeed), `INTERNAL` with a
/// generic message otherwise; the cause goes to the log, never to the client.
pub fn storage(service: &str, error: &DbError) -> Status {
    if error.is_transient() {
        tracing::warn!(error = %error, "{service} storage unavailable");
        Status::unavailable(STORAGE_UNAVAILABLE)
    } else {
        tracing::error!(error = %error, "{service} storage failed");
        Status::internal("internal error")
    }
}

/// `INTERNAL` with a generic message; `what` failed and its `cause` go to the log.
pub fn internal(what: &str, cause: &dyn Display) -> Status {
    tracing::error!(error = %cause, "{what}");
    Status::internal("internal error")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_argument_names_its_field_in_the_message_and_the_details() {
        let status = invalid_argument("wallet_id", "is required");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "wallet_id: is required");
        let violations = status
            .get_details_bad_request()
            .expect("a BadRequest detail")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "wallet_id");
        assert_eq!(violations[0].description, "is required");
    }

    #[test]
    fn failures_keep_their_cause_out_of_the_answer() {
        let status = storage("wallet", &DbError::Corrupt("row 7 is broken".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let status = internal("price computation failed", &"overflow in line 3");
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
