//! Who pays for a customer's send, and what a partner bills its customers (rules W1-W5).
//! Pure functions and plain types: no IO.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use shared::{Money, TierTable};

/// Who pays for a customer's sends (W1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingMode {
    /// The partner's main wallet (W2): the platform stays invisible to the customer.
    PartnerPays,
    /// The customer's own wallet.
    CustomerPays,
}

/// How a partner's main wallet is funded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Funding {
    /// Credits bought in advance (W3).
    Prepaid,
    /// Each send charged to the partner's card or bank account (W5).
    OnDemand,
}

/// Whose wallet a send was paid from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payer {
    /// The partner's main wallet.
    Partner,
    /// The customer's own wallet.
    Customer,
}

/// Longest id the credits-wallet service accepts for a wallet (the suite's id bound).
pub const MAX_WALLET_ID_LEN: usize = shared::limits::MAX_ID_LEN;
/// Longest partner id: its main wallet `partner:<partner_id>` and its customers' wallets
/// `customer:<partner_id>:<customer_id>` fit the wallet service's ids.
pub const MAX_PARTNER_ID_LEN: usize = 48;
/// Longest customer id (see [`MAX_PARTNER_ID_LEN`]).
pub const MAX_CUSTOMER_ID_LEN: usize = 64;
/// Longest partner id a call may name: partners registered before the bound above (whose
/// main wallet `partner:<id>` had to fit the wallet's ids) stay addressable.
pub const MAX_EXISTING_PARTNER_ID_LEN: usize = MAX_WALLET_ID_LEN - "partner:".len();
/// Longest customer id a call may name: customers added before the bound above (whose wallet
/// `customer:<id>` had to fit the wallet's ids) stay addressable.
pub const MAX_EXISTING_CUSTOMER_ID_LEN: usize = MAX_WALLET_ID_LEN - "customer:".len();
/// Longest mailing or reservation id (the suite's id bound, as at the wallet service).
pub const MAX_REFERENCE_ID_LEN: usize = shared::limits::MAX_ID_LEN;
/// Most credits one request may move or cap (AllocateCredits, SetCustomerLimit): the suite's
/// bound, 10^12.
pub const MAX_CREDITS: i64 = shared::limits::MAX_CREDITS;
/// Most recipients of one mailing (ChargeMailing, ReserveMailing, CaptureMailing).
pub const MAX_RECIPIENTS: u64 = shared::limits::MAX_RECIPIENTS;

const _: () =
    assert!("customer:".len() + MAX_PARTNER_ID_LEN + 1 + MAX_CUSTOMER_ID_LEN <= MAX_WALLET_ID_LEN);

/// The wallet id of a partner's main wallet in the credits-wallet service.
pub fn partner_wallet_id(partner_id: &str) -> String {
    format!("partner:{partner_id}")
}

/// The wallet id of a customer's own wallet. A customer is its partner's (customer ids are
/// each partner's own), so its wallet id names both; ids hold no ':', so two never meet.
pub fn customer_wallet_id(partner_id: &str, customer_id: &str) -> String {
    format!("customer:{partner_id}:{customer_id}")
}

/// A customer's identity, one text: `<partner_id>:<customer_id>` (its row's key, and the order
/// in which a transaction locks several customers).
pub fn customer_key(partner_id: &str, customer_id: &str) -> String {
    format!("{partner_id}:{customer_id}")
}

/// W1/W2: partner-pays sends are paid by the partner's main wallet at once, customer-pays sends
/// by the customer's own wallet (`own_wallet` as recorded; a customer added before customer ids
/// were per partner keeps its `customer:<customer_id>`). The mode in force when the send is
/// routed decides.
pub fn route(
    mode: BillingMode,
    partner_id: &str,
    customer_id: &str,
    own_wallet: &str,
) -> (Payer, String) {
    match mode {
        BillingMode::PartnerPays => (Payer::Partner, partner_wallet_id(partner_id)),
        BillingMode::CustomerPays if own_wallet.is_empty() => {
            (Payer::Customer, customer_wallet_id(partner_id, customer_id))
        }
        BillingMode::CustomerPays => (Payer::Customer, own_wallet.to_string()),
    }
}

