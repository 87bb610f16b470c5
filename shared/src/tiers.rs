//! Tier tables: contact-based plan prices (rule S3) and volume prices for
//! credit purchases (rule C1), plus the contact slider (rules S3/S9).
//!
//! # Bands and quantity 0
//!
//! Bands are inclusive `[first, last]`; only the last band may be unbounded
//! (`last: None`). The first band must start at 0 or 1, and bands must be
//! contiguous. Quantity 0 costs zero in `Volume` and `Graduated` mode (there
//! is no unit to charge). In `FlatPerBand` mode it costs the first band's
//! flat price if that band starts at 0 (a "free up to N" or base-fee plan),
//! and zero if it starts at 1.
//!
//! # Monotonicity
//!
//! A larger quantity must never cost less. Graduated tables with
//! non-negative prices are monotone by construction; for `Volume` and
//! `FlatPerBand`, [`TierTable::new`] checks each band boundary and rejects
//! a table where crossing into the next band makes the total drop.
//!
//! [`TierTable::price`] returns the exact, **unrounded** total; callers round
//! once with [`Money::round_to_minor_unit`].

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::currency::Currency;
use crate::money::Money;

/// How a quantity is priced against the bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// The total is the flat price of the band holding the quantity (S3 contact tiers).
    FlatPerBand,
    /// Every unit costs the unit price of the band holding the total
    /// quantity, plus that band's flat price (C1 credit packs).
    Volume,
    /// Each unit costs the unit price of the band it falls in, plus the flat
    /// price of every band reached.
    Graduated,
}

/// One band of a tier table, with inclusive bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// First quantity of the band (inclusive).
    pub first: u64,
    /// Last quantity of the band (inclusive); `None` = unbounded (last band only).
    pub last: Option<u64>,
    /// Price per unit (exact, may have more decimals than the minor unit).
    pub unit_price: Decimal,
    /// Fixed price of the band.
    pub flat_price: Decimal,
}

impl Tier {
    fn contains(&self, quantity: u64) -> bool {
        quantity >= self.first && self.last.is_none_or(|last| quantity <= last)
    }
}

