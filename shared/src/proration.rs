//! Proration of plan changes inside a billing period (rules S7, S8, S19).
//!
//! # Granularity: one second
//!
//! A plan change may happen at any instant (S19), so proration is per
//! second: the share of a price is `seconds used / seconds in the period`.
//! Seconds between UTC timestamps are exact and free of the time-zone and
//! DST ambiguity of "days", the period length in seconds is the denominator
//! so months of 28..31 days are handled exactly, and it is what Stripe does.
//! Sub-second parts are truncated: a change counts from the start of the
//! second it happens in.
//!
//! # Rounding
//!
//! Fractions are exact `Decimal` quotients (28 significant digits) and are
//! only ever multiplied by a price; the product is rounded once, with
//! [`Money::round_to_minor_unit`]. [`prorate`] rounds *cumulatively*: the
//! share of `[from, to)` is `round(price * (to - start) / len) -
//! round(price * (from - start) / len)`, so prorations of adjacent intervals
//! add up exactly to the rounded whole price (no cent is created or lost).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::money::{Money, MoneyError};
use crate::period::BillingPeriod;

/// Errors of proration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProrationError {
    /// The period has no length (`end <= start`, counted in whole seconds).
    #[error("billing period {start} .. {end} is empty")]
    EmptyPeriod {
        /// Period start.
        start: DateTime<Utc>,
        /// Period end.
        end: DateTime<Utc>,
    },
    /// The instant is not within `[start, end]` of the period.
    #[error("{at} is outside the billing period {start} .. {end}")]
    OutsidePeriod {
        /// The instant.
        at: DateTime<Utc>,
        /// Period start.
        start: DateTime<Utc>,
        /// Period end.
        end: DateTime<Utc>,
    },
    /// `from` is after `to`.
    #[error("proration range is inverted: {from} is after {to}")]
    InvertedRange {
        /// Range start.
        from: DateTime<Utc>,
        /// Range end.
        to: DateTime<Utc>,
    },
    /// Plan prices are never negative.
    #[error("cannot prorate a negative price {0}")]
    NegativePrice(Money),
    /// Money arithmetic failed (currency mismatch or overflow).
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// Seconds from the period start to `at`, and the period length in seconds.
fn offset_and_length(
    period: &BillingPeriod,
    at: DateTime<Utc>,
) -> Result<(i64, i64), ProrationError> {
    let len = period.duration_seconds();
    if len <= 0 {
        return Err(ProrationError::EmptyPeriod {
            start: period.start,
            end: period.end,
        });
    }
    if at < period.start || at > period.end {
        return Err(ProrationError::OutsidePeriod {
            at,
            start: period.start,
            end: period.end,
        });
    }
    Ok(((at - period.start).num_seconds(), len))
}

/// Fraction of the period remaining at `at`: `(end - at) / (end - start)`,
/// in `[0, 1]`. Errors if `at` is outside `[start, end]`.
pub fn fraction_remaining(
    period: &BillingPeriod,
    at: DateTime<Utc>,
) -> Result<Decimal, ProrationError> {
    let (offset, len) = offset_and_length(period, at)?;
    Decimal::from(len - offset)
        .checked_div(Decimal::from(len))
        .ok_or(ProrationError::Money(MoneyError::Overflow))
}

/// `round(price * elapsed(at) / len)`: the rounded cumulative share of
/// `price` from the period start up to `at`.
fn cumulative_share(
    price: &Money,
    period: &BillingPeriod,
    at: DateTime<Utc>,
) -> Result<Money, ProrationError> {
    let (offset, len) = offset_and_length(period, at)?;
    // Multiply first, divide once: the quotient is exact unless it has more
    // than 28 digits, and then it is never close enough to a rounding midpoint to matter.
    let exact = price
        .amount()
        .checked_mul(Decimal::from(offset))
        .and_then(|p| p.checked_div(Decimal::from(len)))
        .ok_or(MoneyError::Overflow)?;
    Ok(Money::new(exact, price.currency()).round_to_minor_unit())
}

