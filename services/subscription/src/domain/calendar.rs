//! Dates the rules fix: payment retries before suspension, the months of credits in a
//! period (C7), the trial-ending notice.

use chrono::{DateTime, Duration, Utc};
use shared::BillingInterval;

use super::DomainError;

/// Renewal payment retries: after a failure, the next attempt comes this many days later;
/// when they are used up the subscription is suspended.
pub const RETRY_AFTER_DAYS: [i64; 2] = [1, 2];

/// After `attempts` failed attempts: when to retry, or `None` to suspend.
pub fn next_retry(attempts: u32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let i = usize::try_from(attempts).ok()?.checked_sub(1)?;
    RETRY_AFTER_DAYS.get(i).map(|d| now + Duration::days(*d))
}

/// One calendar month of a period, for the monthly credit allowance (C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowanceMonth {
    /// 0-based month within the period (always 0 on monthly plans).
    pub index: u32,
    /// First instant.
    pub start: DateTime<Utc>,
    /// First instant after it: the grant expires here.
    pub end: DateTime<Utc>,
    /// Whether it is the period's last month.
    pub last: bool,
}

/// Months in one period of `interval`.
pub fn months_per_period(interval: BillingInterval) -> u32 {
    match interval {
        BillingInterval::Month => 1,
        BillingInterval::Year => 12,
    }
}

/// C7: credits that come with a subscription each month do not roll over, also on yearly
/// plans. The month of period `period_index` that holds `at`, counted from the period anchor
/// (`period_start(anchor, Month, n)`, with its end-of-month clamping); `None` when `at` is
/// outside the period.
pub fn allowance_month(
    anchor: DateTime<Utc>,
    interval: BillingInterval,
    period_index: u32,
    at: DateTime<Utc>,
) -> Result<Option<AllowanceMonth>, DomainError> {
    let per = months_per_period(interval);
    let nth = |n: u32| {
        shared::period_start(anchor, BillingInterval::Month, n)
            .map_err(|e| DomainError::Arithmetic(e.to_string()))
    };
    let base = period_index
        .checked_mul(per)
        .ok_or_else(|| DomainError::Arithmetic("period index out of range".into()))?;
    for index in 0..per {
        let start = nth(base + index)?;
        let end = nth(base + index + 1)?;
        if start <= at && at < end {
            return Ok(Some(AllowanceMonth {
                index,
                start,
                end,
                last: index + 1 == per,
            }));
        }
    }
    Ok(None)
}

/// Days before a trial's end when "trial ending" is announced.
pub const TRIAL_ENDING_NOTICE_DAYS: i64 = 3;