/// Errors of tier tables and the contact slider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// A table needs at least one band.
    #[error("tier table has no bands")]
    Empty,
    /// The first band must start at 0 or 1.
    #[error("the first band must start at 0 or 1, got {first}")]
    FirstBandStart {
        /// The offending start.
        first: u64,
    },
    /// A band ends before it starts.
    #[error("band {band} ends ({last}) before it starts ({first})")]
    InvertedBand {
        /// Index of the band.
        band: usize,
        /// Its first quantity.
        first: u64,
        /// Its last quantity.
        last: u64,
    },
    /// Only the last band may be unbounded.
    #[error("band {band} is unbounded but is not the last band")]
    UnboundedNotLast {
        /// Index of the band.
        band: usize,
    },
    /// A band does not start after the previous one.
    #[error("band {band} starts at {first}, not after the previous band's start {previous_first}")]
    NotSorted {
        /// Index of the band.
        band: usize,
        /// Its first quantity.
        first: u64,
        /// The previous band's first quantity.
        previous_first: u64,
    },
    /// A band starts inside the previous band.
    #[error(
        "bands overlap: the previous band ends at {previous_last} but the next starts at {next_first}"
    )]
    Overlap {
        /// Last quantity of the earlier band.
        previous_last: u64,
        /// First quantity of the later band.
        next_first: u64,
    },
    /// Quantities between two bands are not covered.
    #[error("gap in bands: nothing covers the quantities after {after} and before {next_first}")]
    Gap {
        /// Last quantity of the earlier band.
        after: u64,
        /// First quantity of the later band.
        next_first: u64,
    },
    /// Prices must not be negative (nor `-0`).
    #[error("band {band} has a negative price")]
    NegativePrice {
        /// Index of the band.
        band: usize,
    },
    /// More bands than [`crate::limits::MAX_TIERS`].
    #[error("{count} bands exceed the limit of {max}")]
    TooManyBands {
        /// Bands given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A price above [`crate::limits::MAX_PRICE`].
    #[error("band {band}'s {price} {value} is above the largest price {max}")]
    PriceTooLarge {
        /// Index of the band.
        band: usize,
        /// `unit_price` or `flat_price`.
        price: &'static str,
        /// The price.
        value: Decimal,
        /// The limit.
        max: Decimal,
    },
    /// A price finer than allowed: a unit price beyond
    /// [`crate::limits::MAX_UNIT_PRICE_DECIMALS`], a flat price beyond the currency's minor unit.
    #[error("band {band}'s {price} {value} has more than {max} decimals")]
    PriceTooPrecise {
        /// Index of the band.
        band: usize,
        /// `unit_price` or `flat_price`.
        price: &'static str,
        /// The price.
        value: Decimal,
        /// Most decimals allowed.
        max: u32,
    },
    /// A slider beyond [`crate::limits::MAX_CONTACTS`].
    #[error("slider maximum {max} is above the largest plan size {limit}")]
    SliderTooLarge {
        /// Slider maximum.
        max: u64,
        /// The limit.
        limit: u64,
    },
    /// Entering the band starting at `at` would make the total drop.
    #[error("tier table is not monotone: quantity {at} costs less than quantity {}", at.saturating_sub(1))]
    NotMonotone {
        /// First quantity of the cheaper band.
        at: u64,
    },
    /// The quantity is beyond the last (bounded) band.
    #[error("quantity {quantity} is above the table maximum {max}")]
    QuantityAboveTable {
        /// The requested quantity.
        quantity: u64,
        /// The last quantity the table prices.
        max: u64,
    },
    /// A total does not fit in a `Decimal`.
    #[error("tier price out of range")]
    Overflow,
    /// The slider step must be positive.
    #[error("slider step must be greater than zero")]
    SliderZeroStep,
    /// The slider minimum must be positive.
    #[error("slider minimum must be greater than zero")]
    SliderZeroMin,
    /// The slider maximum is below its minimum.
    #[error("slider maximum {max} is below its minimum {min}")]
    SliderMaxBelowMin {
        /// Slider minimum.
        min: u64,
        /// Slider maximum.
        max: u64,
    },
    /// `max - min` is not a multiple of the step, so `max` is unreachable.
    #[error("slider range {min}..={max} is not a whole number of steps of {step}")]
    SliderMisaligned {
        /// Slider minimum.
        min: u64,
        /// Slider maximum.
        max: u64,
        /// Slider step.
        step: u64,
    },
    /// More contacts than the largest slider position.
    #[error("{contacts} contacts exceed the largest plan size {max}")]
    AboveSliderMax {
        /// The contact count.
        contacts: u64,
        /// The slider maximum.
        max: u64,
    },
}

/// A validated tier table (see the module docs for the rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TierTableSpec")]
pub struct TierTable {
    mode: TierMode,
    currency: Currency,
    tiers: Vec<Tier>,
}

/// Unvalidated shape used to deserialize a [`TierTable`] through [`TierTable::new`].
#[derive(Deserialize)]
struct TierTableSpec {
    mode: TierMode,
    currency: Currency,
    tiers: Vec<Tier>,
}

impl TryFrom<TierTableSpec> for TierTable {
    type Error = TierError;

    fn try_from(spec: TierTableSpec) -> Result<Self, Self::Error> {
        // A stored table keeps its shape checks but not the input limits, so that a table
        // stored before a limit was tightened stays readable.
        TierTable::shaped(spec.mode, spec.currency, spec.tiers)
    }
}

fn mul_add(quantity: u64, unit: Decimal, add: Decimal) -> Result<Decimal, TierError> {
    Decimal::from(quantity)
        .checked_mul(unit)
        .and_then(|d| d.checked_add(add))
        .ok_or(TierError::Overflow)
}

