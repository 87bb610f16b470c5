//! Exact money amounts.
//!
//! # Rounding
//!
//! [`Money::round_to_minor_unit`] is the **only** place in the whole suite
//! where money is rounded. Its mode is *half away from zero*
//! ([`RoundingStrategy::MidpointAwayFromZero`]) to the currency's minor unit
//! (two decimals, zero for JPY). It is applied once per invoice line / charge:
//! intermediate results (tier totals, prorated shares before the final step)
//! stay exact, and every function that must return a rounded amount calls it.
//!
//! Amounts are [`Decimal`]s; there are no floats anywhere near money.

use std::cmp::Ordering;
use std::fmt;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::currency::{Currency, UnknownCurrency};

/// Most fractional digits accepted by [`Money::parse`]. Enough for unit
/// prices such as `0.000125`; more is almost certainly a data error.
pub const MAX_FRACTION_DIGITS: usize = 12;

/// Most integer digits accepted by [`Money::parse`], so that integer and
/// fractional digits together fit in `Decimal`'s 28 significant digits
/// without silent rounding.
pub const MAX_INTEGER_DIGITS: usize = 16;

/// Errors of money arithmetic and parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The two operands are in different currencies; there is no implicit FX.
    #[error("currency mismatch: cannot combine {left} with {right}")]
    CurrencyMismatch {
        /// Currency of the left operand.
        left: Currency,
        /// Currency of the right operand.
        right: Currency,
    },
    /// The result does not fit in a `Decimal` (or an `i64` of minor units).
    #[error("money amount out of range")]
    Overflow,
    /// The amount string is not a plain decimal number.
    #[error(
        "invalid amount `{0}`: expected a plain decimal number such as `-12.34` (no exponent, no separators)"
    )]
    InvalidAmount(String),
    /// The amount string has more fractional digits than [`MAX_FRACTION_DIGITS`].
    #[error("invalid amount `{input}`: at most {max} fractional digits are allowed")]
    TooManyFractionDigits {
        /// The rejected input.
        input: String,
        /// The limit.
        max: usize,
    },
    /// The currency code is not supported.
    #[error(transparent)]
    UnknownCurrency(#[from] UnknownCurrency),
    /// Conversion to minor units needs an amount that is already rounded.
    #[error("{amount} {currency} is not a whole number of minor units; round it first")]
    NotRounded {
        /// The unrounded amount.
        amount: Decimal,
        /// Its currency.
        currency: Currency,
    },
}

