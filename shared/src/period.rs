//! Billing intervals and periods.
//!
//! Period boundaries are always computed **from the anchor** (the instant
//! the subscription started), never by chaining one period end into the next
//! start: chaining would let a 31 Jan anchor drift to the 28th forever after
//! February. Days that do not exist in the target month clamp to its last
//! day; the anchor's time of day is kept.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Months, Utc};
use serde::{Deserialize, Serialize};

/// How often a subscription renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingInterval {
    /// Every calendar month from the anchor.
    Month,
    /// Every calendar year from the anchor.
    Year,
}

impl BillingInterval {
    fn months(self) -> u32 {
        match self {
            BillingInterval::Month => 1,
            BillingInterval::Year => 12,
        }
    }
}

impl fmt::Display for BillingInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BillingInterval::Month => "month",
            BillingInterval::Year => "year",
        })
    }
}

impl FromStr for BillingInterval {
    type Err = PeriodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "month" => Ok(BillingInterval::Month),
            "year" => Ok(BillingInterval::Year),
            other => Err(PeriodError::UnknownInterval(other.to_owned())),
        }
    }
}

/// Errors of period computations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    /// The interval string is neither `month` nor `year`.
    #[error("unknown billing interval `{0}` (expected `month` or `year`)")]
    UnknownInterval(String),
    /// The computed date is outside chrono's representable range.
    #[error("billing period date out of range")]
    OutOfRange,
    /// The instant precedes the subscription anchor, so no period holds it.
    #[error("{at} is before the billing anchor {anchor}")]
    BeforeAnchor {
        /// The subscription anchor.
        anchor: DateTime<Utc>,
        /// The instant asked about.
        at: DateTime<Utc>,
    },
}

/// A half-open billing period `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BillingPeriod {
    /// First instant of the period (inclusive).
    pub start: DateTime<Utc>,
    /// First instant after the period (exclusive).
    pub end: DateTime<Utc>,
}

/// Start of period `n` (0-based): `anchor` advanced `n` intervals, computed
/// from the anchor with end-of-month clamping (31 Jan -> 28/29 Feb -> 31 Mar
/// -> 30 Apr; yearly 29 Feb 2024 -> 28 Feb 2025 -> 29 Feb 2028).
pub fn period_start(
    anchor: DateTime<Utc>,
    interval: BillingInterval,
    n: u32,
) -> Result<DateTime<Utc>, PeriodError> {
    let months = n
        .checked_mul(interval.months())
        .ok_or(PeriodError::OutOfRange)?;
    // chrono clamps a non-existent day to the month's last day and keeps the time.
    anchor
        .checked_add_months(Months::new(months))
        .ok_or(PeriodError::OutOfRange)
}

/// The period of the subscription anchored at `anchor` that contains `at`.
pub fn period_containing(
    anchor: DateTime<Utc>,
    interval: BillingInterval,
    at: DateTime<Utc>,
) -> Result<BillingPeriod, PeriodError> {
    if at < anchor {
        return Err(PeriodError::BeforeAnchor { anchor, at });
    }
    // Estimate n from the calendar-month difference, then correct by at most
    // one step either way (clamping and time of day shift the boundary).
    let month_index = |d: DateTime<Utc>| i64::from(d.year()) * 12 + i64::from(d.month0());
    let months = month_index(at) - month_index(anchor);
    let estimate = months / i64::from(interval.months());
    let mut n = u32::try_from(estimate.max(0)).map_err(|_| PeriodError::OutOfRange)?;
    while n > 0 && period_start(anchor, interval, n)? > at {
        n -= 1;
    }
    loop {
        let next = n.checked_add(1).ok_or(PeriodError::OutOfRange)?;
        if period_start(anchor, interval, next)? > at {
            break;
        }
        n = next;
    }
    BillingPeriod::nth(anchor, interval, n)
}

impl BillingPeriod {
    /// Period `n` (0-based) of a subscription anchored at `anchor`.
    pub fn nth(
        anchor: DateTime<Utc>,
        interval: BillingInterval,
        n: u32,
    ) -> Result<BillingPeriod, PeriodError> {
        let next = n.checked_add(1).ok_or(PeriodError::OutOfRange)?;
        Ok(BillingPeriod {
            start: period_start(anchor, interval, n)?,
            end: period_start(anchor, interval, next)?,
        })
    }