impl TierTable {
    /// Validates and builds a table (S3/C1). Checks, in order: at most
    /// [`crate::limits::MAX_TIERS`] bands, prices not negative (nor `-0`), at most
    /// [`crate::limits::MAX_PRICE`], unit prices with at most
    /// [`crate::limits::MAX_UNIT_PRICE_DECIMALS`] decimals and flat prices no finer than the
    /// currency's minor unit; then non-empty,
    /// first band starts at 0 or 1, no negative prices, no inverted band,
    /// only the last band unbounded, bands sorted/contiguous, and (for
    /// `Volume` and `FlatPerBand`) monotone totals across band boundaries.
    pub fn new(
        mode: TierMode,
        currency: Currency,
        tiers: Vec<Tier>,
    ) -> Result<TierTable, TierError> {
        use crate::limits::{MAX_PRICE, MAX_TIERS, MAX_UNIT_PRICE_DECIMALS};
        if tiers.len() > MAX_TIERS {
            return Err(TierError::TooManyBands {
                count: tiers.len(),
                max: MAX_TIERS,
            });
        }
        for (band, tier) in tiers.iter().enumerate() {
            let prices = [
                ("unit_price", tier.unit_price, MAX_UNIT_PRICE_DECIMALS),
                ("flat_price", tier.flat_price, currency.minor_units()),
            ];
            for (price, value, decimals) in prices {
                if value.is_sign_negative() {
                    return Err(TierError::NegativePrice { band });
                }
                if value > MAX_PRICE {
                    return Err(TierError::PriceTooLarge {
                        band,
                        price,
                        value,
                        max: MAX_PRICE,
                    });
                }
                if value.normalize().scale() > decimals {
                    return Err(TierError::PriceTooPrecise {
                        band,
                        price,
                        value,
                        max: decimals,
                    });
                }
            }
        }
        TierTable::shaped(mode, currency, tiers)
    }

    /// [`TierTable::new`] without the input limits: the shape rules only.
    fn shaped(
        mode: TierMode,
        currency: Currency,
        tiers: Vec<Tier>,
    ) -> Result<TierTable, TierError> {
        let first = tiers.first().ok_or(TierError::Empty)?;
        if first.first > 1 {
            return Err(TierError::FirstBandStart { first: first.first });
        }
        for (band, tier) in tiers.iter().enumerate() {
            if tier.unit_price < Decimal::ZERO || tier.flat_price < Decimal::ZERO {
                return Err(TierError::NegativePrice { band });
            }
            match tier.last {
                Some(last) if last < tier.first => {
                    return Err(TierError::InvertedBand {
                        band,
                        first: tier.first,
                        last,
                    });
                }
                None if band + 1 != tiers.len() => {
                    return Err(TierError::UnboundedNotLast { band });
                }
                _ => {}
            }
        }
        for (band, pair) in tiers.windows(2).enumerate().map(|(i, p)| (i + 1, p)) {
            let (prev, next) = (&pair[0], &pair[1]);
            // Only the last band may be unbounded, checked above.
            let previous_last = prev
                .last
                .ok_or(TierError::UnboundedNotLast { band: band - 1 })?;
            if next.first <= prev.first {
                return Err(TierError::NotSorted {
                    band,
                    first: next.first,
                    previous_first: prev.first,
                });
            }
            if next.first <= previous_last {
                return Err(TierError::Overlap {
                    previous_last,
                    next_first: next.first,
                });
            }
            if previous_last.checked_add(1) != Some(next.first) {
                return Err(TierError::Gap {
                    after: previous_last,
                    next_first: next.first,
                });
            }
        }
        let table = TierTable {
            mode,
            currency,
            tiers,
        };
        if mode != TierMode::Graduated {
            // Totals are non-decreasing inside a band (non-negative unit
            // price, or constant for FlatPerBand), so checking every boundary
            // makes the whole table monotone.
            for pair in table.tiers.windows(2) {
                // Unreachable: only the last band may be unbounded, checked above.
                let previous_last = pair[0]
                    .last
                    .ok_or(TierError::UnboundedNotLast { band: 0 })?;
                let at = pair[1].first;
                if table.exact_total(at)? < table.exact_total(previous_last)? {
                    return Err(TierError::NotMonotone { at });
                }
            }
        }
        Ok(table)
    }

    /// The pricing mode.
    pub fn mode(&self) -> TierMode {
        self.mode
    }

    /// The currency of every price in the table.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The bands, sorted and contiguous.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The largest quantity the table prices (`None` if the last band is unbounded).
    pub fn max_quantity(&self) -> Option<u64> {
        self.tiers.last().and_then(|t| t.last)
    }

    fn check_in_range(&self, quantity: u64) -> Result<(), TierError> {
        match self.max_quantity() {
            Some(max) if quantity > max => Err(TierError::QuantityAboveTable { quantity, max }),
            _ => Ok(()),
        }
    }

