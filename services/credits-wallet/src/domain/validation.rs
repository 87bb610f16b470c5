//! Validation of the credit amounts the wallet accepts.

/// Largest credit amount accepted in one operation:
/// [`shared::limits::MAX_CREDITS`] (10^12), the suite's one list of limits.
pub use shared::limits::MAX_CREDITS;

/// Errors of the wallet's input validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A credit amount that must be in `1..=max` is not.
    #[error("{field} must be a positive number of credits (1 to {max})")]
    NotPositive {
        /// The name of the offending field, as the API spells it.
        field: &'static str,
        /// The upper bound, [`MAX_CREDITS`].
        max: i64,
    },
    /// Any other invalid input; the message is meant for the caller.
    #[error("{0}")]
    Invalid(String),
}

/// Validates a positive credit amount named `field` (`1..=MAX_CREDITS`) and
/// returns it, so callers can write `let n = positive_credits("credits", n)?;`.
pub fn positive_credits(field: &'static str, value: i64) -> Result<i64, DomainError> {
    if (1..=MAX_CREDITS).contains(&value) {
        Ok(value)
    } else {
        Err(DomainError::NotPositive {
            field,
            max: MAX_CREDITS,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // --- validation -------------------------------------------------------

    #[test]
    fn positive_credits_bounds() {
        assert_eq!(positive_credits("credits", 1), Ok(1));
        assert_eq!(positive_credits("credits", MAX_CREDITS), Ok(MAX_CREDITS));
        for bad in [0, -1, MAX_CREDITS + 1, i64::MIN, i64::MAX] {
            assert_eq!(
                positive_credits("credits", bad),
                Err(DomainError::NotPositive {
                    field: "credits",
                    max: MAX_CREDITS
                })
            );
        }
        assert_eq!(
            positive_credits("amount", 0).unwrap_err().to_string(),
            "amount must be a positive number of credits (1 to 1000000000000)"
        );
    }
}