/// The rounded share of `price` for `[from, to)` inside `period`
/// (cumulative rounding, see the module docs). The whole period yields
/// exactly the rounded price.
pub fn prorate(
    price: &Money,
    period: &BillingPeriod,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Money, ProrationError> {
    if from > to {
        return Err(ProrationError::InvertedRange { from, to });
    }
    let upto_to = cumulative_share(price, period, to)?;
    let upto_from = cumulative_share(price, period, from)?;
    Ok(upto_to.checked_sub(&upto_from)?)
}

/// The two sides of a plan change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proration {
    /// Unused part of the old price, credited back (>= 0).
    pub credit: Money,
    /// Part of the new price to charge (>= 0).
    pub charge: Money,
}

impl Proration {
    /// `charge - credit`; negative means the customer is owed a credit balance.
    pub fn net(&self) -> Result<Money, MoneyError> {
        self.charge.checked_sub(&self.credit)
    }
}

fn check_prices(old_price: &Money, new_price: &Money) -> Result<(), ProrationError> {
    for price in [old_price, new_price] {
        if price.is_negative() {
            return Err(ProrationError::NegativePrice(*price));
        }
    }
    old_price.checked_cmp(new_price)?; // rejects a currency mismatch up front
    Ok(())
}

/// S7: a change taking effect at `at` within the current period: credit the
/// old price for `[at, end)` and charge the new price for `[at, end)`.
pub fn prorate_change(
    old_price: &Money,
    new_price: &Money,
    period: &BillingPeriod,
    at: DateTime<Utc>,
) -> Result<Proration, ProrationError> {
    check_prices(old_price, new_price)?;
    Ok(Proration {
        credit: prorate(old_price, period, at, period.end)?,
        charge: prorate(new_price, period, at, period.end)?,
    })
}