    fn band_for(&self, quantity: u64) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.contains(quantity))
    }

    /// Exact total of an in-range quantity (S3 / C1 pricing rules).
    fn exact_total(&self, quantity: u64) -> Result<Decimal, TierError> {
        match self.mode {
            // No band holds 0 when the table starts at 1: quantity 0 is free.
            TierMode::FlatPerBand => Ok(self
                .band_for(quantity)
                .map_or(Decimal::ZERO, |t| t.flat_price)),
            TierMode::Volume => match self.band_for(quantity) {
                Some(t) if quantity > 0 => mul_add(quantity, t.unit_price, t.flat_price),
                _ => Ok(Decimal::ZERO),
            },
            TierMode::Graduated => {
                let mut total = Decimal::ZERO;
                for t in &self.tiers {
                    // Units are numbered from 1, so a band starting at 0 holds no unit 0.
                    let lo = t.first.max(1);
                    if quantity < lo {
                        break;
                    }
                    let hi = t.last.map_or(quantity, |last| last.min(quantity));
                    if hi < lo {
                        continue; // a [0, 0] band holds no unit and is never "reached"
                    }
                    let units = hi - lo + 1;
                    total = total
                        .checked_add(mul_add(units, t.unit_price, t.flat_price)?)
                        .ok_or(TierError::Overflow)?;
                }
                Ok(total)
            }
        }
    }

    /// The exact, unrounded total for `quantity` (round once with
    /// [`Money::round_to_minor_unit`]).
    pub fn price(&self, quantity: u64) -> Result<Money, TierError> {
        self.check_in_range(quantity)?;
        Ok(Money::new(self.exact_total(quantity)?, self.currency))
    }

    /// The unit price of the band holding `quantity` (quantity 0 below a
    /// table starting at 1 reports the first band), for quotes.
    pub fn unit_price_at(&self, quantity: u64) -> Result<Decimal, TierError> {
        self.check_in_range(quantity)?;
        let first = self.tiers.first().map_or(0, |t| t.first);
        self.band_for(quantity.max(first))
            .map(|t| t.unit_price)
            .ok_or(TierError::Empty)
    }
}

/// The plan-size slider of the pricing page (S3/S9), e.g. 1,000..=50,000 contacts by 1,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContactSlider {
    min: u64,
    max: u64,
    step: u64,
}

impl ContactSlider {
    /// Builds a slider; `step > 0`, `min > 0`, `max >= min` and `max` reachable from `min`.
    pub fn new(min: u64, max: u64, step: u64) -> Result<ContactSlider, TierError> {
        if step == 0 {
            return Err(TierError::SliderZeroStep);
        }
        if min == 0 {
            return Err(TierError::SliderZeroMin);
        }
        if max < min {
            return Err(TierError::SliderMaxBelowMin { min, max });
        }
        if max > crate::limits::MAX_CONTACTS {
            return Err(TierError::SliderTooLarge {
                max,
                limit: crate::limits::MAX_CONTACTS,
            });
        }
        if !(max - min).is_multiple_of(step) {
            return Err(TierError::SliderMisaligned { min, max, step });
        }
        Ok(ContactSlider { min, max, step })
    }

    /// Smallest position.
    pub fn min(&self) -> u64 {
        self.min
    }

    /// Largest position.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Distance between positions.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The lowest slider position that holds `contacts` (S9: a contact list
    /// needs a plan at least its size; 0 contacts still needs the smallest plan).
    pub fn tier_for(&self, contacts: u64) -> Result<u64, TierError> {
        if contacts > self.max {
            return Err(TierError::AboveSliderMax {
                contacts,
                max: self.max,
            });
        }
        if contacts <= self.min {
            return Ok(self.min);
        }
        (contacts - self.min)
            .div_ceil(self.step)
            .checked_mul(self.step)
            .and_then(|offset| offset.checked_add(self.min))
            .ok_or(TierError::Overflow)
    }

    /// True if `value` is one of the slider positions.
    pub fn contains(&self, value: u64) -> bool {
        value >= self.min && value <= self.max && (value - self.min).is_multiple_of(self.step)
    }