/// An exact amount of money in one currency. May be negative (credits, refunds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// Wraps an exact amount; no rounding happens here.
    pub fn new(amount: Decimal, currency: Currency) -> Money {
        Money { amount, currency }
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Money {
        Money::new(Decimal::ZERO, currency)
    }

    /// Parses a plain decimal string (`"12.34"`, `"-0.5"`, `"7"`) and an ISO code.
    ///
    /// Rejects exponent forms, separators, a lone `.`, more than
    /// [`MAX_FRACTION_DIGITS`] fractional digits and more than
    /// [`MAX_INTEGER_DIGITS`] integer digits.
    pub fn parse(amount: &str, currency: &str) -> Result<Money, MoneyError> {
        let currency: Currency = currency.parse()?;
        let unsigned = amount
            .strip_prefix('-')
            .or_else(|| amount.strip_prefix('+'))
            .unwrap_or(amount);
        let (int_part, frac_part) = match unsigned.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (unsigned, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
            return Err(MoneyError::InvalidAmount(amount.to_owned()));
        }
        if frac_part.is_some_and(|f| f.len() > MAX_FRACTION_DIGITS) {
            return Err(MoneyError::TooManyFractionDigits {
                input: amount.to_owned(),
                max: MAX_FRACTION_DIGITS,
            });
        }
        if int_part.trim_start_matches('0').len() > MAX_INTEGER_DIGITS {
            return Err(MoneyError::Overflow);
        }
        let value: Decimal = amount
            .parse()
            .map_err(|_| MoneyError::InvalidAmount(amount.to_owned()))?;
        Ok(Money::new(value, currency))
    }

    /// Builds an amount from an integer count of minor units (cents; yen for JPY).
    pub fn from_minor_units(minor: i64, currency: Currency) -> Money {
        // The scale is 0 or 2, far below Decimal's maximum of 28, so this
        // cannot fail; the fallback only keeps the function total.
        let amount = Decimal::try_new(minor, currency.minor_units()).unwrap_or(Decimal::ZERO);
        Money::new(amount, currency)
    }

    /// The amount as an integer count of minor units, as payment providers want it.
    ///
    /// Errors with [`MoneyError::NotRounded`] unless the amount is already a
    /// whole number of minor units: this function never rounds silently.
    pub fn to_minor_units(&self) -> Result<i64, MoneyError> {
        if self.round_to_minor_unit().amount != self.amount {
            return Err(MoneyError::NotRounded {
                amount: self.amount,
                currency: self.currency,
            });
        }
        let factor = 10i64
            .checked_pow(self.currency.minor_units())
            .ok_or(MoneyError::Overflow)?;
        self.amount
            .checked_mul(Decimal::from(factor))
            .and_then(|d| d.to_i64())
            .ok_or(MoneyError::Overflow)
    }

    /// The exact amount.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// THE rendering of an amount as text, for the wire, events and [`fmt::Display`]: the
    /// currency's minor-unit digits always (`"0.00"`, `"12.50"` EUR; `"7"` JPY), more only for
    /// an amount that is not a whole number of minor units (`"0.125"`). Trailing zeros beyond
    /// the minor unit are dropped (`"30.000"` is `"30.00"`) and zero has no sign. Never rounds.
    pub fn amount_text(&self) -> String {
        let amount = self.amount.normalize();
        let digits = amount.scale().max(self.currency.minor_units()) as usize;
        format!("{amount:.digits$}")
    }

    /// THE rounding function of the suite (see the module docs): half away
    /// from zero to the currency's minor unit.
    pub fn round_to_minor_unit(&self) -> Money {
        Money::new(
            self.amount.round_dp_with_strategy(
                self.currency.minor_units(),
                RoundingStrategy::MidpointAwayFromZero,
            ),
            self.currency,
        )
    }

    fn same_currency(&self, other: &Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    /// `self + other`; errors on currency mismatch or overflow.
    pub fn checked_add(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// `self - other`; errors on currency mismatch or overflow.
    pub fn checked_sub(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount = self
            .amount
            .checked_sub(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// `-self`. Cannot actually overflow (Decimal is sign-magnitude); the
    /// `Result` keeps the arithmetic API uniform.
    pub fn checked_neg(&self) -> Result<Money, MoneyError> {
        Ok(Money::new(-self.amount, self.currency))
    }

    /// `self * factor`, exact up to Decimal's 28 digits; not rounded.
    pub fn checked_mul(&self, factor: Decimal) -> Result<Money, MoneyError> {
        let amount = self
            .amount
            .checked_mul(factor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// Compares two amounts of the same currency.
    pub fn checked_cmp(&self, other: &Money) -> Result<Ordering, MoneyError> {
        self.same_currency(other)?;
        Ok(self.amount.cmp(&other.amount))
    }

    /// True if the amount is zero (of any scale or sign).
    pub fn is_zero(&self) -> bool {
        self.amount.is_zero()
    }

    /// True if the amount is strictly below zero (`-0` is not negative).
    pub fn is_negative(&self) -> bool {
        self.amount < Decimal::ZERO
    }

    /// True if the amount is strictly above zero.
    pub fn is_positive(&self) -> bool {
        self.amount > Decimal::ZERO
    }
}

impl fmt::Display for Money {
    /// `"12.34 EUR"`: the amount as [`Money::amount_text`] renders it, then the currency.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_text(), self.currency)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn eur(s: &str) -> Money {
        Money::parse(s, "EUR").unwrap()
    }

    #[test]
    fn parse_accepts_plain_decimals() {
        assert_eq!(eur("12.34").amount(), dec!(12.34));
        assert_eq!(eur("-0.5").amount(), dec!(-0.5));
        assert_eq!(eur("+7").amount(), dec!(7));
        assert_eq!(eur("0.000000000001").amount(), dec!(0.000000000001));
    }

    #[test]
    fn parse_rejects_garbage_exponents_and_precision() {
        for bad in [
            "", "abc", "1e5", "1E5", "1.", ".5", "1,000", " 1", "--1", "1.2.3", "NaN",
        ] {
            assert_eq!(
                Money::parse(bad, "EUR"),
                Err(MoneyError::InvalidAmount(bad.into())),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Money::parse("0.0000000000001", "EUR"),
            Err(MoneyError::TooManyFractionDigits { max: 12, .. })
        ));
        assert_eq!(
            Money::parse("12345678901234567", "EUR"),
            Err(MoneyError::Overflow)
        );
        assert!(matches!(
            Money::parse("1", "eur"),
            Err(MoneyError::UnknownCurrency(_))
        ));
    }

    #[test]
    fn rounding_is_half_away_from_zero_to_minor_unit() {
        assert_eq!(eur("0.125").round_to_minor_unit().amount(), dec!(0.13));
        assert_eq!(eur("-0.125").round_to_minor_unit().amount(), dec!(-0.13));
        assert_eq!(eur("0.124999").round_to_minor_unit().amount(), dec!(0.12));
        let yen = Money::parse("100.5", "JPY").unwrap();
        assert_eq!(yen.round_to_minor_unit().amount(), dec!(101));
    }

    #[test]
    fn minor_units_round_trip_and_refuse_unrounded() {
        let m = Money::from_minor_units(1234, Currency::EUR);
        assert_eq!(m.amount(), dec!(12.34));
        assert_eq!(m.to_minor_units(), Ok(1234));
        assert_eq!(
            Money::from_minor_units(500, Currency::JPY).amount(),
            dec!(500)
        );
        assert_eq!(eur("3.1").to_minor_units(), Ok(310));
        assert!(matches!(
            eur("3.105").to_minor_units(),
            Err(MoneyError::NotRounded { .. })
        ));
        assert_eq!(
            Money::new(Decimal::MAX, Currency::EUR).to_minor_units(),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn arithmetic_and_overflow() {
        assert_eq!(eur("1.10").checked_add(&eur("2.2")).unwrap(), eur("3.3"));
        assert_eq!(eur("1").checked_sub(&eur("2.5")).unwrap(), eur("-1.5"));
        assert_eq!(eur("1.5").checked_neg().unwrap(), eur("-1.5"));
        assert_eq!(eur("1.5").checked_mul(dec!(3)).unwrap(), eur("4.5"));
        let max = Money::new(Decimal::MAX, Currency::EUR);
        assert_eq!(max.checked_add(&eur("1")), Err(MoneyError::Overflow));
        assert_eq!(max.checked_mul(dec!(2)), Err(MoneyError::Overflow));
        assert_eq!(
            eur("1").checked_cmp(&eur("2")).unwrap(),
            std::cmp::Ordering::Less
        );
    }

    #[test]
    fn predicates_and_display() {
        assert!(Money::zero(Currency::USD).is_zero());
        assert!(!Money::new(dec!(-0), Currency::USD).is_negative());
        assert!(eur("-0.01").is_negative());
        assert!(eur("0.01").is_positive());
        assert_eq!(eur("12.34").to_string(), "12.34 EUR");
        assert_eq!(eur("5").to_string(), "5.00 EUR");
        assert_eq!(eur("0.125").to_string(), "0.125 EUR");
        assert_eq!(
            Money::from_minor_units(7, Currency::JPY).to_string(),
            "7 JPY"
        );
    }

    #[test]
    fn amount_text_always_shows_the_minor_unit_and_never_rounds() {
        assert_eq!(Money::zero(Currency::EUR).amount_text(), "0.00");
        assert_eq!(Money::new(dec!(-0), Currency::EUR).amount_text(), "0.00");
        assert_eq!(eur("0").amount_text(), "0.00");
        assert_eq!(eur("7").amount_text(), "7.00");
        assert_eq!(eur("12.5").amount_text(), "12.50");
        assert_eq!(eur("30.000").amount_text(), "30.00");
        assert_eq!(eur("-3.10").amount_text(), "-3.10");
        assert_eq!(eur("0.125").amount_text(), "0.125");
        assert_eq!(eur("0.1250").amount_text(), "0.125");
        assert_eq!(Money::zero(Currency::JPY).amount_text(), "0");
        assert_eq!(Money::new(dec!(700.0), Currency::JPY).amount_text(), "700");
    }

    fn any_currency() -> impl Strategy<Value = Currency> {
        prop::sample::select(Currency::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn add_then_sub_round_trips(a in any::<i64>(), b in any::<i64>(), c in any_currency()) {
            let a = Money::from_minor_units(a, c);
            let b = Money::from_minor_units(b, c);
            let sum = a.checked_add(&b).unwrap();
            prop_assert_eq!(sum.checked_sub(&b).unwrap(), a);
            prop_assert_eq!(a.checked_sub(&b).unwrap().checked_add(&b).unwrap(), a);
        }

        #[test]
        fn currency_mismatch_always_errors(
            a in any::<i64>(), b in any::<i64>(), c1 in any_currency(), c2 in any_currency()
        ) {
            prop_assume!(c1 != c2);
            let x = Money::from_minor_units(a, c1);
            let y = Money::from_minor_units(b, c2);
            let mismatch = MoneyError::CurrencyMismatch { left: c1, right: c2 };
            prop_assert_eq!(x.checked_add(&y), Err(mismatch.clone()));
            prop_assert_eq!(x.checked_sub(&y), Err(mismatch.clone()));
            prop_assert_eq!(x.checked_cmp(&y), Err(mismatch));
        }

        #[test]
        fn rounding_is_idempotent_and_within_half_a_minor_unit(
            mantissa in -1_000_000_000_000i64..1_000_000_000_000, scale in 0u32..12, c in any_currency()
        ) {
            let m = Money::new(Decimal::new(mantissa, scale), c);
            let r = m.round_to_minor_unit();
            prop_assert_eq!(r.round_to_minor_unit(), r);
            prop_assert!(r.to_minor_units().is_ok());
            let half = Decimal::new(5, c.minor_units() + 1);
            prop_assert!((r.amount() - m.amount()).abs() <= half);
        }
    }
}