/// A partner's monthly cap on one customer's use of its credits was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "customer limit reached: {used} of {limit} partner credits used this month, this send needs {needed}"
)]
pub struct LimitReached {
    /// The cap.
    pub limit: i64,
    /// Used so far this month.
    pub used: i64,
    /// This send.
    pub needed: i64,
}

/// Whether a partner-pays send of `needed` credits fits under the customer's monthly cap
/// (`limit` 0 = no cap); protects a partner from one runaway customer.
pub fn check_limit(limit: i64, used: i64, needed: i64) -> Result<(), LimitReached> {
    if limit > 0 && used.saturating_add(needed) > limit {
        return Err(LimitReached {
            limit,
            used,
            needed,
        });
    }
    Ok(())
}

/// The calendar month (UTC) holding `at`: `[start, end)`.
pub fn month_of(at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    month(at.year(), at.month()).unwrap_or((at, at))
}

/// The calendar month `year`-`month` (UTC) as `[start, end)`, if it is a real month.
pub fn month(year: i32, month: u32) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let start = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single()?;
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let end = Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).single()?;
    Some((start, end))
}

/// One customer's use in a month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sends (charges and captured holds).
    pub mailings: i64,
    /// Their recipients.
    pub recipients: i64,
    /// Credits paid by the partner.
    pub partner_paid: i64,
    /// Credits paid by the customer.
    pub customer_paid: i64,
}

impl Usage {
    /// All credits used.
    pub fn credits(&self) -> i64 {
        self.partner_paid + self.customer_paid
    }
}

/// What a partner bills a customer for a month (W1: the white-label partner invoices its
/// customers itself): the partner's resale price list applied to the credits the customer used,
/// rounded once to the minor unit.
pub fn resale_amount(prices: &TierTable, usage: &Usage) -> Result<Money, shared::TierError> {
    let credits = u64::try_from(usage.credits()).unwrap_or(0);
    Ok(prices.price(credits)?.round_to_minor_unit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use shared::{Currency, Tier, TierMode};

    // rule W1
    #[test]
    fn w1_the_billing_mode_decides_whose_wallet_pays() {
        assert_eq!(
            route(BillingMode::PartnerPays, "p1", "c1", "customer:p1:c1"),
            (Payer::Partner, "partner:p1".to_string())
        );
        assert_eq!(
            route(BillingMode::CustomerPays, "p1", "c1", ""),
            (Payer::Customer, "customer:p1:c1".to_string())
        );
        // A customer's wallet as recorded (one opened before ids were per partner).
        assert_eq!(
            route(BillingMode::CustomerPays, "p1", "c1", "customer:c1"),
            (Payer::Customer, "customer:c1".to_string())
        );
    }

    #[test]
    fn the_monthly_limit_allows_up_to_the_cap_and_not_beyond() {
        assert!(check_limit(0, 1_000_000, 5).is_ok(), "0 means no cap");
        assert!(check_limit(10_000, 5_000, 5_000).is_ok());
        let err = check_limit(10_000, 5_000, 5_001).unwrap_err();
        assert_eq!(err.used, 5_000);
        assert!(err.to_string().contains("10000"));
    }

    #[test]
    fn months_are_calendar_months_in_utc() {
        let (start, end) = month(2026, 12).unwrap();
        assert_eq!(start.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(end.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert!(month(2026, 13).is_none());
        let at = Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap();
        assert_eq!(month_of(at).1.to_rfc3339(), "2024-03-01T00:00:00+00:00");
    }

    #[test]
    fn resale_amounts_use_the_partners_price_list_rounded_once() {
        let prices = TierTable::new(
            TierMode::Graduated,
            Currency::EUR,
            vec![
                Tier {
                    first: 1,
                    last: Some(10_000),
                    unit_price: dec!(0.0125),
                    flat_price: dec!(0),
                },
                Tier {
                    first: 10_001,
                    last: None,
                    unit_price: dec!(0.01),
                    flat_price: dec!(0),
                },
            ],
        )
        .unwrap();
        let usage = Usage {
            mailings: 2,
            recipients: 12_000,
            partner_paid: 12_001,
            customer_paid: 0,
        };
        // 10,000 * 0.0125 + 2,001 * 0.01 = 125.00 + 20.01
        assert_eq!(
            resale_amount(&prices, &usage).unwrap().to_string(),
            "145.01 EUR"
        );
    }
}
