//! Mailing credits: whole, never-negative balances and signed ledger deltas.
//!
//! Credits are integers on purpose: a mailing consumes a whole number of
//! credits (rating rounds up, rule C2), so there is never a fractional credit
//! to lose or to round.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors of credit arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditsError {
    /// A balance cannot be negative.
    #[error("credit amount must not be negative, got {0}")]
    Negative(i64),
    /// The result does not fit in an `i64`.
    #[error("credit amount out of range")]
    Overflow,
    /// Spending more than the balance holds.
    #[error("insufficient credits: {requested} requested, {available} available")]
    Insufficient {
        /// The balance before the attempted debit.
        available: Credits,
        /// The amount that was asked for.
        requested: Credits,
    },
}

/// A non-negative whole number of credits (a balance or an amount to spend).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
// Deserialization goes through `new` so a negative balance can never enter.
#[serde(try_from = "i64", into = "i64")]
pub struct Credits(i64);

impl Credits {
    /// No credits.
    pub const ZERO: Credits = Credits(0);

    /// A credit amount; negative values are rejected.
    pub fn new(value: i64) -> Result<Credits, CreditsError> {
        if value < 0 {
            Err(CreditsError::Negative(value))
        } else {
            Ok(Credits(value))
        }
    }

    /// The number of credits.
    pub fn get(self) -> i64 {
        self.0
    }

    /// True if there are no credits.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self + other`; errors on overflow.
    pub fn checked_add(self, other: Credits) -> Result<Credits, CreditsError> {
        self.0
            .checked_add(other.0)
            .map(Credits)
            .ok_or(CreditsError::Overflow)
    }

    /// `self - other`; errors with [`CreditsError::Insufficient`] instead of going negative.
    pub fn checked_sub(self, other: Credits) -> Result<Credits, CreditsError> {
        if other.0 > self.0 {
            return Err(CreditsError::Insufficient {
                available: self,
                requested: other,
            });
        }
        // Both are non-negative and other <= self, so this cannot underflow.
        Ok(Credits(self.0 - other.0))
    }

    /// `self - other`, stopping at zero.
    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0).max(0))
    }
}

impl TryFrom<i64> for Credits {
    type Error = CreditsError;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Credits::new(value)
    }
}

impl From<Credits> for i64 {
    fn from(c: Credits) -> i64 {
        c.0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} credits", self.0)
    }
}

/// A signed change to a credit balance, as recorded in a ledger entry
/// (positive = grant/purchase, negative = consumption/expiry).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct CreditDelta(i64);

impl CreditDelta {
    /// A delta of `value` credits (any sign).
    pub fn new(value: i64) -> CreditDelta {
        CreditDelta(value)
    }

    /// The signed number of credits.
    pub fn get(self) -> i64 {
        self.0
    }

    /// A positive delta adding `credits`.
    pub fn from_credits(credits: Credits) -> CreditDelta {
        CreditDelta(credits.0)
    }

    /// A negative delta removing `credits`. Cannot overflow since credits are non-negative.
    pub fn debit(credits: Credits) -> CreditDelta {
        CreditDelta(-credits.0)
    }

    /// The opposite delta (used to reverse an entry). Errors only for `i64::MIN`.
    pub fn negate(self) -> Result<CreditDelta, CreditsError> {
        self.0
            .checked_neg()
            .map(CreditDelta)
            .ok_or(CreditsError::Overflow)
    }

    /// The magnitude of the delta as credits.
    pub fn magnitude(self) -> Credits {
        // i64::MIN has no positive counterpart; saturate (it is not a real ledger value).
        Credits(self.0.checked_abs().unwrap_or(i64::MAX))
    }

    /// Applies the delta to a balance; a debit beyond the balance errors with
    /// [`CreditsError::Insufficient`] rather than producing a negative balance.
    pub fn apply_to(self, balance: Credits) -> Result<Credits, CreditsError> {
        if self.0 >= 0 {
            balance.checked_add(Credits(self.0))
        } else {
            balance.checked_sub(self.magnitude())
        }
    }
}

impl fmt::Display for CreditDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:+} credits", self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(v: i64) -> Credits {
        Credits::new(v).unwrap()
    }

    #[test]
    fn balances_are_never_negative() {
        assert_eq!(Credits::new(-1), Err(CreditsError::Negative(-1)));
        assert_eq!(Credits::try_from(-5), Err(CreditsError::Negative(-5)));
        assert_eq!(c(3).checked_sub(c(3)), Ok(Credits::ZERO));
        assert_eq!(
            c(3).checked_sub(c(4)),
            Err(CreditsError::Insufficient {
                available: c(3),
                requested: c(4)
            })
        );
        assert_eq!(c(3).saturating_sub(c(10)), Credits::ZERO);
        assert_eq!(c(3).min(c(10)), c(3));
    }

    #[test]
    fn overflow_is_an_error() {
        assert_eq!(c(i64::MAX).checked_add(c(1)), Err(CreditsError::Overflow));
        assert_eq!(
            CreditDelta::new(i64::MIN).negate(),
            Err(CreditsError::Overflow)
        );
        assert_eq!(
            CreditDelta::new(1).apply_to(c(i64::MAX)),
            Err(CreditsError::Overflow)
        );
    }

    #[test]
    fn deltas_apply_and_reverse() {
        let d = CreditDelta::debit(c(40));
        assert_eq!(d.get(), -40);
        assert_eq!(d.apply_to(c(100)), Ok(c(60)));
        assert!(matches!(
            d.apply_to(c(10)),
            Err(CreditsError::Insufficient { .. })
        ));
        assert_eq!(d.negate(), Ok(CreditDelta::from_credits(c(40))));
        assert_eq!(CreditDelta::new(i64::MIN).magnitude(), c(i64::MAX));
    }

    #[test]
    fn display() {
        assert_eq!(c(5).to_string(), "5 credits");
        assert_eq!(CreditDelta::new(5).to_string(), "+5 credits");
        assert_eq!(CreditDelta::new(-5).to_string(), "-5 credits");
    }

    proptest! {
        #[test]
        fn applying_a_delta_then_its_negation_restores_the_balance(
            balance in 0i64..1_000_000_000, delta in -1_000_000_000i64..1_000_000_000
        ) {
            let b = c(balance);
            let d = CreditDelta::new(delta);
            match d.apply_to(b) {
                Ok(after) => prop_assert_eq!(d.negate().unwrap().apply_to(after), Ok(b)),
                Err(e) => {
                    // Only a debit larger than the balance may fail.
                    prop_assert!(delta < 0 && -delta > balance);
                    prop_assert!(
                        matches!(e, CreditsError::Insufficient { .. }),
                        "unexpected error {:?}",
                        e
                    );
                }
            }
        }
    }
}
