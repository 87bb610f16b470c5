//! Rating a mailing in credits (rule C2).
//!
//! A mailing costs `ceil(recipients * credits_per_recipient)` plus a fixed
//! per-mailing surcharge. Rounding is *up* so that fractional rates never
//! send a recipient for free, and credits stay whole numbers.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};

use crate::credits::{Credits, CreditsError};

/// Largest mailing the rating accepts: [`crate::limits::MAX_RECIPIENTS`].
pub use crate::limits::MAX_RECIPIENTS;

/// Most decimal places of a per-recipient rate (e.g. `0.000125`).
pub const MAX_RATE_DECIMALS: u32 = 6;

/// Errors of mailing rating.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatingError {
    /// The per-recipient rate must be positive.
    #[error("credits per recipient must be greater than zero, got {0}")]
    NonPositiveRate(Decimal),
    /// The per-recipient rate has too many decimals.
    #[error("credits per recipient {rate} has more than {max} decimal places")]
    TooPrecise {
        /// The rejected rate.
        rate: Decimal,
        /// The limit, [`MAX_RATE_DECIMALS`].
        max: u32,
    },
    /// A mailing needs at least one recipient.
    #[error("a mailing needs at least one recipient")]
    NoRecipients,
    /// More recipients than [`MAX_RECIPIENTS`].
    #[error("{recipients} recipients exceed the limit of {max}")]
    TooManyRecipients {
        /// The requested count.
        recipients: u64,
        /// The limit.
        max: u64,
    },
    /// The credit total does not fit in an `i64`.
    #[error("mailing cost out of range")]
    Overflow,
}

impl From<CreditsError> for RatingError {
    fn from(_: CreditsError) -> Self {
        // Only overflow is possible: every operand here is non-negative.
        RatingError::Overflow
    }
}

/// How many credits a mailing costs (C2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RatingRule {
    credits_per_recipient: Decimal,
    per_mailing_surcharge: Credits,
}

impl RatingRule {
    /// A rule; the rate must be positive with at most [`MAX_RATE_DECIMALS`] decimals.
    pub fn new(
        credits_per_recipient: Decimal,
        per_mailing_surcharge: Credits,
    ) -> Result<RatingRule, RatingError> {
        if credits_per_recipient <= Decimal::ZERO {
            return Err(RatingError::NonPositiveRate(credits_per_recipient));
        }
        // Trailing zeros (1.050000000) do not count as precision.
        if credits_per_recipient.normalize().scale() > MAX_RATE_DECIMALS {
            return Err(RatingError::TooPrecise {
                rate: credits_per_recipient,
                max: MAX_RATE_DECIMALS,
            });
        }
        Ok(RatingRule {
            credits_per_recipient,
            per_mailing_surcharge,
        })
    }

    /// Credits per recipient.
    pub fn credits_per_recipient(&self) -> Decimal {
        self.credits_per_recipient
    }

    /// Fixed credits added to every mailing.
    pub fn per_mailing_surcharge(&self) -> Credits {
        self.per_mailing_surcharge
    }

    /// C2: `ceil(recipients * rate) + surcharge`.
    pub fn credits_for(&self, recipients: u64) -> Result<Credits, RatingError> {
        if recipients == 0 {
            return Err(RatingError::NoRecipients);
        }
        if recipients > MAX_RECIPIENTS {
            return Err(RatingError::TooManyRecipients {
                recipients,
                max: MAX_RECIPIENTS,
            });
        }
        let per_recipient = Decimal::from(recipients)
            .checked_mul(self.credits_per_recipient)
            .map(|d| d.ceil())
            .and_then(|d| d.to_i64())
            .ok_or(RatingError::Overflow)?;
        Ok(Credits::new(per_recipient)?.checked_add(self.per_mailing_surcharge)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn rule(rate: Decimal, surcharge: i64) -> RatingRule {
        RatingRule::new(rate, Credits::new(surcharge).unwrap()).unwrap()
    }

    #[test]
    fn c2_examples() {
        let r = rule(dec!(1.05), 0);
        assert_eq!(r.credits_for(5_000).unwrap().get(), 5_250);
        assert_eq!(r.credits_for(1).unwrap().get(), 2, "1.05 rounds up");
        assert_eq!(
            rule(dec!(1.05), 10).credits_for(5_000).unwrap().get(),
            5_260
        );
        assert_eq!(
            rule(dec!(1), 0).credits_for(MAX_RECIPIENTS).unwrap().get(),
            100_000_000
        );
    }

    #[test]
    fn rejects_bad_rules_and_counts() {
        assert_eq!(
            RatingRule::new(dec!(0), Credits::ZERO),
            Err(RatingError::NonPositiveRate(dec!(0)))
        );
        assert!(matches!(
            RatingRule::new(dec!(0.0000001), Credits::ZERO),
            Err(RatingError::TooPrecise { max: 6, .. })
        ));
        assert!(RatingRule::new(dec!(1.050000000), Credits::ZERO).is_ok());
        let r = rule(dec!(1), 0);
        assert_eq!(r.credits_for(0), Err(RatingError::NoRecipients));
        assert_eq!(
            r.credits_for(MAX_RECIPIENTS + 1),
            Err(RatingError::TooManyRecipients {
                recipients: MAX_RECIPIENTS + 1,
                max: MAX_RECIPIENTS
            })
        );
        let huge = rule(Decimal::from(i64::MAX), 0);
        assert_eq!(huge.credits_for(2), Err(RatingError::Overflow));
    }

    proptest! {
        #[test]
        fn credits_are_monotone_in_recipients(
            rate in 1i64..5_000_000, surcharge in 0i64..1_000, a in 1u64..=MAX_RECIPIENTS, b in 1u64..=MAX_RECIPIENTS
        ) {
            let r = rule(Decimal::new(rate, 6), surcharge);
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(r.credits_for(lo).unwrap() <= r.credits_for(hi).unwrap());
            // Never less than the exact cost plus surcharge.
            let exact = Decimal::from(lo) * r.credits_per_recipient() + Decimal::from(surcharge);
            prop_assert!(Decimal::from(r.credits_for(lo).unwrap().get()) >= exact);
        }
    }
}