/// S8: a change that restarts the billing period at `at` (e.g. switching
/// interval): credit the old price for `[at, end)` and charge the full new
/// price for a new period starting at `at`.
pub fn restart_period_change(
    old_price: &Money,
    new_price: &Money,
    period: &BillingPeriod,
    at: DateTime<Utc>,
) -> Result<Proration, ProrationError> {
    check_prices(old_price, new_price)?;
    Ok(Proration {
        credit: prorate(old_price, period, at, period.end)?,
        charge: new_price.round_to_minor_unit(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::currency::Currency;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn period() -> BillingPeriod {
        // April 2024: 30 days.
        BillingPeriod {
            start: Utc.with_ymd_and_hms(2024, 4, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap(),
        }
    }

    fn eur(cents: i64) -> Money {
        Money::from_minor_units(cents, Currency::EUR)
    }

    #[test]
    fn fraction_remaining_is_per_second() {
        let p = period();
        assert_eq!(fraction_remaining(&p, p.start).unwrap(), dec!(1));
        assert_eq!(fraction_remaining(&p, p.end).unwrap(), dec!(0));
        assert_eq!(
            fraction_remaining(&p, p.start + Duration::days(15)).unwrap(),
            dec!(0.5)
        );
        assert!(matches!(
            fraction_remaining(&p, p.end + Duration::seconds(1)),
            Err(ProrationError::OutsidePeriod { .. })
        ));
        let empty = BillingPeriod {
            start: p.start,
            end: p.start,
        };
        assert!(matches!(
            fraction_remaining(&empty, p.start),
            Err(ProrationError::EmptyPeriod { .. })
        ));
    }

    #[test]
    fn upgrade_mid_period_s7() {
        let p = period();
        let at = p.start + Duration::days(10); // 20 of 30 days remain
        let r = prorate_change(&eur(3_000), &eur(6_000), &p, at).unwrap();
        assert_eq!(r.credit, eur(2_000));
        assert_eq!(r.charge, eur(4_000));
        assert_eq!(r.net().unwrap(), eur(2_000));
        let down = prorate_change(&eur(6_000), &eur(3_000), &p, at).unwrap();
        assert_eq!(down.net().unwrap(), eur(-2_000));
    }

    #[test]
    fn restart_charges_the_full_new_price_s8() {
        let p = period();
        let at = p.start + Duration::days(10);
        let r = restart_period_change(&eur(3_000), &eur(30_000), &p, at).unwrap();
        assert_eq!(r.credit, eur(2_000));
        assert_eq!(r.charge, eur(30_000));
    }

    #[test]
    fn rejects_bad_inputs() {
        let p = period();
        let usd = Money::from_minor_units(100, Currency::USD);
        assert!(matches!(
            prorate_change(&eur(100), &usd, &p, p.start),
            Err(ProrationError::Money(MoneyError::CurrencyMismatch { .. }))
        ));
        assert!(matches!(
            prorate_change(&eur(-1), &eur(100), &p, p.start),
            Err(ProrationError::NegativePrice(_))
        ));
        assert!(matches!(
            prorate(&eur(100), &p, p.end, p.start),
            Err(ProrationError::InvertedRange { .. })
        ));
    }

    #[test]
    fn thirds_add_up_exactly() {
        let p = period();
        let cuts = [
            p.start,
            p.start + Duration::days(10),
            p.start + Duration::days(20),
            p.end,
        ];
        let price = eur(1_000); // 10.00 / 3 = 3.333..
        let parts: Vec<Money> = cuts
            .windows(2)
            .map(|w| prorate(&price, &p, w[0], w[1]).unwrap())
            .collect();
        assert_eq!(parts, vec![eur(333), eur(334), eur(333)]);
    }

    fn price_and_period() -> impl Strategy<Value = (Money, BillingPeriod)> {
        (
            0i64..10_000_000,
            1_700_000_000i64..1_800_000_000,
            1i64..40_000_000,
        )
            .prop_map(|(cents, start, len)| {
                let start = DateTime::from_timestamp(start, 0).unwrap();
                (
                    eur(cents),
                    BillingPeriod {
                        start,
                        end: start + Duration::seconds(len),
                    },
                )
            })
    }

    proptest! {
        #[test]
        fn prorating_the_whole_period_gives_the_whole_price((price, p) in price_and_period()) {
            prop_assert_eq!(prorate(&price, &p, p.start, p.end).unwrap(), price);
            let unrounded = Money::new(price.amount() + dec!(0.004), Currency::EUR);
            prop_assert_eq!(prorate(&unrounded, &p, p.start, p.end).unwrap(), price);
        }

        #[test]
        fn splitting_a_period_never_creates_or_loses_more_than_one_minor_unit(
            (price, p) in price_and_period(), cut in 0i64..40_000_000
        ) {
            let at = p.start + Duration::seconds(cut % (p.duration_seconds() + 1));
            let first = prorate(&price, &p, p.start, at).unwrap();
            let second = prorate(&price, &p, at, p.end).unwrap();
            let sum = first.checked_add(&second).unwrap();
            let diff = sum.checked_sub(&price).unwrap().amount().abs();
            prop_assert!(diff <= dec!(0.01));
            // With cumulative rounding it is in fact exact.
            prop_assert_eq!(sum, price);
        }

        #[test]
        fn fraction_remaining_is_in_unit_interval_and_decreasing(
            (_price, p) in price_and_period(), a in 0i64..40_000_000, b in 0i64..40_000_000
        ) {
            let (a, b) = (a % (p.duration_seconds() + 1), b % (p.duration_seconds() + 1));
            let early = p.start + Duration::seconds(a.min(b));
            let late = p.start + Duration::seconds(a.max(b));
            let fe = fraction_remaining(&p, early).unwrap();
            let fl = fraction_remaining(&p, late).unwrap();
            prop_assert!(fe >= Decimal::ZERO && fe <= Decimal::ONE);
            prop_assert!(fl >= Decimal::ZERO && fl <= Decimal::ONE);
            prop_assert!(fe >= fl);
        }

        #[test]
        fn changing_to_the_same_price_nets_to_zero((price, p) in price_and_period(), x in 0i64..40_000_000) {
            let at = p.start + Duration::seconds(x % (p.duration_seconds() + 1));
            let r = prorate_change(&price, &price, &p, at).unwrap();
            prop_assert!(r.net().unwrap().is_zero());
            prop_assert!(!r.credit.is_negative() && !r.charge.is_negative());
        }
    }
}