    /// All positions, ascending.
    pub fn positions(&self) -> impl Iterator<Item = u64> + use<> {
        let (max, step) = (self.max, self.step);
        std::iter::successors(Some(self.min), move |&v| {
            v.checked_add(step).filter(|&n| n <= max)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn tier(first: u64, last: Option<u64>, unit: Decimal, flat: Decimal) -> Tier {
        Tier {
            first,
            last,
            unit_price: unit,
            flat_price: flat,
        }
    }

    fn eur(table: &TierTable, q: u64) -> Decimal {
        table.price(q).unwrap().amount()
    }

    #[test]
    fn flat_per_band_contact_tiers_s3() {
        let t = TierTable::new(
            TierMode::FlatPerBand,
            Currency::EUR,
            vec![
                tier(1, Some(1_000), dec!(0), dec!(9)),
                tier(1_001, Some(5_000), dec!(0), dec!(29)),
                tier(5_001, Some(50_000), dec!(0), dec!(99)),
            ],
        )
        .unwrap();
        assert_eq!(eur(&t, 0), dec!(0));
        assert_eq!(eur(&t, 1_000), dec!(9));
        assert_eq!(eur(&t, 1_001), dec!(29));
        assert_eq!(eur(&t, 50_000), dec!(99));
        assert_eq!(
            t.price(50_001),
            Err(TierError::QuantityAboveTable {
                quantity: 50_001,
                max: 50_000
            })
        );
        assert_eq!(t.max_quantity(), Some(50_000));
    }

    #[test]
    fn volume_credit_prices_c1() {
        let t = TierTable::new(
            TierMode::Volume,
            Currency::EUR,
            vec![
                tier(1, Some(9_999), dec!(0.02), dec!(0)),
                tier(10_000, Some(99_999), dec!(0.015), dec!(50)),
                tier(100_000, None, dec!(0.0125), dec!(300)),
            ],
        )
        .unwrap();
        assert_eq!(eur(&t, 0), dec!(0));
        assert_eq!(eur(&t, 5_000), dec!(100));
        assert_eq!(eur(&t, 10_000), dec!(200));
        assert_eq!(eur(&t, 100_000), dec!(1550));
        assert_eq!(eur(&t, 1_000_001), dec!(12800.0125), "exact, unrounded");
        assert_eq!(t.unit_price_at(0).unwrap(), dec!(0.02));
        assert_eq!(t.unit_price_at(20_000).unwrap(), dec!(0.015));
    }

    #[test]
    fn graduated_charges_each_band() {
        let t = TierTable::new(
            TierMode::Graduated,
            Currency::USD,
            vec![
                tier(0, Some(100), dec!(1), dec!(0)),
                tier(101, None, dec!(0.5), dec!(5)),
            ],
        )
        .unwrap();
        assert_eq!(eur(&t, 0), dec!(0));
        assert_eq!(eur(&t, 100), dec!(100));
        assert_eq!(eur(&t, 101), dec!(105.5));
        assert_eq!(eur(&t, 150), dec!(130));
        assert_eq!(t.price(150).unwrap().currency(), Currency::USD);
    }

    #[test]
    fn validation_errors() {
        let e = |mode, tiers| TierTable::new(mode, Currency::EUR, tiers).unwrap_err();
        let v = TierMode::Volume;
        assert_eq!(e(v, vec![]), TierError::Empty);
        assert_eq!(
            e(v, vec![tier(2, None, dec!(1), dec!(0))]),
            TierError::FirstBandStart { first: 2 }
        );
        assert_eq!(
            e(v, vec![tier(1, Some(0), dec!(1), dec!(0))]),
            TierError::InvertedBand {
                band: 0,
                first: 1,
                last: 0
            }
        );
        assert_eq!(
            e(
                v,
                vec![
                    tier(1, None, dec!(1), dec!(0)),
                    tier(5, None, dec!(1), dec!(0))
                ]
            ),
            TierError::UnboundedNotLast { band: 0 }
        );
        assert_eq!(
            e(v, vec![tier(1, Some(10), dec!(-1), dec!(0))]),
            TierError::NegativePrice { band: 0 }
        );
        assert_eq!(
            e(
                v,
                vec![
                    tier(1, Some(10), dec!(1), dec!(0)),
                    tier(12, None, dec!(1), dec!(0))
                ]
            ),
            TierError::Gap {
                after: 10,
                next_first: 12
            }
        );
        assert_eq!(
            e(
                v,
                vec![
                    tier(1, Some(10), dec!(1), dec!(0)),
                    tier(5, None, dec!(1), dec!(0))
                ]
            ),
            TierError::Overlap {
                previous_last: 10,
                next_first: 5
            }
        );
        assert_eq!(
            e(
                v,
                vec![
                    tier(1, Some(10), dec!(1), dec!(0)),
                    tier(1, None, dec!(1), dec!(0))
                ]
            ),
            TierError::NotSorted {
                band: 1,
                first: 1,
                previous_first: 1
            }
        );
        // 1,000 units at 0.02 = 20 but 1,001 at 0.01 = 10.01: a volume cliff.
        assert_eq!(
            e(
                v,
                vec![
                    tier(1, Some(1_000), dec!(0.02), dec!(0)),
                    tier(1_001, None, dec!(0.01), dec!(0))
                ]
            ),
            TierError::NotMonotone { at: 1_001 }
        );
        assert_eq!(
            e(
                TierMode::FlatPerBand,
                vec![
                    tier(1, Some(10), dec!(0), dec!(5)),
                    tier(11, None, dec!(0), dec!(4))
                ]
            ),
            TierError::NotMonotone { at: 11 }
        );
        // The same prices are fine when graduated.
        assert!(
            TierTable::new(
                TierMode::Graduated,
                Currency::EUR,
                vec![
                    tier(1, Some(1_000), dec!(0.02), dec!(0)),
                    tier(1_001, None, dec!(0.01), dec!(0))
                ]
            )
            .is_ok()
        );
    }

    #[test]
    fn huge_quantities_overflow_cleanly() {
        // Beyond the input limits (MAX_PRICE), as a stored table may be: still no panic.
        assert!(matches!(
            TierTable::new(
                TierMode::Volume,
                Currency::EUR,
                vec![tier(1, None, Decimal::MAX, dec!(0))],
            ),
            Err(TierError::PriceTooLarge { .. })
        ));
        let t = TierTable::shaped(
            TierMode::Volume,
            Currency::EUR,
            vec![tier(1, None, Decimal::MAX, dec!(0))],
        )
        .unwrap();
        assert_eq!(t.price(u64::MAX), Err(TierError::Overflow));
    }

    #[test]
    fn contact_slider_s9() {
        let s = ContactSlider::new(1_000, 50_000, 1_000).unwrap();
        assert_eq!(s.tier_for(0), Ok(1_000));
        assert_eq!(s.tier_for(1_000), Ok(1_000));
        assert_eq!(s.tier_for(1_001), Ok(2_000));
        assert_eq!(s.tier_for(27_001), Ok(28_000));
        assert_eq!(s.tier_for(50_000), Ok(50_000));
        assert_eq!(
            s.tier_for(50_001),
            Err(TierError::AboveSliderMax {
                contacts: 50_001,
                max: 50_000
            })
        );
        assert!(s.contains(28_000));
        assert!(!s.contains(28_001));
        assert!(!s.contains(51_000));
        assert_eq!(s.positions().count(), 50);
        assert_eq!(s.positions().last(), Some(50_000));
        assert_eq!(ContactSlider::new(1, 10, 0), Err(TierError::SliderZeroStep));
        assert_eq!(ContactSlider::new(0, 10, 1), Err(TierError::SliderZeroMin));
        assert_eq!(
            ContactSlider::new(10, 5, 1),
            Err(TierError::SliderMaxBelowMin { min: 10, max: 5 })
        );
        assert_eq!(
            ContactSlider::new(1_000, 50_500, 1_000),
            Err(TierError::SliderMisaligned {
                min: 1_000,
                max: 50_500,
                step: 1_000
            })
        );
        // Beyond MAX_CONTACTS the constructor refuses; the arithmetic still holds there.
        assert!(matches!(
            ContactSlider::new(u64::MAX - 10, u64::MAX - 1, 9),
            Err(TierError::SliderTooLarge { .. })
        ));
        let near_max = ContactSlider {
            min: u64::MAX - 10,
            max: u64::MAX - 1,
            step: 9,
        };
        assert_eq!(
            near_max.positions().collect::<Vec<_>>(),
            vec![u64::MAX - 10, u64::MAX - 1]
        );
    }

    /// Random band layout: (start 0 or 1, [(width, unit cents, flat cents)], unbounded last).
    fn layout() -> impl Strategy<Value = (u64, Vec<(u64, i64, i64)>, bool)> {
        (
            0u64..=1,
            prop::collection::vec((1u64..40, 0i64..500, 0i64..5_000), 1..6),
            any::<bool>(),
        )
    }

    fn build(start: u64, bands: &[(u64, i64, i64)], unbounded: bool) -> Vec<Tier> {
        let mut first = start;
        let mut tiers = Vec::new();
        for (i, &(width, unit, flat)) in bands.iter().enumerate() {
            let last = first + width - 1;
            let open = unbounded && i + 1 == bands.len();
            tiers.push(tier(
                first,
                (!open).then_some(last),
                Decimal::new(unit, 2),
                Decimal::new(flat, 2),
            ));
            first = last + 1;
        }
        tiers
    }

    fn any_mode() -> impl Strategy<Value = TierMode> {
        prop::sample::select(vec![
            TierMode::FlatPerBand,
            TierMode::Volume,
            TierMode::Graduated,
        ])
    }

    proptest! {
        #[test]
        fn totals_are_monotone_in_quantity_for_valid_tables(
            mode in any_mode(), (start, bands, unbounded) in layout(), repair in any::<bool>()
        ) {
            let mut tiers = build(start, &bands, unbounded);
            if repair {
                // Raise flat prices just enough that each boundary is monotone,
                // so about half the cases are valid Volume/FlatPerBand tables.
                for i in 1..tiers.len() {
                    let prev_last = tiers[i - 1].last.unwrap();
                    let prev_total = match mode {
                        TierMode::Volume => Decimal::from(prev_last) * tiers[i - 1].unit_price + tiers[i - 1].flat_price,
                        _ => tiers[i - 1].flat_price,
                    };
                    let own = match mode {
                        TierMode::Volume => Decimal::from(tiers[i].first) * tiers[i].unit_price,
                        _ => Decimal::ZERO,
                    };
                    tiers[i].flat_price = tiers[i].flat_price.max(prev_total - own);
                }
            }
            let table = match TierTable::new(mode, Currency::EUR, tiers) {
                Ok(t) => t,
                Err(e) => {
                    prop_assert!(!repair && mode != TierMode::Graduated, "valid layout rejected: {}", e);
                    prop_assert!(matches!(e, TierError::NotMonotone { .. }), "unexpected {:?}", e);
                    return Ok(());
                }
            };
            let max = table.max_quantity().unwrap_or(250);
            let mut previous = Decimal::ZERO;
            for q in 0..=max {
                let total = table.price(q).unwrap().amount();
                prop_assert!(total >= previous, "price({}) = {} < price({}) = {}", q, total, q - 1, previous);
                previous = total;
            }
        }

        #[test]
        fn validation_rejects_gaps_and_overlaps_with_the_right_variant(
            mode in any_mode(), (start, bands, unbounded) in layout(),
            pick in any::<prop::sample::Index>(), shift in 1u64..50, overlap in any::<bool>()
        ) {
            prop_assume!(bands.len() >= 2);
            let mut tiers = build(start, &bands, unbounded);
            let i = 1 + pick.index(tiers.len() - 1);
            let (prev_first, prev_last) = (tiers[i - 1].first, tiers[i - 1].last.unwrap());
            let expected = if overlap {
                let next_first = (prev_last + 1).saturating_sub(shift);
                tiers[i].first = next_first;
                if next_first <= prev_first {
                    TierError::NotSorted { band: i, first: next_first, previous_first: prev_first }
                } else {
                    TierError::Overlap { previous_last: prev_last, next_first }
                }
            } else {
                tiers[i].first += shift;
                tiers[i].last = tiers[i].last.map(|l| l + shift);
                // Keep the following bands contiguous so only one defect exists.
                for t in tiers.iter_mut().skip(i + 1) {
                    t.first += shift;
                    t.last = t.last.map(|l| l + shift);
                }
                TierError::Gap { after: prev_last, next_first: tiers[i].first }
            };
            prop_assert_eq!(TierTable::new(mode, Currency::EUR, tiers), Err(expected));
        }

        #[test]
        fn slider_tier_is_the_smallest_position_holding_the_contacts(contacts in 0u64..60_000) {
            let s = ContactSlider::new(1_000, 50_000, 1_000).unwrap();
            match s.tier_for(contacts) {
                Ok(t) => {
                    prop_assert!(s.contains(t) && t >= contacts);
                    prop_assert!(t == s.min() || t - s.step() < contacts);
                }
                Err(e) => prop_assert_eq!(e, TierError::AboveSliderMax { contacts, max: 50_000 }),
            }
        }
    }
}