    /// True if `start <= at < end`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && at < self.end
    }

    /// Length of the period in whole seconds (the proration denominator).
    pub fn duration_seconds(&self) -> i64 {
        (self.end - self.start).num_seconds()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike};
    use proptest::prelude::*;

    fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 30, 15).unwrap()
    }

    #[test]
    fn monthly_clamps_to_month_end_without_drifting() {
        let anchor = utc(2023, 1, 31, 9);
        let starts: Vec<_> = (0..5)
            .map(|n| period_start(anchor, BillingInterval::Month, n).unwrap())
            .collect();
        assert_eq!(
            starts,
            vec![
                utc(2023, 1, 31, 9),
                utc(2023, 2, 28, 9),
                utc(2023, 3, 31, 9),
                utc(2023, 4, 30, 9),
                utc(2023, 5, 31, 9)
            ]
        );
        let leap = period_start(utc(2024, 1, 31, 0), BillingInterval::Month, 1).unwrap();
        assert_eq!(leap, utc(2024, 2, 29, 0));
    }

    #[test]
    fn yearly_leap_day_anchor() {
        let anchor = utc(2024, 2, 29, 12);
        let y = |n| period_start(anchor, BillingInterval::Year, n).unwrap();
        assert_eq!(y(1), utc(2025, 2, 28, 12));
        assert_eq!(y(3), utc(2027, 2, 28, 12));
        assert_eq!(y(4), utc(2028, 2, 29, 12));
    }

    #[test]
    fn period_containing_finds_the_half_open_period() {
        let anchor = utc(2023, 1, 31, 9);
        let p = period_containing(anchor, BillingInterval::Month, utc(2023, 3, 15, 0)).unwrap();
        assert_eq!(
            p,
            BillingPeriod {
                start: utc(2023, 2, 28, 9),
                end: utc(2023, 3, 31, 9)
            }
        );
        // The end instant belongs to the next period.
        let q = period_containing(anchor, BillingInterval::Month, p.end).unwrap();
        assert_eq!(q.start, p.end);
        assert!(!p.contains(p.end) && p.contains(p.start));
        assert_eq!(p.duration_seconds(), 31 * 86_400);
        assert_eq!(
            period_containing(anchor, BillingInterval::Month, utc(2023, 1, 1, 0)),
            Err(PeriodError::BeforeAnchor {
                anchor,
                at: utc(2023, 1, 1, 0)
            })
        );
        let y = period_containing(anchor, BillingInterval::Year, utc(2025, 1, 31, 8)).unwrap();
        assert_eq!(
            y,
            BillingPeriod::nth(anchor, BillingInterval::Year, 1).unwrap()
        );
    }

    #[test]
    fn interval_parse_and_display() {
        assert_eq!(
            "month".parse::<BillingInterval>(),
            Ok(BillingInterval::Month)
        );
        assert_eq!(BillingInterval::Year.to_string(), "year");
        assert_eq!(
            "Monthly".parse::<BillingInterval>(),
            Err(PeriodError::UnknownInterval("Monthly".into()))
        );
        assert_eq!(
            period_start(utc(2023, 1, 1, 0), BillingInterval::Year, u32::MAX),
            Err(PeriodError::OutOfRange)
        );
    }

    fn anchor() -> impl Strategy<Value = DateTime<Utc>> {
        // 2000-01-01 .. 2100-01-01, arbitrary second of the day.
        (946_684_800i64..4_102_444_800).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
    }

    proptest! {
        #[test]
        fn period_start_is_increasing_and_clamps_to_month_end(a in anchor(), n in 1u32..600) {
            let prev = period_start(a, BillingInterval::Month, n - 1).unwrap();
            let cur = period_start(a, BillingInterval::Month, n).unwrap();
            prop_assert!(cur > prev);
            // Same time of day; the day is the anchor's day or the month's last day.
            prop_assert_eq!(cur.time(), a.time());
            let next_month_first = cur.with_day(1).unwrap().checked_add_months(Months::new(1)).unwrap();
            let last_day = next_month_first.date_naive().pred_opt().unwrap().day();
            prop_assert_eq!(cur.day(), a.day().min(last_day));
            prop_assert_eq!(cur.hour(), a.hour());
        }

        #[test]
        fn period_containing_contains_the_instant(a in anchor(), offset in 0i64..400_000_000, yearly in any::<bool>()) {
            let interval = if yearly { BillingInterval::Year } else { BillingInterval::Month };
            let at = a + chrono::Duration::seconds(offset);
            let p = period_containing(a, interval, at).unwrap();
            prop_assert!(p.contains(at));
            prop_assert!(p.duration_seconds() > 0);
        }
    }
}
